"""Faults, one at a time, each on its own ``deskpush serve`` process: what each client saw, and everyone else.

=============================  ================================================================
agent drop mid-offer           an agent's TCP connection reset while an offer is displayed:
                               one comes back within the presence grace, one does not
integrator drop                a v1.1 integrator reset with offers pending and one request in
                               flight; the agent answers meanwhile; the integrator resumes
SIGTERM with stateFile         offers pending and an outcome the integrator has not collected;
                               clean stop, restart on the same port and file, everyone back
SIGKILL                        the same, killed: embedded mode keeps nothing, counted
slow reader                    a desktop that never reads while big offers pile up for it
frame floods                   an agent and an integrator sending past their rate limits
connection flood               1,000 connections that never say hello, 200 that never finish
                               the request
fd exhaustion                  the server's RLIMIT_NOFILE capped at 256, then 400 connections
=============================  ================================================================

Except across a restart, a bystander pair (``fuzz.Bystander``: an agent and an
integrator with their own key doing offer round trips) runs throughout; every
round trip must succeed. Each row's ``met`` is the conjunction of its checks,
listed in the report; a server ``Traceback`` fails any row.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .fuzz import Bystander
from .proc import ServerProcess, agent_token, supported
from .wire import Client, ClientClosed

__all__ = ["run_faults", "FAULTS"]

CHAT = "msdyn_chat_incoming_unauthenticated"
KEYS = {"fault": "fault-key-" + "0123456789abcdef" * 2, "bystander": "bystander-key-" + "0123456789abcdef" * 2}


def config(**server: Any) -> dict[str, Any]:
    limits = {k: v for k, v in server.pop("limits", {}).items() if supported("limits", k)}
    return {"server": {"demo": False, **server},
            "auth": {"integratorKeys": [{"name": n, "key": k} for n, k in KEYS.items()]},
            "limits": {"presenceGrace": 2.0, **limits}}


class Row:
    """One fault's line in the table, and the checks behind it."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.saw: list[str] = []
        self.others = ""
        self.checks: list[tuple[str, bool]] = []
        self.exceptions: list[str] = []
        self.error = ""

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, bool(ok)))
        return bool(ok)

    @property
    def met(self) -> bool:
        return bool(self.checks) and all(ok for _, ok in self.checks) and not self.exceptions and not self.error

    def as_dict(self) -> dict[str, Any]:
        return {"fault": self.fault, "saw": "; ".join(self.saw), "others": self.others,
                "checks": self.checks, "exceptions": self.exceptions, "error": self.error, "met": self.met}


# --------------------------------------------------------------------------
# Clients


async def agent(port: int, agent_id: str, **kw: Any) -> tuple[Client, dict]:
    c = await Client.open("127.0.0.1", port, "/agent", **kw)
    c.send({"type": "hello", "token": agent_token(agent_id)})
    welcome = await c.recv(5)
    assert welcome["type"] == "welcome", welcome
    return c, welcome


async def integrator(port: int, resume: str = "$", key: str = KEYS["fault"]) -> tuple[Client, list[dict], dict]:
    """A v1.1 integrator over the Bearer path; (client, replayed results, resumed)."""
    c = await Client.open("127.0.0.1", port, f"/integrator?resumeAfter={resume}",
                          headers=[("Authorization", f"Bearer {key}")])
    replayed = []
    while True:
        m = await c.recv(5)
        if m["type"] == "resumed":
            return c, replayed, m
        replayed.append(m)


async def until(c: Client, pred: Callable[[dict], bool], timeout: float = 5.0, into: list | None = None) -> dict:
    """The first message matching ``pred``; the others go to ``into``."""
    deadline = time.monotonic() + timeout
    while True:
        m = await c.recv(max(0.01, deadline - time.monotonic()))
        if pred(m):
            return m
        if into is not None:
            into.append(m)


def refusal(exc: BaseException) -> str:
    """What a connection that did not open got, in a few words."""
    text = str(exc)
    if "HTTP " in text:
        return "HTTP " + text.partition("HTTP ")[2].split(" ", 1)[0]
    if "lost in the handshake" in text:
        return "closed with no answer"
    return type(exc).__name__


