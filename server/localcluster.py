"""Cluster mode on one machine: Redis, N deskpush nodes and HAProxy in front, on 127.0.0.1.

``LocalCluster`` is what the cluster tests stand on and what ``deskpush
local-cluster`` (``make cluster``) runs. Cluster mode promises things about
*processes*: a node killed with SIGKILL loses nothing, Redis restarted from
its append-only file brings the offers back, a load balancer takes a dead
node out and its clients reconnect to another. Only real processes show
that, so every part is one: Debian's ``redis-server`` and ``haproxy``, and
each node a ``deskpush serve --redis URL`` of its own.

Every process gets a free port on 127.0.0.1 (a port bound with 0 and
closed; a child that finds it taken since is started again on another) and
writes its output to a log file of its own in the work directory. A node
keeps its port across restarts, so the balancer's configuration stays true.
HAProxy checks ``GET /readyz`` on every node twice a second and takes a node
out after two failures: a killed or draining node stops getting clients
within about a second, and new connections that still reach it are
redispatched to another node at once.

Nothing outlives the cluster: ``close()`` (``async with``) stops every
process, a failed ``start()`` stops what it started, an interpreter exit
kills what is left, and on Linux each child is started under ``setpriv
--pdeathsig KILL`` so the kernel kills it if this process dies without a
word (the child dies with the *thread* that started it: start clusters
from the event loop's thread).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import csv
import io
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .auth import AgentTokens
from .config import (
    API_KEY_ENV,
    JWT_SECRET_ENV,
    Config,
    ConfigError,
    default,
    ephemeral_secret,
    load,
    read_dev_secrets,
)

__all__ = ["LocalCluster", "ClusterError", "RedisServer", "Balancer", "Node", "free_port", "http_status",
           "read_dev_secrets", "banner", "add_parser", "cmd_local_cluster", "main"]

HOST = "127.0.0.1"
#: Where Debian installs the two; /usr/sbin is not on every user's PATH.
DEBIAN_PATHS = "/usr/bin:/usr/sbin"


class ClusterError(Exception):
    """A process of the cluster did not start, or not in time; the message ends with its log's last lines."""


