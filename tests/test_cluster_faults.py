"""Cluster mode against ``kill -9``: real node processes behind HAProxy die and come back, and nothing is lost.

Issue 11's node-death test. Everything here is a real process
(``deskpush.server.localcluster``): Redis with its AOF, three ``deskpush serve
--redis`` nodes, HAProxy in front of them checking ``/readyz``. The clients are
what production runs: desktops that reconnect through the balancer when their
connection closes (as ``demo_client/desktop.js`` does, after a short backoff),
and an integrator on the Python SDK (``deskpush.client``), which resumes with
``resumeAfter`` (protocol v1.1) and sends its unanswered notifyEvents again
with the same requestId.

What a contact centre would notice if cluster mode broke its promise, and so
what is checked: an offer with no outcome (a chat nobody routes), an offer
with two (a chat routed twice), an offer shown to an agent as two cards, a
card that comes back after a reconnect with another deadline, a display
timeout that never fires because the node that would have fired it died.

Randomness is seeded (``SEED``): which node dies, when, and what each agent
does with each card. Timing still varies with the machine's load, so no
assertion depends on it; the summary table printed by each test (shown by
pytest when a test fails, or with ``-s``) says what happened in the run.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from deskpush.client import CIFError, Integrator, IntegratorError, Reconnect, Resumed, Status
from deskpush.server.localcluster import LocalCluster

from .conftest import API_KEY, SECRET, UNIT

#: DESKPUSH_TEST_SEED runs another seed (to explore); the suite runs this one.
SEED = int(os.environ.get("DESKPUSH_TEST_SEED", "11"))
#: The display timeout of the offers: short, so that many timers fire during the run.
FAST = "fast_chat"
#: A display timeout no run outlives: offers that end only when the test says so.
SLOW = "slow_chat"
TIMEOUT = {FAST: 1.0, SLOW: 600.0}

TIMEOUT_OUTCOME = {"actionName": "Timeout", "responseReason": "DisplayTimeout"}
ACCEPT = {"actionName": "Accept", "responseReason": "Accept"}
REJECT = {"actionName": "Reject", "responseReason": "DeclinedByAgent"}
CANCEL = {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"}


def cluster_config(tmp_path: Path, presence_grace: float) -> Path:
    """The nodes' TOML: the two templates, presence grace, snapshots often (restarted nodes load one)."""
    path = tmp_path / "deskpush.toml"
    templates = "".join(
        f'\n[[templates]]\nname = "{name}"\ntitle = "Chat {{n}}"\n'
        f'fields = [{{ header = "Offer", value = "{{n}}" }}]\ntimeout = {timeout}\n'
        for name, timeout in TIMEOUT.items())
    path.write_text(f"[limits]\npresenceGrace = {presence_grace}\n\n[cluster]\nsnapshotInterval = 3.0\n{templates}")
    return path


def make_cluster(tmp_path: Path, presence_grace: float = 10.0) -> LocalCluster:
    return LocalCluster(3, config=cluster_config(tmp_path, presence_grace * UNIT), jwt_secret=SECRET,
                        api_keys={"crm": API_KEY}, workdir=tmp_path / "cluster", timeout=30 * UNIT)


def api_key(cluster: LocalCluster) -> str:
    # The environment may name other keys (as for serve, it wins over our arguments).
    return cluster.api_keys.get("crm") or next(iter(cluster.api_keys.values()))


async def balancer_sessions(cluster: LocalCluster) -> list[int]:
    """Each node's open client connections as HAProxy counts them (``scur``), by index.

    How a test learns which node the balancer gave a connection to:
    HAProxy's health checks are not sessions, a WebSocket tunnel is one.
    """
    reader, writer = await asyncio.open_unix_connection(str(cluster.balancer.socket_path))
    try:
        writer.write(b"show stat\n")
        text = (await reader.read()).decode()
    finally:
        writer.close()
    rows = {row["svname"]: int(row["scur"] or 0) for row in csv.DictReader(io.StringIO(text.removeprefix("# ")))
            if row.get("pxname") == "nodes"}
    return [rows.get(f"node{i}", 0) for i in range(len(cluster.nodes))]


