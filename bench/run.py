"""deskpush's benchmarks against its peers: one command, one table.

    python -m bench.run                  # everything, 3 runs (about 12 minutes on 2 cores)
    python -m bench.run --quick          # tiny counts, 1 run: a smoke run (under a minute)
    python -m bench.run --only offer --runs 5 --servers deskpush,floor
    python -m bench.run --baseline HEAD~3    # also deskpush as of an earlier commit, side by side
    python -m bench.run --servers deskpush,deskpush-cluster-1,deskpush-cluster-2 --only offer --only timeout
    python -m bench.run --only failover      # kill -9 of one of three cluster nodes

Each server under test runs as its own process on 127.0.0.1 (a free port), or in
cluster mode as its nodes and a redis-server of its own, and is driven by a load
generator in another process (bench/gen.js, Node.js with ``ws`` which also speaks
Socket.IO; or bench/gen_py.py, pure Python, for the offer workload on deskpush's
protocol only). The generator prints ``{"mark": "start"}`` and
``{"mark": "end"}`` around the measured window; this harness samples the
server's (every node's, and Redis's apart) and the generator's CPU seconds
(/proc/PID/stat) and the server's RSS (/proc/PID/status VmRSS, VmHWM) when it
reads them. Each figure is the median of
the runs with min-max; ratios are taken pair by pair within a run, then summarised
the same way. Writes the table, the machine and the date to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deskpush.server.localcluster import RedisServer

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SECRET = "bench-secret-" + secrets.token_hex(16)
API_KEY = "bench-key-" + secrets.token_hex(16)  # keys are 32 bytes or more
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------
# Workloads and servers

FULL = {
    "offer": {"agents": 200, "inflight": 100, "seconds": 10.0, "warmup": 0.5},
    "storm": {"agents": 9000},
    "timeout": {"agents": 2000, "perAgent": 10, "timeout": 2.0},
    "cancel": {"agents": 200, "inflight": 100, "seconds": 3.0, "warmup": 0.5},
    "failover": {"agents": 6000, "inflight": 50, "warmup": 2.0},
}
# The timeout storm's display timeout is shorter here, and the windows too: with the
# cluster servers the whole smoke run still fits in a minute.
QUICK = {
    "offer": {"agents": 6, "inflight": 3, "seconds": 0.6, "warmup": 0.2},
    "storm": {"agents": 400},
    "timeout": {"agents": 100, "perAgent": 10, "timeout": 0.5},
    "cancel": {"agents": 6, "inflight": 3, "seconds": 0.6, "warmup": 0.2},
    "failover": {"agents": 60, "inflight": 6, "warmup": 0.5},
}
BURST = 200  # at most this many agents connecting at once
WORKLOADS = list(FULL)


@dataclass(frozen=True)
class Server:
    name: str
    title: str
    proto: str  # "raw" (deskpush's wire protocol) or "sio" (Socket.IO)
    workloads: tuple[str, ...]
    progress: bool = False
    default: bool = True  # in the default --servers
    log_level: str = "INFO"
    metrics: bool = True  # deskpush's server.metrics
    nodes: int = 0  # cluster mode: this many deskpush nodes on one redis-server started for the run
    balancer: bool = False  # the nodes behind HAProxy: server/localcluster.py's LocalCluster


SERVERS = [
    Server("deskpush", "deskpush", "raw", ("offer", "storm", "timeout", "cancel")),
    Server("deskpush-progress", "deskpush +progress", "raw", ("offer",), progress=True),
    # Cluster mode (docs/cluster.md), the same config plus --redis: agent i on node i % nodes,
    # the integrator on the last node, so half the agents' offers cross nodes with two.
    Server("deskpush-cluster-1", "deskpush 1 node + Redis", "raw", ("offer", "timeout"), nodes=1),
    Server("deskpush-cluster-2", "deskpush 2 nodes + Redis", "raw", ("offer", "timeout"), nodes=2),
    # The failover workload only: kill -9 of the last of three nodes behind HAProxy (make cluster's).
    Server("deskpush-cluster-3", "deskpush 3 nodes + Redis", "raw", ("failover",), nodes=3, balancer=True),
    Server("floor", "floor", "raw", ("offer", "storm", "timeout", "cancel")),
    Server("socketio", "Socket.IO (Node)", "sio", ("offer", "storm", "timeout", "cancel")),
    Server("pysio", "python-socketio", "sio", ("offer", "storm", "timeout", "cancel")),
    # For finding where the time goes, not for the targets: deskpush without its per-outcome log line.
    Server("deskpush-warning", "deskpush WARNING", "raw", ("offer", "storm", "timeout", "cancel"),
           default=False, log_level="WARNING"),
    # What counting for /metrics costs: deskpush with server.metrics = false, side by side
    # (python -m bench.run --only offer --servers deskpush,deskpush-nometrics).
    Server("deskpush-nometrics", "deskpush no metrics", "raw", ("offer", "storm", "timeout", "cancel"),
           default=False, metrics=False),
]
BY_NAME = {s.name: s for s in SERVERS}
DEFAULT_SERVERS = ",".join(s.name for s in SERVERS if s.default)
PEERS = ["floor", "socketio", "pysio"]  # deskpush's ratio is taken to each
CLUSTERS = [s.name for s in SERVERS if s.nodes]
C1, C2, C3 = CLUSTERS  # named in the targets below

# (workload, key, label, target) ; the key names a figure computed by figures(). A target maps
# who to (op, bound): a peer's name (deskpush ÷ that peer), "abs" (deskpush's own figure), or a
# pair (subject, peer or "abs") for a server other than deskpush. "server" in a label is the
# deskpush process, or in cluster mode all its nodes together; Redis is counted on its own.
METRICS = [
    ("offer", "rate", "offer: outcomes/s", {"floor": (">=", 0.8), "socketio": (">=", 1.0), "pysio": (">=", 4.0),
                                            (C1, "deskpush"): (">=", 0.35)}),
    ("offer", "p50", "offer: p50 ms", None),
    ("offer", "p99", "offer: p99 ms", {"floor": ("<=", 1.5)}),
    ("offer", "cpu_us", "offer: server CPU µs/outcome", None),
    ("offer", "redis_us", "offer: Redis CPU µs/outcome", None),
    ("offer", "cpu_pct", "offer: server CPU % of a core", None),
    ("offer", "redis_pct", "offer: Redis CPU % of a core", None),
    ("offer", "hwm_mib", "offer: server peak RSS MiB", None),
    ("offer", "gen_pct", "offer: generator CPU % of a core", None),
    ("storm", "seconds", "storm: s until all welcomed", {"floor": ("<=", 1.2), "abs": ("<", 4.0)}),
    ("storm", "kib_agent", "storm: KiB RSS per agent", {"abs": ("<=", 24.0)}),
    ("storm", "cpu_s", "storm: server CPU s", None),
    ("storm", "overflows", "storm: listen queue overflows", None),
    ("storm", "gen_pct", "storm: generator CPU % of a core", None),
    ("timeout", "p50", "timeout: lateness p50 ms", None),
    ("timeout", "p99", "timeout: lateness p99 ms", {"abs": ("<=", 50.0), (C1, "abs"): ("<=", 100.0),
                                                    (C2, "abs"): ("<=", 100.0)}),
    ("timeout", "max", "timeout: lateness max ms", {"abs": ("<=", 200.0)}),
    ("timeout", "cpu_s", "timeout: server CPU s", None),
    ("timeout", "redis_s", "timeout: Redis CPU s", None),
    ("timeout", "gen_pct", "timeout: generator CPU % of a core", None),
    ("cancel", "rate", "cancel: cancels/s", None),
    ("cancel", "p50", "cancel: cancel->resolved p50 ms", None),
    ("cancel", "p99", "cancel: cancel->resolved p99 ms", None),
    ("cancel", "cpu_us", "cancel: server CPU µs/cancel", None),
    ("cancel", "gen_pct", "cancel: generator CPU % of a core", None),
    ("failover", "seconds", "failover: s from kill -9 until all its agents offered again", {(C3, "abs"): ("<=", 5.0)}),
    ("failover", "welcomed", "failover: s from kill -9 until all its agents welcomed again", None),
    ("failover", "p50", "failover: per agent, s until offered again, p50", None),
    ("failover", "connect_p50", "failover: per agent, s from reconnecting to welcome, p50", None),
    ("failover", "retries", "failover: reconnect attempts refused", None),
    ("failover", "cpu_s", "failover: server CPU s", None),
    ("failover", "redis_s", "failover: Redis CPU s", None),
    ("failover", "balancer_s", "failover: HAProxy CPU s", None),
    ("failover", "gen_pct", "failover: generator CPU % of a core", None),
]


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# An earlier commit of deskpush, run side by side (--baseline REF)


@dataclass(frozen=True)
class Baseline:
    ref: str
    path: Path  # what goes first on sys.path
    module: str  # what runs as "python -m MODULE serve ..."


BASELINE: Baseline | None = None
# Runs MODULE from the baseline tree: the editable install's finder (which
# maps deskpush to this checkout) is dropped first.
BASELINE_BOOT = (
    "import runpy, sys; path, module = sys.argv[1:3]; sys.argv = [module, *sys.argv[3:]]; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path.insert(0, path); runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def checkout_baseline(ref: str, tmp: Path) -> Baseline:
    """``ref``'s tree in ``tmp``, runnable with this venv's packages.

    Before deskpush had one import name its folders were top-level packages
    (``python -m server``); after, a directory of links stands in for the
    installed ``deskpush`` package.
    """
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = tmp / f"baseline-{sha}"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    if '"deskpush.server" = "server"' not in (tree / "pyproject.toml").read_text():
        return Baseline(sha, tree, "server")
    links = tree / "_import" / "deskpush"
    links.mkdir(parents=True)
    for name, folder in (("protocol", "protocol"), ("server", "server"), ("client", "demo_client")):
        (links / name).symlink_to(tree / folder)
    return Baseline(sha, links.parent, "deskpush.server")


# ---------------------------------------------------------------------------
# Processes

def raise_nofile(need: int) -> None:
    """Raise our RLIMIT_NOFILE to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < need:
        raise BenchError(f"need {need} file descriptors per process, the hard limit is {soft}: "
                         f"raise it (ulimit -Hn, or /etc/security/limits.conf) or use --quick")


