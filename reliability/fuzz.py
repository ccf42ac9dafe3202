"""The bad-input run: a hypothesis fuzz of a real server's two endpoints and its HTTP side, with bystanders.

One ``deskpush serve`` process. Each fuzz case is its own TCP connection,
made by ``wire.SyncClient``: the opening handshake (websockets' client
request), then, *after authentication*, a valid hello (an agent's JWT, or the
integrator's key in a hello or as a Bearer header), then the case's bytes; or,
*before authentication*, the case's bytes as the very first frames. A case of
well-formed frames ends with a ping whose pong proves the server read
everything before it, then a close frame; every case then half-closes and
reads until the server closes TCP. Families (see ``strategies``):

=====================  ==============================================================
agent/integrator JSON  frames from the frame schemas, mutated, in text or binary
                       frames, whole or fragmented
agent/integrator raw   frame headers, fragments, control frames, masks, lengths
HTTP                   the opening request: methods, paths, headers, pipelining
=====================  ==============================================================

What counts, per case: a ``Traceback`` in the server's log while the case ran
(a server exception), a close with 1011 (internal error), a server that did
not close after the client's EOF (hung), a server that died; and what RFC 6455
and RFC 9110 require of it: a text message that is not UTF-8 fails the
connection with 1007 (RFC 6455 section 8.1), a HEAD response has no content
(RFC 9110 section 9.3.2), and methods other than GET and HEAD are not served a
page (issue 13 asks for 405). Throughout, a bystander pair (an agent and an
integrator with their own key) runs offer round trips; each must succeed.
The seed fixes every case: hypothesis runs with ``@seed`` and no database.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from deskpush.protocol import BUILTIN_TEMPLATES

from .proc import ServerProcess, agent_token, supported, tracebacks
from .strategies import Case, Context, frame_streams, http_requests, json_messages
from .wire import Client, ClientClosed, Seen, SyncClient, encode, frame, mask

__all__ = ["FuzzParams", "Bystander", "run_fuzz", "FAMILIES"]

PING_PROBE = b"probe"


@dataclass(frozen=True)
class Family:
    name: str
    endpoint: str  # agent, integrator, http
    auth: bool  # cases sent after authentication
    kind: str  # json, raw, http
    share: float  # of the cases


FAMILIES = [
    Family("agent, before auth, JSON", "agent", False, "json", 0.10),
    Family("agent, after auth, JSON", "agent", True, "json", 0.15),
    Family("integrator, before auth, JSON", "integrator", False, "json", 0.10),
    Family("integrator, after auth, JSON", "integrator", True, "json", 0.15),
    Family("agent, before auth, raw frames", "agent", False, "raw", 0.08),
    Family("agent, after auth, raw frames", "agent", True, "raw", 0.12),
    Family("integrator, before auth, raw frames", "integrator", False, "raw", 0.08),
    Family("integrator, after auth, raw frames", "integrator", True, "raw", 0.12),
    Family("HTTP opening request", "http", False, "http", 0.10),
]


@dataclass
class FuzzParams:
    cases: int = 4000
    timeout: float = 5.0  # for the server to close after the client's EOF
    seed: int = 0


@dataclass
class FamilyResult:
    cases: int = 0
    seen: Counter = field(default_factory=Counter)  # how each case ended
    exceptions: int = 0
    internal_errors: int = 0
    hung: int = 0
    deviations: int = 0
    max_log_lines: int = 0


@dataclass
class Finding:
    """One kind of failure, with the smallest input that showed it."""

    what: str
    family: str
    count: int
    example: Case
    seen: str
    traceback: str = ""


# --------------------------------------------------------------------------
# Bystanders: an agent and an integrator with their own key, doing offer round trips


class Bystander:
    """Offer round trips in a thread of their own, on their own event loop, while the fuzz runs.

    Each round trip: a notifyEvent for the bystander agent, its notification,
    Accept, the integrator's Accept/Accept result. A round trip that does not
    end so within 5 s, or a connection closed by the server, is a failure.
    A ``sink`` agent is connected too and accepts whatever the fuzz offers it,
    so the fuzz's valid notifyEvents go all the way through.
    """

    def __init__(self, port: int, key: str, name: str = "bystander") -> None:
        self.port, self.key, self.name = port, key, name
        self.ok = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Bystander:
        self.thread.start()
        if not self.ready.wait(20):
            raise RuntimeError(f"{self.name} did not start: {self.error}")
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)

    def _run(self) -> None:
        import uvloop

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._main())
        except BaseException as exc:  # reported by start() or in the failures
            self.error = exc
            self.failures.append(f"bystander stopped: {exc!r}")
            self.ready.set()

    async def _connect(self) -> tuple[Client, Client]:
        agent = await Client.open("127.0.0.1", self.port, "/agent")
        agent.send({"type": "hello", "token": agent_token(self.name)})
        welcome = await agent.recv(5)
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"no welcome: {welcome}")
        integ = await Client.open("127.0.0.1", self.port, "/integrator",
                                  headers=[("Authorization", f"Bearer {self.key}")])
        return agent, integ

    async def _main(self) -> None:
        def accept_all(client: Client, data: bytes) -> None:
            if b'"notification"' in data:
                nid = re.search(rb'"notificationId":"([^"]+)"', data)
                if nid:
                    client.send({"type": "respond", "notificationId": nid.group(1).decode(), "action": "Accept"})

        sink = await Client.open("127.0.0.1", self.port, "/agent", on_message=accept_all)
        sink.send({"type": "hello", "token": agent_token("sink")})
        agent, integ = await self._connect()
        self.ready.set()
        n = 0
        while not self.stopping.is_set():
            n += 1
            rid = f"{self.name}-{n}"
            t0 = time.perf_counter()
            try:
                integ.send({"type": "notifyEvent", "requestId": rid, "agentId": self.name, "progress": False,
                            "input": {"templateName": "msdyn_chat_incoming_unauthenticated", "templateParameters": {}},
                            "correlationId": rid})
                note = await agent.recv(5)
                if note.get("type") != "notification" or note.get("correlationId") != rid:
                    raise RuntimeError(f"agent got {note}")
                agent.send({"type": "respond", "notificationId": note["notificationId"], "action": "Accept"})
                result = await integ.recv(5)
                if (result.get("type") != "result" or result.get("requestId") != rid
                        or result["value"] != {"actionName": "Accept", "responseReason": "Accept"}):
                    raise RuntimeError(f"integrator got {result}")
                resolved = await agent.recv(5)
                if resolved.get("type") != "resolved":
                    raise RuntimeError(f"agent got {resolved}")
                self.ok += 1
                self.latencies.append(time.perf_counter() - t0)
            except (TimeoutError, ClientClosed, RuntimeError, OSError) as exc:
                self.failures.append(f"round trip {rid}: {exc!r}"[:300])
                for c in (agent, integ):
                    c.cut()
                await asyncio.sleep(0.5)
                try:
                    agent, integ = await self._connect()
                except (OSError, TimeoutError, RuntimeError, ClientClosed) as exc2:
                    self.failures.append(f"reconnect: {exc2!r}"[:300])
                    await asyncio.sleep(1.0)
                continue
            await asyncio.sleep(0.02)
        for c in (agent, integ, sink):
            c.close()
        await asyncio.sleep(0.2)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {"ok": self.ok, "failed": len(self.failures), "failures": self.failures[:10],
                "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
                "max_ms": 1000 * lat[-1] if lat else None}


# --------------------------------------------------------------------------
# One case


def _ended(seen: Seen) -> str:
    if seen.hung:
        return "hung"
    if seen.close_code is not None:
        return f"close {seen.close_code}"
    if seen.status is not None and seen.status != 101:
        return f"HTTP {seen.status}"
    if seen.reset:
        return "reset"
    return "open until the client closed" if PING_PROBE in seen.pongs else "closed without a close frame"


TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2: method = token


def client_closes(data: bytes) -> list[tuple[int, str]]:
    """(code, reason) of each whole close frame in a client's byte stream, up to where it stops being frames."""
    out, pos = [], 0
    while pos + 2 <= len(data):
        op, masked, n = data[pos] & 0x0F, data[pos + 1] & 0x80, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n, pos = int.from_bytes(data[pos:pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos:pos + 8], "big"), pos + 8
        key = data[pos:pos + 4] if masked else b""
        pos += 4 if masked else 0
        if pos + n > len(data):
            break
        payload = mask(data[pos:pos + n], key) if masked else data[pos:pos + n]
        pos += n
        if op == 8 and len(payload) >= 2:
            out.append((int.from_bytes(payload[:2], "big"), payload[2:].decode(errors="replace")))
    return out