def table(title: str, rows: list[tuple[str, Any]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join([title, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def no_tracebacks(cluster: LocalCluster) -> None:
    for i in range(len(cluster.nodes)):
        log = cluster.node_log(i)
        at = log.find("Traceback")
        assert at < 0, f"node {i}'s log has a traceback:\n{log[max(0, at - 2000):at + 4000]}"


# ---------------------------------------------------------------------------
# A desktop: one agent's browser tab, reconnecting like demo_client/desktop.js


@dataclass
class Shared:
    """What every desktop of a run counts, for the summary and the checks."""

    welcomes: int = 0
    reconnects: int = 0
    failed_connects: int = 0
    replayed: int = 0  # cards shown again after a welcome, as they were first shown
    shown_while_away: int = 0  # cards first seen in a welcome's replay (displayed while the tab was away)
    responds: int = 0
    not_pending: int = 0  # respond refused: the offer had already ended (a timeout or cancel won the race)
    close_codes: Counter[int | None] = field(default_factory=Counter)
    open_at_drop: set[str] = field(default_factory=set)  # correlationIds of cards open when a connection dropped
    #: ms from a card's expiresAt to its `resolved` Timeout on the desktop (same machine, same wall clock).
    timeout_lateness: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class Desktop:
    """An agent's tab: shows cards, answers some after a while, reconnects through the balancer when dropped.

    On each ``welcome`` it checks the protocol's promise: the notification
    frames that follow are exactly ``displayed``, in order, each one it had
    seen before unchanged (the same ``expiresAt``). A card it meant to answer
    when the connection dropped is answered again once replayed (a respond
    on a dying connection may never have reached the log); a card not in
    ``displayed`` ended while it was away.
    """

    def __init__(self, agent_id: str, url: str, token: str, shared: Shared, decide: Any) -> None:
        self.agent_id = agent_id
        self.url = url
        self.token = token
        self.shared = shared
        self.decide = decide  # correlationId -> (action or None, delay)
        self.ws: ClientConnection | None = None
        self.welcomed = asyncio.Event()
        self.welcomes = 0
        self.cards: dict[str, dict[str, Any]] = {}  # notificationId -> the frame as first shown
        self.open: set[str] = set()  # notificationIds displayed now, as far as this tab knows
        self.want: dict[str, str] = {}  # notificationId -> the action this tab means to send (until resolved)
        self.responded: dict[str, str] = {}  # notificationId -> action actually sent (at least once)
        self.by_correlation: dict[str, set[str]] = defaultdict(set)
        self.resolved: dict[str, dict[str, str]] = {}
        self.stopping = False
        self._timers: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        attempt = 0
        while not self.stopping:
            try:
                ws = await connect(self.url, open_timeout=10 * UNIT, close_timeout=1, compression=None)
            except (OSError, InvalidHandshake, TimeoutError):
                self.shared.failed_connects += 1
                attempt += 1
                await asyncio.sleep(self.backoff(attempt))
                continue
            try:
                await ws.send(json.dumps({"type": "hello", "token": self.token}))
                async with asyncio.timeout(15 * UNIT):
                    welcome = json.loads(await ws.recv())
                    assert welcome["type"] == "welcome", welcome
                    replay = [json.loads(await ws.recv()) for _ in welcome["displayed"]]
                attempt = 0
                self.on_welcome(ws, welcome, replay)
                async for raw in ws:
                    self.on_frame(json.loads(raw))
            except (ConnectionClosed, TimeoutError, OSError):
                pass
            finally:
                welcomed, self.ws = self.ws is not None, None
                self.welcomed.clear()
                await ws.close()
            if self.stopping:
                break
            self.shared.close_codes[ws.close_code] += 1
            if welcomed:
                for nid in self.open:
                    self.shared.open_at_drop.add(self.cards[nid]["correlationId"])
            attempt += 1
            await asyncio.sleep(self.backoff(attempt))

    @staticmethod
    def backoff(attempt: int) -> float:
        # desktop.js: 250 ms first, then doubling with jitter; capped short here (a test run is short).
        return min(1.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.0)

    def on_welcome(self, ws: ClientConnection, welcome: dict[str, Any], replay: list[dict[str, Any]]) -> None:
        shared = self.shared
        shared.welcomes += 1
        self.welcomes += 1
        if self.welcomes > 1:
            shared.reconnects += 1
        ids = [frame.get("notificationId") for frame in replay]
        if [frame["type"] for frame in replay] != ["notification"] * len(replay) or ids != welcome["displayed"]:
            shared.problems.append(f"{self.agent_id}: welcome listed {welcome['displayed']}, then came {replay}")
        for nid in list(self.open):
            if nid not in welcome["displayed"]:  # ended while this tab was away
                self.open.discard(nid)
                self.want.pop(nid, None)
        self.ws = ws
        self.welcomed.set()
        for frame in replay:
            nid = frame["notificationId"]
            if nid in self.cards:
                shared.replayed += 1
                if frame != self.cards[nid]:
                    shared.problems.append(f"{self.agent_id}: {nid} replayed as {frame}, first shown as "
                                           f"{self.cards[nid]} (expiresAt {frame['expiresAt']} vs "
                                           f"{self.cards[nid]['expiresAt']})")
                self.open.add(nid)
                if nid in self.want:
                    self.send_respond(nid, self.want[nid])  # it may have died with the old connection
            else:
                shared.shown_while_away += 1
                self.show(frame)

    def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "notification":
            nid = frame["notificationId"]
            if nid in self.cards:
                self.shared.problems.append(f"{self.agent_id}: {nid} shown twice on one connection: {frame}")
            self.show(frame)
        elif kind == "resolved":
            nid = frame["notificationId"]
            self.open.discard(nid)
            self.want.pop(nid, None)
            self.resolved[nid] = {"actionName": frame["actionName"], "responseReason": frame["responseReason"]}
            if self.resolved[nid] == TIMEOUT_OUTCOME and nid in self.cards:
                self.shared.timeout_lateness.append(time.time() * 1000 - self.cards[nid]["expiresAt"])
        elif kind == "error":
            if frame["code"] == "NotificationNotPending":
                self.shared.not_pending += 1
                self.want.pop(frame["notificationId"], None)
            else:
                self.shared.problems.append(f"{self.agent_id}: error {frame}")
        elif kind not in ("queue", "pong"):
            self.shared.problems.append(f"{self.agent_id}: unexpected {frame}")

    def show(self, frame: dict[str, Any]) -> None:
        nid, cid = frame["notificationId"], frame["correlationId"]
        self.cards[nid] = frame
        self.open.add(nid)
        self.by_correlation[cid].add(nid)
        action, delay = self.decide(cid)
        if action is not None:
            task = asyncio.get_running_loop().create_task(self.answer_later(nid, action, delay))
            self._timers.add(task)
            task.add_done_callback(self._timers.discard)

    async def answer_later(self, nid: str, action: str, delay: float) -> None:
        await asyncio.sleep(delay)
        if nid in self.open:
            self.want[nid] = action
            self.send_respond(nid, action)

    def send_respond(self, nid: str, action: str) -> None:
        ws = self.ws
        if ws is None:
            return  # sent after the next welcome, if the card is replayed
        self.responded[nid] = action
        self.shared.responds += 1
        task = asyncio.get_running_loop().create_task(self._send(ws, nid, action))
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    @staticmethod
    async def _send(ws: ClientConnection, nid: str, action: str) -> None:
        try:
            await ws.send(json.dumps({"type": "respond", "notificationId": nid, "action": action}))
        except ConnectionClosed:
            pass

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self._timers):
            task.cancel()
        if self.ws is not None:
            await self.ws.close()


@dataclass
class Offer:
    """One notifyEvent of the run and what became of it."""

    n: int
    agent: str
    cancel_after: float | None
    request_id: str | None = None
    notification_id: str | None = None
    displayed: bool = False
    cancelled: bool = False
    value: dict[str, Any] | None = None
    error: str | None = None
    cancel_answer: dict[str, Any] | str | None = None

    @property
    def correlation_id(self) -> str:
        return f"offer-{self.n}"


def decision(correlation_id: str) -> tuple[str | None, float]:
    """What the agent does with a card: Accept, Reject or nothing (it times out), and after how long.

    Seeded by the offer, not by the order cards arrive in, so a run's
    decisions do not depend on its timing. Some answers come after the 1 s
    display timeout on purpose: a respond that loses the race to the timer.
    """
    rng = random.Random(f"{SEED}:{correlation_id}")
    roll = rng.random()
    action = "Accept" if roll < 0.35 else "Reject" if roll < 0.6 else None
    return action, rng.uniform(0.05, 1.1)


async def test_five_node_kills_under_load_lose_nothing(tmp_path):
    """200 desktops and an integrator through HAProxy; a node dies by SIGKILL five times; every offer ends once."""
    agents_n, rate, kills_n = 200, 25.0, 5
    random.seed(SEED)  # the desktops' backoff jitter
    rng = random.Random(SEED)
    shared = Shared()
    offers: list[Offer] = []
    outcomes: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)  # requestId -> (outcomeId, value)
    resumes: list[Resumed] = []
    lost: list[str] = []
    kills: list[int] = []
    started = time.monotonic()

    desktops: dict[str, Desktop] = {}
    spread: list[int] = []

    def summary() -> str:
        kinds = Counter(f"{o.value['actionName']}/{o.value['responseReason']}" if o.value
                        else o.error[:50] if o.error else "no outcome" for o in offers)
        late = sorted(shared.timeout_lateness) or [0.0]
        timed_out = sum(1 for o in offers if o.correlation_id in shared.open_at_drop and o.value == TIMEOUT_OUTCOME)
        return table(f"node kills under load (seed {SEED}, {time.monotonic() - started:.0f} s)", [
            ("agents / spread over the nodes at start", f"{len(desktops)} / {spread}"),
            ("kills (node index)", kills),
            ("offers", len(offers)),
            *((f"  {k}", v) for k, v in sorted(kinds.items())),
            ("cancelEvents sent", sum(o.cancelled for o in offers)),
            ("desktop welcomes / reconnects", f"{shared.welcomes} / {shared.reconnects}"),
            ("failed connects (retried)", shared.failed_connects),
            ("close codes seen by desktops", dict(shared.close_codes)),
            ("cards replayed unchanged / first seen in a replay", f"{shared.replayed} / {shared.shown_while_away}"),
            ("cards open at a drop / of them timed out", f"{len(shared.open_at_drop)} / {timed_out}"),
            ("display timeouts seen by desktops: ms late p50/p99/max", f"{late[len(late) // 2]:.0f} / "
             f"{late[int(len(late) * 0.99)]:.0f} / {late[-1]:.0f} ({len(shared.timeout_lateness)} seen)"),
            ("responds sent / refused NotificationNotPending", f"{shared.responds} / {shared.not_pending}"),
            ("integrator drops / resumes (results replayed)",
             f"{len(lost)} / {max(0, len(resumes) - 1)} {[r.count for r in resumes[1:]]}"),
            ("offers whose result came with no status before", sum(o.request_id is None for o in offers)),
            ("desktop problems", len(shared.problems)),
        ])

    async def run(cluster: LocalCluster) -> None:
        base = cluster.url()
        agents = [f"agent-{i:03d}" for i in range(agents_n)]
        desktops.update({a: Desktop(a, f"{base}/agent", cluster.tokens.issue(a), shared, decision) for a in agents})
        desk_tasks = [asyncio.create_task(d.run()) for d in desktops.values()]
        async with asyncio.timeout(60 * UNIT):
            for d in desktops.values():
                await d.welcomed.wait()
        spread[:] = await balancer_sessions(cluster)

        ig = Integrator(
            f"{base}/integrator", api_key(cluster),
            reconnect=Reconnect(attempts=None, timeout=60 * UNIT, initial=0.05, maximum=0.5),
            on_outcome=lambda rid, value, oid: outcomes[rid].append((oid, value)),
            on_resumed=resumes.append, on_lost=lost.append, open_timeout=10 * UNIT)

        async def offer(o: Offer) -> None:
            def on_status(status: Status) -> None:
                o.request_id, o.notification_id = status.request_id, status.notification_id
                o.displayed |= status.state == "displayed"

            if o.cancel_after is not None:
                canceller = asyncio.create_task(cancel(o))
            try:
                o.value = await ig.notify_event({"templateName": FAST, "templateParameters": {"n": o.n}},
                                                o.correlation_id, f"token-{o.n}", agent_id=o.agent,
                                                on_status=on_status)
            except (CIFError, IntegratorError) as exc:
                o.error = f"{type(exc).__name__}: {exc}"
            if o.cancel_after is not None:
                await canceller

        async def cancel(o: Offer) -> None:
            await asyncio.sleep(o.cancel_after)
            o.cancelled = True
            try:
                o.cancel_answer = await ig.cancel_event(f"token-{o.n}")
            except (CIFError, IntegratorError) as exc:
                o.cancel_answer = f"{type(exc).__name__}: {exc}"

        producing = True

        async def produce() -> list[asyncio.Task[None]]:
            tasks = []
            while producing:
                o = Offer(len(offers), rng.choice(agents), rng.uniform(0.1, 1.3) if rng.random() < 0.2 else None)
                offers.append(o)
                tasks.append(asyncio.create_task(offer(o)))
                await asyncio.sleep(1 / rate)
            return tasks

        async with ig:
            producer = asyncio.create_task(produce())
            try:
                # Every node dies at least once (so every desktop and the integrator are dropped at
                # least once: each stays on its node until that node dies), then two more at random.
                kill_rng = random.Random(SEED)
                victims = kill_rng.sample(range(3), 3) + [kill_rng.randrange(3) for _ in range(kills_n - 3)]
                for victim in victims:
                    await asyncio.sleep(kill_rng.uniform(1.0, 3.0))
                    await cluster.kill_node(victim)
                    kills.append(victim)
                    await asyncio.sleep(kill_rng.uniform(0.1, 1.0))  # a supervisor's restart delay
                    await cluster.start_node(victim)
                    await cluster.wait_balancer(victim, up=True, timeout=10 * UNIT)
                await asyncio.sleep(2.0)
            finally:
                producing = False
                tasks = await producer
            # Every call ends (an offer still waiting then fails as the Integrator closes: the checks say so).
            await asyncio.wait(tasks, timeout=60 * UNIT)
        await asyncio.gather(*tasks)
        for d in desktops.values():
            await d.stop()
        await asyncio.gather(*desk_tasks)
        no_tracebacks(cluster)

    try:
        async with make_cluster(tmp_path) as cluster:
            await run(cluster)
    finally:
        print("\n" + summary())

    kinds = Counter(f"{o.value['actionName']}/{o.value['responseReason']}" if o.value else o.error for o in offers)
    assert shared.problems == [], shared.problems[:10]
    assert len(kills) == kills_n
    # Every desktop was dropped at least once and came back; the integrator resumed, completely.
    assert all(d.welcomes >= 2 for d in desktops.values()), [a for a, d in desktops.items() if d.welcomes < 2]
    assert len(resumes) >= 2 and all(r.complete for r in resumes), resumes
    # Every notifyEvent got exactly one outcome: a value for its call, and one outcomeId for its requestId
    # however often its result came (on_outcome sees each outcomeId once: a second one is a second outcome).
    assert [o for o in offers if o.value is None] == []
    assert {rid: got for rid, got in outcomes.items() if len(got) != 1} == {}
    assert len(outcomes) == len(offers)  # no requestId without a call: nothing was offered twice
    known = {o.request_id: o for o in offers if o.request_id is not None}  # told by a status
    assert set(known) <= set(outcomes)
    assert all(outcomes[rid][0][1] == o.value for rid, o in known.items())
    # The few whose result was replayed before any status reached the SDK: the same outcomes, as a whole.
    assert Counter(json.dumps(got[0][1], sort_keys=True) for rid, got in outcomes.items() if rid not in known) == \
        Counter(json.dumps(o.value, sort_keys=True) for o in offers if o.request_id is None)
    # Only the outcomes this run can make: nobody was away past presence grace, no queue overflowed.
    assert set(kinds) <= {"Accept/Accept", "Reject/DeclinedByAgent", "Timeout/DisplayTimeout",
                          "Cancel/CancelledByIntegrator"}, kinds
    agent_of = {o.correlation_id: o.agent for o in offers}
    for d in desktops.values():  # every card a desktop saw is an offer to its agent
        assert all(agent_of.get(cid) == d.agent_id for cid in d.by_correlation), d.agent_id
    for o in offers:
        desk = desktops[o.agent]
        seen = desk.by_correlation.get(o.correlation_id, set())
        assert len(seen) <= 1, (o, seen)  # one offer, one card, across every reconnect
        nid = next(iter(seen), None) or o.notification_id
        assert o.notification_id in (None, nid), (o, seen)
        answered = desk.responded.get(nid)
        if o.value == ACCEPT:
            assert answered == "Accept", o
        elif o.value == REJECT:
            assert answered == "Reject", o
        elif o.value == CANCEL:
            assert o.cancelled, o
        # Displayed, unanswered, not cancelled: its display timeout fired, wherever its agent was.
        if (o.displayed or seen) and answered is None and not o.cancelled:
            assert o.value == TIMEOUT_OUTCOME, o
        if o.cancelled:
            assert isinstance(o.cancel_answer, dict), o
            assert {k: o.cancel_answer[k] for k in ("actionName", "responseReason")} == o.value, o
    # Timers of offers whose desktop's node had just died fired too.
    assert any(o.correlation_id in shared.open_at_drop and o.value == TIMEOUT_OUTCOME for o in offers)


# ---------------------------------------------------------------------------
# The integrator's own node dies


async def recv(ws: ClientConnection, timeout: float = 15.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout * UNIT):
        return json.loads(await ws.recv())


async def test_the_integrators_node_dies_and_it_resumes_on_another_with_every_result_once(tmp_path):
    """kill -9 of the node holding the integrator while its offers are pending; it resumes through HAProxy.

    The integrator speaks the protocol itself here (no SDK), so the test
    decides when it comes back: only once the agents have answered offers
    and display timeouts have fired while it was away. Those outcomes must
    come in the replay before ``resumed``; the requests still unanswered are
    sent again with the same requestId (the last few were sent just before
    the kill and may never have reached the log: those are taken as new);
    then every request has had exactly one ``result`` frame, over the two
    connections together.
    """
    async with make_cluster(tmp_path) as cluster:
        key = api_key(cluster)
        resumed_url = f"{cluster.url()}/integrator?resumeAfter="
        headers = {"Authorization": f"Bearer {key}"}
        ig = await connect(resumed_url + "$", additional_headers=headers)
        first = await recv(ig)
        assert first["type"] == "resumed" and first["complete"], first
        position = first["lastOutcomeId"]
        sessions = await balancer_sessions(cluster)
        assert sorted(sessions) == [0, 0, 1], sessions
        victim = sessions.index(1)
        others = [i for i in range(3) if i != victim]

        # Agents on the two other nodes, straight to them: they stay up throughout.
        agents: dict[str, ClientConnection] = {}
        for i in range(4):
            a = f"agent-{i}"
            agents[a] = ws = await connect(f"{cluster.url(others[i % 2])}/agent")
            await ws.send(json.dumps({"type": "hello", "token": cluster.tokens.issue(a)}))
            assert (await recv(ws))["type"] == "welcome"
        requests: dict[str, dict[str, Any]] = {}  # requestId -> the notifyEvent frame

        async def notify(rid: str, agent: str, template: str) -> None:
            frame = {"type": "notifyEvent", "requestId": rid, "agentId": agent, "correlationId": rid,
                     "input": {"templateName": template, "templateParameters": {"n": rid}}}
            requests[rid] = frame
            await ig.send(json.dumps(frame))

        # agent-0..2: three offers each that wait for an answer (one displayed, two queued);
        # agent-3: two that time out after a second each, one after the other.
        for a in ("agent-0", "agent-1", "agent-2"):
            for n in range(3):
                await notify(f"{a}-r{n}", a, SLOW)
        for n in range(2):
            await notify(f"agent-3-r{n}", "agent-3", FAST)
        results: dict[str, list[dict[str, Any]]] = defaultdict(list)  # requestId -> result frames, both connections
        statuses: Counter[str] = Counter()
        while statuses["queued"] < len(requests):
            frame = await recv(ig)
            if frame["type"] == "status":
                statuses[frame["state"]] += 1
            elif frame["type"] == "result":
                results[frame["requestId"]].append(frame)
            else:
                raise AssertionError(frame)
        # One more offer each, and at once the integrator's node dies: these may or may not be in the log.
        for a in ("agent-0", "agent-1", "agent-2"):
            await notify(f"{a}-r3", a, SLOW)
        await cluster.kill_node(victim)
        try:
            async for raw in ig:  # whatever the node wrote before it died
                frame = json.loads(raw)
                if frame["type"] == "result":
                    results[frame["requestId"]].append(frame)
        except ConnectionClosed:
            pass
        seen_before = {rid: frames[-1]["outcomeId"] for rid, frames in results.items()}
        if seen_before:
            position = max(seen_before.values())

        # While the integrator is away: agent-0 accepts two offers, agent-1 rejects two, agent-2 accepts
        # one, and agent-3's two display timeouts fire. Each agent sees its outcomes as `resolved`.
        decided_away: dict[str, dict[str, str]] = {}  # requestId -> outcome, as the agent saw it
        cards: dict[str, set[str]] = defaultdict(set)  # requestId (the correlationId) -> notificationIds shown
        ended: Counter[str] = Counter()  # agent -> `resolved` frames it got

        async def answer(agent: str, actions: list[str | None]) -> None:
            ws = agents[agent]
            requests_of: dict[str, str] = {}  # notificationId -> requestId (the correlationId)
            for action in actions:
                while True:
                    frame = await recv(ws)
                    if frame["type"] == "notification":
                        requests_of[frame["notificationId"]] = frame["correlationId"]
                        cards[frame["correlationId"]].add(frame["notificationId"])
                        if action is not None:
                            await ws.send(json.dumps({"type": "respond", "notificationId": frame["notificationId"],
                                                      "action": action}))
                    elif frame["type"] == "resolved":
                        ended[agent] += 1
                        decided_away[requests_of[frame["notificationId"]]] = {
                            "actionName": frame["actionName"], "responseReason": frame["responseReason"]}
                        break

        await asyncio.gather(answer("agent-0", ["Accept", "Accept"]), answer("agent-1", ["Reject", "Reject"]),
                             answer("agent-2", ["Accept"]), answer("agent-3", [None, None]))
        assert list(decided_away.values()).count(TIMEOUT_OUTCOME) == 2
        assert not set(decided_away) & set(seen_before)

        # Back, through the balancer: its old node is dead, so it lands on another.
        ig = await connect(resumed_url + position, additional_headers=headers)
        replay = []
        while (frame := await recv(ig))["type"] != "resumed":
            assert frame["type"] == "result", frame
            replay.append(frame)
            results[frame["requestId"]].append(frame)
        resumed = frame
        assert resumed["complete"] is True and resumed["count"] == len(replay), resumed
        assert cluster.node_pid(victim) is None and (await balancer_sessions(cluster))[victim] == 0
        # Exactly what was decided while it was away, in the order of the history, with the same outcomes.
        assert {f["requestId"]: f["value"] for f in replay} == decided_away
        assert [f["outcomeId"] for f in replay] == sorted(f["outcomeId"] for f in replay)

        # Every request without a result, again with the same requestId: a status each, no second offer.
        unanswered = [rid for rid in requests if rid not in results]
        for rid in unanswered:
            await ig.send(json.dumps(requests[rid]))
        answered_status: dict[str, dict[str, Any]] = {}
        while len(answered_status) < len(unanswered):
            frame = await recv(ig)
            assert frame["type"] == "status", frame
            answered_status[frame["requestId"]] = frame

        # Now the agents accept everything left; each outcome comes once, on the new connection.
        async def accept_rest(agent: str) -> None:
            ws = agents[agent]
            while ended[agent] < sum(1 for rid in requests if rid.startswith(agent + "-")):
                frame = await recv(ws)
                if frame["type"] == "resolved":
                    ended[agent] += 1
                elif frame["type"] == "notification":
                    cards[frame["correlationId"]].add(frame["notificationId"])
                    await ws.send(json.dumps({"type": "respond", "notificationId": frame["notificationId"],
                                              "action": "Accept"}))

        async def read_results() -> None:
            while len(results) < len(requests):
                frame = await recv(ig)
                if frame["type"] == "result":
                    results[frame["requestId"]].append(frame)
                elif frame["type"] != "status":
                    raise AssertionError(frame)

        await asyncio.gather(read_results(), *(accept_rest(a) for a in ("agent-0", "agent-1", "agent-2")))
        for ws in [ig, *agents.values()]:
            await ws.close()
        no_tracebacks(cluster)

    print("\n" + table("the integrator's node killed", [
        ("requests (3 sent just before the kill)", len(requests)),
        ("results before the kill", len(seen_before)),
        ("decided while away / replayed", f"{len(decided_away)} / {len(replay)}"),
        ("sent again after resumed / answered with status", f"{len(unanswered)} / {len(answered_status)}"),
        ("results after", len(results) - len(seen_before) - len(replay)),
    ]))
    assert set(results) == set(requests)
    assert set(cards) == set(requests)
    assert {rid: nids for rid, nids in cards.items() if len(nids) != 1} == {}  # one card per request, no second offer
    assert {rid: len(frames) for rid, frames in results.items() if len(frames) != 1} == {}  # each exactly once
    outcome_ids = [frames[0]["outcomeId"] for frames in results.values()]
    assert len(set(outcome_ids)) == len(outcome_ids)


# ---------------------------------------------------------------------------
# A node paused past the log's trim


async def test_a_node_paused_past_the_logs_trim_resyncs_instead_of_skipping_entries(tmp_path):
    """SIGSTOP a node (a stopped VM, a swap storm) until its own NodeDown is trimmed from the log, then SIGCONT.

    It must not read on from where the log now starts as if nothing were
    missing: the entries it never saw include that it was declared down, so
    it would keep its sessions while every other node had dropped them, and
    an agent's Accept there would be applied by it alone (the agent sees
    ``resolved``, the integrator never gets the result). It must notice,
    load the snapshot and close its sessions with 1012, as it does when it
    finds its own NodeDown; the desktop comes back and its Accept counts.
    """
    import redis.asyncio as aioredis

    from deskpush.protocol.replica import NodeDown, decode_event

    config = tmp_path / "deskpush.toml"
    config.write_text(f'[limits]\npresenceGrace = {30 * UNIT}\n\n[cluster]\nheartbeat = 0.2\nnodeTimeout = 1.0\n'
                      f'snapshotInterval = 0.5\n\n[[templates]]\nname = "{SLOW}"\ntitle = "Chat"\ntimeout = 600.0\n')
    async with LocalCluster(2, config=config, jwt_secret=SECRET, api_keys={"crm": API_KEY},
                            workdir=tmp_path / "cluster", timeout=30 * UNIT) as cluster, \
            aioredis.Redis.from_url(cluster.redis_url) as r:
        token = cluster.tokens.issue("agent-7")
        agent = await connect(f"{cluster.url(0)}/agent")
        await agent.send(json.dumps({"type": "hello", "token": token}))
        assert (await recv(agent))["type"] == "welcome"
        ig = await connect(f"{cluster.url(1)}/integrator?resumeAfter=$",
                           additional_headers={"Authorization": f"Bearer {api_key(cluster)}"})
        assert (await recv(ig))["type"] == "resumed"
        await ig.send(json.dumps({"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "progress": False,
                                  "input": {"templateName": SLOW}}))
        card = await recv(agent)
        assert card["type"] == "notification", card

        pid = cluster.node_pid(0)
        os.kill(pid, signal.SIGSTOP)
        try:
            # Node 1 declares node 0 down; traffic goes on, snapshots are written, the log is trimmed
            # past the NodeDown (each cancel of an unknown token is one more entry and one answer).
            down_at, n = None, 0
            async with asyncio.timeout(30 * UNIT):
                while True:
                    n += 1
                    await ig.send(json.dumps({"type": "cancelEvent", "requestId": f"c{n}",
                                              "cancellationToken": "none"}))
                    assert (await recv(ig))["error"]["message"] == "CancellationTokenNotFoundError"
                    if down_at is None:
                        for entry_id, fields in await r.xrange("{deskpush}:log"):
                            event = decode_event(fields[b"e"])
                            if type(event) is NodeDown and event.node != event.down:
                                down_at = entry_id.decode()
                    trimmed = await r.hget("{deskpush}:snapshot", "trimmed")
                    if down_at is not None and trimmed is not None and \
                            tuple(map(int, trimmed.decode().split("-"))) > tuple(map(int, down_at.split("-"))):
                        break
                    await asyncio.sleep(0.05)
        finally:
            os.kill(pid, signal.SIGCONT)

        # Its sessions are gone in every other replica: it says so to its desktop, which comes back.
        try:
            async with asyncio.timeout(15 * UNIT):
                async for _ in agent:
                    pass
        except ConnectionClosed:
            pass
        except TimeoutError:
            raise AssertionError("the woken node kept its sessions, unaware it had been declared down") from None
        assert agent.close_code == 1012, (agent.close_code, agent.close_reason)
        agent = await connect(f"{cluster.url()}/agent")
        await agent.send(json.dumps({"type": "hello", "token": token}))
        welcome = await recv(agent)
        assert welcome["displayed"] == [card["notificationId"]]
        assert await recv(agent) == card
        await agent.send(json.dumps({"type": "respond", "notificationId": card["notificationId"], "action": "Accept"}))
        result = await recv(ig)
        assert (result["requestId"], result["value"]) == ("r1", ACCEPT)
        assert (await recv(agent))["type"] == "resolved"
        await agent.close()
        await ig.close()
        no_tracebacks(cluster)