def free_port() -> int:
    """A port nobody listens on right now (bound with port 0, then closed); see ``_Child.start_on_free_port``."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _bindable(port: int) -> bool:
    """Whether nothing listens on ``port`` (SO_REUSEADDR: a killed node's TIME_WAIT connections do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


async def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status code of ``GET path`` on 127.0.0.1:``port``, or None when nothing answers in time."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=DEBIAN_PATHS)
    if found is None:
        raise ClusterError(f"{name} is not on the PATH nor in /usr/bin or /usr/sbin: install Debian's "
                           "redis-server and haproxy (make cluster-tools)")
    return found


#: Every child still running, for the interpreter's exit.
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _all_open_files() -> None:
    """In the child, before exec: the soft open files limit up to the hard one.

    HAProxy sizes its maxconn from the soft limit (about 500 connections
    under a 1024 soft limit, two descriptors each), too few for thousands of
    desktops; deskpush nodes raise their own limit anyway.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Child:
    """One process of the cluster: started again and again with the same log file, appended to."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_start = 0  # where this run's output starts in the log

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        # Its own session: Ctrl-C in the terminal reaches this process only, which stops the rest in order.
        guard = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
            log.flush()
            self.log_start = log.tell()
            self.proc = subprocess.Popen([*guard, *argv], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                         preexec_fn=_all_open_files)
        _LIVE.add(self.proc)

    def log(self, this_run: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[self.log_start if this_run else 0:].decode(errors="replace")

    async def wait(self, timeout: float) -> int | None:
        """The exit status once the process has ended within ``timeout`` seconds, else None."""
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.proc is None or self.proc.returncode is None:
            return None
        _LIVE.discard(self.proc)
        return self.proc.returncode

    async def end(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig``, wait ``timeout`` seconds for the exit, then SIGKILL; the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if await self.wait(timeout) is None:
                self.proc.kill()
        return await self.wait(10.0)

    async def wait_started(self, probe: Callable[[], object], timeout: float) -> None:
        """Poll ``probe`` (a coroutine function returning true once the process serves) for ``timeout`` seconds.

        Raises:
            ClusterError: the process exited first, or did not serve in time (it is then killed).
        """
        deadline = time.monotonic() + timeout
        while True:
            if await probe() and self.running:  # type: ignore[misc]
                return
            if not self.running:
                raise _Exited(f"{self.name} exited with status {self.proc.returncode if self.proc else None} "
                              f"before it served; {self.log_path} ends:\n{self.tail()}")
            if time.monotonic() > deadline:
                await self.end(signal.SIGKILL)
                raise ClusterError(f"{self.name} did not serve within {timeout:g} s; {self.log_path} ends:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log(this_run=True).splitlines()[-lines:])

    async def start_on_free_port(self, argv: Callable[[int], Sequence[str]], probe: Callable[[], object],
                                 timeout: float, port: int, env: Mapping[str, str] | None = None) -> int:
        """Start with ``argv(port)``, on a free port when ``port`` is 0, and wait until it serves; the port.

        A free port may be taken by another process between ``free_port()``
        and the child's bind: when the child exits saying so, it is started
        again on another (a port asked for stays an error).
        """
        if port and not _bindable(port):
            # Else the probe could take another program's answer on it for ours.
            raise ClusterError(f"{self.name}: {HOST}:{port} is in use by another program")
        for attempt in range(5):
            chosen = port or free_port()
            self.spawn(argv(chosen), env)
            try:
                await self.wait_started(lambda: probe(chosen), timeout)  # type: ignore[operator]
                return chosen
            except _Exited:
                if port or attempt == 4 or "Address already in use" not in self.log(this_run=True):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


class _Exited(ClusterError):
    pass


async def _redis_ping(port: int) -> bool:
    """Whether Redis answers PING with PONG (``-LOADING`` while it replays its AOF: not yet)."""
    try:
        async with asyncio.timeout(1.0):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(b"*1\r\n$4\r\nPING\r\n")
                return (await reader.readline()).startswith(b"+PONG")
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False


def _check_appendfsync(value: str) -> None:
    if value not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync is always, everysec or no, not {value!r}")


class RedisServer:
    """``redis-server`` with its data in ``workdir``: AOF on, no RDB snapshots, in the foreground.

    Restarted on the same port and directory it replays its append-only
    file, which is what a restart test needs. ``appendfsync`` is Redis's:
    ``everysec`` (the default, what production runs; a SIGKILL may lose the
    last second) or ``always`` (nothing acknowledged is lost).
    """

    def __init__(self, workdir: Path, *, port: int = 0, appendfsync: str = "everysec") -> None:
        _check_appendfsync(appendfsync)
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.appendfsync = appendfsync
        self.child = _Child("redis-server", workdir / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def argv(self, port: int) -> list[str]:
        return [_binary("redis-server"), "--port", str(port), "--bind", HOST, "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
                "--daemonize", "no", "--logfile", ""]

    @property
    def pid(self) -> int | None:
        return self.child.proc.pid if self.child.proc is not None else None

    async def start(self, timeout: float = 30.0) -> None:
        """Start it (again) and wait until it has loaded its data and answers PING."""
        self.port = await self.child.start_on_free_port(self.argv, _redis_ping, timeout, self.port)

    async def stop(self) -> int | None:
        """SIGTERM: Redis writes its AOF out and exits."""
        return await self.child.end(signal.SIGTERM, timeout=30.0)

    async def kill(self) -> int | None:
        """SIGKILL: what ``appendfsync`` has not written yet is lost."""
        return await self.child.end(signal.SIGKILL)


class Balancer:
    """HAProxy on 127.0.0.1 in front of deskpush nodes on ``backends`` (their ports).

    ``mode http`` passes WebSocket upgrades through; after the 101 the
    connection is a tunnel under ``timeout tunnel``. ``leastconn``: sessions
    last hours, so new ones go where there are fewest. Health checks are
    ``GET /readyz`` every 500 ms, down after 2 failures, up after 1 success.
    ``retries`` with ``option redispatch`` send a connection that a dead node
    refuses, before the checks notice, to another node.
    """

    def __init__(self, workdir: Path, backends: Sequence[int], *, port: int = 0) -> None:
        self.workdir = workdir
        self.backends = list(backends)
        self.port = port
        self.config_path = workdir / "haproxy.cfg"
        self.socket_path = workdir / "haproxy.sock"
        self.child = _Child("haproxy", workdir / "haproxy.log")

    def config(self, port: int) -> str:
        servers = "".join(f"    server node{i} {HOST}:{p} check\n" for i, p in enumerate(self.backends))
        return f"""\
global
    stats socket {self.socket_path} mode 600 level admin
    nbthread 1

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout tunnel 1h
    timeout client-fin 5s
    timeout check 1s
    retries 3
    option redispatch 1
    option forwardfor

frontend deskpush
    bind {HOST}:{port}
    default_backend nodes

backend nodes
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}"""

    def argv(self, port: int) -> list[str]:
        self.config_path.write_text(self.config(port))
        return [_binary("haproxy"), "-f", str(self.config_path), "-db"]

    async def start(self, timeout: float = 30.0) -> None:
        async def listening(port: int) -> bool:
            return await http_status(port, "/", timeout=1.0) is not None

        self.port = await self.child.start_on_free_port(self.argv, listening, timeout, self.port)

    async def stop(self) -> int | None:
        return await self.child.end(signal.SIGTERM)

    async def states(self) -> list[str]:
        """Each node's state as HAProxy sees it, by index: ``UP``, ``DOWN``, ``UP 1/2`` (going down), ..."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(b"show stat\n")
            text = (await reader.read()).decode()
        finally:
            writer.close()
        states = {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text.removeprefix("# ")))
                  if row.get("pxname") == "nodes"}
        return [states.get(f"node{i}", "?") for i in range(len(self.backends))]

    async def wait_state(self, i: int, up: bool, timeout: float = 10.0) -> None:
        """Wait until HAProxy counts node ``i`` up (``UP``) or down (``DOWN``)."""
        want = "UP" if up else "DOWN"
        deadline = time.monotonic() + timeout
        while (await self.states())[i] != want:
            if time.monotonic() > deadline:
                raise ClusterError(f"HAProxy has node {i} {(await self.states())[i]}, not {want}, after {timeout:g} s")
            await asyncio.sleep(0.05)


class Node:
    """One ``deskpush serve`` process on a port of its own, kept across restarts.

    ``redis_url`` None runs it embedded (no ``--redis``): a plain server, as
    the balancer's own tests use. Its log holds every run's output.
    """

    def __init__(self, index: int, workdir: Path, config_path: Path, *, redis_url: str | None,
                 env: Mapping[str, str] | None = None, args: Sequence[str] = (), log_level: str = "INFO") -> None:
        self.index = index
        self.config_path = config_path
        self.redis_url = redis_url
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.args = list(args)
        self.log_level = log_level
        self.port = 0
        self.child = _Child(f"node {index}", workdir / f"node-{index}.log")

    def argv(self, port: int) -> list[str]:
        redis = ["--redis", self.redis_url] if self.redis_url else []
        return [sys.executable, "-m", "deskpush.server", "serve", "--config", str(self.config_path),
                "--host", HOST, "--port", str(port), "--log-level", self.log_level, *redis, *self.args]

    async def ready(self, port: int | None = None) -> bool:
        return await http_status(port or self.port, "/readyz", timeout=1.0) == 200

    async def start(self, timeout: float = 30.0, wait: bool = True) -> None:
        """Start a fresh process (on its old port, if it had one) and, with ``wait``, wait for ``/readyz`` 200."""
        if wait:
            self.port = await self.child.start_on_free_port(self.argv, self.ready, timeout, self.port, self.env)
        else:
            self.port = self.port or free_port()
            self.child.spawn(self.argv(self.port), self.env)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await self.child.wait_started(self.ready, timeout)

    def log(self) -> str:
        return self.child.log()


class LocalCluster:
    """Redis, ``nodes`` deskpush nodes in cluster mode and HAProxy in front of them, on 127.0.0.1.

    ``async with LocalCluster(3) as cluster:`` starts everything and waits
    until every node answers ``/readyz`` with 200 and HAProxy counts it up;
    leaving the block stops everything, whatever happened inside.

    Args:
        nodes: how many nodes; 0 runs Redis and the balancer alone.
        balancer_port: HAProxy's port; 0 picks a free one.
        config: a TOML file every node reads, as ``deskpush serve --config``
            (each node gets ``--host 127.0.0.1`` and a ``--port`` of its own;
            leave ``server.pidFile`` unset, the nodes would share it).
        jwt_secret, api_keys: the token secret and integrator keys ({name: key})
            when the config and the environment set none. As for ``serve``,
            theirs win: sign with ``cluster.tokens`` and read ``cluster.api_keys``.
        dev_secrets: ``serve``'s ``--dev-secrets`` file, next in line; then
            a secret and a key made for this run.
        appendfsync: Redis's ``appendfsync``: ``everysec`` or ``always``.
        node_args: more ``deskpush serve`` options, for every node.
        workdir: where the configs, Redis's data and the logs go; None: a
            temporary directory, removed at ``close()``.
        timeout: seconds each process gets to start serving.
    """

    def __init__(self, nodes: int = 3, *, balancer_port: int = 0, config: str | os.PathLike[str] | None = None,
                 jwt_secret: str | None = None, api_keys: Mapping[str, str] | None = None,
                 dev_secrets: str | None = None, appendfsync: str = "everysec", node_args: Sequence[str] = (),
                 log_level: str = "INFO", workdir: str | os.PathLike[str] | None = None,
                 timeout: float = 30.0) -> None:
        _check_appendfsync(appendfsync)  # before anything is made
        self.config: Config = load(config) if config is not None else default()
        secret, keys = self.config.jwt_secret(), self.config.api_keys()
        dev = read_dev_secrets(dev_secrets) if dev_secrets and not (secret and keys) else {}
        self.secret_source = ("config" if secret else "argument" if jwt_secret
                              else "dev" if JWT_SECRET_ENV in dev else "generated")
        self.key_source = ("config" if keys else "argument" if api_keys else "dev" if API_KEY_ENV in dev else "generated")
        self.dev_secrets = dev_secrets if dev else None
        self.jwt_secret: str = secret or jwt_secret or dev.get(JWT_SECRET_ENV) or ephemeral_secret()
        self.api_keys: dict[str, str] = keys or dict(api_keys or {}) or {
            "default": dev.get(API_KEY_ENV) or ephemeral_secret()}
        self.own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="deskpush-cluster-") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Removed at close(), or when a cluster never started is collected.
        self.remove_workdir = weakref.finalize(self, shutil.rmtree, self.workdir, ignore_errors=True)
        if not self.own_workdir:
            self.remove_workdir.detach()
        # The nodes read the same file and environment as this process, plus
        # what fills the gaps: the keys as tables appended to a copy of the
        # file (keys of any name, which the environment cannot give), the
        # secret in the variable the file names for it.
        text = Path(config).read_text(encoding="utf-8") if config is not None else ""
        if not keys:
            text += "".join(f"\n[[auth.integratorKeys]]\nname = {json.dumps(name)}\nkey = {json.dumps(key)}\n"
                            for name, key in self.api_keys.items())
        self.config_path = self.workdir / "node.toml"
        self.config_path.write_text(text, encoding="utf-8")
        self.config_path.chmod(0o600)
        env = dict(os.environ)
        if not secret:
            env[self.config.auth.jwt_secret_env] = self.jwt_secret
        self.redis = RedisServer(self.workdir, appendfsync=appendfsync)
        self.nodes = [Node(i, self.workdir, self.config_path, redis_url=None, env=env, args=node_args,
                           log_level=log_level) for i in range(nodes)]
        self.balancer = Balancer(self.workdir, [], port=balancer_port)
        self.timeout = timeout

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start Redis, then the nodes together, then HAProxy; return once HAProxy counts every node up.

        Raises:
            ClusterError: a process did not start; everything started is stopped again.
        """
        try:
            await self.redis.start(self.timeout)
            for node in self.nodes:
                node.redis_url = self.redis.url
            try:
                async with asyncio.TaskGroup() as tg:
                    for node in self.nodes:
                        tg.create_task(node.start(self.timeout))
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
            self.balancer.backends = self.node_ports
            await self.balancer.start(self.timeout)
            for i in range(len(self.nodes)):
                await self.balancer.wait_state(i, up=True, timeout=self.timeout)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the balancer, the nodes (SIGINT: every connection closed at once) and Redis; SIGKILL the slow."""
        await self.balancer.stop()
        await asyncio.gather(*(node.child.end(signal.SIGINT) for node in self.nodes))
        await self.redis.stop()
        self.remove_workdir()

    # -- what a test needs to know

    @property
    def balancer_port(self) -> int:
        return self.balancer.port

    @property
    def node_ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def url(self, i: int | None = None) -> str:
        """``ws://127.0.0.1:PORT`` of the balancer, or of node ``i``; add ``/agent`` or ``/integrator``."""
        return f"ws://{HOST}:{self.balancer_port if i is None else self.nodes[i].port}"

    @property
    def tokens(self) -> AgentTokens:
        """Agent tokens every node takes: ``cluster.tokens.issue("agent-7")``."""
        return self.config.agent_tokens(self.jwt_secret)

    def node_pid(self, i: int) -> int | None:
        proc = self.nodes[i].child.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def node_log(self, i: int) -> str:
        """Everything node ``i`` wrote, every run of it, each run after a ``---`` line with its command."""
        return self.nodes[i].log()

    def tracebacks(self, i: int | None = None) -> int:
        """Lines starting a Python traceback in node ``i``'s log, or all nodes' logs together."""
        logs = [self.node_log(i)] if i is not None else [node.log() for node in self.nodes]
        return sum(log.count("Traceback (most recent call last)") for log in logs)

    def redis_log(self) -> str:
        return self.redis.child.log()

    def balancer_log(self) -> str:
        return self.balancer.child.log()

    # -- what a test does to it

    async def kill_node(self, i: int) -> None:
        """SIGKILL node ``i`` and wait until it is gone (``kill -9``: nothing of it runs on)."""
        await self.nodes[i].child.end(signal.SIGKILL)

    async def stop_node(self, i: int, timeout: float = 60.0) -> int | None:
        """SIGTERM node ``i`` (a drain: ``/readyz`` turns 503, sessions closed with 1012) and wait; its exit status."""
        return await self.nodes[i].child.end(signal.SIGTERM, timeout)

    async def start_node(self, i: int, wait: bool = True) -> None:
        """Start node ``i`` again, a fresh process on its port; with ``wait``, until ``/readyz`` answers 200."""
        node = self.nodes[i]
        if node.child.running:
            raise ClusterError(f"node {i} is running (pid {node.child.proc.pid}): kill or stop it first")  # type: ignore[union-attr]
        await node.start(self.timeout, wait)

    async def wait_ready(self, i: int, timeout: float | None = None) -> None:
        """Wait until node ``i`` answers ``/readyz`` with 200; ClusterError if it exits first or takes longer."""
        await self.nodes[i].wait_ready(self.timeout if timeout is None else timeout)

    async def stop_redis(self) -> int | None:
        """SIGTERM Redis: it writes out its AOF and exits. It stays down until ``start_redis()``."""
        return await self.redis.stop()

    async def kill_redis(self) -> int | None:
        """SIGKILL Redis (writes not yet fsynced are lost under ``everysec``). It stays down until ``start_redis()``."""
        return await self.redis.kill()

    async def start_redis(self) -> None:
        """Start Redis again on its port and directory, and wait until it has replayed its AOF."""
        await self.redis.start(self.timeout)

    async def restart_redis(self, down: float = 0.0) -> None:
        """``stop_redis()``, ``down`` seconds without Redis, ``start_redis()``."""
        await self.stop_redis()
        await asyncio.sleep(down)
        await self.start_redis()

    async def balancer_states(self) -> list[str]:
        """Each node's state in HAProxy, by index: ``UP``, ``DOWN``, ``UP 1/2`` (failing), ``DOWN 1/1`` (rising)."""
        return await self.balancer.states()

    async def wait_balancer(self, i: int, up: bool = True, timeout: float = 10.0) -> None:
        """Wait until HAProxy counts node ``i`` up or down (its checks run every 500 ms)."""
        await self.balancer.wait_state(i, up, timeout)


# --------------------------------------------------------------------------
# deskpush local-cluster: the same in the foreground, for a person


def banner(cluster: LocalCluster, agent: str = "agent-1") -> str:
    """What ``deskpush local-cluster`` prints once everything serves: where to connect, with what, and what runs.

    The same rules as ``deskpush serve``'s: a working agent token only when
    the demo page is on and the secret is a development one (made for this
    run or kept in ``--dev-secrets``), never for a configured secret.
    """
    http, ws = f"http://{HOST}:{cluster.balancer_port}", cluster.url()
    key_name, key = next(iter(cluster.api_keys.items()))
    demo = cluster.config.server.demo
    dev = cluster.secret_source in ("dev", "generated")
    from .cli import command_name

    command = command_name()
    lines = [f"deskpush {__version__} local cluster: {len(cluster.nodes)} nodes on Redis, HAProxy on {ws}  "
             f"(agents: {ws}/agent, integrators: {ws}/integrator)"]
    if demo and dev:
        token = cluster.tokens.issue(agent, ttl=cluster.config.token_ttl())
        lines.append(f"  agent desktop:     {http}/#token={token}")
    elif demo:
        lines.append(f"  agent desktop:     {http}/  (sign in with a token from: {command} token AGENT_ID)")
    if cluster.key_source == "config":
        lines.append(f"  integrator keys:   {', '.join(cluster.api_keys)} (from the config or {API_KEY_ENV})")
        key = "<your key>"
    else:
        kept = f"development key kept in {cluster.dev_secrets}" if cluster.key_source == "dev" else "made for this run"
        lines.append(f"  integrator key:    {key}  ({key_name}: {kept})")
    if demo:
        lines.append(f"  integrator page:   {http}/integrator.html#apiKey={key}&agentId={agent}")
    lines.append(f"  try:  {command} notify --url {ws}/integrator --api-key {key} --agent {agent} "
                 f"--template msdyn_chat_incoming_unauthenticated --param customerName=Jane")
    for i, node in enumerate(cluster.nodes):
        lines.append(f"  node {i}:            {cluster.url(i)}  (pid {cluster.node_pid(i)}, log {node.child.log_path})")
    lines.append(f"  redis:             {cluster.redis_url}  (AOF in {cluster.redis.dir}, "
                 f"appendfsync {cluster.redis.appendfsync})")
    lines.append(f"  balancer:          HAProxy, {cluster.balancer.config_path}; GET /readyz every 500 ms")
    lines.append("  Ctrl-C stops them all" + (f" and removes {cluster.workdir}" if cluster.own_workdir else ""))
    return "\n".join(lines)


def _count(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of nodes from 0 to 64")
    return int(text)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``local-cluster`` to ``deskpush``'s subcommands (``cli.build_parser``)."""
    from .cli import port_arg  # cli imports this module in build_parser: not at the top

    p = subparsers.add_parser(
        "local-cluster", help="run Redis, several nodes and HAProxy on this machine (cluster mode)",
        description="Run cluster mode on this machine until Ctrl-C or SIGTERM: a redis-server (AOF on, in a "
                    "temporary directory), --nodes deskpush nodes on free ports, and HAProxy on --port in front "
                    "of them, checking GET /readyz every 500 ms. Needs Debian's redis-server and haproxy "
                    "(make cluster-tools). For development and tests, not production.")
    p.add_argument("--nodes", type=_count, default=3, metavar="N", help="how many nodes, 0 to 64; 0 runs Redis and the balancer alone (default: 3)")
    p.add_argument("--port", type=port_arg, default=8765,
                   help="the balancer's port, 0 to 65535; 0 picks a free one (default: 8765)")
    p.add_argument("--config", metavar="FILE",
                   help="TOML config file every node reads (default: $DESKPUSH_CONFIG, else the embedded "
                        "defaults); each node gets a port of its own")
    p.add_argument("--dev-secrets", metavar="FILE",
                   help="development only: the token secret and integrator key kept in FILE, as "
                        "deskpush serve --dev-secrets (make cluster uses .venv/deskpush-dev.env; default: none, "
                        "new ones each run)")
    p.set_defaults(func=cmd_local_cluster)
    return p


def cmd_local_cluster(args: argparse.Namespace) -> int:
    """``deskpush local-cluster``: start, print the banner, stop everything on Ctrl-C or SIGTERM."""
    try:
        return asyncio.run(_local_cluster(args))
    except (ClusterError, ConfigError) as exc:
        print(f"deskpush local-cluster: {exc}", file=sys.stderr)
        return 1


async def _local_cluster(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = LocalCluster(args.nodes, balancer_port=args.port, config=args.config or os.environ.get("DESKPUSH_CONFIG"),
                           dev_secrets=args.dev_secrets)
    print(f"starting Redis, {args.nodes} nodes and HAProxy in {cluster.workdir} ...", file=sys.stderr, flush=True)
    starting = asyncio.ensure_future(cluster.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()  # start() stops what it started
            await asyncio.wait({starting})
            return 130
        starting.result()
        print(banner(cluster), flush=True)
        await stopping
        print("stopping the balancer, the nodes and Redis", file=sys.stderr, flush=True)
        return 0
    finally:
        stopping.cancel()
        await cluster.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m deskpush.server.localcluster [OPTIONS]``: ``deskpush local-cluster``, with the same parser."""
    parser = argparse.ArgumentParser(prog="deskpush")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["local-cluster", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