def state_file(srv: ServerProcess) -> str:
    return srv.config["server"]["stateFile"]


def notify(rid: str, agent_id: str, **extra: Any) -> dict:
    return {"type": "notifyEvent", "requestId": rid, "agentId": agent_id, "correlationId": rid,
            "input": {"templateName": CHAT, "templateParameters": extra.pop("params", {})}, **extra}


def outcome(m: dict) -> str:
    v = m["value"]
    return f"{v['actionName']}/{v['responseReason']}"


# --------------------------------------------------------------------------
# The faults


async def agent_drop(srv: ServerProcess, row: Row) -> None:
    port = srv.port
    ig, _, _ = await integrator(port)
    a, _ = await agent(port, "agent-back")
    b, _ = await agent(port, "agent-gone")
    ig.send(notify("r-back", "agent-back", progress=False))
    ig.send(notify("r-gone", "agent-gone", progress=False))
    na = await until(a, lambda m: m["type"] == "notification")
    await until(b, lambda m: m["type"] == "notification")
    a.cut()
    b.cut()
    await asyncio.sleep(0.5)
    a2, welcome = await agent(port, "agent-back")
    replay = await until(a2, lambda m: m["type"] == "notification")
    row.check("the returning agent's welcome lists the displayed offer", welcome["displayed"] == [na["notificationId"]])
    row.check("it is replayed with the same id and expiresAt",
              (replay["notificationId"], replay["expiresAt"]) == (na["notificationId"], na["expiresAt"]))
    a2.send({"type": "respond", "notificationId": replay["notificationId"], "action": "Accept"})
    results = {}
    t0 = time.monotonic()
    while len(results) < 2:
        m = await until(ig, lambda m: m["type"] == "result", 10)
        results[m["requestId"]] = (outcome(m), time.monotonic() - t0)
    row.check("the integrator gets Accept/Accept for the returning agent's offer",
              results["r-back"][0] == "Accept/Accept")
    row.check("and Reject/AgentDisconnected for the one that did not come back",
              results["r-gone"][0] == "Reject/AgentDisconnected")
    ig.send(notify("r-after", "agent-gone", progress=False))
    refused = await until(ig, lambda m: m.get("requestId") == "r-after")
    row.check("a new offer to the gone agent is refused AgentNotConnectedError",
              refused.get("error", {}).get("message") == "AgentNotConnectedError")
    row.saw += [f"agent back after 0.5 s: welcome displayed={welcome['displayed'] == [na['notificationId']]}, "
                f"the offer replayed with its id and expiresAt, answered: integrator got {results['r-back'][0]}",
                f"agent gone: integrator got {results['r-gone'][0]} {results['r-gone'][1]:.1f} s after the cut "
                f"(presenceGrace 2 s), then {refused.get('error', {}).get('message')} for a new offer"]
    for c in (a2, ig):
        c.close()


