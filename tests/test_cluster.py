"""Cluster mode on a real redis-server: what survives nodes stopping, joining late, Redis going away.

The nodes here run in the test's process (each its own DeskpushServer with its own Redis
connections); tests/test_cluster_faults.py kills real node processes behind HAProxy.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from deskpush.protocol import Limits, Template
from deskpush.server import Config, DeskpushServer
from deskpush.server.cluster import ClusterError
from deskpush.server.config import ClusterSection, ConfigError, ServerSection

from .conftest import API_KEY, SECRET, UNIT, recv_json, send_json

CHAT = {"templateName": "msdyn_chat_incoming_unauthenticated", "templateParameters": {"customerName": "Jane"}}
_prefixes = itertools.count(1)


def cluster_config(url: str, prefix: str, *, limits: Limits = Limits(), **cluster) -> Config:
    return Config(server=ServerSection(host="127.0.0.1", port=0), limits=limits,
                  cluster=ClusterSection(redis=url, prefix=prefix, **cluster))


def node(config: Config) -> DeskpushServer:
    return DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY})


@pytest.fixture
def prefix() -> str:
    return f"c{os.getpid()}-{next(_prefixes)}"


async def agent_on(srv: DeskpushServer, agent_id: str = "agent-7"):
    ws = await connect(f"ws://127.0.0.1:{srv.port}/agent")
    await send_json(ws, {"type": "hello", "token": srv.tokens.issue(agent_id)})
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def integrator_on(srv: DeskpushServer, after: str = "$"):
    ws = await connect(f"ws://127.0.0.1:{srv.port}/integrator?resumeAfter={after}",
                       additional_headers={"Authorization": f"Bearer {API_KEY}"})
    frames = []
    while True:
        frame = await recv_json(ws)
        if frame["type"] == "resumed":
            return ws, frames, frame
        frames.append(frame)


async def until(ws, kind: str) -> dict:
    while True:
        frame = await recv_json(ws)
        if frame["type"] == kind:
            return frame


async def test_offers_and_outcomes_outlive_every_node(redis_url, prefix):
    """All nodes stop (a deploy, a power cut of the app tier): new nodes carry on from Redis."""
    config = cluster_config(redis_url, prefix)
    a, b = node(config), node(config)
    await a.start()
    await b.start()
    agent, _ = await agent_on(a)
    ig, _, resumed = await integrator_on(b)
    await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT})
    card = await until(agent, "notification")
    await send_json(ig, {"type": "notifyEvent", "requestId": "r2", "agentId": "agent-7", "input": CHAT,
                         "progress": False})
    await until(ig, "status")  # r1 queued
    await until(ig, "status")  # r1 displayed
    await a.close()
    await b.close()
    # New processes, nothing in memory: everything comes from Redis.
    c, d = node(config), node(config)
    await c.start()
    await d.start()
    try:
        agent2, welcome = await agent_on(d)
        assert welcome["displayed"] == [card["notificationId"]]
        replayed = await until(agent2, "notification")  # the card again, with its original deadline
        assert replayed["notificationId"] == card["notificationId"] and replayed["expiresAt"] == card["expiresAt"]
        ig2, replay, resumed2 = await integrator_on(c, resumed["lastOutcomeId"])
        assert resumed2["complete"] is True and replay == []
        # The retry of r1 finds the pending offer: no second one.
        await send_json(ig2, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT})
        assert (await until(ig2, "status"))["notificationId"] == card["notificationId"]
        await send_json(agent2, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        result = await until(ig2, "result")
        assert result["requestId"] == "r1" and result["value"] == {"actionName": "Accept", "responseReason": "Accept"}
        # r2 was queued behind it, and is shown now.
        second = await until(agent2, "notification")
        assert second["notificationId"] != card["notificationId"]
    finally:
        await c.close()
        await d.close()


async def test_a_node_that_joins_late_loads_the_snapshot_and_agrees(redis_url, prefix):
    config = cluster_config(redis_url, prefix, snapshot_interval=0.2, heartbeat=0.1, node_timeout=1.0)
    a = node(config)
    await a.start()
    late = None
    try:
        agent, _ = await agent_on(a)
        ig, _, _ = await integrator_on(a)
        for i in range(30):  # one displayed, some queued, the rest refused: queue full
            await send_json(ig, {"type": "notifyEvent", "requestId": f"r{i}", "agentId": "agent-7", "input": CHAT,
                                 "progress": False})
        card = await until(agent, "notification")
        async with asyncio.timeout(5 * UNIT):
            while a.engine.statistics()["offers"] < 30:
                await asyncio.sleep(0.02)
        assert a.engine.statistics()["outcomes"] > 0
        await asyncio.sleep(0.6 * UNIT)  # a snapshot or two, and the log trimmed behind them
        late = node(config)
        await late.start()
        assert late.engine.statistics() == a.engine.statistics()
        assert late.engine.history("crm") == a.engine.history("crm")
        agent2, welcome = await agent_on(late)
        assert welcome["displayed"] == [card["notificationId"]]
        assert (await until(agent2, "notification"))["expiresAt"] == card["expiresAt"]
    finally:
        if late is not None:
            await late.close()
        await a.close()


async def test_a_stopped_nodes_agents_go_to_presence_grace(redis_url, prefix):
    config = cluster_config(redis_url, prefix, limits=Limits(presence_grace=0.5))
    a, b = node(config), node(config)
    await a.start()
    await b.start()
    try:
        agent, _ = await agent_on(a)
        ig, _, _ = await integrator_on(b)
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT,
                             "progress": False})
        await until(agent, "notification")
        await a.close()  # the agent's only node goes; the integrator's stays
        result = await until(ig, "result")
        assert result["value"] == {"actionName": "Reject", "responseReason": "AgentDisconnected"}
    finally:
        await b.close()


async def test_redis_unreachable_at_start_is_one_clear_error(prefix):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    srv = node(cluster_config(f"redis://127.0.0.1:{port}/0", prefix, redis_timeout=0.5))
    with pytest.raises(ClusterError, match=rf"cannot reach Redis at redis://127.0.0.1:{port}/0 for 0.5 s "
                                           r"\(cluster.redisTimeout\)"):
        await srv.start()


def test_the_cli_says_so_and_exits_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "deskpush.toml"
    cfg.write_text(f'[server]\nport = 0\n[cluster]\nredisTimeout = 0.5\n')
    env = {**os.environ, "DESKPUSH_JWT_SECRET": SECRET, "DESKPUSH_API_KEY": API_KEY}
    done = subprocess.run([sys.executable, "-m", "deskpush.server", "serve", "--config", str(cfg),
                           "--redis", f"redis://:hunter2hunter2@127.0.0.1:{port}/0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"deskpush: cannot reach Redis at redis://***@127.0.0.1:{port}/0 for 0.5 s"), line
    assert "hunter2" not in done.stderr


@pytest.mark.parametrize("cluster, message", [
    ({"redis": "localhost:6379"}, "cluster.redis must be a redis://"),
    ({"redis": "redis://x", "heartbeat": 2.0, "node_timeout": 3.0}, "at least twice cluster.heartbeat"),
])
def test_cluster_sections_that_cannot_work_are_refused(cluster, message):
    config = Config(cluster=ClusterSection(**cluster))
    with pytest.raises(ConfigError, match=message):
        config.check_cluster()


def test_a_state_file_in_cluster_mode_is_refused():
    config = Config(server=ServerSection(state_file="/tmp/x.json"), cluster=ClusterSection(redis="redis://x"))
    with pytest.raises(ConfigError, match="server.stateFile is for embedded mode"):
        config.check_cluster()


async def test_a_reload_reaches_every_node(redis_url, prefix):
    config = cluster_config(redis_url, prefix)
    a, b = node(config), node(config)
    await a.start()
    await b.start()
    try:
        extra = Template(name="callback", title="Callback for {customerName}", timeout=30)
        a.reload(msgspec.structs.replace(config, templates=(extra,)), {"crm": API_KEY})
        ig, _, _ = await integrator_on(b)
        await agent_on(b, "agent-9")
        for _ in range(100):  # the Rules entry reaches b's replica within a round trip or so
            if "callback" in b.engine.templates:
                break
            await asyncio.sleep(0.02)
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-9",
                             "input": {"templateName": "callback", "templateParameters": {"customerName": "Ann"}}})
        status = await until(ig, "status")
        assert status["state"] in ("queued", "displayed")
    finally:
        await a.close()
        await b.close()


async def ready(port: int) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, "/readyz")


def http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_a_redis_restart_loses_nothing_and_clients_wait(tmp_path, prefix):
    """Redis stops (SIGTERM, AOF written) and comes back on the same port and directory.

    Meanwhile the nodes keep their sessions, an agent's Accept waits in its node, /readyz says
    why the node is not ready and new sessions get 503; afterwards the nodes reconnect on their
    own, the Accept is applied, and the integrator gets its one result.
    """
    from deskpush.server.localcluster import RedisServer

    redis = RedisServer(tmp_path, appendfsync="always")
    await redis.start()
    config = cluster_config(redis.url, prefix, redis_timeout=0.5, heartbeat=0.2, node_timeout=1.0)
    a, b = node(config), node(config)
    try:
        await a.start()
        await b.start()
        agent, _ = await agent_on(a)
        ig, _, _ = await integrator_on(b)
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT,
                             "progress": False})
        card = await until(agent, "notification")
        assert (await ready(a.port))[0] == 200
        assert a.statistics()["clusterRedisUp"] == 1 and a.statistics()["clusterApplied"] >= 3

        await redis.stop()
        await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        async with asyncio.timeout(10 * UNIT):
            while (await ready(a.port))[0] == 200:
                await asyncio.sleep(0.1)
        status, body = await ready(a.port)
        assert status == 503 and "redis unreachable" in body, body
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{a.port}/agent")
        assert refused.value.response.status_code == 503
        assert agent.state.name == "OPEN" and ig.state.name == "OPEN"  # nobody was cut
        # What /stats and /metrics show meanwhile: Redis down, the Accept waiting in node a.
        figures = a.statistics()
        assert figures["clusterRedisUp"] == 0 and figures["clusterBuffered"] >= 1, figures

        await redis.start()  # the same port and directory: the AOF comes back
        result = await until(ig, "result")
        assert result["value"] == {"actionName": "Accept", "responseReason": "Accept"}
        assert (await until(agent, "resolved"))["notificationId"] == card["notificationId"]
        async with asyncio.timeout(10 * UNIT):
            while (await ready(a.port))[0] != 200 or (await ready(b.port))[0] != 200:
                await asyncio.sleep(0.1)
        # The state in Redis is whole: a node started now agrees with the two that lived through it.
        late = node(config)
        await late.start()
        try:
            assert late.engine.history("crm") == b.engine.history("crm") == a.engine.history("crm")
            assert [r.outcome_id for r in late.engine.history("crm")] == [result["outcomeId"]]
        finally:
            await late.close()
        # And nobody declared anybody down on the way (the nodes' sessions are all still there).
        assert a.engine.statistics()["agentSessions"] == 1 and a.engine.statistics()["integrators"] == 1
    finally:
        await a.close()
        await b.close()
        await redis.stop()


async def test_a_redis_that_comes_back_empty_gets_the_state_back_from_the_nodes(redis_url, prefix):
    """Redis lost everything (a new instance without its AOF): the nodes write their state back.

    They load the functions again, say in an ERROR line that the log went back, write their
    replica as the snapshot, and carry on; a node started afterwards finds the offers and outcomes.
    """
    import redis as sync_redis

    config = cluster_config(redis_url, prefix, heartbeat=0.2, node_timeout=1.0)
    a, b = node(config), node(config)
    await a.start()
    await b.start()
    late = None
    try:
        agent, _ = await agent_on(a)
        ig, _, _ = await integrator_on(b)
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT,
                             "progress": False})
        card = await until(agent, "notification")
        r = sync_redis.Redis.from_url(redis_url)
        # Everything of this cluster gone, functions included.
        await asyncio.to_thread(lambda: (r.delete(*r.keys(f"{{{prefix}}}:*")), r.function_flush()))
        # Both nodes' readers notice nothing (no error, no reconnect); the next append finds no function.
        await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        result = await until(ig, "result")
        assert result["value"] == {"actionName": "Accept", "responseReason": "Accept"}
        async with asyncio.timeout(5 * UNIT):  # the nodes write their state back as the snapshot
            while not await asyncio.to_thread(r.hexists, f"{{{prefix}}}:snapshot", "blob"):
                await asyncio.sleep(0.02)
        late = node(config)
        await late.start()
        assert [r.outcome_id for r in late.engine.history("crm")] == [result["outcomeId"]]
        assert late.engine.statistics() == a.engine.statistics()
    finally:
        if late is not None:
            await late.close()
        await a.close()
        await b.close()


async def test_a_stalled_event_loop_does_not_make_later_timeouts_late(redis_url, prefix):
    """A node's loop stalls (a long GC pause, a starved CPU) while an entry waits in the log.

    The entry's id is Redis's clock when it was appended, not when the node
    read it: taking it for "Redis's clock now" set the node's clock back by
    the stall, for good, and every display timeout on a lone node fired that
    much late from then on. The node's clock only learns from what proves
    it wrong (an entry from its future; its own Tick that Redis stamped
    before the deadline it was sent for), so the next timeout is on time.
    """
    import redis as sync_redis

    from deskpush.protocol.replica import Tick, encode_event

    config = msgspec.structs.replace(cluster_config(redis_url, prefix),
                                     templates=(Template(name="fast", title="Fast", timeout=1.0),))
    a = node(config)
    await a.start()
    try:
        agent, _ = await agent_on(a)
        ig, _, _ = await integrator_on(a)
        stall = 3.0 * UNIT
        with sync_redis.Redis.from_url(redis_url) as r:
            r.fcall("deskpush_append", 2, a.cluster.log_key, a.cluster.counter_key, encode_event(Tick("another-node")))
        time.sleep(stall)  # the loop stalls; the entry waits
        await asyncio.sleep(0.2)  # ... and is read
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7",
                             "input": {"templateName": "fast"}, "progress": False})
        card = await until(agent, "notification")
        resolved = await until(agent, "resolved")
        late = time.time() * 1000 - card["expiresAt"]
        assert resolved["responseReason"] == "DisplayTimeout"
        assert late < stall * 1000 / 2, f"the timeout fired {late:.0f} ms after expiresAt"
    finally:
        await a.close()


async def test_an_upgrade_keeps_the_offers_and_refuses_mixed_builds(redis_url, prefix, monkeypatch):
    """A new build's nodes take over the state of the old build's, once the old ones are stopped.

    Replicas agree only if they run the same rules, so a node of another build refuses to join
    while the old build's nodes run; once they have stopped (the last writes a snapshot of the
    log's end), the new build starts from the snapshot's portable state, as from a state file.
    """
    import deskpush.server.cluster as cluster_module

    config = cluster_config(redis_url, prefix)
    old = node(config)
    await old.start()
    agent, _ = await agent_on(old)
    ig, _, resumed = await integrator_on(old)
    await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT,
                         "progress": False})
    card = await until(agent, "notification")
    await send_json(ig, {"type": "notifyEvent", "requestId": "r2", "agentId": "agent-7", "input": CHAT,
                         "progress": False})
    await send_json(ig, {"type": "cancelEvent", "requestId": "c1", "cancellationToken": "nope"})
    await until(ig, "error")

    monkeypatch.setattr(cluster_module, "BUILD", "0123456789abcdef")  # what the next release computes
    new = node(config)
    with pytest.raises(ClusterError, match="nodes of another deskpush build"):
        await new.start()

    await old.close()  # the last node of the old build: a snapshot of the log's end
    new = node(config)
    await new.start()
    try:
        agent2, welcome = await agent_on(new)
        assert welcome["displayed"] == [card["notificationId"]]
        assert (await until(agent2, "notification"))["expiresAt"] == card["expiresAt"]
        ig2, replay, resumed2 = await integrator_on(new, resumed["lastOutcomeId"])
        assert resumed2["complete"] is True
        await send_json(agent2, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        result = await until(ig2, "result")
        assert result["requestId"] == "r1" and result["value"]["actionName"] == "Accept"
        assert (await until(agent2, "notification"))["notificationId"] != card["notificationId"]  # r2, queued
    finally:
        await new.close()