def _answered(seen: Seen, case: Case) -> str:
    """How an HTTP case ended: the status of each answer, or how it was closed without one."""
    statuses = [str(status) for status, _, _ in parse_responses(seen.raw)]
    if seen.hung:
        return "hung"
    if statuses:
        return "HTTP " + " + ".join(statuses)
    return "no answer, " + ("reset" if seen.reset else "closed") + ("" if case.complete else " (request cut short)")


def ws_case(port: int, family: Family, case: Case, ctx: Context, bearer: bool, token: str,
            timeout: float) -> Seen:
    """Run one WebSocket case; what the server did."""
    c = SyncClient("127.0.0.1", port, timeout)
    headers = [("Authorization", f"Bearer {ctx.api_key}")] if family.auth and family.endpoint == "integrator" \
        and bearer else []
    if not c.handshake(f"/{family.endpoint}", headers):
        return c.finish(timeout)
    if family.auth:
        if family.endpoint == "agent":
            c.send_raw(frame(encode({"type": "hello", "token": token})))
            c.wait_for(lambda s: any(b'"welcome"' in m for m in s.messages) or s.close_code is not None, timeout)
        elif not bearer:
            c.send_raw(frame(encode({"type": "hello", "apiKey": ctx.api_key})))
    if c.send_raw(case.data) and case.complete:
        c.send_raw(frame(PING_PROBE, 9))
        if c.wait_for(lambda s: PING_PROBE in s.pongs or s.close_code is not None, timeout) \
                and c.seen.close_code is None:
            c.send_raw(frame(b"\x03\xe8", 8))  # close 1000: the client ends it
    return c.finish(timeout)


