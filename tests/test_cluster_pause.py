"""A node process that stops running for a while (SIGSTOP: a long GC pause, a stalled VM, swap).

Two real node processes on a real Redis (``LocalCluster``, no balancer needed: the clients
connect to each node's own port). A pause shorter than ``cluster.nodeTimeout`` but longer than two
snapshot intervals leaves the node behind the log's trim: it must load the newer snapshot and
have its clients resynchronise. A pause longer than ``nodeTimeout`` gets it declared down by the
other node: its agents go to presence grace there, and when it wakes it must close its sessions and
rejoin under a new id. In both cases nothing is decided twice and the clients hear why.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from deskpush.server.localcluster import LocalCluster

from .conftest import UNIT

CHAT = {"templateName": "msdyn_chat_incoming_unauthenticated", "templateParameters": {"customerName": "Jane"}}


def config(tmp_path: Path, **cluster: float) -> Path:
    path = tmp_path / "cluster.toml"
    lines = ["[limits]", "presenceGrace = 30.0", "[cluster]"] + [f"{k} = {v}" for k, v in cluster.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def recv(ws, kind: str, timeout: float = 10.0) -> dict:
    async with asyncio.timeout(timeout * UNIT):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == kind:
                return frame


async def agent(cluster: LocalCluster, port: int, agent_id: str = "agent-7"):
    ws = await connect(f"ws://127.0.0.1:{port}/agent")
    await ws.send(json.dumps({"type": "hello", "token": cluster.tokens.issue(agent_id)}))
    return ws, await recv(ws, "welcome")


async def integrator(cluster: LocalCluster, port: int):
    key = next(iter(cluster.api_keys.values()))
    ws = await connect(f"ws://127.0.0.1:{port}/integrator?resumeAfter=$",
                       additional_headers={"Authorization": f"Bearer {key}"})
    await recv(ws, "resumed")
    return ws


async def closed_with(ws, timeout: float = 15.0) -> tuple[int | None, str | None]:
    async with asyncio.timeout(timeout * UNIT):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            return ws.close_code, ws.close_reason


@pytest.mark.parametrize("case", ["behind the trim", "declared down"])
async def test_a_paused_node_resynchronises_its_clients(tmp_path, case):
    if case == "behind the trim":
        # Snapshots every 0.2 s trim the log past the paused node within a second; no one declares it down.
        cfg = config(tmp_path, heartbeat=0.5, nodeTimeout=6.0, snapshotInterval=0.2)
        pause = 1.5
    else:
        cfg = config(tmp_path, heartbeat=0.2, nodeTimeout=1.0, snapshotInterval=10.0)
        pause = 3.0
    async with LocalCluster(2, config=cfg) as cluster:
        port_a, port_b = cluster.node_ports
        desk, _ = await agent(cluster, port_b)
        ig = await integrator(cluster, port_a)
        await ig.send(json.dumps({"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT,
                                  "progress": False}))
        card = await recv(desk, "notification")

        pid = cluster.node_pid(1)
        os.kill(pid, signal.SIGSTOP)
        try:
            # Node A goes on: offers to an agent of its own, snapshots, heartbeats.
            # Node A goes on: offers to an agent of its own, a steady trickle of entries (so each
            # snapshot is newer than the last and the log is trimmed), heartbeats.
            other, _ = await agent(cluster, port_a, "agent-8")
            loop = asyncio.get_running_loop()
            end, i = loop.time() + pause, 0
            while loop.time() < end:
                i += 1
                await ig.send(json.dumps({"type": "notifyEvent", "requestId": f"x{i}", "agentId": "agent-8",
                                          "input": CHAT, "progress": False}))
                await asyncio.sleep(0.05)
        finally:
            os.kill(pid, signal.SIGCONT)

        code, reason = await closed_with(desk)
        assert (code, reason) == (1012, "cluster node resynchronising"), (code, reason)
        # The desktop comes back (to either node) and finds its offer as it was.
        desk2, welcome = await agent(cluster, port_b)
        assert welcome["displayed"] == [card["notificationId"]]
        again = await recv(desk2, "notification")
        assert again["expiresAt"] == card["expiresAt"]
        await desk2.send(json.dumps({"type": "respond", "notificationId": card["notificationId"],
                                     "action": "Accept"}))
        result = await recv(ig, "result")
        while result["requestId"] != "r1":  # agent-8's queue overflowed meanwhile
            result = await recv(ig, "result")
        assert result["value"] == {"actionName": "Accept", "responseReason": "Accept"}, result
        await cluster.wait_ready(1)
        assert cluster.tracebacks() == 0
        log_b = cluster.node_log(1)
        if case == "behind the trim":
            assert "behind the log's start: loading the snapshot" in log_b, log_b[-2000:]
        else:
            assert "was declared down by another node" in log_b, log_b[-2000:]
