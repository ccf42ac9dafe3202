"""The churn soak: thousands of agents coming and going, offers at a steady rate, integrators cut and resumed.

One ``deskpush serve`` process; in this process, on one event loop, every
agent and integrator (``wire.Client``). What is planned comes from the seed:
which agent each offer goes to, what happens to it (accepted or rejected
after a think time, left to time out on a short-timeout template, cancelled,
or an answer racing a cancel), which agent leaves when and for how long,
when each integrator's connection is cut or closed. What the server's timing
makes of the plan is what is measured.

Agents: 10% of them leave each minute, half with a clean close and half with
a TCP reset; most come back within the presence grace (their displayed offers
are replayed and answered again), some only after it (their offers end with
Reject/AgentDisconnected). Offers go to the planned agent whether it is there
or not.

Integrators speak protocol v1.1 as ``docs/protocol.md`` ("Outcomes across
reconnects") tells a client to: connect with ``resumeAfter`` (``$`` first,
then the last outcomeId received), one over the Bearer path with the query
parameter and one with a hello; keep every unanswered request; after
``resumed`` send each again with the same requestId; ack now and then. They
are cut (TCP reset) or closed cleanly every ``cut_every`` seconds and come
back after a pause; requests made meanwhile wait for the resume.

What is checked, at the end, after a drain:

* lost: a request (notifyEvent or cancelEvent) with no final answer (a
  ``result`` or an ``error``);
* duplicated, per requestId: a notifyEvent answered with two different
  outcomeIds, or with both a result and an error (the same outcomeId again
  is the protocol's allowed re-delivery, counted apart); per outcomeId: one
  id for two requestIds; and on the agents' side, one requestId
  (correlationId) offered as two notifications;
* the agent's view agrees with the integrator's: the ``resolved`` an agent saw
  for a notification names the outcome its integrator got;
* every ``resumed`` was complete; the server logged as many outcomes as the
  integrators received;
* server exceptions (``Traceback`` in its log), RSS over time and its slope,
  open fds at the end and once every client has gone.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .proc import ServerProcess, agent_token
from .wire import Client, Proxy

__all__ = ["SoakParams", "run_soak", "soak_config"]

decode = msgspec.json.decode
CHAT = "msdyn_chat_incoming_unauthenticated"  # built-in, 120 s display timeout
SHORT = "soak_short"
PLANS = [("accept", 0.40), ("reject", 0.20), ("timeout", 0.15), ("cancel", 0.15), ("race", 0.10)]


@dataclass
class SoakParams:
    seconds: float = 600.0
    agents: int = 2000
    offer_rate: float = 100.0  # notifyEvents per second, all integrators together
    churn_per_minute: float = 0.10  # share of the agents that leave (and come back) each minute
    integrators: int = 2  # speaking the protocol themselves
    sdk: bool = True  # and one more on the Python SDK, through a proxy that cuts it
    cut_every: float = 30.0  # seconds between cuts of each integrator's connection
    presence_grace: float = 3.0
    short_timeout: float = 2.0
    queue_timeout: float = 15.0
    drain_timeout: float = 90.0
    sample_every: float = 5.0
    warmup: float = 60.0  # RSS slope from here on
    burst: int = 100  # agents connecting at once

    @property
    def caps(self) -> int:
        """recentOutcomes and outcomeHistory: reached within the first 20 s, so memory reaches its steady state."""
        return max(500, int(self.offer_rate * 20))


def soak_config(p: SoakParams, keys: dict[str, str]) -> dict[str, Any]:
    return {
        "server": {"demo": False},
        "auth": {"integratorKeys": [{"name": n, "key": k} for n, k in keys.items()]},
        "limits": {"presenceGrace": p.presence_grace, "queueTimeout": p.queue_timeout,
                   "recentOutcomes": p.caps, "outcomeHistory": p.caps},
        "templates": [{"name": SHORT, "title": "Short offer for {customerName}", "timeout": p.short_timeout,
                       "fields": [{"header": "Customer", "value": "{customerName}"}]}],
    }


@dataclass
class Plan:
    integrator: int
    agent: int
    kind: str
    template: str
    answer_after: float  # accept, reject, race
    cancel_after: float  # cancel, race


# --------------------------------------------------------------------------
# Agents


class Agents:
    """Every agent's sessions and what they saw, keyed by the offers' correlationId (= requestId)."""

    def __init__(self, port: int, n: int, plans: dict[str, Plan]) -> None:
        self.port = port
        self.ids = [f"agent-{k:04d}" for k in range(n)]
        self.tokens = [agent_token(a) for a in self.ids]
        self.plans = plans
        self.sessions: list[Client | None] = [None] * n
        self.leaving: set[Client] = set()
        self.timers: dict[Client, list[asyncio.TimerHandle]] = defaultdict(list)
        self.offered: dict[str, set[str]] = defaultdict(set)  # correlationId -> notificationIds shown
        self.resolved: dict[str, tuple[str, str]] = {}  # notificationId -> outcome
        self.conflicts: list[str] = []
        self.responds = 0
        self.errors: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # sessions the server closed unasked, by close code
        self.sessions_opened = 0
        self.failed_connects: Counter[str] = Counter()
        self.loop = asyncio.get_running_loop()

    async def connect(self, k: int) -> None:
        for attempt in range(5):
            try:
                client = await Client.open("127.0.0.1", self.port, "/agent",
                                           on_message=lambda c, data, k=k: self.message(k, c, data))
            except (OSError, TimeoutError) as exc:
                self.failed_connects[type(exc).__name__] += 1
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            client.send({"type": "hello", "token": self.tokens[k]})
            self.sessions[k] = client
            self.sessions_opened += 1
            client.ended.add_done_callback(lambda fut, k=k, c=client: self.ended(k, c, fut.result()))
            return
        raise ConnectionError(f"agent {self.ids[k]} could not connect")

    def leave(self, k: int, abrupt: bool) -> None:
        client = self.sessions[k]
        if client is None:
            return
        self.sessions[k] = None
        self.leaving.add(client)
        self._cancel_timers(client)
        if abrupt:
            client.cut()
        else:
            client.close()

    def ended(self, k: int, client: Client, how: tuple[int | None, str]) -> None:
        self._cancel_timers(client)
        if client in self.leaving:
            self.leaving.discard(client)
            return
        self.dropped[str(how[0])] += 1
        if self.sessions[k] is client:
            self.sessions[k] = None

    def message(self, k: int, client: Client, data: bytes) -> None:
        m = decode(data)
        t = m["type"]
        if t == "notification":
            nid, corr = m["notificationId"], m["correlationId"]
            self.offered[corr].add(nid)
            plan = self.plans.get(corr)
            if plan is None:
                self.errors["notification for an unknown request"] += 1
            elif plan.kind in ("accept", "reject", "race"):
                action = "Reject" if plan.kind == "reject" else "Accept"
                self.timers[client].append(self.loop.call_later(plan.answer_after, self._respond, client, nid, action))
        elif t == "resolved":
            outcome = (m["actionName"], m["responseReason"])
            earlier = self.resolved.setdefault(m["notificationId"], outcome)
            if earlier != outcome:
                self.conflicts.append(f"{m['notificationId']}: {earlier} then {outcome}")
        elif t == "error":
            self.errors[m["code"]] += 1
        elif t not in ("welcome", "queue", "pong"):
            self.errors[f"unexpected frame {t}"] += 1

    def _respond(self, client: Client, nid: str, action: str) -> None:
        if client.send({"type": "respond", "notificationId": nid, "action": action}):
            self.responds += 1

    def _cancel_timers(self, client: Client) -> None:
        for handle in self.timers.pop(client, ()):
            handle.cancel()

    def close_all(self) -> None:
        for k, client in enumerate(self.sessions):
            if client is not None:
                self.leave(k, abrupt=False)


# --------------------------------------------------------------------------
# Integrators (protocol v1.1, resuming)


class Integrator:
    """One API key's integrator, resuming across every cut as docs/protocol.md says a client must."""

    def __init__(self, port: int, name: str, key: str, bearer: bool) -> None:
        self.port, self.name, self.key, self.bearer = port, name, key, bearer
        self.client: Client | None = None
        self.resumed = False  # on the current connection
        self.last = "$"
        self.pending: dict[str, dict] = {}  # requestId -> frame, in the order made
        self.kind: dict[str, str] = {}
        self.results: dict[str, list[str]] = defaultdict(list)  # notify requestId -> outcomeIds received
        self.outcomes: dict[str, tuple[str, str]] = {}  # outcomeId -> outcome
        self.owners: dict[str, set[str]] = defaultdict(set)  # outcomeId -> requestIds
        self.cancel_answers: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)  # requestId -> error messages
        self.status: dict[str, str] = {}  # requestId -> notificationId
        self.stray: list[str] = []  # frames that fit no request
        self.connects = 0
        self.cuts: Counter[str] = Counter()
        self.resumes: list[tuple[int, bool]] = []  # (count, complete)
        self.incomplete: list[str] = []
        self.dropped: Counter[str] = Counter()
        self.sent = 0
        self.resent = 0
        self.stop = False
        self.connecting = False
        self.events: deque[str] = deque(maxlen=12)  # the last connection events, to say why one is stuck

    def event(self, what: str) -> None:
        self.events.append(f"{time.monotonic():.1f} {what}")

    async def connect(self) -> None:
        if self.connecting:
            return
        self.connecting = True
        try:
            await self._connect()
        finally:
            self.connecting = False

    async def _connect(self) -> None:
        delay = 0.1
        while not self.stop:
            self.resumed = False
            path = f"/integrator?resumeAfter={self.last}" if self.bearer else "/integrator"
            headers = [("Authorization", f"Bearer {self.key}")] if self.bearer else []
            self.event(f"connect {path}")
            try:
                client = await Client.open("127.0.0.1", self.port, path, headers=headers, on_message=self.message)
            except (OSError, TimeoutError) as exc:
                self.event(f"failed {exc!r}"[:200])
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            # The server may have sent ``resumed`` already, with the 101: then
            # message() has made this the resumed connection; else it is now.
            self.client = client
            self.connects += 1
            client.ended.add_done_callback(lambda fut, c=client: self.ended(c, fut.result()))
            if not self.bearer:
                client.send({"type": "hello", "apiKey": self.key, "resumeAfter": self.last})
            return

    def cut(self, abrupt: bool) -> None:
        client, self.client, self.resumed = self.client, None, False
        if client is None:
            return
        self.cuts["reset" if abrupt else "close"] += 1
        self.event("cut" if abrupt else "close")
        if abrupt:
            client.cut()
        else:
            client.close()

    def ended(self, client: Client, how: tuple[int | None, str]) -> None:
        self.event(f"ended {how} {'current' if self.client is client else 'old'}")
        if self.client is client:  # not one of our cuts
            self.dropped[str(how[0])] += 1
            self.client, self.resumed = None, False
            if not self.stop:
                asyncio.ensure_future(self.connect())

    def request(self, rid: str, frame: dict, kind: str) -> None:
        self.pending[rid] = frame
        self.kind[rid] = kind
        self.sent += 1
        if self.resumed and self.client is not None:
            self.client.send(frame)

    def ack(self) -> None:
        if self.resumed and self.client is not None and self.last != "$":
            self.client.send({"type": "ack", "outcomeId": self.last})

    def duplicates(self) -> list[str]:
        """notifyEvents answered with two outcomeIds, or with a result and an error."""
        return [rid for rid, oids in self.results.items() if len(set(oids)) > 1 or self.errors.get(rid)]

    def lost(self) -> list[str]:
        return list(self.pending)

    async def close(self) -> None:
        self.stop = True
        self.cut(abrupt=False)

    def message(self, client: Client, data: bytes) -> None:
        m = decode(data)
        t = m["type"]
        rid = m.get("requestId")
        if t == "result":
            oid = m.get("outcomeId")
            value = m["value"]
            outcome = (value["actionName"], value["responseReason"])
            if oid is not None:
                if self.kind.get(rid) != "notify":
                    self.stray.append(f"result with outcomeId for {rid!r}")
                self.results[rid].append(oid)
                self.owners[oid].add(rid)
                earlier = self.outcomes.setdefault(oid, outcome)
                if earlier != outcome:
                    self.stray.append(f"outcomeId {oid}: {earlier} then {outcome}")
                if oid > self.last or self.last == "$":
                    self.last = oid
            else:
                if self.kind.get(rid) != "cancel":
                    self.stray.append(f"result without outcomeId for {rid!r}")
                self.cancel_answers[rid].append(outcome)
            self.pending.pop(rid, None)
        elif t == "error":
            if rid is None:
                self.stray.append(f"error without requestId: {m['error']}")
            else:
                self.errors[rid].append(m["error"]["message"])
                self.pending.pop(rid, None)
        elif t == "status":
            self.status[rid] = m["notificationId"]
        elif t == "resumed":
            self.event(f"resumed {m['count']} {m['complete']}")
            self.client = client  # ``resumed`` can come with the 101, before Client.open returns
            self.resumes.append((m["count"], m["complete"]))
            if not m["complete"]:
                self.incomplete.append(m.get("details", ""))
            if self.last == "$" or m["lastOutcomeId"] > self.last:
                self.last = m["lastOutcomeId"]
            self.resumed = True
            # Every request still unanswered goes again, with its requestId, in order.
            for frame in list(self.pending.values()):
                client.send(frame)
                self.resent += 1
        else:
            self.stray.append(f"unexpected frame {t}")


