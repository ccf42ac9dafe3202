"""Shared fixtures: a real deskpush server on 127.0.0.1:0 and clients for it."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect

from deskpush.protocol import Limits
from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection

SECRET = "test-secret-" + "x" * 32
API_KEY = "test-api-key-" + "k" * 32  # keys are 32 bytes or more
# One environment-scaled unit for test timeouts (slow CI machines get more).
UNIT = float(os.environ.get("DESKPUSH_TEST_TIME_UNIT", "1.0"))


def make_config(**limits: Any) -> Config:
    server = ServerSection(host="127.0.0.1", port=0)
    return Config(server=server, limits=Limits(**limits))


@pytest.fixture
async def server() -> AsyncIterator[DeskpushServer]:
    async with DeskpushServer(make_config(), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
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
