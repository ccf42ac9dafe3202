"""The cluster harness (``deskpush.server.localcluster``): Redis, HAProxy, nodes as real processes.

What cluster mode promises rests on these: Redis brings its data back from
the AOF after a restart, HAProxy passes HTTP and WebSocket through to the
nodes and takes a dead node out, and nothing is left running afterwards,
whatever happened. Nodes in cluster mode are tested with the cluster
itself; the balancer is tested here in front of plain (embedded) nodes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from deskpush.server.localcluster import Balancer, ClusterError, LocalCluster, Node, banner, http_status

from .conftest import API_KEY, SECRET, UNIT, recv_json, send_json


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_redis_runs_with_aof_and_a_key_survives_a_restart():
    async with LocalCluster(0, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as cluster:
        async with aioredis.Redis.from_url(cluster.redis_url, decode_responses=True) as r:
            assert await r.config_get("appendonly") == {"appendonly": "yes"}
            assert await r.config_get("appendfsync") == {"appendfsync": "everysec"}
            assert await r.config_get("save") == {"save": ""}
            await r.set("offer", "pending")
        port = cluster.redis.port
        await cluster.restart_redis()
        assert cluster.redis.port == port  # the same URL: nodes reconnect where they were
        async with aioredis.Redis.from_url(cluster.redis_url, decode_responses=True) as r:
            assert await r.get("offer") == "pending"
        assert "Ready to accept connections" in cluster.redis_log()


async def test_with_appendfsync_always_a_killed_redis_loses_nothing_acknowledged():
    async with LocalCluster(0, appendfsync="always") as cluster:
        async with aioredis.Redis.from_url(cluster.redis_url, decode_responses=True) as r:
            for i in range(50):
                await r.set(f"k{i}", i)
        await cluster.kill_redis()
        assert port_free(cluster.redis.port)
        await cluster.start_redis()
        async with aioredis.Redis.from_url(cluster.redis_url, decode_responses=True) as r:
            assert await r.mget([f"k{i}" for i in range(50)]) == [str(i) for i in range(50)]


def test_appendfsync_is_checked():
    with pytest.raises(ValueError, match="appendfsync"):
        LocalCluster(0, appendfsync="sometimes")


@pytest.fixture
async def embedded(tmp_path):
    """Two plain deskpush nodes (no Redis) and HAProxy in front: what the balancer does, without cluster mode."""
    config = tmp_path / "node.toml"
    config.write_text(f'[auth]\njwtSecret = "{SECRET}"\n[[auth.integratorKeys]]\nname = "crm"\nkey = "{API_KEY}"\n')
    nodes = [Node(i, tmp_path, config, redis_url=None) for i in range(2)]
    balancer = Balancer(tmp_path, [])
    try:
        await asyncio.gather(*(node.start(30 * UNIT) for node in nodes))
        balancer.backends = [node.port for node in nodes]
        await balancer.start(30 * UNIT)
        for i in range(2):
            await balancer.wait_state(i, up=True, timeout=10 * UNIT)
        yield nodes, balancer
    finally:
        await balancer.stop()
        for node in nodes:
            await node.child.end(signal.SIGKILL)


async def test_balancer_forwards_http_and_websocket_to_the_nodes(embedded):
    nodes, balancer = embedded
    assert await balancer.states() == ["UP", "UP"]
    assert await http_status(balancer.port, "/readyz") == 200
    from deskpush.server.auth import AgentTokens

    async with connect(f"ws://127.0.0.1:{balancer.port}/agent") as ws:
        await send_json(ws, {"type": "hello", "token": AgentTokens(SECRET).issue("agent-7")})
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome", welcome


async def test_balancer_takes_a_killed_node_out_and_a_restarted_one_back(embedded):
    nodes, balancer = embedded
    port = nodes[0].port
    await nodes[0].child.end(signal.SIGKILL)
    # Before and after the checks notice, every request finds the live node.
    for _ in range(6):
        assert await http_status(balancer.port, "/readyz") == 200
    await balancer.wait_state(0, up=False, timeout=10 * UNIT)
    await nodes[0].start(30 * UNIT)
    assert nodes[0].port == port
    await balancer.wait_state(0, up=True, timeout=10 * UNIT)
    assert "is DOWN" in balancer.child.log() and "is UP" in balancer.child.log()
    assert nodes[0].log().count("\n--- ") + nodes[0].log().startswith("--- ") == 2  # one line per run


async def test_close_stops_every_process_and_removes_its_directory():
    cluster = LocalCluster(0)
    async with cluster:
        pids = [cluster.redis.child.proc.pid, cluster.balancer.child.proc.pid]
        ports = [cluster.redis.port, cluster.balancer_port]
        assert not any(gone(pid) for pid in pids)
        workdir = cluster.workdir
        assert (workdir / "redis" / "appendonlydir").is_dir()
    assert all(gone(pid) for pid in pids)
    assert all(port_free(port) for port in ports)
    assert not workdir.exists()


async def test_a_failed_start_stops_what_it_started(tmp_path):
    cluster = LocalCluster(1, node_args=["--no-such-option"], workdir=tmp_path)
    with pytest.raises(ClusterError, match=r"node 0 exited with status 2 before it served(.|\n)*--no-such-option"):
        await cluster.start()
    assert gone(cluster.redis.child.proc.pid)
    assert cluster.balancer.child.proc is None  # never got that far
    assert tmp_path.exists()  # a directory given is the caller's, logs and all


async def test_an_exception_inside_the_block_still_stops_everything():
    with pytest.raises(RuntimeError, match="test failed"):
        async with LocalCluster(0) as cluster:
            pids = [cluster.redis.child.proc.pid, cluster.balancer.child.proc.pid]
            raise RuntimeError("test failed")
    assert all(gone(pid) for pid in pids)


async def test_the_config_and_environment_win_over_the_arguments_as_for_serve(tmp_path, monkeypatch):
    monkeypatch.delenv("DESKPUSH_API_KEY", raising=False)
    monkeypatch.setenv("DESKPUSH_JWT_SECRET", "from-env-" + "e" * 32)
    config = tmp_path / "deskpush.toml"
    config.write_text("[limits]\nqueueLimit = 7\n")
    cluster = LocalCluster(2, config=config, jwt_secret=SECRET, api_keys={"crm": API_KEY, "bo": API_KEY + "2"},
                           workdir=tmp_path / "w")
    assert cluster.jwt_secret == "from-env-" + "e" * 32
    assert cluster.api_keys == {"crm": API_KEY, "bo": API_KEY + "2"}
    # The nodes' file: the given one, with the keys it lacks appended; it loads as the nodes will load it.
    from deskpush.server.config import load

    node_config = load(cluster.config_path)
    assert node_config.limits.queue_limit == 7
    assert node_config.api_keys() == cluster.api_keys
    assert cluster.nodes[0].env["DESKPUSH_JWT_SECRET"] == cluster.jwt_secret
    assert oct(cluster.config_path.stat().st_mode & 0o777) == "0o600"


async def test_dev_secrets_are_shared_with_make_serve_and_kept(tmp_path):
    path = str(tmp_path / "dev.env")
    first = LocalCluster(0, dev_secrets=path, workdir=tmp_path / "a")
    second = LocalCluster(0, dev_secrets=path, workdir=tmp_path / "b")
    assert first.jwt_secret == second.jwt_secret and first.api_keys == second.api_keys
    assert (tmp_path / "dev.env").stat().st_mode & 0o077 == 0
    text = (tmp_path / "dev.env").read_text()
    assert f"DESKPUSH_JWT_SECRET={first.jwt_secret}" in text and f"DESKPUSH_API_KEY={first.api_keys['default']}" in text


async def test_banner_names_the_balancer_and_a_working_token():
    async with LocalCluster(0) as cluster:
        text = banner(cluster)
    ws = f"ws://127.0.0.1:{cluster.balancer_port}"
    assert f"{ws}/agent" in text and f"{ws}/integrator" in text
    assert cluster.redis_url in text and cluster.api_keys["default"] in text
    token = re.search(r"#token=(\S+)", text).group(1)
    assert cluster.tokens.verify(token) == "agent-1"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_command_stops_everything_on_ctrl_c_or_sigterm(sig, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "deskpush.server.localcluster", "--nodes", "0", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        first = proc.stdout.readline()
        assert "local cluster: 0 nodes on Redis, HAProxy on ws://127.0.0.1:" in first, proc.stderr.read()
        lines = [first]
        while not lines[-1].startswith("  Ctrl-C"):
            lines.append(proc.stdout.readline())
            assert lines[-1], proc.stderr.read()  # ended before the banner did
        text = "".join(lines)
        balancer = int(re.search(r"HAProxy on ws://127.0.0.1:(\d+)", text).group(1))
        redis = int(re.search(r"redis://127.0.0.1:(\d+)/0", text).group(1))
        workdir = Path(re.search(r"AOF in (\S+)/redis,", text).group(1))
        assert not port_free(balancer) and not port_free(redis)
        proc.send_signal(sig)
        assert proc.wait(timeout=30 * UNIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert port_free(balancer) and port_free(redis)
    assert not workdir.exists()


async def test_a_port_taken_between_choosing_and_binding_is_replaced(tmp_path, monkeypatch):
    from deskpush.server import localcluster

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real = localcluster.free_port
        monkeypatch.setattr(localcluster, "free_port", lambda: next(ports, None) or real())
        redis = localcluster.RedisServer(tmp_path)
        try:
            await redis.start(30 * UNIT)
            assert redis.port != taken.getsockname()[1]
            assert "Address already in use" in redis.child.log()
        finally:
            await redis.kill()


async def test_a_balancer_port_in_use_is_a_clear_error_and_nothing_stays(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cluster = LocalCluster(0, balancer_port=taken.getsockname()[1], workdir=tmp_path)
        with pytest.raises(ClusterError, match=rf"haproxy: 127.0.0.1:{taken.getsockname()[1]} is in use"):
            await cluster.start()
    assert gone(cluster.redis.child.proc.pid)