async def integrator_drop(srv: ServerProcess, row: Row) -> None:
    port = srv.port
    a, _ = await agent(port, "agent-1")
    ig, _, resumed = await integrator(port)
    last = resumed["lastOutcomeId"]
    for i in range(1, 6):
        ig.send(notify(f"r{i}", "agent-1"))
    got: dict[str, list[str]] = {}
    while True:
        m = await ig.recv(5)
        if m["type"] == "status" and m["requestId"] == "r1" and m["state"] == "displayed":
            break
    ig.send(notify("r6", "agent-1"))  # in flight as the connection drops: did it arrive?
    ig.cut()
    shown: Counter[str] = Counter()
    answered = 0
    # The agent answers two offers while the integrator is away.
    for action in ("Accept", "Reject"):
        n = await until(a, lambda m: m["type"] == "notification")
        shown[n["correlationId"]] += 1
        a.send({"type": "respond", "notificationId": n["notificationId"], "action": action})
        answered += 1
    await asyncio.sleep(0.3)
    ig2, replayed, resumed = await integrator(port, last)
    for m in replayed:
        got.setdefault(m["requestId"], []).append(m["outcomeId"])
    row.check("the resume is complete", resumed["complete"])
    row.check("the two outcomes that ended while it was away are replayed",
              sorted(got) == ["r1", "r2"] and len(replayed) == 2)
    for i in range(3, 7):  # unanswered: sent again with the same requestId
        ig2.send(notify(f"r{i}", "agent-1"))
    answers: dict[str, str] = {}

    async def agent_side() -> None:
        while len(answers) < 4:
            n = await until(a, lambda m: m["type"] == "notification", 10)
            shown[n["correlationId"]] += 1
            a.send({"type": "respond", "notificationId": n["notificationId"], "action": "Accept"})
            answers[n["correlationId"]] = n["notificationId"]

    task = asyncio.ensure_future(agent_side())
    while len([r for r in got if r in ("r3", "r4", "r5", "r6")]) < 4:
        m = await until(ig2, lambda m: m["type"] == "result", 15)
        got.setdefault(m["requestId"], []).append(m["outcomeId"])
    await task
    row.check("every requestId got exactly one outcomeId",
              all(len(set(v)) == 1 for v in got.values()) and len(got) == 6)
    row.check("no offer was made twice (each requestId shown to the agent once)", max(shown.values()) == 1
              and len(shown) == 6)
    row.saw += [f"reset with 5 offers pending and r6 in flight; the agent answered 2 meanwhile; "
                f"resume: {len(replayed)} results replayed, complete={resumed['complete']}; "
                f"r3-r6 sent again: each shown to the agent once ({dict(shown)}), 6 requestIds, 6 outcomes"]
    for c in (a, ig2):
        c.close()


async def _restart_setup(srv: ServerProcess) -> dict[str, Any]:
    """Offers pending (displayed and queued), one answered while the integrator was away."""
    port = srv.port
    a1, _ = await agent(port, "agent-1")
    a2, _ = await agent(port, "agent-2")
    ig, _, _ = await integrator(port)
    ig.send(notify("r1", "agent-1"))
    ig.send(notify("r2", "agent-1"))
    n1 = await until(a1, lambda m: m["type"] == "notification")
    ig.send(notify("r3", "agent-2"))
    n3 = await until(a2, lambda m: m["type"] == "notification")
    a2.send({"type": "respond", "notificationId": n3["notificationId"], "action": "Accept"})
    r3 = await until(ig, lambda m: m["type"] == "result")
    ig.send(notify("r4", "agent-2"))
    n4 = await until(a2, lambda m: m["type"] == "notification")
    await until(ig, lambda m: m["type"] == "status" and m["requestId"] == "r4" and m["state"] == "displayed")
    ig.close()  # the integrator goes away; r4 is answered while it is
    await asyncio.sleep(0.2)
    a2.send({"type": "respond", "notificationId": n4["notificationId"], "action": "Reject"})
    await until(a2, lambda m: m["type"] == "resolved")
    await asyncio.sleep(0.2)
    return {"clients": [a1, a2], "n1": n1, "last": r3["outcomeId"]}


