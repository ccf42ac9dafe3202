"""Shared fixtures: a real deskpush server on 127.0.0.1:0 and clients for it."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect

from deskpush.protocol import Limits
from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ClusterSection, ServerSection

SECRET = "test-secret-" + "x" * 32
API_KEY = "test-api-key-" + "k" * 32  # keys are 32 bytes or more
# One environment-scaled unit for test timeouts (slow CI machines get more).
UNIT = float(os.environ.get("DESKPUSH_TEST_TIME_UNIT", "1.0"))


def make_config(**limits: Any) -> Config:
    server = ServerSection(host="127.0.0.1", port=0)
    return Config(server=server, limits=Limits(**limits))


# ---------------------------------------------------------------------------
# Both modes: the end-to-end tests run against one embedded server and against
# a cluster of three nodes on a real redis-server (cluster mode, docs/cluster.md).


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``redis-server`` for the session, on a free port, AOF on, in a temporary directory."""
    from deskpush.server.localcluster import RedisServer

    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    asyncio.run(redis.start())  # its own short loop: the tests' loops are per test
    try:
        yield redis.url
    finally:
        asyncio.run(redis.stop())


class Cluster:
    """Three cluster nodes that a test uses as it would one server.

    ``port`` names the next node each time it is read, so an agent's tabs
    and the integrator of a test land on different nodes, as behind a load
    balancer. The rest (``tokens``, ``engine``, ``config``...) is node 0's.
    """

    def __init__(self, nodes: list[DeskpushServer]) -> None:
        self.nodes = nodes
        self._turn = itertools.cycle(range(len(nodes)))

    @property
    def port(self) -> int:
        return self.nodes[next(self._turn)].port

    @property
    def connections(self) -> frozenset[Any]:
        """Every node's open connections."""
        return frozenset().union(*(node.connections for node in self.nodes))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.nodes[0], name)

    async def start(self) -> None:
        for node in self.nodes:
            await node.start()

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()

    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_prefixes = itertools.count(1)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module with ``BOTH_MODES = True`` runs each test on an embedded server and on a cluster."""
    if "serve" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_MODES", False):
        metafunc.parametrize("serve", ["embedded", "cluster"], indirect=True)


@pytest.fixture
def serve(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``serve(config, **kwargs)``: a ``DeskpushServer``, or in cluster mode three nodes on Redis."""
    if getattr(request, "param", "embedded") == "embedded":
        return DeskpushServer
    url = request.getfixturevalue("redis_url")
    prefix = f"t{os.getpid()}-{next(_prefixes)}"  # each test its own keys in the shared Redis

    def make(config: Config, **kwargs: Any) -> Cluster:
        config = msgspec.structs.replace(config, cluster=ClusterSection(redis=url, prefix=prefix))
        return Cluster([DeskpushServer(config, **kwargs) for _ in range(3)])

    return make


@pytest.fixture
async def server(serve: Callable[..., Any]) -> AsyncIterator[DeskpushServer]:
    async with serve(make_config(), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        yield srv


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    import asyncio

    async with asyncio.timeout(timeout * UNIT):
        return json.loads(await ws.recv())


async def send_json(ws: ClientConnection, obj: Any) -> None:
    await ws.send(msgspec.json.encode(obj).decode())


async def open_agent(srv: DeskpushServer, agent_id: str = "agent-7") -> tuple[ClientConnection, dict[str, Any]]:
    """Connect and authenticate an agent session; returns (ws, welcome)."""
    ws = await connect(f"ws://127.0.0.1:{srv.port}/agent")
    await send_json(ws, {"type": "hello", "token": srv.tokens.issue(agent_id)})
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def open_integrator(srv: DeskpushServer, key: str = API_KEY) -> ClientConnection:
    return await connect(
        f"ws://127.0.0.1:{srv.port}/integrator", additional_headers={"Authorization": f"Bearer {key}"}
    )
