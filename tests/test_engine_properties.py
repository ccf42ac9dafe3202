"""Random sequences of everything that can happen to the engine, checked
against a model and the engine's invariants (hypothesis state machine).

The model is deliberately independent of the engine's internals: it learns
notification ids from the injected id counter and from the frames the engine
sends, and uses only the engine's public queries to check its invariants:

* exactly one outcome (``Ended``) per notifyEvent that was not refused, and
  exactly one ``result`` to its integrator, sent only if that connection was
  still connected when the notification ended (v1 connections: none of them
  resumes), and always one entry in the integrator's history of outcomes;
* never a frame to a connection that is closed (or never was opened);
* per agent at most sessions_per_agent sessions: a new one beyond closes the
  oldest (``Close``), which gets nothing after;
* per agent, displayed <= display_limit and queued <= queue_limit, FIFO;
* nothing sent about a notification after it ended (notification, status,
  resolved, result), except error replies; no replay of an ended one;
* every open session of an agent was shown every displayed notification and
  gets ``resolved`` when it ends; its last queue frame is the queue length;
* refusals and replies are the ones the rules say (templates, tokens,
  presence, queue full, cancel/respond races);
* ``next_deadline()`` is never in the past after ``handle_timer(now)``;
  timeouts happen at their deadline, never before.

A second, differential test drives two engines with the same events, one
whose caller runs ``handle_timer`` punctually and one whose caller is late:
they must answer the same, since events run the deadlines already due.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from deskpush.protocol import frames as f
from deskpush.protocol.engine import (
    ACCEPTED,
    AGENT_DISCONNECTED,
    AUTO_ACCEPTED,
    CANCELLED,
    DECLINED,
    DISPLAY_TIMEOUT,
    QUEUE_LIMIT,
    QUEUE_TIME_LIMIT,
    Close,
    Ended,
    Engine,
    Limits,
    Outcome,
    Send,
)
from deskpush.protocol.templates import Template
from deskpush.protocol.vocabulary import CLOSE_SESSION_REPLACED

from .engine_helpers import T0, cancel_frame, notify_frame, respond_frame

TEMPLATES = {
    "short": Template(name="short", title="Short {x}", timeout=0.4),
    "long": Template(name="long", title="Long", timeout=5.0),
    "auto": Template(name="auto", title="Auto", auto_accept=True, timeout=1.0),
}
INTEGRATORS = ("k1", "k2")
AGENTS = ("a1", "a2")
ALL_AGENTS = (*AGENTS, "a3")  # a3 never connects
TOKENS = ("tA", "tB", "tC")
TIMER_OUTCOMES = {DISPLAY_TIMEOUT, QUEUE_TIME_LIMIT, AGENT_DISCONNECTED, AUTO_ACCEPTED}


@dataclass
class Req:
    rid: str
    conn: str
    integrator: str
    agent: str
    progress: bool
    at: float
    token: str | None = None
    nid: str | None = None
    outcome: Outcome | None = None
    results: int = 0
    delivered: bool | None = None
    statuses: list[str] = field(default_factory=list)
    template: str = ""
    displayed_at: float | None = None
    expires_at: int | None = None
    step: float = 0.0  # the engine's timer_resolution, in ms

    def display_deadline(self) -> float:
        assert self.displayed_at is not None
        return rounded(self.displayed_at + TEMPLATES[self.template].timeout * 1000.0, self.step)

    def queue_deadline(self, queue_timeout: float) -> float:
        return rounded(self.at + queue_timeout * 1000.0, self.step)


def rounded(when: float, step: float) -> float:
    """A deadline as the engine sets it: up to a multiple of ``step`` ms (0: exact)."""
    return math.ceil(when / step) * step if step else when


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine: Engine | None = None

    # ------------------------------------------------------------------
    # Setup

    @initialize(
        display_limit=st.integers(1, 2),
        queue_limit=st.integers(0, 3),
        queue_timeout=st.sampled_from([0.3, 2.5, 6.0]),
        grace=st.sampled_from([0.0, 0.2, 1.0, 5.0]),
        start=st.sampled_from([T0, T0 + 0.25]),
        resolution=st.sampled_from([0.0, 0.05]),
        sessions_per_agent=st.sampled_from([1, 2, 3, 10]),
    )
    def setup(self, display_limit, queue_limit, queue_timeout, grace, start, resolution, sessions_per_agent):
        self.limits = Limits(display_limit=display_limit, queue_limit=queue_limit,
                             queue_timeout=queue_timeout, presence_grace=grace, timer_resolution=resolution,
                             sessions_per_agent=sessions_per_agent)
        self.replacing: tuple[str, ...] = ()  # the sessions the next event must close, oldest first
        self.replaced: list[str] = []  # closed by the engine, their socket not closed yet
        self.counter = itertools.count(1)
        self.issued: list[str] = []
        self.engine = Engine(TEMPLATES, self.limits, new_id=self._new_id)
        self.now = start
        self.conn_seq = itertools.count(1)
        self.req_seq = itertools.count(1)
        self.sessions: dict[str, str] = {}         # open session -> agent
        self.integrators: dict[str, str] = {}      # open integrator conn -> integrator
        self.grace: dict[str, float] = {}          # agent with no session -> grace deadline
        self.present: set[str] = set()
        self.requests: dict[str, Req] = {}
        self.by_nid: dict[str, Req] = {}
        self.ended: set[str] = set()
        self.live_tokens: dict[tuple[str, str], str] = {}
        self.last_outcome: dict[tuple[str, str], Outcome] = {}
        self.shown: dict[str, set[str]] = {}
        self.resolved: set[tuple[str, str]] = set()
        self.last_queue: dict[str, int] = {}
        self.cancels: dict[str, int] = {}
        # Start with something to work with; the rules connect and disconnect more.
        for integrator in INTEGRATORS:
            self.connect_integrator(integrator)
        for agent in AGENTS:
            self.connect_agent(agent)

    def _new_id(self) -> str:
        ident = f"id{next(self.counter)}"
        self.issued.append(ident)
        return ident

    # ------------------------------------------------------------------
    # Checking what the engine returned

    def apply(self, effects: list) -> tuple[list[Send], list[Ended]]:
        """Check every effect against the model and fold it in."""
        assert isinstance(effects, list)
        ended_now: dict[str, Ended] = {}
        notify_results: dict[str, int] = {}
        sends: list[Send] = []
        for e in effects:
            if isinstance(e, Ended):
                nid = e.notification_id
                assert nid not in self.ended, f"{nid} ended twice"
                req = self.requests[e.correlation_id]
                assert req.nid == nid and req.outcome is None
                assert (e.agent_id, e.integrator) == (req.agent, req.integrator)
                assert e.delivered == (req.conn in self.integrators)
                req.outcome = e.outcome
                req.delivered = e.delivered
                self.ended.add(nid)
                ended_now[nid] = e
                tk = (req.integrator, req.token)
                if self.live_tokens.get(tk) == req.rid:
                    del self.live_tokens[tk]
                self.last_outcome[tk] = e.outcome
                assert [(r.value.action_name, r.value.response_reason) for r in self.engine.history(req.integrator)
                        if r.request_id == req.rid] == [e.outcome]
                continue
            if isinstance(e, Close):
                # From here the replaced sessions get nothing (checked below, as closed).
                assert e == Close(self.replacing, CLOSE_SESSION_REPLACED), (e, self.replacing)
                for conn in e.targets:
                    del self.sessions[conn]
                    self.replaced.append(conn)
                self.replacing = ()
                continue
            assert isinstance(e, Send), e
            sends.append(e)
            assert e.targets and len(set(e.targets)) == len(e.targets)
            for conn in e.targets:
                assert conn in self.sessions or conn in self.integrators, f"frame to closed {conn}: {e.frame}"
                self._check_frame(conn, e.frame, ended_now, notify_results)
        # Every notify result goes with that notification's Ended in the same call.
        for rid, count in notify_results.items():
            req = self.requests[rid]
            assert count == 1 and req.nid in ended_now
            assert ended_now[req.nid].delivered
        for nid, e in ended_now.items():
            req = self.by_nid[nid]
            assert notify_results.get(req.rid, 0) == (1 if e.delivered else 0)
            # Every open session that was shown it is told it ended.
            for conn, agent in self.sessions.items():
                if nid in self.shown[conn]:
                    assert (conn, nid) in self.resolved, f"{conn} not told {nid} ended"
        return sends, list(ended_now.values())

    def _check_frame(self, conn, frame, ended_now, notify_results):
        match frame:
            case f.Notification():
                nid = frame.notification_id
                assert nid not in self.ended, f"notification frame for ended {nid}"
                req = self.by_nid[nid]
                assert frame.correlation_id == req.rid
                assert self.sessions[conn] == req.agent
                assert nid not in self.shown[conn]
                if req.displayed_at is None:  # first seen: displayed by this very call
                    req.displayed_at = self.now
                assert frame.expires_at == int(req.display_deadline())
                assert frame.expires_at > self.now - 1
                if req.expires_at is None:
                    req.expires_at = frame.expires_at
                assert frame.expires_at == req.expires_at  # replay keeps the original
                self.shown[conn].add(nid)
            case f.Resolved():
                nid = frame.notification_id
                assert nid in ended_now, f"resolved for {nid} outside the call that ended it"
                assert nid in self.shown[conn] and (conn, nid) not in self.resolved
                assert (frame.action_name, frame.response_reason) == ended_now[nid].outcome
                self.resolved.add((conn, nid))
            case f.QueueLength():
                assert conn in self.sessions
                assert self.last_queue[conn] != frame.queued
                self.last_queue[conn] = frame.queued
            case f.Status():
                req = self.requests[frame.request_id]
                assert req.outcome is None, "status after the outcome"
                assert req.progress and conn == req.conn
                assert (frame.notification_id, frame.cancellation_token) == (req.nid, req.token)
                assert req.statuses == {"queued": [], "displayed": ["queued"]}[frame.state]
                req.statuses.append(frame.state)
            case f.Result(value=f.NotifyValue()):
                req = self.requests[frame.request_id]
                assert conn == req.conn and req.results == 0 and req.outcome is None
                req.results += 1
                notify_results[req.rid] = notify_results.get(req.rid, 0) + 1
            case f.Result(value=f.CancelValue()):
                assert self.cancels[frame.request_id] == 0
                self.cancels[frame.request_id] += 1
            case f.IntegratorError():
                assert conn in self.integrators
            case f.AgentError() | f.Welcome() | f.Pong():
                assert conn in self.sessions
            case _:
                raise AssertionError(f"unexpected frame {frame!r}")

    def _only_followers(self, ended: list[Ended], agent: str) -> None:
        """After the first outcome, only auto-accepts it let through from the agent's queue."""
        for e in ended[1:]:
            assert (e.agent_id, e.outcome) == (agent, AUTO_ACCEPTED), e

    def _only_to(self, sends: list[Send], conn: str) -> list:
        assert all(s.targets == (conn,) for s in sends), sends
        return [s.frame for s in sends]

    # ------------------------------------------------------------------
    # Agents

    @precondition(lambda self: self.engine is not None)
    @rule(agent=st.sampled_from(AGENTS))
    def connect_agent(self, agent):
        conn = f"s{next(self.conn_seq)}"
        doomed = self._due()
        displayed = [] if agent in doomed else self.engine.displayed(agent)
        queued = [] if agent in doomed else self.engine.queued(agent)
        mine = [c for c, a in self.sessions.items() if a == agent]  # oldest first
        self.replacing = tuple(mine[:max(0, len(mine) + 1 - self.limits.sessions_per_agent)])
        self.sessions[conn] = agent
        self.shown[conn] = set()
        self.last_queue[conn] = 0
        sends, ended = self._event(doomed, lambda: self.engine.agent_connected(conn, agent, f"sess-{conn}",
                                                                              self.now))
        assert not self.replacing, f"{self.replacing} not closed"
        frames = self._only_to(sends, conn)
        assert not ended
        assert frames[0] == f.Welcome(agent_id=agent, session_id=f"sess-{conn}", server_time=int(self.now),
                                      displayed=tuple(displayed))
        assert [x.notification_id for x in frames[1:] if isinstance(x, f.Notification)] == displayed
        assert len(frames) == 1 + len(displayed) + (1 if queued else 0)
        self.grace.pop(agent, None)
        self.present.add(agent)

    @precondition(lambda self: self.engine is not None and self.sessions)
    @rule(data=st.data())
    def disconnect_agent(self, data):
        conn = data.draw(st.sampled_from(sorted(self.sessions)))
        agent = self.sessions.pop(conn)
        assert self.engine.agent_disconnected(conn, self.now) == []
        if agent not in self.sessions.values():
            self.grace[agent] = self.now + self.limits.presence_grace * 1000.0

    @precondition(lambda self: self.engine is not None and self.replaced)
    @rule(data=st.data())
    def replaced_session_socket_closes(self, data):
        # The server tells the engine when the replaced session's socket is gone: nothing happens.
        conn = data.draw(st.sampled_from(self.replaced))
        self.replaced.remove(conn)
        assert self.engine.agent_disconnected(conn, self.now) == []

    @precondition(lambda self: self.engine is not None and self.sessions)
    @rule(data=st.data(), action=st.sampled_from(["Accept", "Reject"]), pick=st.integers(0, 1000),
          which=st.sampled_from(["displayed", "displayed", "displayed", "queued", "any", "bogus"]))
    def respond(self, data, action, pick, which):
        conn = data.draw(st.sampled_from(sorted(self.sessions)))
        agent = self.sessions[conn]
        # Mostly what this session shows; otherwise any id ever issued (stale, queued,
        # another agent's) or one never issued.
        choices = {
            "displayed": sorted(self.shown[conn] - self.ended),
            "queued": sorted(n for n, r in self.by_nid.items()
                             if r.agent == agent and n not in self.ended and n not in self.shown[conn]),
            "any": sorted(self.by_nid),
            "bogus": [],
        }[which] or sorted(self.by_nid)
        nid = choices[pick % len(choices)] if choices and which != "bogus" else "bogus"
        req = self.by_nid.get(nid)
        # Displayed now iff this session was shown it and it has not ended.
        answerable = req is not None and nid in self.shown[conn] and nid not in self.ended
        doomed = self._due()
        sends, ended = self._event(doomed, lambda: self.engine.agent_frame(conn, respond_frame(nid, action),
                                                                          self.now))
        if answerable:
            assert (ended[0].notification_id, ended[0].outcome) == (nid, ACCEPTED if action == "Accept"
                                                                     else DECLINED)
            self._only_followers(ended, agent)
            return
        assert ended == []
        [err] = self._only_to(sends, conn)
        assert isinstance(err, f.AgentError) and err.notification_id == nid
        if req is None or req.agent != agent:
            assert err.code == "UnknownNotification"
        elif nid in self.ended:
            assert err.code == "NotificationNotPending"
        else:
            assert err.code == "NotificationNotDisplayed"
            assert nid in self.engine.queued(agent)

    # ------------------------------------------------------------------
    # Integrators

    @precondition(lambda self: self.engine is not None)
    @rule(integrator=st.sampled_from(INTEGRATORS))
    def connect_integrator(self, integrator):
        conn = f"i{next(self.conn_seq)}"
        self.integrators[conn] = integrator
        assert self.engine.integrator_connected(conn, integrator, self.now) == []

    @precondition(lambda self: self.engine is not None and self.integrators)
    @rule(data=st.data())
    def disconnect_integrator(self, data):
        conn = data.draw(st.sampled_from(sorted(self.integrators)))
        del self.integrators[conn]
        assert self.engine.integrator_disconnected(conn, self.now) == []

    @precondition(lambda self: self.engine is not None and self.integrators)
    @rule(
        data=st.data(),
        agent=st.sampled_from([*AGENTS, *AGENTS, "a3"]),
        template=st.sampled_from(["short", "long", "long", "auto", "nope"]),
        token_mode=st.sampled_from(["none", "none", "input", "input", "beside", "both", "differ"]),
        token=st.sampled_from(TOKENS),
        progress=st.booleans(),
    )
    def notify(self, data, agent, template, token_mode, token, progress):
        """Any notifyEvent, including the ones that must be refused."""
        self._notify(data, agent, template, token_mode, token, progress)

    @precondition(lambda self: self.engine is not None and self.integrators)
    @rule(
        data=st.data(),
        agent=st.sampled_from(AGENTS),
        template=st.sampled_from(["short", "long", "auto"]),
        token_mode=st.sampled_from(["none", "input"]),
        token=st.sampled_from(TOKENS),
        progress=st.booleans(),
    )
    def notify_plain(self, data, agent, template, token_mode, token, progress):
        """A notifyEvent that is usually accepted, so queues fill up."""
        self._notify(data, agent, template, token_mode, token, progress)

    def _notify(self, data, agent, template, token_mode, token, progress):
        conn = data.draw(st.sampled_from(sorted(self.integrators)))
        integrator = self.integrators[conn]
        rid = f"r{next(self.req_seq)}"
        kw = {
            "none": {},
            "input": {"token": token},
            "beside": {"outer_token": token},
            "both": {"token": token, "outer_token": token},
            "differ": {"token": token, "outer_token": token + "x"},
        }[token_mode]
        frame = notify_frame(rid, agent, template, correlation_id=rid, progress=progress, **kw)
        doomed = self._due()
        full = (len(self.engine.displayed(agent)) >= self.limits.display_limit
                and len(self.engine.queued(agent)) >= self.limits.queue_limit)
        displayable = len(self.engine.displayed(agent)) < self.limits.display_limit

        if template == "nope":
            expected_error = "NotificationTemplateNotFoundError"
        elif token_mode == "differ":
            expected_error = "RejectAfterClientError"
        elif token_mode != "none" and (integrator, token) in self.live_tokens:
            expected_error = "CancellationTokenInUseError"
        elif agent not in self.present:
            expected_error = "AgentNotConnectedError"
        else:
            expected_error = None

        req = Req(rid, conn, integrator, agent, progress, self.now, template=template,
                  step=self.limits.timer_resolution * 1000.0)
        del self.issued[:]
        effects = self.engine.integrator_frame(conn, frame, self.now)
        if expected_error is None:
            assert agent not in doomed
            # Ids from the counter: the server's token (if it made one), then the notification's.
            assert len(self.issued) == (2 if token_mode == "none" else 1)
            req.token = self.issued[0] if token_mode == "none" else token
            req.nid = self.issued[-1]
            self.requests[rid] = req
            self.by_nid[req.nid] = req
        sends, ended = self._event(doomed, lambda: effects)

        if expected_error is not None:
            assert ended == []
            [err] = self._only_to(sends, conn)
            assert isinstance(err, f.IntegratorError) and err.request_id == rid
            assert (err.error.message, err.error.msdyn_name) == (expected_error, "NotifyEvent")
            return
        if full:
            assert [(e.notification_id, e.outcome) for e in ended] == [(req.nid, QUEUE_LIMIT)]
            assert [(s.frame.request_id, s.frame.value) for s in sends] == [
                (rid, f.NotifyValue("Reject", "NotificationQueueLimitExceeded"))]
            return
        if req.outcome is None:
            self.live_tokens[(integrator, req.token)] = rid
        if progress:
            assert req.statuses[:1] == ["queued"]
        if displayable:
            if progress:
                assert req.statuses == ["queued", "displayed"]
            for s, a in self.sessions.items():
                if a == agent:
                    assert req.nid in self.shown[s]
            if template == "auto":
                assert [(e.notification_id, e.outcome) for e in ended] == [(req.nid, AUTO_ACCEPTED)]
            else:
                assert ended == [] and req.nid in self.engine.displayed(agent)
        else:
            assert ended == [] and self.engine.queued(agent)[-1] == req.nid
            assert not [s for s in sends if isinstance(s.frame, f.Notification)]

    @precondition(lambda self: self.engine is not None and self.integrators)
    @rule(data=st.data(), pick=st.integers(0, 1000),
          source=st.sampled_from(["live", "live", "fixed", "seen", "unknown"]))
    def cancel(self, data, pick, source):
        conn = data.draw(st.sampled_from(sorted(self.integrators)))
        integrator = self.integrators[conn]
        # Mostly a live token of this integrator; otherwise a fixed one, any token ever used
        # (ended, or another integrator's), or one never used.
        live_mine = sorted(t for k, t in self.live_tokens if k == integrator)
        seen = sorted({r.token for r in self.requests.values() if r.token})
        if source == "live" and live_mine:
            token = live_mine[pick % len(live_mine)]
        elif source == "seen" and seen:
            token = seen[pick % len(seen)]
        elif source == "unknown":
            token = "never-used"
        else:
            token = TOKENS[pick % len(TOKENS)]
        rid = f"c{next(self.req_seq)}"
        self.cancels[rid] = 0
        doomed = self._due()
        live = self.live_tokens.get((integrator, token))
        before = self.last_outcome.get((integrator, token))
        sends, ended = self._event(doomed, lambda: self.engine.integrator_frame(conn, cancel_frame(rid, token),
                                                                               self.now))
        mine = [s.frame for s in sends if s.targets == (conn,) and getattr(s.frame, "request_id", None) == rid]
        if live is not None:
            req = self.requests[live]
            assert (ended[0].notification_id, ended[0].outcome) == (req.nid, CANCELLED)
            self._only_followers(ended, req.agent)
            assert mine == [f.Result(request_id=rid, value=f.CancelValue(token, "Cancel", "CancelledByIntegrator"))]
            return
        assert ended == []
        frames = self._only_to(sends, conn)
        if before is not None:
            assert frames == [f.Result(request_id=rid, value=f.CancelValue(token, *before))]
        else:
            [err] = frames
            assert isinstance(err, f.IntegratorError) and err.request_id == rid
            assert (err.error.message, err.error.msdyn_name) == ("CancellationTokenNotFoundError", "CancelEvent")

    # ------------------------------------------------------------------
    # Time

    @precondition(lambda self: self.engine is not None)
    @rule(size=st.sampled_from(["small", "small", "small", "large"]), small=st.floats(0, 300, allow_nan=False),
          large=st.sampled_from([400.0, 1000.0, 3000.0, 10_000.0]))
    def advance(self, size, small, large):
        """Move the clock (milliseconds) and run the timers."""
        self._advance_to(self.now + (small if size == "small" else large))

    @precondition(lambda self: self.engine is not None and self.engine.next_deadline() is not None)
    @rule()
    def advance_to_next_deadline(self):
        self._advance_to(self.engine.next_deadline())

    def _advance_to(self, when: float) -> None:
        assert when >= self.now
        self.now = when
        sends, ended = self.apply(self.engine.handle_timer(when))
        nd = self.engine.next_deadline()
        assert nd is None or nd > when, f"next_deadline {nd} in the past after handle_timer({when})"
        for e in ended:
            req = self.by_nid[e.notification_id]
            assert e.outcome in TIMER_OUTCOMES, e
            if e.outcome == DISPLAY_TIMEOUT:
                assert when >= req.display_deadline(), "display timeout before its time"
                assert req.expires_at is None or when >= req.expires_at, "display timeout before expiresAt"
            if e.outcome == QUEUE_TIME_LIMIT:
                assert req.displayed_at is None
                assert when >= req.queue_deadline(self.limits.queue_timeout)
        gone = {a for a, d in self.grace.items() if d <= when}
        self._forgotten(gone)
        assert {e.agent_id for e in ended if e.outcome == AGENT_DISCONNECTED} <= gone

    # Deadlines already due when an event arrives ---------------------------
    #
    # The engine runs them before the event itself. Here the clock only moves
    # through handle_timer, so the only deadlines that can be due at an event are
    # grace deadlines of zero length (a disconnect at this same ``now``).

    def _due(self) -> set[str]:
        """Agents the next time-dependent event will forget first; the model
        already treats their pending notifications as ended."""
        doomed = {a for a, d in self.grace.items() if d <= self.now}
        nd = self.engine.next_deadline()
        assert (nd is not None and nd <= self.now) == bool(doomed)
        for agent in doomed:
            self.present.discard(agent)
            for req in self.requests.values():
                if req.agent == agent and req.outcome is None:
                    tk = (req.integrator, req.token)
                    if self.live_tokens.get(tk) == req.rid:
                        del self.live_tokens[tk]
                    self.last_outcome[tk] = AGENT_DISCONNECTED
        return doomed

    def _event(self, doomed: set[str], call) -> tuple[list[Send], list[Ended]]:
        """Run an event; check the due grace expiries lead its effects; return the event's own."""
        pending = {r.rid for r in self.requests.values() if r.outcome is None and r.agent in doomed}
        sends, ended = self.apply(call())
        first = [e for e in ended if e.correlation_id in pending]
        assert ended[:len(first)] == first and {e.outcome for e in first} <= {AGENT_DISCONNECTED}
        self._forgotten(doomed)
        sends = [s for s in sends if not (isinstance(s.frame, f.Result) and s.frame.request_id in pending)]
        return sends, ended[len(first):]

    def _forgotten(self, agents: set[str]) -> None:
        for agent in agents:
            del self.grace[agent]
            self.present.discard(agent)
            if agent not in self.sessions.values():  # else it came back by this very event
                assert not self.engine.is_agent_present(agent)
            for req in self.requests.values():
                if req.agent == agent:
                    assert req.outcome is not None, f"{req.rid} still pending after grace"

    # ------------------------------------------------------------------
    # Invariants

    @invariant()
    def deadline_floor_is_never_after_the_next_deadline(self):
        # The server keeps its timer while it is no later than this floor.
        if self.engine is None:
            return
        floor = self.engine.deadline_floor()
        nd = self.engine.next_deadline()
        assert nd is None or (floor is not None and floor <= nd)

    @invariant()
    def limits_fifo_and_sessions_in_step(self):
        if self.engine is None:
            return
        lim = self.limits
        live = 0
        for agent in ALL_AGENTS:
            shown = self.engine.displayed(agent)
            queued = self.engine.queued(agent)
            live += len(shown) + len(queued)
            assert len(shown) <= lim.display_limit
            assert len(queued) <= lim.queue_limit
            assert not queued or len(shown) == lim.display_limit
            nums = [int(x[2:]) for x in queued]
            assert nums == sorted(nums)
            if shown and queued:
                assert max(int(x[2:]) for x in shown) < nums[0]
            for nid in shown + queued:
                assert nid not in self.ended
                assert self.by_nid[nid].agent == agent
            for nid in shown:
                req = self.by_nid[nid]
                if req.displayed_at is None:  # displayed by the last call, unseen by any session
                    req.displayed_at = self.now
                assert self.now < req.display_deadline(), "displayed past its display timeout"
                assert req.expires_at is None or req.expires_at > self.now - 1
            for nid in queued:
                assert self.now < self.by_nid[nid].queue_deadline(lim.queue_timeout)
            assert self.engine.is_agent_present(agent) == (agent in self.present)
            for conn, a in self.sessions.items():
                if a == agent:
                    assert set(shown) <= self.shown[conn]
                    assert self.last_queue[conn] == len(queued)
        pending = [r for r in self.requests.values() if r.outcome is None]
        assert live == len(pending) == self.engine.statistics()["live"]
        assert self.engine.outcomes == len(self.ended)
        nd = self.engine.next_deadline()
        assert nd is None or nd >= self.now

    # ------------------------------------------------------------------
    # Drain everything at the end: every accepted notifyEvent has its outcome.

    def teardown(self):
        if self.engine is None:
            return
        for conn in sorted(self.sessions):
            self.disconnect_agent_conn(conn)
        horizon = 1000.0 * (max(t.timeout for t in TEMPLATES.values()) + self.limits.queue_timeout
                            + self.limits.presence_grace) + 1
        self._advance_to(self.now + horizon)
        assert self.engine.next_deadline() is None
        for req in self.requests.values():
            assert req.outcome is not None, f"{req.rid} never ended"
            assert req.results == (1 if req.delivered else 0)
            assert self.engine.outcome_of(req.nid) == req.outcome
        assert self.engine.statistics()["agents"] == 0
        kept = [r for k in INTEGRATORS for r in self.engine.history(k)]
        assert len(kept) == len(self.requests) == self.engine.outcomes
        assert len({r.outcome_id for r in kept}) == len(kept)

    def disconnect_agent_conn(self, conn: str) -> None:
        agent = self.sessions.pop(conn)
        assert self.engine.agent_disconnected(conn, self.now) == []
        if agent not in self.sessions.values():
            self.grace[agent] = self.now + self.limits.presence_grace * 1000.0


EngineMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineMachine = EngineMachine.TestCase


# ---------------------------------------------------------------------------
# Late timers: the answer must not depend on whether the caller's timer ran
# before an event that arrived after a deadline.

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("connect"), st.sampled_from(AGENTS)),
        st.tuples(st.just("disconnect"), st.integers(0, 5)),
        st.tuples(st.just("notify"), st.sampled_from(AGENTS), st.sampled_from(sorted(TEMPLATES)),
                  st.sampled_from(TOKENS)),
        st.tuples(st.just("respond"), st.integers(0, 3), st.sampled_from(["Accept", "Reject"])),
        st.tuples(st.just("cancel"), st.sampled_from(TOKENS)),
        st.tuples(st.just("integrator_gone")),
        st.tuples(st.just("sleep"), st.sampled_from([0.0, 300.0, 400.0, 1000.0, 5000.0])),
    ),
    min_size=10,
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(ops=_OPS, grace=st.sampled_from([0.0, 0.2, 1.0]), queue_limit=st.integers(0, 2))
def test_late_timer_gives_the_same_answers_as_a_punctual_one(ops, grace, queue_limit):
    """Engine ``punctual`` gets handle_timer(now) before every time-dependent
    event; engine ``late`` never does. Their effects, in order, are the same."""
    limits = Limits(queue_limit=queue_limit, queue_timeout=0.3, presence_grace=grace)
    engines = {}
    for name in ("punctual", "late"):
        counter = itertools.count(1)
        engines[name] = Engine(TEMPLATES, limits, new_id=lambda c=counter: f"id{next(c)}")
    now = T0
    sessions: list[tuple[str, str]] = [("s-a1", "a1"), ("s-a2", "a2")]
    nids: list[tuple[str, str]] = []  # (notification id, agent), newest first
    conn_seq = itertools.count(1)
    integrator = "i0"
    for eng in engines.values():
        eng.integrator_connected(integrator, "k1", now)
        for conn, agent in sessions:
            eng.agent_connected(conn, agent, conn, now)

    def both(call, timed: bool) -> list:
        punctual = (engines["punctual"].handle_timer(now) if timed else []) + call(engines["punctual"])
        late = call(engines["late"])
        assert late == punctual
        return late

    for n, op in enumerate(ops):
        match op:
            case ("connect", agent):
                conn = f"s{next(conn_seq)}"
                sessions.append((conn, agent))
                both(lambda e: e.agent_connected(conn, agent, conn, now), True)
            case ("disconnect", i) if sessions:
                conn, _ = sessions.pop(i % len(sessions))
                both(lambda e: e.agent_disconnected(conn, now), False)
            case ("notify", agent, template, token):
                frame = notify_frame(f"r{n}", agent, template, token=token)
                out = both(lambda e: e.integrator_frame(integrator, frame, now), True)
                nids[:0] = {(s.frame.notification_id, agent) for s in out
                            if isinstance(s, Send) and isinstance(s.frame, f.Status)}
            case ("respond", j, action) if nids:
                nid, agent = nids[j % len(nids)]
                mine = [c for c, a in sessions if a == agent] or [c for c, _ in sessions]
                if mine:
                    frame = respond_frame(nid, action)
                    both(lambda e: e.agent_frame(mine[0], frame, now), True)
            case ("cancel", token):
                both(lambda e: e.integrator_frame(integrator, cancel_frame(f"c{n}", token), now), True)
            case ("integrator_gone",):
                both(lambda e: e.integrator_disconnected(integrator, now), False)
                integrator = f"i{next(conn_seq)}"
                for eng in engines.values():
                    eng.integrator_connected(integrator, "k1", now)
            case ("sleep", ms):
                now += ms
    now += 60_000
    both(lambda e: e.handle_timer(now), False)
    assert engines["late"].outcomes == engines["punctual"].outcomes