async def _after_restart(srv: ServerProcess, row: Row, before: dict[str, Any], killed: bool) -> None:
    port = srv.port
    codes = []
    for c in before["clients"]:
        code, _ = await c.wait_ended(20)
        codes.append(code)
    row.saw.append(f"connected clients saw close {sorted(set(codes), key=str)}")
    srv.restart()
    a1, welcome = await agent(port, "agent-1")
    a2, welcome2 = await agent(port, "agent-2")
    ig, replayed, resumed = await integrator(port, before["last"])
    n1 = before["n1"]
    if not killed:
        row.check("clients saw 1012 (a draining restart) or, from a server without a drain, 1001 (going away)",
                  len(set(codes)) == 1 and set(codes) <= {1001, 1012})
        replay = await until(a1, lambda m: m["type"] == "notification")
        row.check("the displayed offer is back, same id and expiresAt",
                  welcome["displayed"] == [n1["notificationId"]] and replay["expiresAt"] == n1["expiresAt"])
        row.check("the integrator's resume is complete and replays r4, answered before the stop",
                  resumed["complete"] and [m["requestId"] for m in replayed] == ["r4"])
        ig.send(notify("r1", "agent-1"))
        ig.send(notify("r2", "agent-1"))
        st1 = await until(ig, lambda m: m["type"] == "status" and m["requestId"] == "r1")
        row.check("r1 sent again claims the restored offer (status, no new offer)",
                  st1["notificationId"] == n1["notificationId"])
        a1.send({"type": "respond", "notificationId": n1["notificationId"], "action": "Accept"})
        n2 = await until(a1, lambda m: m["type"] == "notification" and m["correlationId"] == "r2")
        a1.send({"type": "respond", "notificationId": n2["notificationId"], "action": "Accept"})
        results = {}
        while len(results) < 2:
            m = await until(ig, lambda m: m["type"] == "result", 10)
            results[m["requestId"]] = outcome(m)
        row.check("both pending offers end Accept/Accept after the restart", results == {"r1": "Accept/Accept",
                                                                                          "r2": "Accept/Accept"})
        restored = [line for line in srv.log().splitlines() if "restored" in line]
        row.saw += [f"after restart: agent-1's welcome displayed the same offer (same expiresAt), its queued one "
                    f"followed; integrator resumed complete={resumed['complete']} with r4's result replayed; "
                    f"r1 and r2 sent again: status, then {results}; lost 0 of 2 pending",
                    restored[-1].split(" INFO deskpush ")[-1].replace(f"{srv.tmp}/", "")
                    if restored else "no 'restored' log line"]
    else:
        queued = 0
        try:
            queue = await until(a1, lambda m: m["type"] == "queue", 0.5)
            queued = queue["queued"]
        except TimeoutError:
            pass
        lost = 2 - len(welcome["displayed"]) - queued
        row.check("lost offers are counted: 2 of 2 pending (embedded mode saves nothing on kill -9)", lost == 2)
        row.check("the integrator is told: resumed complete=false", not resumed["complete"])
        ig.send(notify("r1", "agent-1"))
        answer = await until(ig, lambda m: m.get("requestId") == "r1")
        row.saw += [f"after restart: agent-1's welcome displayed={welcome['displayed']} (its 2 offers gone); "
                    f"integrator resumed complete={resumed['complete']}: {resumed.get('details', '')!r}; "
                    f"lost {lost} of 2 pending offers and r4's uncollected outcome; a client following "
                    f"docs/protocol.md fails its pending calls with OutcomeUnknownError (r1 sent anyway: "
                    f"{answer['type']} {answer.get('state', '')}, a new offer)"]
    for c in (a1, a2, ig):
        c.close()


async def sigterm(srv: ServerProcess, row: Row) -> None:
    before = await _restart_setup(srv)
    srv.signal(signal.SIGTERM)
    status = srv.wait(20)
    row.check("the server exits 0 on SIGTERM", status == 0)
    row.check("the state file was written", Path(state_file(srv)).exists())
    await _after_restart(srv, row, before, killed=False)
    row.others = "every client is disconnected by a restart and reconnects; see the row"


async def sigkill(srv: ServerProcess, row: Row) -> None:
    before = await _restart_setup(srv)
    srv.signal(signal.SIGKILL)
    status = srv.wait(20)
    row.check("killed", status == -signal.SIGKILL)
    row.check("no state file (nothing saved on kill -9)", not Path(state_file(srv)).exists())
    await _after_restart(srv, row, before, killed=True)
    row.others = "every client is disconnected (no close frame) and reconnects; see the row"