class SdkIntegrator:
    """An integrator on the Python SDK (``deskpush.client.Integrator``), which resumes on its own.

    Its connection runs through a ``wire.Proxy``, since the SDK owns its
    socket: a cut resets both legs. The SDK settles each call once, so what
    it is measured by: every call settles with the outcome or a refusal (an
    ``OutcomeUnknownError`` or a gave-up error counts as lost); ``on_outcome``
    sees every distinct outcome, so one requestId with two outcomeIds, or one
    outcomeId for two requestIds, shows there; and the agents' side as for
    the others.
    """

    def __init__(self, port: int, name: str, key: str) -> None:
        self.port, self.name, self.key = port, name, key
        self.proxy = Proxy(port)
        self.ig: Any = None
        self.pending: dict[str, None] = {}  # our requestId (the correlationId) -> a call not settled yet
        self.kind: dict[str, str] = {}
        self.results: dict[str, list[str]] = {}  # our requestId -> [a stand-in id for its one value]
        self.outcomes: dict[str, tuple[str, str]] = {}
        self.owners: dict[str, set[str]] = defaultdict(set)  # outcomeId -> the SDK's requestIds
        self.by_request: dict[str, set[str]] = defaultdict(set)  # the SDK's requestId -> outcomeIds
        self.cancel_answers: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)
        self.unknown: list[str] = []  # OutcomeUnknownError: the SDK says it cannot know
        self.gave_up: list[str] = []  # IntegratorConnectionError
        self.stray: list[str] = []
        self.cuts: Counter[str] = Counter()
        self.resumes: list[tuple[int, bool]] = []
        self.incomplete: list[str] = []
        self.dropped: Counter[str] = Counter()
        self.sent = 0
        self.resent = 0
        self.tasks: set[asyncio.Task] = set()
        self.stack: Any = None

    @property
    def connects(self) -> int:
        return self.ig.connects if self.ig is not None else 0

    @property
    def resumed(self) -> bool:
        return self.ig is not None and self.ig.connected

    async def start(self) -> None:
        from contextlib import AsyncExitStack

        from deskpush.client import Integrator as Sdk
        from deskpush.client import Reconnect

        await self.proxy.start()

        def on_outcome(request_id: str, value: dict, outcome_id: str) -> None:
            self.owners[outcome_id].add(request_id)
            self.by_request[request_id].add(outcome_id)

        def on_resumed(r: Any) -> None:
            self.resumes.append((r.count, r.complete))
            if not r.complete:
                self.incomplete.append(r.details)

        self.stack = AsyncExitStack()
        self.ig = await self.stack.enter_async_context(Sdk(
            f"ws://127.0.0.1:{self.proxy.port}/integrator", self.key, on_outcome=on_outcome, on_resumed=on_resumed,
            reconnect=Reconnect(attempts=None, timeout=120.0, initial=0.05, maximum=1.0)))

    def duplicates(self) -> list[str]:
        return [rid for rid, oids in self.by_request.items() if len(oids) > 1]

    def lost(self) -> list[str]:
        return list(self.pending) + self.unknown + self.gave_up

    def request(self, rid: str, frame: dict, kind: str) -> None:
        self.pending[rid] = None
        self.kind[rid] = kind
        self.sent += 1
        task = asyncio.ensure_future(self._call(rid, frame, kind))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _call(self, rid: str, frame: dict, kind: str) -> None:
        from deskpush.client import CIFError, IntegratorConnectionError, OutcomeUnknownError

        try:
            if kind == "notify":
                value = await self.ig.notify_event(frame["input"], correlation_id=frame["correlationId"],
                                                   cancellation_token=frame["cancellationToken"],
                                                   agent_id=frame["agentId"], progress=frame["progress"])
                self.results[rid] = [f"sdk:{rid}"]
                self.outcomes[f"sdk:{rid}"] = (value["actionName"], value["responseReason"])
            else:
                value = await self.ig.cancel_event(frame["cancellationToken"])
                self.cancel_answers[rid].append((value["actionName"], value["responseReason"]))
        except OutcomeUnknownError:
            self.unknown.append(rid)
        except IntegratorConnectionError:
            self.gave_up.append(rid)
        except CIFError as err:
            self.errors[rid].append(err.message)
        finally:
            self.pending.pop(rid, None)

    def cut(self, abrupt: bool) -> None:
        if self.proxy.cut(abrupt):
            self.cuts["reset" if abrupt else "FIN"] += 1

    async def connect(self) -> None:
        pass  # the SDK reconnects on its own

    def ack(self) -> None:
        if self.ig is not None and self.ig.connected and self.ig.last_outcome_id:
            task = asyncio.ensure_future(self.ig.ack())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.stack is not None:
            await self.stack.aclose()
        await self.proxy.close()