def py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_sample(pid: int) -> dict[str, float]:
    """CPU seconds (all threads), RSS and peak RSS (KiB) of a live process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    out = {"cpu": (int(fields[11]) + int(fields[12])) / CLK_TCK, "t": time.monotonic()}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = float(line.split()[1])
    return out


def sample(pids: dict[str, int]) -> dict:
    """Every process of a server at one moment: its figures summed over the server's own processes
    (cpu, VmRSS, VmHWM; the nodes in cluster mode) and Redis's CPU on its own ("redis_cpu")."""
    out: dict = {"t": time.monotonic(), "cpu": 0.0, "VmRSS": 0.0, "VmHWM": 0.0}
    for role, pid in pids.items():
        try:
            got = proc_sample(pid)
        except (OSError, IndexError):  # gone: the node the failover workload killed, already reaped
            continue
        if role == "redis":
            out["redis_cpu"] = got["cpu"]
        elif role == "balancer":
            out["balancer_cpu"] = got["cpu"]
        else:
            for key in ("cpu", "VmRSS", "VmHWM"):
                out[key] += got.get(key, 0.0)
    return out


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (whole machine)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split(), values.split())).get("ListenOverflows", 0))
    return 0


def deskpush_config(path: Path, workload: str, metrics: bool = True, timeout: float = 2.0) -> None:
    display_limit = 10 if workload == "timeout" else 1
    path.write_text(f"""\
# Written by bench/run.py. Every feature stays on; only limits a benchmark would trip are raised.
[server]
host = "127.0.0.1"
port = 0
agentRate = 1000.0        # the offer workload answers ~50 offers/s per agent, the default rate
agentBurst = 2000.0
integratorRate = 1000000.0  # the timeout storm sends 20,000 notifyEvents at once
integratorBurst = 1000000.0
{"" if metrics else "metrics = false          # deskpush-nometrics: what counting for /metrics costs"}
[limits]
displayLimit = {display_limit}
queueLimit = 100

[auth]
jwtSecret = "{SECRET}"

[[auth.integratorKeys]]
name = "bench"
key = "{API_KEY}"

[[templates]]
name = "bench_timeout"
title = "New chat request"
timeout = {timeout}
fields = [{{ header = "Customer", value = "{{customerName}}" }},
          {{ header = "Queue", value = "{{queueName}}" }},
          {{ header = "Comment", value = "{{comment}}" }}]
""")