async def slow_reader(srv: ServerProcess, row: Row) -> None:
    port = srv.port
    slow, _ = await agent(port, "agent-slow", rcvbuf=4096)
    slow.pause_reading()
    ig, _, _ = await integrator(port)
    big = "x" * 60_000
    sent, t0 = 0, time.monotonic()
    dropped_at = None
    while sent < 400:
        ig.send(notify(f"r{sent}", "agent-slow", progress=False, params={"customerName": big}))
        sent += 1
        if sent % 10 == 0:
            await asyncio.sleep(0.05)
            if "write buffer over" in srv.log():
                dropped_at = sent
                break
    row.check("the server dropped the desktop that does not read", dropped_at is not None)
    line = next((x for x in srv.log().splitlines() if "write buffer over" in x), "")
    slow.resume_reading()
    code, _ = await slow.wait_ended(10)
    row.check("the slow desktop's connection ended without a close frame (1006)", code is None)
    results = Counter()
    deadline = time.monotonic() + 15
    while sum(results.values()) < sent and time.monotonic() < deadline:
        try:
            m = await ig.recv(max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        if m["type"] == "result":
            results[outcome(m)] += 1
        elif m["type"] == "error":
            results[m["error"]["message"]] += 1
    row.check("every offer to it got an answer", sum(results.values()) == sent)
    row.saw += [f"{sent} offers of 60 KB for a desktop that never reads: dropped after {dropped_at} "
                f"({time.monotonic() - t0:.1f} s); server log: {line.split(' deskpush ')[-1]!r}; the desktop saw its "
                f"connection end with no close frame; its offers ended {dict(results)}"]
    ig.close()


async def floods(srv: ServerProcess, row: Row) -> None:
    port = srv.port
    from .wire import frame

    a, _ = await agent(port, "agent-flood")
    a.send_raw(frame(b'{"type":"ping"}') * 1000)
    code, reason = await a.wait_ended(10)
    pongs = a.queue.qsize()
    row.check("an agent sending 1,000 frames at once is closed 1008", code == 1008)
    ig = await Client.open("127.0.0.1", port, "/integrator", headers=[("Authorization", f"Bearer {KEYS['fault']}")])
    ig.send_raw(frame(b'{"type":"ack","outcomeId":"1795996800123-000004"}') * 5000)
    icode, ireason = await ig.wait_ended(10)
    row.check("an integrator sending 5,000 frames at once (burst 2,000) is closed 1008", icode == 1008)
    row.saw += [f"agent: {pongs} pongs (agentBurst 200), then close {code} {reason!r}",
                f"integrator: close {icode} {ireason!r}"]


async def connection_flood(srv: ServerProcess, row: Row) -> None:
    port = srv.port
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    silent = await asyncio.gather(*(Client.open("127.0.0.1", port, "/agent" if i % 2 else "/integrator")
                                    for i in range(1000)), return_exceptions=True)
    opened = [c for c in silent if isinstance(c, Client)]
    refused = Counter(refusal(e) for e in silent if not isinstance(e, Client))
    half: list[socket.socket] = []
    for _ in range(200):
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, b"GET /agent HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        half.append(s)
    ends = await asyncio.gather(*(c.wait_ended(20) for c in opened), return_exceptions=True)
    took = time.monotonic() - t0
    codes = Counter(str(e[0]) if isinstance(e, tuple) else type(e).__name__ for e in ends)
    row.check("each of 1,000 connections that never send hello is closed 4401 within helloTimeout (3 s), "
              "or refused with 503 before it is held (server.maxPendingHandshakes, where the server has it)",
              set(codes) <= {"4401"} and set(refused) <= {"HTTP 503"} and len(opened) + sum(refused.values()) == 1000)
    closed_half = 0
    for s in half:
        try:
            data = await asyncio.wait_for(loop.sock_recv(s, 100), 15)
            closed_half += data == b"" or data.startswith(b"HTTP/1.1 503")
        except (ConnectionError, asyncio.TimeoutError):
            closed_half += 1
        s.close()
    row.check("200 that never finish their request are dropped", closed_half == 200)
    row.saw += [f"1,000 silent WebSockets: {len(opened)} opened then closed {dict(codes)}, "
                f"{sum(refused.values())} refused{' ' + str(dict(refused)) if refused else ''}, all within "
                f"{took:.1f} s; "
                f"200 half-sent requests: {closed_half} dropped at the handshake timeout"]


async def fd_exhaustion(srv: ServerProcess, row: Row) -> None:
    port = srv.port
    fds_before = srv.fds()
    attempts = await asyncio.gather(*(Client.open("127.0.0.1", port, "/agent", timeout=8) for _ in range(400)),
                                    return_exceptions=True)
    opened = [c for c in attempts if isinstance(c, Client)]
    failed = Counter(refusal(e) for e in attempts if not isinstance(e, Client))
    fds_full = srv.fds()
    for c in opened:
        c.cut()
    await asyncio.sleep(1.0)
    try:
        late, _ = await agent(port, "agent-late")
    except (OSError, TimeoutError, ClientClosed, AssertionError):
        late = None
    row.check("with the fd limit reached, the server keeps running", srv.alive())
    row.check("once the connections are gone, a new agent connects", late is not None)
    said = [x for x in srv.log().splitlines() if x[24:].startswith(("WARNING", "ERROR", "CRITICAL"))]
    told = said[0].split(" deskpush ", 1)[-1] if said else "nothing"
    row.check("the refusals are in the server's log (issue 13: log and count them, a line per second at most)",
              any(re.search(r"descriptor|too many open files|EMFILE|accept", x, re.I) for x in said))
    row.saw += [f"RLIMIT_NOFILE 256, {fds_before} fds in use: of 400 connections {len(opened)} opened "
                f"({fds_full} fds), the others got {dict(failed)}; the server's log said {told!r}; once the "
                f"open ones closed, a new agent connected"]
    if late is not None:
        late.close()


FAULTS: list[tuple[str, Callable[[ServerProcess, Row], Awaitable[None]], dict[str, Any], bool]] = [
    ("agent drop mid-offer", agent_drop, {}, True),
    ("integrator drop (TCP reset)", integrator_drop, {}, True),
    ("SIGTERM with stateFile", sigterm, {"stateFile": "STATE"}, False),
    ("SIGKILL (embedded mode)", sigkill, {"stateFile": "STATE"}, False),
    ("slow reader", slow_reader, {"outboundLimit": 65536, "limits": {"displayLimit": 1000, "queueLimit": 1000,
                                                                     "maxNotificationBytes": 131072}}, True),
    ("frame floods", floods, {"integratorRate": 1000.0, "integratorBurst": 2000.0}, True),
    ("connection flood", connection_flood, {"helloTimeout": 3.0}, True),
    ("fd exhaustion", fd_exhaustion, {"NOFILE": 256}, True),
]


def run_one(name: str, scenario: Callable[[ServerProcess, Row], Awaitable[None]], server: dict[str, Any],
            bystanders: bool, tmp: Path) -> dict[str, Any]:
    import uvloop

    row = Row(name)
    server = dict(server)
    nofile = server.pop("NOFILE", None)
    slug = name.split()[0].lower().strip("(")
    if server.get("stateFile") == "STATE":
        server["stateFile"] = str(tmp / f"{slug}-state.json")
    srv = ServerProcess(tmp, f"fault-{slug}", config(**server), nofile=nofile).start()
    by = Bystander(srv.port, KEYS["bystander"]).start() if bystanders else None
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(scenario(srv, row), 120))
        if by is not None:
            time.sleep(1.0)  # the bystander goes on a moment after the fault
    except (Exception, AssertionError) as exc:  # the scenario could not finish: that is the finding
        row.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if by is not None:
            by.stop()
            s = by.summary()
            row.others = (f"bystander: {s['ok']} round trips, {s['failed']} failed"
                          + (f" (max {s['max_ms']:.0f} ms)" if s["max_ms"] is not None else ""))
            row.check("every bystander round trip succeeded", s["failed"] == 0 and s["ok"] > 0)
            if s["failures"]:
                row.saw.append(f"bystander failures: {s['failures'][:3]}")
        srv.stop()
    row.exceptions = [t.exception for t in srv.tracebacks()]
    return row.as_dict()


def run_faults(tmp: Path, say: Any = print, only: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for name, scenario, server, bystanders in FAULTS:
        if only and not any(o in name for o in only):
            continue
        t0 = time.monotonic()
        row = run_one(name, scenario, server, bystanders, tmp)
        say(f"faults: {name:30} {'met' if row['met'] else 'NOT MET'} ({time.monotonic() - t0:.1f} s)"
            + (f"  error: {row['error']}" if row["error"] else "")
            + (f"  exceptions: {row['exceptions']}" if row["exceptions"] else ""))
        rows.append(row)
    return rows