def parse_responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP responses in ``raw``: (status, headers in lower case, the bytes after the head up to the next)."""
    out = []
    rest = raw
    while rest.startswith(b"HTTP/"):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            break
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 101:
            out.append((status, headers, b""))
            break
        n = int(headers.get("content-length", "0") or 0)
        body, rest = rest[:n] if status != 304 else b"", rest[n:]
        # What a HEAD response sent after its head, if anything, is read as body here
        # (a HEAD response must have none: RFC 9110 section 9.3.2).
        out.append((status, headers, body))
    return out


def http_case(port: int, case: Case, timeout: float) -> Seen:
    """Send the request bytes as they are; read until the server closes."""
    seen = Seen()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        seen.reset = True
        return seen
    try:
        sock.sendall(case.data)
    except OSError:
        seen.reset = True
    shut = False

    def shutdown() -> None:
        nonlocal shut
        shut = True
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    if not case.complete:
        shutdown()
    deadline = time.monotonic() + timeout + 1.0
    quiet_until = time.monotonic() + 1.0
    while True:
        now = time.monotonic()
        if now > deadline:
            seen.hung = True
            break
        if not shut:
            responses = parse_responses(seen.raw)
            if now > quiet_until or (responses and responses[-1][0] == 101):
                shutdown()
        sock.settimeout(max(0.01, min(deadline, quiet_until if not shut else deadline) - now))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            seen.reset = seen.eof = True
            break
        except OSError:
            seen.eof = True
            break
        if not data:
            seen.eof = True
            break
        seen.raw += data
    sock.close()
    responses = parse_responses(seen.raw)
    if responses:
        seen.status = responses[0][0]
    return seen


# --------------------------------------------------------------------------
# The run


class Fuzz:
    def __init__(self, p: FuzzParams, srv: ServerProcess, ctx: Context, say: Any) -> None:
        self.p, self.srv, self.ctx, self.say = p, srv, ctx, say
        self.results: dict[str, FamilyResult] = defaultdict(FamilyResult)
        self.findings: dict[tuple[str, str], Finding] = {}
        self.deaths = 0

    def find(self, what: str, family: Family, case: Case, seen: Seen, tb: str = "") -> None:
        key = (what, family.name)
        shown = f"{_ended(seen)}; messages {[m[:120] for m in seen.messages[:3]]}" if family.kind != "http" \
            else repr(seen.raw[:300])
        old = self.findings.get(key)
        if old is None:
            self.findings[key] = Finding(what, family.name, 1, case, shown, tb)
        else:
            old.count += 1
            if len(case.data) < len(old.example.data):
                old.example, old.seen, old.traceback = case, shown, tb or old.traceback

    def run_case(self, family: Family, case: Case, extra: Any) -> None:
        r = self.results[family.name]
        r.cases += 1
        offset = self.srv.log_size()
        if family.kind == "http":
            seen = http_case(self.srv.port, case, self.p.timeout)
        else:
            bearer, which = extra
            seen = ws_case(self.srv.port, family, case, self.ctx, bearer, self.ctx.agent_tokens[which], self.p.timeout)
        r.seen[_ended(seen) if family.kind != "http" else _answered(seen, case)] += 1
        time.sleep(0.002)  # the server's log is written at the end of its loop iteration
        new = self.srv.log_since(offset)
        lines = [line for line in new.splitlines() if line and " INFO " not in line and " DEBUG " not in line]
        r.max_log_lines = max(r.max_log_lines, len(lines))
        found = tracebacks(new)
        for tb in found:
            r.exceptions += 1
            self.find(f"server exception: {tb.exception}", family, case, seen, tb.text)
        if seen.close_code == 1011 and (1011, seen.close_reason) not in client_closes(case.data):
            # (A close frame with 1011 that echoes the client's own is no internal error.)
            r.internal_errors += 1
            if not found:  # else the exception says why
                self.find(f"closed 1011 {seen.close_reason!r}", family, case, seen)
        if seen.hung:
            r.hung += 1
            self.find("the server did not close after the client's EOF", family, case, seen)
        if family.kind == "json" and case.bad_utf8_text and seen.close_code not in (1007, 1002, 1008, 1009):
            r.deviations += 1
            self.find("a text message that is not UTF-8 was not failed with 1007 (RFC 6455 8.1)", family, case, seen)
        if family.kind == "http":
            methods = extra
            for i, (status, headers, body) in enumerate(parse_responses(seen.raw)):
                method, line_ok = methods[i] if i < len(methods) else ("?", False)
                # Only a valid request line makes a HEAD request; an invalid one gets its 400
                # like any other (RFC 9112 section 3).
                if method == "HEAD" and line_ok and body:
                    r.deviations += 1
                    self.find("HEAD answered with content (RFC 9110 9.3.2)", family, case, seen)
                if method not in ("GET", "HEAD", "?") and 200 <= status < 300 or (method not in ("GET", "?")
                                                                                  and status == 101):
                    r.deviations += 1
                    if TOKEN.fullmatch(method):
                        self.find(f"{method} answered {status} (issue 13: GET and HEAD only, 405 otherwise)",
                                  family, case, seen)
                    else:
                        self.find(f"a method that is not a token ({method!r}) answered {status} (RFC 9112 "
                                  "section 3: an invalid request line gets 400)", family, case, seen)
        if not self.srv.alive():
            self.deaths += 1
            self.find("the server died", family, case, seen, self.srv.tail())
            self.srv.restart()

    def family_test(self, family: Family, n: int, seed: int) -> Any:
        if family.kind == "json":
            strategy = st.tuples(json_messages(family.endpoint, self.ctx, first=not family.auth),
                                 st.tuples(st.booleans(), st.integers(0, len(self.ctx.agent_tokens) - 1)))
        elif family.kind == "raw":
            strategy = st.tuples(frame_streams(),
                                 st.tuples(st.booleans(), st.integers(0, len(self.ctx.agent_tokens) - 1)))
        else:
            strategy = http_requests(self.ctx)

        @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate], derandomize=False,
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, print_blob=False)
        @hypothesis_seed(seed)
        @given(strategy)
        def test(drawn: Any) -> None:
            case, extra = drawn
            self.run_case(family, case, extra)

        return test


def fuzz_config(keys: dict[str, str]) -> dict[str, Any]:
    auth: dict[str, Any] = {"integratorKeys": [{"name": n, "key": k} for n, k in keys.items()]}
    if supported("auth", "failedAuthLimit"):
        # The fuzz fails integrator authentication on purpose, from one address:
        # with the throttle on, every later case would be refused before the code it targets.
        auth["failedAuthLimit"] = 0
    return {"server": {"demo": True}, "auth": auth}


def run_fuzz(p: FuzzParams, tmp: Path, say: Any = print) -> dict[str, Any]:
    """Start a server and the bystanders, run every family, stop; the figures and the findings."""
    import random

    rng = random.Random(f"fuzz-{p.seed}")
    keys = {"fuzz": f"fuzz-key-{rng.getrandbits(128):032x}", "bystander": f"bystander-key-{rng.getrandbits(128):032x}"}
    srv = ServerProcess(tmp, "fuzz", fuzz_config(keys)).start()
    ctx = Context(agent_tokens=(agent_token("fuzz-a"), agent_token("fuzz-b")), api_key=keys["fuzz"],
                  agent_ids=("fuzz-a", "fuzz-b", "sink"), templates=tuple(t.name for t in BUILTIN_TEMPLATES))
    fuzz = Fuzz(p, srv, ctx, say)
    bystander = Bystander(srv.port, keys["bystander"]).start()
    t0 = time.monotonic()
    try:
        for i, family in enumerate(FAMILIES):
            n = max(1, round(p.cases * family.share))
            t1 = time.monotonic()
            fuzz.family_test(family, n, p.seed * 100 + i)()
            r = fuzz.results[family.name]
            say(f"fuzz: {family.name:38} {r.cases:5} cases {time.monotonic() - t1:5.1f} s  "
                f"exceptions {r.exceptions}  deviations {r.deviations}  {dict(r.seen.most_common(4))}")
    finally:
        bystander.stop()
        status = srv.stop()
    return {
        "seconds": time.monotonic() - t0,
        "families": {name: {"cases": r.cases, "seen": dict(r.seen), "exceptions": r.exceptions,
                            "internal_errors": r.internal_errors, "hung": r.hung, "deviations": r.deviations,
                            "max_log_lines": r.max_log_lines}
                     for name, r in fuzz.results.items()},
        "findings": [{"what": x.what, "family": x.family, "count": x.count, "input": x.example.describe(),
                      "input_bytes": len(x.example.data), "seen": x.seen, "traceback": x.traceback[-1500:]}
                     for x in sorted(fuzz.findings.values(), key=lambda x: (x.what, x.family))],
        "deaths": fuzz.deaths,
        "bystander": bystander.summary(),
        "tracebacks": len(srv.tracebacks()),
        "exit_status": status,
    }