def start_redis(tmp: Path, name: str) -> RedisServer:
    """A redis-server of the run's own: a free port, a temporary directory, AOF on (fsync every second,
    Redis's default), as the tests and `make cluster` start one and as production should run it."""
    from deskpush.server.localcluster import ClusterError, RedisServer

    redis = RedisServer(Path(tempfile.mkdtemp(prefix=f"{name}-redis-", dir=tmp)))
    try:
        asyncio.run(redis.start())
    except (ClusterError, OSError) as exc:
        raise BenchError(f"the cluster servers need redis-server (Debian's redis-server; make test installs "
                         f"it): {exc}") from None
    return redis


def ready(port: int) -> bool:
    """GET /readyz answers 200: a cluster node has joined and takes sessions."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
            c.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return c.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class Running:
    """A server under test, started on free ports; stop() ends it.

    One process, or in cluster mode a redis-server and ``server.nodes`` deskpush
    nodes on it. ``pids`` names what is sampled: the server's processes (the
    nodes) and "redis".
    """

    def __init__(self, server: Server, workload: str, tmp: Path, profile: Path | None = None,
                 timeout: float = 2.0) -> None:
        self.name = server.name
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []  # (role, process, log)
        self.spies: list[subprocess.Popen] = []
        self.redis: RedisServer | None = None
        env = {**os.environ, "BENCH_SECRET": SECRET, "BENCH_API_KEY": API_KEY, "BENCH_TIMEOUT": str(timeout),
               "PYTHONUNBUFFERED": "1"}
        py = sys.executable
        try:
            if server.nodes:
                self.redis = start_redis(tmp, f"{server.name}-{workload}")
                redis_port = self.redis.port
            self.ports = [free_port() for _ in range(max(1, server.nodes))]
            cfg = tmp / f"{server.name}-{workload}.toml"
            if server.name.startswith("deskpush") or server.name == "baseline":
                deskpush_config(cfg, workload, server.metrics, timeout)  # every node the same
            for k, port in enumerate(self.ports):
                role = f"node{k}" if server.nodes else "server"
                log = tmp / (f"{server.name}-{workload}" + (f"-{role}" if server.nodes else "") + ".log")
                if server.name.startswith("deskpush") or server.name == "baseline":
                    args = ["serve", "--config", str(cfg), "--port", str(port), "--log-level", server.log_level]
                    if server.nodes:
                        args += ["--redis", f"redis://127.0.0.1:{redis_port}/0"]
                    if server.name == "baseline":
                        assert BASELINE is not None
                        cmd = [py, "-c", BASELINE_BOOT, str(BASELINE.path), BASELINE.module, *args]
                    else:
                        cmd = [py, "-m", "deskpush.server", *args]
                elif server.name == "floor":
                    cmd = [py, str(BENCH / "peers" / "floor.py"), "--port", str(port)]
                elif server.name == "socketio":
                    cmd = ["node", str(BENCH / "peers" / "socketio_server.js"), str(port)]
                else:
                    cmd = [py, str(BENCH / "peers" / "pysio_server.py"), "--port", str(port)]
                with open(log, "wb") as out:
                    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
                self.procs.append((role, proc, log))
            # Nodes join the cluster in parallel; each is waited for until /readyz says 200.
            deadline = time.monotonic() + 30
            for (role, proc, _), port in zip(self.procs, self.ports):
                while True:
                    if proc.poll() is not None:
                        raise BenchError(f"{server.name} {role} exited with {proc.returncode}:\n{self.tail()}")
                    if server.nodes:
                        up = ready(port)
                    else:
                        try:
                            socket.create_connection(("127.0.0.1", port), timeout=1).close()
                            up = True
                        except OSError:
                            up = False
                    if up:
                        break
                    if time.monotonic() > deadline:
                        raise BenchError(f"{server.name} {role} was not ready within 30 s:\n{self.tail()}")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.port = self.ports[0]
        self.pids = {role: proc.pid for role, proc, _ in self.procs}
        if self.redis is not None:
            self.pids["redis"] = self.redis.pid
        time.sleep(0.3)  # let it settle before the idle sample
        self.idle = sample(self.pids)
        if profile is not None and server.name != "socketio":
            # Collapsed stacks ("raw"), one line per stack with its sample count; written when the server exits.
            profile.mkdir(parents=True, exist_ok=True)
            for role, proc, _ in self.procs:
                out = profile / (f"{server.name}-{workload}" + (f"-{role}" if server.nodes else "") + ".txt")
                self.spies.append(subprocess.Popen(
                    [py_spy(), "record", "--pid", str(proc.pid), "--format", "raw", "--rate", "250",
                     "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def tail(self) -> str:
        out = []
        for role, _, log in self.procs:
            try:
                lines = log.read_text(errors="replace").splitlines()[-15:]
            except OSError:
                continue
            out += ([f"--- {role}"] if len(self.procs) > 1 else []) + lines
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 2 s: everything is measured by now, and a server that drains
        9,000 closing connections gracefully would only make the run longer. Redis goes last."""
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.procs:
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            asyncio.run(self.redis.stop())
        for spy in self.spies:
            spy.wait(30)


