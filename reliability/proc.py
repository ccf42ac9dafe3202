"""A real ``deskpush serve`` process for the runs: its config file, its port, its log, its RSS and fds.

Each run starts the server the way an operator does, ``python -m deskpush.server
serve --config FILE --port P``, on 127.0.0.1 and a free port, and reads what an
operator would: the process's stderr (the log: a ``Traceback`` there is a
server exception), ``/proc/PID/status`` (VmRSS) and ``/proc/PID/fd``. The
helpers that the benchmarks already have (a free port, a /proc sample, the
file-descriptor limit) come from ``bench.run``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from bench.run import free_port, proc_sample
from deskpush.server.auth import AgentTokens

__all__ = ["ServerProcess", "ServerError", "Traceback", "tracebacks", "toml", "supported", "agent_token", "SECRET"]

ROOT = Path(__file__).resolve().parent.parent
SECRET = "reliability-secret-" + secrets.token_hex(16)
TOKENS = AgentTokens(SECRET)
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):$", re.M)


class ServerError(Exception):
    """The server under test would not start, or died."""


class Traceback(msgspec.Struct, frozen=True):
    """One traceback in a server log: its last line (the exception) and the whole text."""

    exception: str
    text: str


def tracebacks(log: str) -> list[Traceback]:
    """Every ``Traceback (most recent call last):`` block in ``log``."""
    out = []
    for m in _TRACEBACK.finditer(log):
        lines = log[m.start():].splitlines()
        end = 1
        while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()
                                     or lines[end].startswith(("During handling", "The above exception",
                                                               "Traceback ("))):
            end += 1
        exception = lines[end] if end < len(lines) else "(cut off)"
        out.append(Traceback(exception, "\n".join(lines[:end + 1])))
    return out


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return "[" + ", ".join(_value(x) for x in v) + "]"


def toml(config: dict[str, Any], prefix: str = "") -> str:
    """The TOML text of ``config``: top-level keys, then ``[table]`` and ``[[array.of.tables]]``.

    Enough for deskpush's config (msgspec writes TOML only with an extra package).
    """
    lines: list[str] = []
    nested: list[str] = []
    for key, v in config.items():
        name = f"{prefix}{key}"
        if isinstance(v, dict):
            nested.append(f"\n[{name}]\n" + toml(v, f"{name}."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v) and key != "fields":
            nested.extend(f"\n[[{name}]]\n" + toml(x, f"{name}.") for x in v)
        else:
            lines.append(f"{key} = {_value(v)}")
    return "\n".join(lines) + "\n" + "".join(nested)


def supported(section: str, key: str) -> bool:
    """Whether this deskpush's config has ``[section] key`` (camelCase): runs set newer knobs only where they exist."""
    from deskpush.server import config as c

    cls = {"server": c.ServerSection, "auth": c.AuthSection, "limits": c.Limits}[section]
    return key in {f.encode_name for f in msgspec.inspect.type_info(cls).fields}


def agent_token(agent_id: str, ttl: float = 6 * 3600) -> str:
    return TOKENS.issue(agent_id, ttl=ttl)


class ServerProcess:
    """``deskpush serve`` with a config written from ``config`` (a dict of the TOML's tables).

    ``start()`` waits until the port accepts connections; ``restart()`` starts
    a new process on the same port and config (a SIGTERM'd server's state
    file is then read back). ``nofile`` caps the process's file descriptors
    (soft and hard ``RLIMIT_NOFILE``), for the fd exhaustion fault.
    """

    def __init__(self, tmp: Path, name: str, config: dict[str, Any], *, nofile: int | None = None,
                 log_level: str = "INFO") -> None:
        self.tmp = tmp
        self.name = name
        self.port = free_port()
        self.nofile = nofile
        self.log_level = log_level
        self.config_path = tmp / f"{name}.toml"
        config = {**config, "server": {"host": "127.0.0.1", **config.get("server", {})}}
        config.setdefault("auth", {})["jwtSecret"] = SECRET
        self.config = config
        self.config_path.write_text(toml(config))
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.logs: list[Path] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.starts += 1
        log = self.tmp / f"{self.name}-{self.starts}.log"
        self.logs.append(log)
        cmd = [sys.executable, "-m", "deskpush.server", "serve", "--config", str(self.config_path),
               "--port", str(self.port), "--log-level", self.log_level]
        with open(log, "wb") as err, open(self.tmp / f"{self.name}-{self.starts}.out", "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if self.nofile is not None:
            # Soft and hard: the server cannot raise it either. Set while Python
            # is still starting, long before the server listens.
            resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServerError(f"{self.name} did not listen within {timeout:.0f} s:\n{self.tail()}")
                time.sleep(0.05)
        return self

    def restart(self) -> ServerProcess:
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int | None:
        """The exit status once it has exited (-N for a signal), None if it is still running."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a clean stop: close every connection, save the state file), SIGKILL if it hangs."""
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    # -- what an operator can read

    def rss_mib(self) -> float:
        return proc_sample(self.pid)["VmRSS"] / 1024

    def cpu_s(self) -> float:
        return proc_sample(self.pid)["cpu"]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def connections(self) -> Counter[str]:
        """The server's TCP sockets by state (LISTEN, ESTABLISHED, CLOSE_WAIT...), from /proc."""
        inodes = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        states: Counter[str] = Counter()
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    states[TCP_STATES.get(fields[3], fields[3])] += 1
                    inodes.discard(fields[9])
        if inodes:
            states["not TCP"] = len(inodes)
        return states

    def log(self) -> str:
        """Every start's log (stderr), in order."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_size(self) -> int:
        return sum(p.stat().st_size for p in self.logs if p.exists())

    def log_since(self, offset: int) -> str:
        """The current log from byte ``offset`` (a value of ``log_size()``) on, within the last start."""
        earlier = sum(p.stat().st_size for p in self.logs[:-1] if p.exists())
        with open(self.logs[-1], "rb") as fh:
            fh.seek(max(0, offset - earlier))
            return fh.read().decode(errors="replace")

    def tracebacks(self) -> list[Traceback]:
        return tracebacks(self.log())

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-n:])