# --------------------------------------------------------------------------
# The run


def health(port: int, key: str) -> dict[str, Any]:
    """The engine's counts: ``GET /stats`` with an integrator key, or ``/healthz`` on a server before /stats."""
    import urllib.request

    for path in ("/stats", "/healthz"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                body = msgspec.json.decode(r.read())
        except (OSError, msgspec.DecodeError):
            continue
        counts = {k: v for k, v in body.items() if k != "status"} if isinstance(body, dict) else {}
        if counts:
            return counts
    return {}


def slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y) per unit of t; 0 with fewer than two points."""
    if len(samples) < 2:
        return 0.0
    ts = [t for t, _ in samples]
    ys = [y for _, y in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in samples) / den if den else 0.0


async def _soak(p: SoakParams, srv: ServerProcess, seed: int, keys: dict[str, str],
                say: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    plans: dict[str, Plan] = {}
    agents = Agents(srv.port, p.agents, plans)
    integrators: list[Any] = [Integrator(srv.port, name, key, bearer=(i % 2 == 0))
                              for i, (name, key) in enumerate(keys.items()) if name != "soak-sdk"]
    if "soak-sdk" in keys:
        integrators.append(SdkIntegrator(srv.port, "soak-sdk", keys["soak-sdk"]))
    idle_fds, idle_connections = srv.fds(), srv.connections()
    t_connect = time.monotonic()
    for b in range(0, p.agents, p.burst):
        await asyncio.gather(*(agents.connect(k) for k in range(b, min(p.agents, b + p.burst))))
    for ig in integrators:
        await (ig.start() if isinstance(ig, SdkIntegrator) else ig.connect())
    connect_s = time.monotonic() - t_connect
    await asyncio.sleep(1.0)
    say(f"soak: {p.agents} agents and {len(integrators)} integrators connected in {connect_s:.1f} s; "
        f"running {p.seconds:.0f} s")

    t0 = time.monotonic()
    end = t0 + p.seconds
    samples: list[tuple[float, float, int]] = []  # (s since t0, RSS MiB, fds)
    # One stream of draws per concern, so that each is the same whatever order
    # the event loop happens to run them in: offer i, leave j, cut k.
    plan_rng = random.Random(f"soak-{seed}-offers")
    churn_rng = random.Random(f"soak-{seed}-churn")
    kinds = [k for k, _ in PLANS]
    weights = [w for _, w in PLANS]
    away: set[int] = set()
    returns: list[asyncio.Future] = []

    async def nap(seconds: float) -> None:
        """Sleep, but not past the end of the run."""
        await asyncio.sleep(max(0.0, min(seconds, end - time.monotonic())))

    async def sampler() -> None:
        while time.monotonic() < end:
            samples.append((time.monotonic() - t0, srv.rss_mib(), srv.fds()))
            await nap(p.sample_every)
        samples.append((time.monotonic() - t0, srv.rss_mib(), srv.fds()))

    async def offers() -> None:
        i = 0
        interval = 1.0 / p.offer_rate
        due = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= end:
                return
            while due <= now:
                ig_index = i % len(integrators)
                ig = integrators[ig_index]
                kind = plan_rng.choices(kinds, weights)[0]
                template = SHORT if kind in ("timeout", "cancel") or plan_rng.random() < 0.3 else CHAT
                answer = plan_rng.uniform(0.05, 1.5)
                cancel = answer + plan_rng.uniform(-0.05, 0.05) if kind == "race" else plan_rng.uniform(0.1, 2.5)
                plan = Plan(ig_index, plan_rng.randrange(p.agents), kind, template, answer, cancel)
                rid = f"{ig.name}-{i:07d}"
                plans[rid] = plan
                ig.request(rid, {"type": "notifyEvent", "requestId": rid, "agentId": agents.ids[plan.agent],
                                 "input": {"templateName": template,
                                           "templateParameters": {"customerName": f"Customer {i}"}},
                                 "cancellationToken": f"t-{rid}", "correlationId": rid,
                                 "progress": plan_rng.random() < 0.5}, "notify")
                if kind in ("cancel", "race"):
                    loop.call_later(plan.cancel_after, ig.request, f"{rid}-c",
                                    {"type": "cancelEvent", "requestId": f"{rid}-c",
                                     "cancellationToken": f"t-{rid}"}, "cancel")
                i += 1
                due += interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def come_back(k: int, after: float) -> None:
        await asyncio.sleep(after)
        try:
            await agents.connect(k)
        finally:
            away.discard(k)

    async def churn() -> None:
        per_second = p.agents * p.churn_per_minute / 60.0
        if per_second <= 0:
            return
        interval = 1.0 / per_second
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() >= end:
                return
            k = churn_rng.randrange(p.agents)
            abrupt = churn_rng.random() < 0.5
            after = (churn_rng.uniform(0.3, p.presence_grace * 0.9) if churn_rng.random() < 0.8
                     else churn_rng.uniform(p.presence_grace + 1.0, p.presence_grace + 5.0))
            if k in away or agents.sessions[k] is None:
                continue
            away.add(k)
            agents.leave(k, abrupt)
            returns.append(asyncio.ensure_future(come_back(k, after)))

    async def cuts(ig: Any, phase: float) -> None:
        cut_rng = random.Random(f"soak-{seed}-cuts-{ig.name}")
        await nap(phase)
        while time.monotonic() < end:
            ig.cut(abrupt=cut_rng.random() < 0.5)
            await asyncio.sleep(cut_rng.uniform(0.2, 2.0))
            await ig.connect()
            await nap(p.cut_every * cut_rng.uniform(0.7, 1.3))

    async def acks() -> None:
        while time.monotonic() < end:
            await nap(10.0)
            for ig in integrators:
                ig.ack()

    async def progress() -> None:
        while time.monotonic() < end:
            await nap(60.0)
            if time.monotonic() < end:
                sent = sum(ig.sent for ig in integrators)
                say(f"soak: {time.monotonic() - t0:4.0f} s  requests {sent}  "
                    f"RSS {samples[-1][1]:.1f} MiB  fds {samples[-1][2]}")

    await asyncio.gather(sampler(), offers(), churn(), acks(), progress(),
                         *(cuts(ig, p.cut_every * (i + 1) / (len(integrators) + 1))
                           for i, ig in enumerate(integrators)))
    ran_s = time.monotonic() - t0
    counts = health(srv.port, next(iter(keys.values())))
    # Drain: every agent back, every integrator connected, until nothing is pending.
    await asyncio.gather(*returns, return_exceptions=True)
    for ig in integrators:
        if not ig.resumed:
            await ig.connect()
    drain_start = time.monotonic()
    told = drain_start
    while time.monotonic() - drain_start < p.drain_timeout:
        if all(not ig.pending and ig.resumed for ig in integrators):
            break
        await asyncio.sleep(0.5)
        if time.monotonic() - told >= 10:
            told = time.monotonic()
            waiting = [(rid, plans.get(rid.removesuffix("-c"))) for ig in integrators for rid in ig.pending]
            say(f"soak: draining, {len(waiting)} requests unanswered, e.g. {waiting[:3]}; "
                f"resumed {[ig.resumed for ig in integrators]}; "
                f"{[list(getattr(ig, 'events', ())) for ig in integrators if not ig.resumed]}")
    drain_s = time.monotonic() - drain_start
    await asyncio.sleep(1.0)  # any late or doubled frame
    # One last resume each: anything the server still has after our last id would show here.
    for ig in integrators:
        ig.cut(abrupt=False)
        await asyncio.sleep(0.2)
        await ig.connect()
    for _ in range(40):
        if all(ig.resumed for ig in integrators):
            break
        await asyncio.sleep(0.25)
    end_rss, end_fds = srv.rss_mib(), srv.fds()
    connected_sessions = sum(1 for s in agents.sessions if s is not None and s.open_now)
    for ig in integrators:
        await ig.close()
    agents.close_all()
    await asyncio.sleep(2.0)
    for _ in range(20):  # connections close within the server's close timeout
        after = srv.connections()
        if set(after) <= {"LISTEN", "not TCP"}:
            break
        await asyncio.sleep(0.5)
    after_fds = srv.fds()
    out = summarise(p, srv, agents, integrators, samples, ran_s, drain_s, connect_s,
                    idle_fds, end_rss, end_fds, after_fds, connected_sessions)
    out["engine_counts"] = counts
    out["connections_after"] = dict(after)
    out["connections_idle"] = dict(idle_connections)
    return out


def summarise(p: SoakParams, srv: ServerProcess, agents: Agents, integrators: list[Any],
              samples: list[tuple[float, float, int]], ran_s: float, drain_s: float, connect_s: float,
              idle_fds: int, end_rss: float, end_fds: int, after_fds: int, connected: int) -> dict[str, Any]:
    notify = [(ig, rid) for ig in integrators for rid, k in ig.kind.items() if k == "notify"]
    cancels = [(ig, rid) for ig in integrators for rid, k in ig.kind.items() if k == "cancel"]
    lost = [rid for ig in integrators for rid in ig.lost()]
    results = sum(1 for ig, rid in notify if ig.results.get(rid))
    refused = Counter(ig.errors[rid][0] for ig, rid in notify if ig.errors.get(rid) and not ig.results.get(rid))
    dup_request = [rid for ig in integrators for rid in ig.duplicates()]
    redelivered = sum(len(ig.results[rid]) - len(set(ig.results[rid])) for ig, rid in notify if ig.results.get(rid))
    dup_outcome = [oid for ig in integrators for oid, rids in ig.owners.items() if len(rids) > 1]
    second_offers = [corr for corr, nids in agents.offered.items() if len(nids) > 1]
    outcomes = Counter()
    mismatched = []
    for ig, rid in notify:
        oids = ig.results.get(rid)
        if not oids:
            continue
        outcome = ig.outcomes[oids[0]]
        outcomes[f"{outcome[0]}/{outcome[1]}"] += 1
        for nid in agents.offered.get(rid, ()):
            seen = agents.resolved.get(nid)
            if seen is not None and seen != outcome:
                mismatched.append(f"{rid}: integrator {outcome}, agent {seen}")
    cancel_answers = sum(1 for ig, rid in cancels if ig.cancel_answers.get(rid) or ig.errors.get(rid))
    dup_cancel = [rid for ig, rid in cancels if len(set(ig.cancel_answers.get(rid, ()))) > 1]
    log = srv.log()
    logged_outcomes = log.count(" outcome notificationId=")
    distinct_outcomes = sum(len(ig.owners) for ig in integrators)
    tbs = srv.tracebacks()
    rs = [(t / 60.0, rss) for t, rss, _ in samples if t >= min(p.warmup, ran_s / 4)]
    return {
        "params": {"seconds": p.seconds, "agents": p.agents, "offerRate": p.offer_rate,
                   "churnPerMinute": p.churn_per_minute, "integrators": len(integrators),
                   "sdk": any(isinstance(ig, SdkIntegrator) for ig in integrators), "cutEvery": p.cut_every,
                   "presenceGrace": p.presence_grace, "shortTimeout": p.short_timeout, "caps": p.caps},
        "ran_s": ran_s, "drain_s": drain_s, "connect_s": connect_s,
        "requests": sum(ig.sent for ig in integrators),
        "offers": len(notify), "cancels": len(cancels), "cancel_answers": cancel_answers,
        "results": results, "refused": dict(refused), "outcomes": dict(outcomes),
        "lost": lost, "dup_request": dup_request, "dup_outcome": dup_outcome, "dup_cancel": dup_cancel,
        "second_offers": second_offers, "redelivered": redelivered, "mismatched": mismatched,
        "agent_conflicts": agents.conflicts, "agent_errors": dict(agents.errors),
        "agent_sessions": agents.sessions_opened, "agent_responds": agents.responds,
        "agent_dropped": dict(agents.dropped), "agent_failed_connects": dict(agents.failed_connects),
        "integrator_connects": sum(ig.connects for ig in integrators),
        "integrator_cuts": dict(sum((ig.cuts for ig in integrators), Counter())),
        "sdk_unknown": [rid for ig in integrators if isinstance(ig, SdkIntegrator) for rid in ig.unknown],
        "sdk_gave_up": [rid for ig in integrators if isinstance(ig, SdkIntegrator) for rid in ig.gave_up],
        "integrator_dropped": dict(sum((ig.dropped for ig in integrators), Counter())),
        "resent": sum(ig.resent for ig in integrators),
        "resumes": sum(len(ig.resumes) for ig in integrators),
        "replayed": sum(c for ig in integrators for c, _ in ig.resumes),
        "incomplete": [d for ig in integrators for d in ig.incomplete],
        "stray": [s for ig in integrators for s in ig.stray],
        "logged_outcomes": logged_outcomes, "distinct_outcomes": distinct_outcomes,
        "tracebacks": [t.exception for t in tbs], "traceback_texts": [t.text for t in tbs[:3]],
        "log_errors": sum(1 for line in log.splitlines() if " ERROR " in line),
        "rss_start": samples[0][1] if samples else 0.0, "rss_end": end_rss,
        "rss_max": max((r for _, r, _ in samples), default=0.0),
        "rss_slope": slope(rs), "slope_from_s": rs[0][0] * 60 if rs else 0.0,
        "fds_idle": idle_fds, "fds_start": samples[0][2] if samples else 0, "fds_end": end_fds,
        "fds_after": after_fds, "connected_at_end": connected,
        "samples": [(round(t, 1), round(r, 2), f) for t, r, f in samples],
    }


def run_soak(p: SoakParams, tmp: Path, seed: int, say: Any = print) -> dict[str, Any]:
    """Start a server, run the soak against it, stop it; the figures and what they show."""
    import uvloop

    import logging

    # The SDK says each drop on its logger; the run counts them itself.
    logging.getLogger("deskpush.integrator").setLevel(logging.ERROR)
    rng = random.Random(f"soak-{seed}")
    keys = {f"soak-{c}": f"soak-key-{c}-{rng.getrandbits(128):032x}" for c in "abcdefgh"[:p.integrators]}
    if p.sdk:
        keys["soak-sdk"] = f"soak-key-sdk-{rng.getrandbits(128):032x}"
    srv = ServerProcess(tmp, "soak", soak_config(p, keys)).start()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out = runner.run(_soak(p, srv, seed, keys, say))
    finally:
        out_status = srv.stop()
    out["exit_status"] = out_status
    out["tracebacks"] = [t.exception for t in srv.tracebacks()]
    return out