class RunningBalanced:
    """A cluster behind HAProxy, as ``make cluster`` runs one: server/localcluster.py's ``LocalCluster``
    (redis-server, the nodes, HAProxy checking /readyz), with the bench's config; stop() ends it.

    LocalCluster is asyncio and its children die with the thread that started them, so it runs on an
    event loop in a thread of its own for as long as the cluster lives.
    """

    def __init__(self, server: Server, workload: str, tmp: Path, profile: Path | None = None,
                 timeout: float = 2.0) -> None:
        import asyncio

        from deskpush.server.localcluster import ClusterError, LocalCluster

        self.name = server.name
        cfg = tmp / f"{server.name}-{workload}.toml"
        deskpush_config(cfg, workload, server.metrics, timeout)
        self.cluster = LocalCluster(server.nodes, config=cfg, log_level=server.log_level,
                                    workdir=Path(tempfile.mkdtemp(prefix=f"{server.name}-{workload}-", dir=tmp)))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="localcluster", daemon=True)
        self.thread.start()
        self.spies: list[subprocess.Popen] = []
        try:
            self._call(self.cluster.start(), 120)
        except ClusterError as exc:
            self._end_loop()
            raise BenchError(f"{server.name}: {exc}") from None
        self.ports = self.cluster.node_ports
        self.port = self.ports[0]
        self.balancer_url = f"http://127.0.0.1:{self.cluster.balancer_port}"
        self.pids = {f"node{i}": self.cluster.node_pid(i) for i in range(server.nodes)}
        self.pids["redis"] = self.cluster.redis.child.proc.pid
        self.pids["balancer"] = self.cluster.balancer.child.proc.pid
        time.sleep(0.3)  # let it settle before the idle sample
        self.idle = sample(self.pids)
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            for i in range(server.nodes):
                out = profile / f"{server.name}-{workload}-node{i}.txt"
                self.spies.append(subprocess.Popen(
                    [py_spy(), "record", "--pid", str(self.pids[f"node{i}"]), "--format", "raw", "--rate", "250",
                     "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def _call(self, coro, timeout: float):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def tail(self) -> str:
        return "\n".join(f"--- node {i}\n" + "\n".join(self.cluster.node_log(i).splitlines()[-15:])
                         for i in range(len(self.ports)))

    def stop(self) -> None:
        """The balancer, then the nodes (SIGINT, SIGKILL after 10 s) and Redis: LocalCluster.close()."""
        try:
            self._call(self.cluster.close(), 120)
        finally:
            self._end_loop()
        for spy in self.spies:
            spy.wait(30)


def run_generator(gen: str, params: dict, server: Running, timeout: float) -> tuple[dict, dict, dict]:
    """Run one generator process; returns (result, samples at marks, generator samples at marks)."""
    if gen == "node":
        cmd = ["node", str(BENCH / "gen.js"), json.dumps(params)]
    else:
        cmd = [sys.executable, str(BENCH / "gen_py.py"), json.dumps(params)]
    proc = subprocess.Popen(cmd, cwd=BENCH, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    marks: dict[str, dict] = {}
    gmarks: dict[str, dict] = {}
    result = None
    try:
        for line in proc.stdout:
            msg = json.loads(line)
            if "mark" in msg:
                marks[msg["mark"]] = sample(server.pids) | {"overflows": listen_overflows()}
                gmarks[msg["mark"]] = proc_sample(proc.pid)
            elif "result" in msg:
                result = msg["result"]
        proc.wait()
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    if result is None or set(marks) != {"start", "end"}:
        why = "timed out" if proc.returncode == -signal.SIGKILL else f"exit {proc.returncode}"
        raise BenchError(f"generator {why}: {''.join(errors).strip()[-2000:]}\nserver log:\n{server.tail()}")
    return result, marks, gmarks


def figures(workload: str, r: dict, m: dict, g: dict, idle: dict, agents: int) -> tuple[dict, list[str]]:
    """The table's figures for one measured run, and any problems it showed."""
    wall = m["end"]["t"] - m["start"]["t"]
    cpu = m["end"]["cpu"] - m["start"]["cpu"]
    # Redis's CPU in the window (cluster mode only; None leaves the cell empty).
    redis = m["end"]["redis_cpu"] - m["start"]["redis_cpu"] if "redis_cpu" in m["start"] else None
    out = {"gen_pct": 100 * (g["end"]["cpu"] - g["start"]["cpu"]) / wall if wall > 0 else 0.0}
    problems = []
    if workload == "offer":
        n = r["outcomes"]
        out |= {"rate": r["outcomesPerSec"], "p50": r["latencyMs"]["p50"], "p99": r["latencyMs"]["p99"],
                "cpu_us": 1e6 * cpu / n if n else float("nan"), "cpu_pct": 100 * cpu / wall,
                "hwm_mib": m["end"]["VmHWM"] / 1024, "outcomes": n}
        if redis is not None:
            out |= {"redis_us": 1e6 * redis / n if n else float("nan"), "redis_pct": 100 * redis / wall}
        if r["errors"] or not n:
            problems.append(f"{r['errors']} offers did not end with Accept, {n} did")
    elif workload == "storm":
        out |= {"seconds": r["seconds"], "kib_agent": (m["end"]["VmHWM"] - idle["VmRSS"]) / agents, "cpu_s": cpu,
                "overflows": m["end"]["overflows"] - m["start"]["overflows"]}
        if r["welcomed"] != agents:
            problems.append(f"only {r['welcomed']} of {agents} welcomed")
        if r["retries"]:
            problems.append(f"{r['retries']} connection attempts retried")
    elif workload == "timeout":
        lat = r["latenessMs"]
        out |= {"p50": lat["p50"], "p99": lat["p99"], "max": lat["max"], "cpu_s": cpu}
        bad = {k: v for k, v in r["outcomes"].items() if k != "Timeout/DisplayTimeout"}
        if bad or r["results"] != r["sent"] or r["unmatched"]:
            problems.append(f"{r['results']}/{r['sent']} results, other outcomes {bad}, unmatched {r['unmatched']}")
    elif workload == "cancel":
        n = r["cancelled"]
        out |= {"rate": r["cancelsPerSec"], "p50": r["latencyMs"]["p50"], "p99": r["latencyMs"]["p99"],
                "cpu_us": 1e6 * cpu / n if n else float("nan")}
        if r["other"] or not n:
            problems.append(f"{r['other']} offers did not end with Cancel, {n} did")
    elif workload == "failover":
        out |= {"seconds": r["seconds"], "welcomed": r["welcomedSeconds"], "p50": r["perAgent"]["p50"],
                "connect_p50": r["connecting"]["p50"],
                "retries": r["retries"], "cpu_s": cpu}
        if r["recovered"] != r["victims"]:
            problems.append(f"only {r['recovered']} of the killed node's {r['victims']} agents were offered again")
        bad = {k: v for k, v in r["outcomes"].items() if k != "Accept/Accept"}
        if bad or r["unanswered"]:
            problems.append(f"offers that did not end with Accept: {bad}, {r['unanswered']} without a result")
    if redis is not None and workload != "offer":
        out["redis_s"] = redis
    if "balancer_cpu" in m["start"]:
        out["balancer_s"] = m["end"]["balancer_cpu"] - m["start"]["balancer_cpu"]
    return {k: v if k in ("overflows", "retries") or v is None else float(v) for k, v in out.items()}, problems


# ---------------------------------------------------------------------------
# The table

def fmt(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    a = abs(x)
    if a >= 100 or isinstance(x, int):
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def spread(values: list[float], unit: str = "") -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "-"
    med = statistics.median(values)
    if all(isinstance(v, int) for v in values):
        med = round(med)
    if len(values) == 1:
        return f"{fmt(med)}{unit}"
    return f"{fmt(med)}{unit} ({fmt(min(values))}–{fmt(max(values))})"


def ratios(results: list[dict], workload: str, key: str, peer: str, base: str = "deskpush") -> list[float]:
    """base / peer for one figure, pair by pair within each run."""
    out = []
    for run in results:
        a = run.get((workload, base), {}).get(key)
        b = run.get((workload, peer), {}).get(key)
        if a is not None and b:
            out.append(a / b)
    return out


def verdict(results: list[dict], workload: str, key: str, target: dict | None, servers: list[str]) -> tuple[str, str]:
    """The targets' text and whether each subject's median (or median ratio) meets them.

    A target's subject is deskpush unless its key is a pair (subject, who); a target whose
    subject or peer is not in this run is left out.
    """
    if not target:
        return "", ""
    texts, checks = [], []
    for who, (op, bound) in target.items():
        subject, who = who if isinstance(who, tuple) else ("deskpush", who)
        if subject not in servers or (who != "abs" and who not in servers):
            continue
        # A server other than deskpush is named in the target's text: "1 node + Redis >= 0.35× deskpush".
        named = "" if subject == "deskpush" else BY_NAME[subject].title.removeprefix("deskpush ") + " "
        if who == "abs":
            values = [run[(workload, subject)][key] for run in results if (workload, subject) in run]
            got = statistics.median(values) if values else None
            texts.append(f"{named}{op} {fmt(bound)}")
            label = fmt(got)
        else:
            rs = ratios(results, workload, key, who, base=subject)
            got = statistics.median(rs) if rs else None
            texts.append(f"{named}{op} {bound:g}× {BY_NAME[who].title}")
            label = f"{fmt(got)}× {BY_NAME[who].title}"
        label = f"{named}{label}"
        if got is None:
            checks.append(f"n/a ({label})")
        else:
            ok = got >= bound if op == ">=" else got <= bound if op == "<=" else got < bound
            checks.append(("yes" if ok else "NO") + f" ({label})")
    return "; ".join(texts), "; ".join(checks)


def table(results: list[dict], servers: list[str], workloads: list[str]) -> str:
    peers = [p for p in ["baseline", "deskpush-nometrics", *PEERS] if p in servers and "deskpush" in servers]
    # Each cluster server over the embedded one, where both ran a workload (not the failover's three nodes).
    clusters = [c for c in CLUSTERS if c in servers and "deskpush" in servers
                and set(BY_NAME[c].workloads) & set(BY_NAME["deskpush"].workloads)]
    head = (["figure"] + [BY_NAME[s].title for s in servers] + [f"deskpush ÷ {BY_NAME[p].title}" for p in peers]
            + [f"{BY_NAME[c].title} ÷ deskpush" for c in clusters])
    # How far the stack itself is from Node: the limit of what any Python server here can reach.
    floor_node = "floor" in servers and "socketio" in servers
    if floor_node:
        head.append("floor ÷ Socket.IO (Node)")
    head += ["target", "met"]
    rows = [head, ["---"] * len(head)]
    for workload, key, label, target in METRICS:
        if workload not in workloads:
            continue
        row = [label]
        for s in servers:
            row.append(spread([run[(workload, s)].get(key) for run in results if (workload, s) in run]))
        for p in peers:
            row.append(spread(ratios(results, workload, key, p), "×"))
        for c in clusters:
            row.append(spread(ratios(results, workload, key, "deskpush", base=c), "×"))
        if floor_node:
            row.append(spread(ratios(results, workload, key, "socketio", base="floor"), "×"))
        row += list(verdict(results, workload, key, target, servers))
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def machine() -> list[str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    node = "-"
    if shutil.which("node"):
        node = subprocess.run(["node", "-v"], capture_output=True, text=True).stdout.strip()

    def version(dist: str) -> str:
        try:
            from importlib.metadata import version as v
            return v(dist)
        except Exception:
            return "-"

    def npm_version(pkg: str) -> str:
        try:
            return json.loads((BENCH / "node_modules" / pkg / "package.json").read_text())["version"]
        except OSError:
            return "-"

    return [
        f"- CPU: {model}, {len(os.sched_getaffinity(0))} cores available (nproc), "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2**30} GiB RAM, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()} (websockets {version('websockets')}, msgspec {version('msgspec')}, "
        f"uvloop {version('uvloop')}, python-socketio {version('python-socketio')}, aiohttp {version('aiohttp')}); "
        f"Node {node} (ws {npm_version('ws')}, socket.io {npm_version('socket.io')})",
    ]


NOTES = """\
## How it is measured

- **Servers.** deskpush: `deskpush serve --config <generated> --log-level INFO` with every feature on: agent
  JWTs (HS256) and an integrator API key, frame validation, templates (the built-in
  `msdyn_chat_incoming_unauthenticated`; a `bench_timeout` template with a 2 s timeout), queue limits
  (`displayLimit` 1, 10 for the timeout storm; `queueLimit` 100), one INFO log line per outcome (to a file),
  the default `timerResolution` (deadlines, and so `expiresAt`, rounded up to 50 ms).
  Only the rate limits are raised (`agentRate` 1000/s, `integratorRate` 10^6/s) so that the load is not
  refused. The floor (`bench/peers/floor.py`): websockets + uvloop + msgspec, forwards offers and answers with
  one `call_later` per offer, reads the agent id from the JWT unverified, nothing else; it listens with a
  backlog of 4096 (asyncio's default of 100 drops connections in a storm). Socket.IO on Node
  (`bench/peers/socketio_server.js`, `socket.timeout(ms).emitWithAck()`) and python-socketio on aiohttp + uvloop
  (`bench/peers/pysio_server.py`, `sio.call(..., timeout=...)`) verify the same JWTs and API key. Each runs
  as its own process; no compression anywhere; Socket.IO uses the WebSocket transport only.
- **Cluster mode** (docs/cluster.md). "1 node + Redis" and "2 nodes + Redis": the same config and command
  plus `--redis redis://127.0.0.1:PORT/0`, on a `redis-server` the bench starts for each measurement (a free
  port, a temporary directory, `appendonly yes` with Redis's default fsync every second, nothing else set);
  each node is waited for until `GET /readyz` answers 200. Agent *i* connects to node *i* mod *n* and the
  integrator to the last node, so with two nodes half the agents get their offers through the other node.
  "server" figures are the nodes' together (CPU summed over the nodes, % of one core, so two nodes may pass
  100); Redis's CPU has rows of its own. The target: 1 node + Redis at least 0.35x the embedded server's
  outcomes/s in the same run, and timeout storm p99 lateness at most 100 ms.
- **Failover.** 3 nodes + Redis behind HAProxy, as `make cluster` runs them (`server/localcluster.py`:
  HAProxy checks `/readyz` every 500 ms, takes a node out after 2 failures, and redispatches a connection a
  dead node refuses). 6,000 agents, agent *i* connected directly to node *i* mod 3 (so the 2,000 the kill
  hits are known), the integrator on node 0; offers flow to the agents of nodes 0 and 1 (a closed loop of
  50, as in the offer round trip) for 2 s, then the generator sends SIGKILL to node 2 and starts its
  clock. Each of node 2's agents, when its connection drops, connects again through HAProxy, at most 200
  connecting at once as in the storm, retrying as there; once it is welcomed, the integrator sends it a
  new offer. The figure: seconds from the kill until the last of the 2,000 has that offer on its desktop
  (target: at most 5 s); also until the last is welcomed, the median per agent, and the median time from
  starting to reconnect to the welcome. Every offer must end with Accept, the background's and the new
  ones. HAProxy's CPU is on its own row, not in the server's.
- **Frames per offer.** deskpush and the floor: notifyEvent, notification, respond, result, resolved (the
  same frames, the same sizes); `+progress` adds the two status frames. The Socket.IO peers: notify,
  notification, ack, ack (the agent learns the outcome from its own ack, so no resolved), i.e. one
  message fewer per offer.
- **Generator.** `bench/gen.js`: one Node.js process holding every agent and the integrator (`ws`, or
  for the Socket.IO peers, its own few lines of Socket.IO v5 on `ws`, much cheaper than socket.io-client).
  Its CPU is in the table, as % of one core over the window. Near 100% it is the bottleneck (the cancel
  storm against deskpush): that server's rate is then a lower bound.
- **Offer round trip.** 200 agents answer Accept at once; 100 notifyEvents in flight (slot *i* offers to
  agents *i* and *i*+100 in turn, so no agent holds two); 0.5 s warm-up, then a 10 s window. Latency:
  notifyEvent sent -> result received, in the generator. CPU µs/outcome: server CPU in the window / outcomes.
- **Connection storm.** 9,000 agents, at most 200 connecting at once (each welcomed agent lets the next one
  start; a failed one retries); seconds from the first connect to the last welcome (for Socket.IO: the
  client's `connect`, i.e. handshake and authenticated namespace connect). RSS per agent: (peak RSS -
  idle RSS) / 9,000. Listen queue overflows: the kernel's TcpExt ListenOverflows over the storm (whole
  machine); each one is a client waiting 1 s or more to retransmit.
- **Timeout storm.** 2,000 agents, 20,000 notifyEvents sent at once (10 per agent), 2 s display timeout
  (0.5 s with `--quick`, every server's),
  nobody answers. Lateness: when the integrator receives the Timeout/DisplayTimeout result minus the
  `expiresAt` (epoch ms) of that notification as its agent received it (matched by correlationId), both on
  the machine's wall clock.
- **Cancel storm.** 200 agents, 100 offers in flight, 0.5 s warm-up then a 3 s window; deskpush (progress
  on) is cancelled on `status: displayed`; the peers send no status, so the generator cancels as soon as the
  agent holds the offer. Latency: cancelEvent sent -> `resolved` received by the agent.
- **Ratios** are deskpush's figure over the peer's from the same run; for latency, CPU, seconds and RSS a
  ratio under 1 favours deskpush. Targets are judged on the medians. The machine is shared: absolute
  figures move with whatever else runs; compare within one run.

## Measurements behind the code

The code says why it is shaped as it is; what was measured to choose lives here, with when.

- **Timer budget** (`Dispatcher.timer_budget`, 0.1 s): ending deadlines for up to 0.1 s per timer run
  before I/O gets a turn. Timeout storm p99 lateness when it was chosen (2026-11-24): about 34 ms at
  0.1 s, 37 ms at 0.05 s, 38 ms at 0.03 s. The longer a run, the more of each desktop's frames share
  one write.
- **A write costs about 10 µs** (loopback TCP, `socket.send`, measured alone, 2026-11-24), almost all
  of it the kernel's: a flush to 2,000 desktops takes about 20 ms, which is why a flush stops every
  `flush_slice` writes to end what fell due (`server/dispatch.py`).
- **uvloop's cached clock** (`server/clock.py`): before `LoopClock` refreshed it after its callbacks,
  the first deadline after a 30 ms timer run fired 25 to 35 ms late in each instrumented timeout
  storm, and later ones compounded (14, 31, 51 ms in one run; 2026-11-24). `tests/test_clock.py`
  measures 300 ms late without the refresh for a 0.3 s callback.
- **Garbage collection** (`server/cli.py`): a full collection walks every live object, 100 ms and
  more with thousands of sessions and offers, and stalls every timer meanwhile; hence
  `gc.freeze()` after start and a 10x higher threshold for the oldest generation.
- **Timers grouped by deadline** (`protocol/timers.py`): a timeout storm puts 20,000 deadlines in
  a burst; one heap entry per timer meant 20,000 tuples sifted by comparison. Grouped, the heap
  holds only the distinct times (a handful, on the `timerResolution` grid). Ending 20,000 display
  timeouts in-process: engine 3.4 -> 2.7 µs each (medians of 7, 2026-11-24).
- **Module constants for the states** (`protocol/engine.py`): reading a module global is several
  times faster than looking up an `Enum` member, on the hot path of every event.
- **A remembered outcome** (`limits.recentOutcomes`, 100,000 by default): 1,150 bytes each while it
  kept its card and connection, 540 once it kept only ids and outcome (2026-11-24), 425 as its own
  small record (2026-11-29; `tests/test_engine_memory.py` bounds it).
- **The engine restructured** (2026-11-29: effects returned, typed timers, the small record),
  against the engine before it, in-process, pinned to one core: 200 agents x 100,000 accepted
  offers 0.84x the time, 20,000 display timeouts 0.87x, a cancel-heavy mix 0.86x (medians of 11
  alternating runs); under callgrind, 6 to 8% fewer instructions in each.
- **A cluster node's clock** (`server/cluster.py`, `RedisClock`): while every batch read from the
  log set it back to its last entry's time, the node's clock lagged Redis's by the log's delivery time
  and every deadline fired that late: timeout storm p99 lateness 213 ms on 1 node + Redis (`--quick`,
  2026-11-30); moved back only when the node's own Tick reached Redis early, 26 ms.
- **Unmasking in Python** (`server/connection.py`): websockets' C helper is not public API, so
  deskpush XORs the payload as one integer: about 0.5 to 0.9 µs for a 60 to 250-byte message,
  against 0.1 to 0.25 µs in C (2026-11-29).
- **Counting for /metrics** (`server/metrics.py`): plain integers on the hot path, prometheus-client
  only at scrape time. A whole server under callgrind, 1,000 accepted offers (20 agents, one
  integrator, `--log-level WARNING`), user-space instructions per offer: 172,247 with metrics on,
  166,764 with `server.metrics = false`, 1.033x (2026-11-30; 1.046x before error frames were taken
  out of the per-frame dictionary update). `--servers deskpush,deskpush-nometrics --only offer
  --runs 7` the same day: CPU per outcome 1.04x (0.98-1.11); outcomes/s 1.00x in the three runs
  where neither server was starved by other work, 0.87x median over all seven.
- **Memory per connected agent**: 16.5 KiB while each session was a websockets `ServerConnection`
  with a handler task; about 8 KiB as deskpush's own `asyncio.Protocol` with no task (storm,
  2026-11-29, `--baseline 44de42e`).
"""


# ---------------------------------------------------------------------------
# Setup and main

def ensure_node(need_node: bool) -> None:
    if not need_node:
        return
    if not shutil.which("node") or not shutil.which("npm"):
        raise BenchError("node and npm are needed for the Node generator and the Socket.IO peer; "
                         "without them run: python -m bench.run --gen python --only offer --servers deskpush,floor")
    if not (BENCH / "node_modules" / "ws").is_dir() or not (BENCH / "node_modules" / "socket.io").is_dir():
        verb = "ci" if (BENCH / "package-lock.json").exists() else "install"
        print(f"bench: npm {verb} --prefix bench", file=sys.stderr)
        subprocess.run(["npm", verb, "--prefix", str(BENCH), "--no-audit", "--no-fund"], check=True, stdout=sys.stderr)


def ensure_pysio(need: bool) -> None:
    if not need:
        return
    try:
        import aiohttp  # noqa: F401
        import socketio  # noqa: F401
    except ImportError:
        print("bench: pip install -r bench/requirements.txt", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")],
                       check=True, stdout=sys.stderr)


def ensure_cluster_tools(servers: list[str]) -> None:
    """Debian's redis-server for the cluster servers, and haproxy for the one behind a balancer."""
    need = {"redis-server"} if any(BY_NAME[s].nodes for s in servers) else set()
    need |= {"haproxy"} if any(BY_NAME[s].balancer for s in servers) else set()
    missing = [name for name in sorted(need) if not shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")]
    if missing:
        raise BenchError(f"the deskpush-cluster servers need {' and '.join(missing)} (Debian's packages; "
                         "make cluster-tools installs them); without them leave those servers out of --servers")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny counts and 1 run: a smoke run")
    p.add_argument("--runs", type=int, help="runs of every workload (default 3; 1 with --quick)")
    p.add_argument("--only", action="append", choices=WORKLOADS, help="run only this workload (repeatable)")
    p.add_argument("--servers", default=DEFAULT_SERVERS,
                   help="comma-separated, from: " + ", ".join(s.name for s in SERVERS))
    p.add_argument("--gen", choices=["node", "python"], default="node",
                   help="load generator; python covers only the offer workload on deskpush and the floor")
    p.add_argument("--out", default=str(BENCH / "RESULTS.md"), help="markdown file to write ('-' for none)")
    p.add_argument("--baseline", metavar="REF",
                   help="also run deskpush as of git commit REF (e.g. HEAD~5), with a 'deskpush ÷ REF' column")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record the Python servers with py-spy (collapsed stacks, DIR/SERVER-WORKLOAD.txt); "
                        "its CPU figures then include the sampling's cost")
    args = p.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    runs = args.runs or (1 if args.quick else 3)
    workloads = args.only or WORKLOADS
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in servers if s not in BY_NAME]
    if unknown:
        p.error(f"unknown server {', '.join(unknown)}")
    servers = [s.name for s in SERVERS if s.name in servers]  # table order
    if args.baseline:
        servers.insert(servers.index("deskpush") + 1 if "deskpush" in servers else 0, "baseline")
        BY_NAME["baseline"] = Server("baseline", f"deskpush {args.baseline}", "raw", tuple(WORKLOADS))
    if args.gen == "python" and (set(workloads) != {"offer"} or any(BY_NAME[s].proto != "raw" for s in servers)):
        p.error("--gen python covers only --only offer on deskpush's protocol (deskpush, deskpush-progress, "
                "the deskpush-cluster servers, floor)")

    try:
        raise_nofile(max(sizes[w].get("agents", 0) for w in workloads) + 200)
        ensure_node(args.gen == "node" or "socketio" in servers)
        ensure_pysio("pysio" in servers)
        ensure_cluster_tools(servers)
        if args.profile and not py_spy():
            raise BenchError("--profile needs py-spy on PATH (pip install py-spy)")
        if args.baseline:
            global BASELINE
            BASELINE = checkout_baseline(args.baseline, Path(tempfile.mkdtemp(prefix="deskpush-baseline-")))
        load0, t0 = os.getloadavg()[0], time.monotonic()
        results, problems = run_all(args.gen, sizes, runs, workloads, servers, args.profile)
        elapsed, load1 = time.monotonic() - t0, os.getloadavg()[0]
    except (BenchError, subprocess.CalledProcessError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1

    text = table(results, servers, workloads)
    print(text)
    print(f"bench: {elapsed:.0f} s in all", file=sys.stderr)
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    if args.out != "-":
        conditions = (f"- The run took {elapsed:.0f} s. Load average {load0:.1f} just before it (other work on the machine; "
                      f"{load1:.1f} at the end, which includes the bench's own ~2). A server that is the bottleneck but "
                      "shows well under 100% in 'server CPU % of a core' was starved by other work during that run.")
        write_results(Path(args.out), text, args, sizes, runs, workloads, problems, conditions)
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 1 if problems else 0


def run_all(gen: str, sizes: dict, runs: int, workloads: list[str], servers: list[str],
            profile: Path | None = None) -> tuple[list[dict], list[str]]:
    results: list[dict] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="deskpush-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for run in range(runs):
            got: dict = {}
            for workload in workloads:
                todo = [s for s in servers if workload in BY_NAME[s].workloads]
                # Rotate the order each run so that drift on a shared machine spreads over all servers.
                k = run % len(todo) if todo else 0
                for name in todo[k:] + todo[:k]:
                    server = BY_NAME[name]
                    params = {"proto": server.proto, "workload": workload, "secret": SECRET, "apiKey": API_KEY,
                              "burst": BURST, "progress": server.progress, **sizes[workload]}
                    if workload == "cancel":
                        # deskpush cancels on `status: displayed`; the peers send no status, so the
                        # generator cancels as soon as its agent holds the offer.
                        params["cancelOn"] = "status" if server.proto == "raw" and name != "floor" else "notification"
                        params["progress"] = params["cancelOn"] == "status"
                    t0 = time.monotonic()
                    try:
                        kind = RunningBalanced if server.balancer else Running
                        srv = kind(server, workload, tmp, profile, timeout=sizes["timeout"]["timeout"])
                        try:
                            # Agent i connects to urls[i % len(urls)], the integrator to the last one.
                            params["url"], params["urls"] = srv.urls[0], srv.urls
                            if server.balancer:
                                params["balancer"] = srv.balancer_url
                            if workload == "failover":
                                # The generator kills the last node itself: one clock from kill to welcome.
                                params["killPid"] = srv.pids[f"node{server.nodes - 1}"]
                            r, m, g = run_generator(gen, params, srv, timeout=180)
                        finally:
                            srv.stop()
                    except BenchError as exc:  # note it and go on: one broken peer should not void the run
                        problems.append(f"run {run + 1} {workload} {name}: {exc}")
                        print(f"bench: {problems[-1]}", file=sys.stderr, flush=True)
                        continue
                    fig, bad = figures(workload, r, m, g, srv.idle, sizes[workload].get("agents", 0))
                    got[(workload, name)] = fig
                    problems += [f"run {run + 1} {workload} {name}: {b}" for b in bad]
                    print(f"run {run + 1}/{runs} {workload:7} {name:18} {time.monotonic() - t0:5.1f} s  "
                          + "  ".join(f"{k}={fmt(v)}" for k, v in fig.items()), file=sys.stderr, flush=True)
            results.append(got)
    return results, problems


def write_results(path: Path, text: str, args: argparse.Namespace, sizes: dict, runs: int,
                  workloads: list[str], problems: list[str], conditions: str) -> None:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m bench.run" + (" --quick" if args.quick else "") + (f" --runs {args.runs}" if args.runs else "")
    cmd += "".join(f" --only {w}" for w in (args.only or []))
    cmd += f" --servers {args.servers}" if args.servers != DEFAULT_SERVERS else ""
    cmd += " --gen python" if args.gen == "python" else ""
    cmd += f" --baseline {args.baseline}" if args.baseline else ""
    lines = [
        "# deskpush benchmark results",
        "",
        f"`{cmd}` on {when}; {runs} run(s); each figure is the median with (min–max) over the runs, and each "
        "ratio is deskpush's figure divided by the peer's from the same run, summarised the same way.",
        "",
        *machine(),
        conditions,
        f"- Sizes: {json.dumps({w: sizes[w] for w in workloads})}; at most {BURST} agents connecting at once",
        "",
        text,
        "",
    ]
    if problems:
        lines += ["Problems seen:", "", *[f"- {x}" for x in problems], ""]
    lines += [NOTES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
