"""The notification lifecycle: a pure, synchronous state machine.

This module owns what the server knows about agents, their sessions,
integrator connections and notifications, and decides every outcome.

Theory of operation
-------------------
The engine does no I/O and reads no clock: every call takes ``now`` (epoch
milliseconds, supplied by the caller) and returns a list of *effects*:
``Send`` (a frame for some connections), ``Ended`` (one per outcome, for
logging and metrics) and ``Close`` (connections the engine no longer counts
as sessions, to be closed with a code and reason). Each call makes its own list and hands it to the helpers
that add to it, so what a call returns is exactly what it did. Connections are
opaque hashable handles chosen by the caller. ``next_deadline()`` says when
``handle_timer(now)`` must next be called.

An integrator is named by the API key its connection authenticated with
(``integrator`` everywhere below): its connections share cancellation tokens
and one history of outcomes (``_Key``).

A notification moves through::

    QUEUED ──display──> DISPLAYED ──> ENDED
       └──────────────────────────────> ENDED

and every transition into ENDED goes through ``_end()``, the one place an
outcome is decided; an ended notification never changes again, so each one has
exactly one outcome and its integrator gets exactly one ``result``. What can
end a notification:

=============================  ======================================  ================
event                          from                                    outcome
=============================  ======================================  ================
notifyEvent, queue full        (new)                                   Reject/NotificationQueueLimitExceeded
queue deadline                 QUEUED                                  Reject/NotificationQueueTimeLimitExceeded
displayed, template autoAccept DISPLAYED                               Accept/AutoAccept
respond Accept                 DISPLAYED                               Accept/Accept
respond Reject                 DISPLAYED                               Reject/DeclinedByAgent
display deadline               DISPLAYED                               Timeout/DisplayTimeout
cancelEvent                    QUEUED, DISPLAYED                       Cancel/CancelledByIntegrator
presence grace expires         QUEUED, DISPLAYED                       Reject/AgentDisconnected
=============================  ======================================  ================

An agent has at most ``sessions_per_agent`` sessions. A new session beyond
that closes the agent's oldest one (``Close`` with 4409): the tab or device
the agent just opened is the one they want to work in, and the oldest is the
likeliest to be forgotten or dead (a laptop asleep whose TCP connection has
not timed out yet). Refusing the newest instead would let stale sessions, or
a stolen token's, lock the agent out; closing the oldest means that a stolen
token can push the agent's own sessions out, which the agent sees happen.

Per agent at most ``display_limit`` notifications are displayed; the rest wait
in a FIFO queue of at most ``queue_limit``. When a displayed one ends, the head
of the queue is displayed. Every session of the agent is shown every displayed
notification (a session that connects later gets them replayed in ``welcome``
order), so ``resolved`` goes to every current session when a displayed
notification ends.

When an agent's last session drops, its timers keep running; a session that
returns within ``presence_grace`` gets the displayed notifications replayed. If
none returns, every pending notification ends with Reject/AgentDisconnected and
the agent is forgotten. An integrator that disconnects does not cancel its
notifications.

Outcomes across an integrator's reconnects (protocol v1.1)
---------------------------------------------------------
Every outcome gets an ``outcomeId`` from one clock per engine (``OutcomeClock``:
epoch ms and a sequence, so ids sort as strings in the order outcomes
happened) and its ``result`` frame is kept, in order, in its integrator's
history, bounded by ``outcome_history`` and ``outcome_retention`` and trimmed
early by ``ack``. A connection that connects with a resume point (``$``: now)
is *resuming*: it is first sent every kept result after that point, then
``resumed`` saying how many and whether the history reached back that far
(nothing after the point was forgotten, and the point is not older than the
engine's history, which starts with the process or comes back from a
snapshot). On resuming connections a notifyEvent whose requestId is known
does not make a new offer: a pending one answers with its ``status`` and
moves to the asking connection, an ended one with its kept ``result``.

A result goes to the connection that asked (or last asked again), if open;
otherwise to every resuming connection of the integrator; and always to the
history.

Ended notifications are remembered (bounded by ``recent_outcomes``) as a small
record, so a late respond or cancelEvent still gets a definite answer.

The deadlines (a queued notification's, a displayed one's, an agent's presence
grace) are held in a ``timers.Timers``; ``_timer_stands`` is the one rule that
says whether a timer still counts.

An event can arrive at a ``now`` past a deadline before the caller's timer has
called ``handle_timer``. So the events whose answer depends on the time (agent
connect and frames, integrator frames) first run every deadline already due:
a respond after ``expiresAt`` is too late, a session after the grace does not
revive anything, whatever order the caller's timer and sockets happened to run.
"""

from __future__ import annotations

import enum
import itertools
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from . import frames as f
from .templates import Renderer, Template, describe, rendered_size_over
from .timers import Timers
from .vocabulary import (
    ACCEPTED,
    AGENT_DISCONNECTED,
    AUTO_ACCEPTED,
    CANCELLED,
    CLOSE_SESSION_REPLACED,
    DECLINED,
    DISPLAY_TIMEOUT,
    QUEUE_LIMIT,
    QUEUE_TIME_LIMIT,
    AgentErrorCode,
    Closing,
    ErrorMessage,
    MsdynName,
    Outcome,
)

__all__ = [
    "Engine",
    "Limits",
    "Outcome",
    "Send",
    "Ended",
    "Close",
    "Effect",
    "State",
    "ACCEPTED",
    "AUTO_ACCEPTED",
    "DECLINED",
    "QUEUE_LIMIT",
    "QUEUE_TIME_LIMIT",
    "DISPLAY_TIMEOUT",
    "CANCELLED",
    "AGENT_DISCONNECTED",
    "Snapshot",
    "SavedNotification",
    "SavedOutcome",
    "SavedHistory",
    "OutcomeClock",
    "SNAPSHOT_VERSIONS",
]

Conn = Hashable


# The result value of each outcome, made once (frames are immutable).
_VALUES = {
    o: f.NotifyValue(action_name=o.action_name, response_reason=o.response_reason)
    for o in (ACCEPTED, AUTO_ACCEPTED, DECLINED, QUEUE_LIMIT, QUEUE_TIME_LIMIT, DISPLAY_TIMEOUT, CANCELLED,
              AGENT_DISCONNECTED)
}


class Send(msgspec.Struct, frozen=True, gc=False):
    """Send ``frame`` to each connection in ``targets``."""

    targets: tuple[Conn, ...]
    frame: f.Outbound


class Ended(msgspec.Struct, frozen=True, gc=False):
    """A notification reached its one outcome."""

    notification_id: str
    agent_id: str
    integrator: str
    correlation_id: str | None
    outcome: Outcome
    delivered: bool
    #: Milliseconds from the notifyEvent to this outcome (for metrics); None
    #: for a notification restored from a snapshot that did not keep the time.
    duration: float | None = None


class Close(msgspec.Struct, frozen=True, gc=False):
    """Close each connection in ``targets`` with ``closing``'s code and reason.

    The engine has already let go of them: no frame is sent to them after
    this, and their ``agent_disconnected`` is a no-op.
    """

    targets: tuple[Conn, ...]
    closing: Closing


Effect = Send | Ended | Close


class Limits(msgspec.Struct, rename="camel", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-agent limits; times in seconds."""

    display_limit: Annotated[int, Meta(ge=1, le=1000)] = 1
    queue_limit: Annotated[int, Meta(ge=0, le=100_000)] = 10
    queue_timeout: Annotated[float, Meta(gt=0)] = 120.0
    presence_grace: Annotated[float, Meta(ge=0)] = 30.0
    recent_outcomes: Annotated[int, Meta(ge=0)] = 100_000
    outcome_history: Annotated[int, Meta(ge=0)] = 100_000
    outcome_retention: Annotated[float, Meta(ge=0)] = 86_400.0
    timer_resolution: Annotated[float, Meta(ge=0, le=1)] = 0.05
    sessions_per_agent: Annotated[int, Meta(ge=1, le=100_000)] = 10
    #: Bytes of a notification's rendered title and fields, as JSON; a bigger one is refused.
    max_notification_bytes: Annotated[int, Meta(ge=1)] = 16 * 1024


class State(enum.Enum):
    """Where a notification is in its lifecycle (see the module docstring)."""

    QUEUED = "queued"
    DISPLAYED = "displayed"
    ENDED = "ended"


# Module constants: the hot paths read these as globals, cheaper than looking
# up a member of the Enum each time.
QUEUED, DISPLAYED, ENDED = State.QUEUED, State.DISPLAYED, State.ENDED


@dataclass(slots=True, eq=False)
class _Notification:
    """A pending notification, from notifyEvent until its outcome."""

    id: str
    agent: _Agent
    integrator: str
    owner: Conn | None  # the connection owed its result; None once sent, or if the connection went
    request_id: str
    token: str
    correlation_id: str | None
    progress: bool
    template: Template
    title: str
    fields: tuple[f.Field, ...]
    state: State = QUEUED
    deadline: float = 0.0  # of the queue while QUEUED, of the display while DISPLAYED
    frame: f.Notification | None = None  # the card, once displayed
    created: float | None = None  # when its notifyEvent arrived (None: restored without it)


class _Remembered(msgspec.Struct, frozen=True, gc=False):
    """What is kept of an ended notification: enough to answer a late respond or cancelEvent.

    Not the card nor the connection that asked: there are ``recent_outcomes``
    of these (100,000 by default), and a closed connection must be freed.
    """

    id: str
    agent_id: str
    integrator: str
    token: str
    outcome: Outcome


class _Kept(msgspec.Struct, frozen=True, gc=False):
    """An outcome in its integrator's history: its result frame as sent, and what retention needs."""

    outcome_id: str  # the same as result.outcome_id, typed as always there
    result: f.Result
    agent_id: str
    ended_at: float


@dataclass(slots=True, eq=False)
class _Key:
    """An integrator (an API key's name): its connections and its history of outcomes."""

    name: str
    history: deque[_Kept] = field(default_factory=deque)  # oldest first, in outcomeId order
    ended: dict[str, _Kept] = field(default_factory=dict)  # the same, by requestId
    pending: dict[str, _Notification] = field(default_factory=dict)  # by requestId
    resuming: tuple[Conn, ...] = ()  # its open connections that asked to resume (v1.1)
    forgotten: str = ""  # the newest outcomeId dropped from the history ("": none)


class OutcomeClock:
    """The engine's outcome clock: ids ``"<13-digit ms>-<6-digit sequence>"`` that only grow.

    The millisecond is the caller's ``now`` unless that is behind the last id
    (a clock step back, or a restored snapshot from a faster clock); a
    sequence that would pass 999999 moves on to the next millisecond.
    """

    __slots__ = ("ms", "seq")

    def __init__(self, ms: int = 0, seq: int = 0) -> None:
        self.ms = ms
        self.seq = seq

    @classmethod
    def parse(cls, outcome_id: str) -> OutcomeClock:
        ms, _, seq = outcome_id.partition("-")
        return cls(int(ms), int(seq))

    def last(self) -> str:
        return f"{self.ms:013d}-{self.seq:06d}"

    def next(self, now: float) -> str:
        ms = int(now)
        if ms > self.ms:
            self.ms, self.seq = ms, 0
        elif self.seq < 999_999:
            self.seq += 1
        else:
            self.ms, self.seq = self.ms + 1, 0
        return f"{self.ms:013d}-{self.seq:06d}"


@dataclass(slots=True, eq=False)
class _Agent:
    """An agent with a session, or within its presence grace, or restored and waiting for one."""

    id: str
    sessions: dict[Conn, str] = field(default_factory=dict)
    targets: tuple[Conn, ...] = ()  # tuple(sessions), kept with them: what a Send to all of them takes
    displayed: list[_Notification] = field(default_factory=list)
    queue: deque[_Notification] = field(default_factory=deque)
    grace_deadline: float | None = None
    queued_sent: int = 0
    draining: bool = False


# The three kinds of timer. A timer names its kind rather than leaving it to
# the state of what it points at: a notification displayed from the queue can
# get a display deadline equal to its queue deadline, and its display timer
# must then run in its own place among the timers of that deadline, not in
# the place of its stale queue timer. ``gc=False``: only the Timers hold a
# timer, so it cannot be part of a reference cycle.


class _QueueTimer(msgspec.Struct, frozen=True, gc=False):
    """A queued notification's queue deadline: it ends with QUEUE_TIME_LIMIT."""

    notification: _Notification


class _DisplayTimer(msgspec.Struct, frozen=True, gc=False):
    """A displayed notification's display deadline: it ends with DISPLAY_TIMEOUT."""

    notification: _Notification


class _GraceTimer(msgspec.Struct, frozen=True, gc=False):
    """The end of the presence grace of an agent without a session."""

    agent: _Agent


_Timer = _QueueTimer | _DisplayTimer | _GraceTimer


def _timer_stands(when: float, timer: _Timer) -> bool:
    """Whether ``timer``, set for ``when``, still counts: the one validity rule.

    A notification's timer goes stale when the notification leaves the state
    it was set for (displayed, or ended), an agent's when a session comes
    back (or a later drop sets a new grace). Nothing is removed from the
    timers at those moments; this is asked instead.
    """
    kind = type(timer)
    if kind is _DisplayTimer:
        n = timer.notification
        return n.state is DISPLAYED and n.deadline == when
    if kind is _QueueTimer:
        n = timer.notification
        return n.state is QUEUED and n.deadline == when
    agent = timer.agent
    return agent.grace_deadline == when and not agent.sessions


# Timers that went stale stay until they surface. They are swept when there
# are more than this many, and more than twice as many as could still count.
_SWEEP_ABOVE = 4096


class SavedNotification(msgspec.Struct, rename="camel", frozen=True, kw_only=True):
    """A pending notification as kept across a restart."""

    id: str
    agent_id: str
    integrator: str
    request_id: str
    cancellation_token: str
    correlation_id: str | None
    progress: bool
    template: Template
    title: str
    fields: tuple[f.Field, ...]
    state: Literal["queued", "displayed"]
    deadline: float
    frame: f.Notification | None = None
    #: When its notifyEvent arrived (epoch ms), for the offer-to-outcome
    #: duration; absent from snapshots of earlier versions.
    created_at: float | None = None


class SavedOutcome(msgspec.Struct, rename="camel", frozen=True, kw_only=True, gc=False):
    """An outcome in an integrator's history, as kept across a restart."""

    outcome_id: f.OutcomeId
    request_id: str
    agent_id: str
    action_name: str
    response_reason: str
    ended_at: float


class SavedHistory(msgspec.Struct, rename="camel", frozen=True, kw_only=True):
    """An integrator's history of outcomes, oldest first."""

    integrator: str
    forgotten: Annotated[str, Meta(pattern=r"^([0-9]{13}-[0-9]{6})?$")] = ""  # an outcomeId, or "" for none
    outcomes: tuple[SavedOutcome, ...] = ()


# The snapshot versions ``Engine.restore`` takes; ``snapshot`` writes the last.
SNAPSHOT_VERSIONS = (1, 2)


class Snapshot(msgspec.Struct, rename="camel", frozen=True, kw_only=True):
    """Every pending notification, per agent in display then queue order, and the outcome histories.

    Version 1 had no histories; ``history_start`` is where the engine's
    histories begin (the first start without a snapshot), ``last_outcome_id``
    the newest outcomeId issued. Decoded from JSON, every field is checked
    (a state, an outcomeId), so what ``restore`` gets cannot make it fail
    half-way; a version it does not know is refused before anything else.
    """

    version: int = 2
    saved_at: float = 0.0
    notifications: tuple[SavedNotification, ...] = ()
    history_start: f.OutcomeId | None = None
    last_outcome_id: f.OutcomeId | None = None
    histories: tuple[SavedHistory, ...] = ()


#: Why a frame or a parameter nested deeper than msgspec's recursive decoder
#: and encoder go is refused (about 1,000 levels, under Python's recursion limit).
TOO_DEEP = "JSON nested too deeply"


def _notify_error(request_id: str, message: ErrorMessage, details: str = "") -> f.IntegratorError:
    return f.IntegratorError(
        request_id=request_id,
        error=f.ErrorBody(message=message, msdyn_name=MsdynName.NOTIFY_EVENT, details=details),
    )


def _used_for_another_agent(request_id: str, agent_id: str) -> f.IntegratorError:
    return _notify_error(request_id, ErrorMessage.REJECT_AFTER_CLIENT,
                         f"requestId {request_id!r} was already used for agent {agent_id!r} - at $.requestId")


def _cancel_error(request_id: str, message: ErrorMessage, details: str = "") -> f.IntegratorError:
    return f.IntegratorError(
        request_id=request_id,
        error=f.ErrorBody(message=message, msdyn_name=MsdynName.CANCEL_EVENT, details=details),
    )


def id_factory() -> Callable[[], str]:
    """Ids that are unique: a random 64-bit prefix drawn once, then a counter.

    A uuid4 per id costs a getrandom() system call, twice per notifyEvent; the
    ids need to be unique (across restarts too, hence the prefix), not secret:
    a notification answers only to its own agent and a cancellation token only
    to its own integrator.
    """
    prefix = uuid.uuid4().hex[:16]
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):016x}"


class Engine:
    """The notification lifecycle for one server. See the module docstring."""

    def __init__(
        self,
        templates: Mapping[str, Template],
        limits: Limits = Limits(),
        *,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.templates = dict(templates)
        self._renderers = {name: Renderer(t) for name, t in self.templates.items()}
        self.limits = limits
        self._new_id = new_id or id_factory()
        self._agents: dict[str, _Agent] = {}
        self._sessions: dict[Conn, _Agent] = {}  # agent session -> its agent
        self._integrators: dict[Conn, _Key] = {}  # integrator connection -> its integrator
        self._keys: dict[str, _Key] = {}  # every integrator seen, by name
        self._owned: dict[Conn, set[_Notification]] = {}  # connection -> pending ones it is owed results of
        self._live: dict[str, _Notification] = {}  # every pending notification, by id
        self._tokens: dict[tuple[str, str], _Notification] = {}  # the same, by (integrator, token)
        self._recent: OrderedDict[str, _Remembered] = OrderedDict()  # ended, oldest first, by id
        self._recent_tokens: dict[tuple[str, str], _Remembered] = {}  # the same, by (integrator, token)
        self._timers: Timers[_Timer] = Timers(_timer_stands)
        self._ids = OutcomeClock()
        self._history_start: str | None = None  # set by the first event, or a snapshot
        self.outcomes = 0
        #: Notifications made from a notifyEvent (those refused at once by a full queue too).
        self.offers = 0

    def replace_templates(self, templates: Mapping[str, Template]) -> None:
        """Use ``templates`` from now on (a reload of the configuration).

        Only notifyEvents after this call see the change: every pending
        notification holds the ``Template`` it was created with, and its card
        was rendered then, so a displayed or queued offer looks and times out
        as it did (a template removed or changed in the meantime included).
        """
        renderers = {name: Renderer(t) for name, t in templates.items()}
        self.templates = dict(templates)
        self._renderers = renderers

    def __getstate__(self) -> dict[str, object]:
        # Renderers hold compiled functions, which do not pickle (cluster
        # mode's snapshots do); they are made again from the templates.
        state = self.__dict__.copy()
        del state["_renderers"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._renderers = {name: Renderer(t) for name, t in self.templates.items()}

    # ------------------------------------------------------------------
    # Queries

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must next run (epoch ms), or None."""
        return self._timers.next_deadline()

    def deadline_floor(self) -> float | None:
        """A time no later than ``next_deadline()`` (None: no deadline at all), in O(1).

        Ended notifications leave their timers behind until they surface, so
        this may be earlier than the next deadline that still matters; a
        caller that only needs to know whether its timer is still early
        enough can ask this instead.
        """
        return self._timers.earliest()

    def is_agent_present(self, agent_id: str) -> bool:
        return agent_id in self._agents

    def displayed(self, agent_id: str) -> list[str]:
        agent = self._agents.get(agent_id)
        return [n.id for n in agent.displayed] if agent else []

    def queued(self, agent_id: str) -> list[str]:
        agent = self._agents.get(agent_id)
        return [n.id for n in agent.queue] if agent else []

    def state_of(self, notification_id: str) -> State | None:
        n = self._live.get(notification_id)
        if n is not None:
            return n.state
        return ENDED if notification_id in self._recent else None

    def outcome_of(self, notification_id: str) -> Outcome | None:
        ended = self._recent.get(notification_id)
        return ended.outcome if ended is not None else None

    def history(self, integrator: str) -> list[f.Result]:
        """The kept results of ``integrator``'s notifyEvents, oldest first (each with its outcomeId)."""
        key = self._keys.get(integrator)
        return [kept.result for kept in key.history] if key else []

    def last_outcome_id(self) -> str:
        """The newest outcomeId issued (or where the history starts, if none yet)."""
        return self._ids.last()

    def statistics(self) -> dict[str, int]:
        return {
            "agents": len(self._agents),
            "agentSessions": len(self._sessions),
            "integrators": len(self._integrators),
            "live": len(self._live),
            "displayed": sum(len(a.displayed) for a in self._agents.values()),
            "outcomes": self.outcomes,
            "offers": self.offers,
            "remembered": len(self._recent),
            "history": sum(len(k.history) for k in self._keys.values()),
            "timers": self._timers.size,
        }

    # ------------------------------------------------------------------
    # Agent events

    def agent_connected(self, conn: Conn, agent_id: str, session_id: str, now: float) -> list[Effect]:
        """A session authenticated as ``agent_id``: welcome it and replay.

        If the agent already has ``sessions_per_agent`` sessions, its oldest
        is closed first (see the module docstring).
        """
        out: list[Effect] = []
        self._run_due(now, None, out)
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = _Agent(agent_id)
        sessions = agent.sessions
        over = len(sessions) + 1 - self.limits.sessions_per_agent
        if over > 0:
            oldest = tuple(itertools.islice(sessions, over))  # dicts keep the order sessions came in
            for old in oldest:
                del sessions[old]
                del self._sessions[old]
            out.append(Close(oldest, CLOSE_SESSION_REPLACED))
        agent.sessions[conn] = session_id
        agent.targets = tuple(agent.sessions)
        agent.grace_deadline = None
        self._sessions[conn] = agent
        target = (conn,)
        out.append(Send(target, f.Welcome(agent_id=agent_id, session_id=session_id, server_time=int(now),
                                          displayed=tuple(n.id for n in agent.displayed))))
        for n in agent.displayed:
            out.append(Send(target, n.frame))
        if agent.queue:
            out.append(Send(target, f.QueueLength(queued=len(agent.queue))))
        return out

    def agent_disconnected(self, conn: Conn, now: float) -> list[Effect]:
        """A session closed. The agent's last one starts the presence grace; nothing is sent."""
        agent = self._sessions.pop(conn, None)
        if agent is None:
            return []
        del agent.sessions[conn]
        agent.targets = tuple(agent.sessions)
        if not agent.sessions:
            when = now + self.limits.presence_grace * 1000.0
            agent.grace_deadline = when
            self._arm(when, _GraceTimer(agent))
        return []

    def agent_frame(self, conn: Conn, frame: f.AgentInbound, now: float) -> list[Effect]:
        """A decoded frame from an authenticated agent session."""
        out: list[Effect] = []
        self._run_due(now, None, out)
        match frame:
            case f.Respond():
                self._respond(conn, frame, now, out)
            case f.Ping():
                out.append(Send((conn,), f.Pong(server_time=int(now))))
            case f.AgentHello():
                out.append(Send((conn,), f.AgentError(code=AgentErrorCode.ALREADY_AUTHENTICATED,
                                                      message="hello was already accepted")))
        return out

    def _respond(self, conn: Conn, frame: f.Respond, now: float, out: list[Effect]) -> None:
        agent = self._sessions.get(conn)
        nid = frame.notification_id
        n = self._live.get(nid)
        if n is None or n.agent is not agent:
            ended = self._recent.get(nid)
            if ended is not None and ended.agent_id == (agent.id if agent else None):
                code = AgentErrorCode.NOTIFICATION_NOT_PENDING
                msg = f"notification already ended: {ended.outcome.action_name}/{ended.outcome.response_reason}"
            else:
                code, msg = AgentErrorCode.UNKNOWN_NOTIFICATION, "no such notification for this agent"
            out.append(Send((conn,), f.AgentError(code=code, message=msg, notification_id=nid)))
            return
        if n.state is not DISPLAYED:
            out.append(Send((conn,), f.AgentError(code=AgentErrorCode.NOTIFICATION_NOT_DISPLAYED,
                                                  message="notification is not displayed", notification_id=nid)))
            return
        self._end(n, ACCEPTED if frame.action == "Accept" else DECLINED, now, out)

    # ------------------------------------------------------------------
    # Integrator events

    def integrator_connected(self, conn: Conn, integrator: str, now: float,
                             resume_after: str | None = None) -> list[Effect]:
        """A connection authenticated with the API key named ``integrator``.

        With ``resume_after`` (an outcomeId, or ``"$"``: from now) it is a
        resuming connection: it is sent the kept results after that point,
        then ``resumed``. See the module docstring.
        """
        key = self._key(integrator)
        self._integrators[conn] = key
        if resume_after is None:
            return []
        out: list[Effect] = []
        # Deadlines already due end first, so their results are in the replay,
        # not sent again live to this connection.
        self._run_due(now, None, out)
        self._start(now)
        key.resuming += (conn,)
        self._trim(key, now)
        last = self._ids.last()
        if resume_after == f.RESUME_NOW:
            out.append(Send((conn,), f.Resumed(count=0, complete=True, last_outcome_id=last)))
            return out
        replay = []
        for kept in reversed(key.history):
            if kept.outcome_id <= resume_after:
                break
            replay.append(kept.result)
        replay.reverse()
        out.extend(Send((conn,), result) for result in replay)
        details = ""
        if resume_after > last:
            details = f"resumeAfter {resume_after} is newer than any outcome of this server ({last})"
        elif self._history_start is not None and resume_after < self._history_start:
            details = (f"this server's history starts at {self._history_start}, after resumeAfter "
                       f"{resume_after} (restarted without server.stateFile?)")
        elif resume_after < key.forgotten:
            details = (f"outcomes after resumeAfter {resume_after} up to {key.forgotten} were forgotten "
                       "(limits.outcomeHistory, limits.outcomeRetention, or an ack)")
        out.append(Send((conn,), f.Resumed(count=len(replay), complete=not details, last_outcome_id=last,
                                           details=details)))
        return out

    def integrator_disconnected(self, conn: Conn, now: float) -> list[Effect]:
        """Its notifications run on; their results go to the history (and resuming connections)."""
        key = self._integrators.pop(conn, None)
        if key is not None and conn in key.resuming:
            key.resuming = tuple(c for c in key.resuming if c != conn)
        for n in self._owned.pop(conn, ()):
            n.owner = None
        return []

    def _key(self, integrator: str) -> _Key:
        key = self._keys.get(integrator)
        if key is None:
            key = self._keys[integrator] = _Key(integrator)
        return key

    def _start(self, now: float) -> None:
        """Start the outcome clock and the histories at the first ``now`` (unless a snapshot did)."""
        if self._history_start is None:
            if int(now) > self._ids.ms:
                self._ids = OutcomeClock(int(now), 0)
            self._history_start = self._ids.last()

    def _trim(self, key: _Key, now: float) -> None:
        """Forget the oldest outcomes beyond ``outcome_history`` or older than ``outcome_retention``."""
        history = key.history
        if not history:
            return
        cap = self.limits.outcome_history
        horizon = now - self.limits.outcome_retention * 1000.0
        while history and (len(history) > cap or history[0].ended_at < horizon):
            self._forget(key, history.popleft())

    def _forget(self, key: _Key, kept: _Kept) -> None:
        rid = kept.result.request_id
        if key.ended.get(rid) is kept:
            del key.ended[rid]
        key.forgotten = kept.outcome_id

    def _ack(self, key: _Key, outcome_id: str) -> None:
        """The integrator stored every outcome up to ``outcome_id``: forget them."""
        history = key.history
        while history and history[0].outcome_id <= outcome_id:
            self._forget(key, history.popleft())

    def template_infos(self) -> tuple[f.TemplateInfo, ...]:
        """Every template a notifyEvent may name, as the ``templates`` frame lists them."""
        return tuple(describe(t) for t in self.templates.values())

    def integrator_frame(self, conn: Conn, frame: f.IntegratorInbound, now: float) -> list[Effect]:
        """A decoded frame from an authenticated integrator connection."""
        out: list[Effect] = []
        self._run_due(now, None, out)
        match frame:
            case f.NotifyEvent():
                self._notify(conn, frame, now, out)
            case f.CancelEvent():
                self._cancel(conn, frame, now, out)
            case f.Ack():
                self._ack(self._integrators[conn], frame.outcome_id)
            case f.ListTemplates():
                out.append(Send((conn,), f.Templates(request_id=frame.request_id, templates=self.template_infos())))
            case f.IntegratorHello():
                out.append(Send((conn,), f.IntegratorError(error=f.ErrorBody(
                    message=ErrorMessage.REJECT_AFTER_CLIENT, msdyn_name=MsdynName.NOTIFY_EVENT,
                    details="hello was already accepted"))))
        return out

    def _notify(self, conn: Conn, frame: f.NotifyEvent, now: float, out: list[Effect]) -> None:
        """Refuse ``frame`` with an error, or make its notification and place it."""
        key = self._integrators[conn]
        integrator = key.name
        rid = frame.request_id
        if conn in key.resuming and self._notify_again(conn, key, frame, out):
            return
        inp = frame.input
        render = self._renderers.get(inp.template_name)
        if render is None:
            out.append(Send((conn,), _notify_error(rid, ErrorMessage.TEMPLATE_NOT_FOUND,
                                                   f"no template named {inp.template_name!r}")))
            return
        token = inp.cancellation_token
        if frame.cancellation_token is not None:
            if token is not None and token != frame.cancellation_token:
                out.append(Send((conn,), _notify_error(
                    rid, ErrorMessage.REJECT_AFTER_CLIENT,
                    "cancellationToken in input and beside it differ - at $.cancellationToken")))
                return
            token = frame.cancellation_token
        if token is None:
            token = self._new_id()
        elif (integrator, token) in self._tokens:
            out.append(Send((conn,), _notify_error(rid, ErrorMessage.TOKEN_IN_USE,
                                                   f"cancellationToken {token!r} belongs to a pending notification")))
            return
        agent = self._agents.get(frame.agent_id)
        if agent is None:
            out.append(Send((conn,), _notify_error(rid, ErrorMessage.AGENT_NOT_CONNECTED,
                                                   f"agent {frame.agent_id!r} is not connected")))
            return
        try:
            title, fields = render(inp.template_parameters)
        except RecursionError:
            # A parameter that is not a string is rendered as JSON, by a
            # recursive encoder a few calls deeper in the stack than the
            # decoder that took it in: nested just short of what decodes, it
            # may not encode. The same refusal as JSON too deep to decode.
            out.append(Send((conn,), _notify_error(rid, ErrorMessage.REJECT_AFTER_CLIENT,
                                                   f"{TOO_DEEP} - at $.input.templateParameters")))
            return
        limit = self.limits.max_notification_bytes
        size = rendered_size_over(title, fields, limit)
        if size:
            out.append(Send((conn,), _notify_error(
                rid, ErrorMessage.REJECT_AFTER_CLIENT,
                f"the rendered notification (title and fields) is {size} bytes, over "
                f"limits.maxNotificationBytes ({limit}) - at $.input.templateParameters")))
            return
        n = _Notification(
            id=self._new_id(),
            agent=agent,
            integrator=integrator,
            owner=conn,
            request_id=rid,
            token=token,
            correlation_id=frame.correlation_id,
            progress=frame.progress,
            template=render.template,
            title=title,
            fields=fields,
            created=now,
        )
        self.offers += 1
        self._place(n, now, out)

    def _notify_again(self, conn: Conn, key: _Key, frame: f.NotifyEvent, out: list[Effect]) -> bool:
        """Answer a notifyEvent whose requestId is known (True), or leave it to ``_notify`` (False).

        A pending one answers with its status, and its result will go to
        ``conn``; an ended one with the result it had.
        """
        rid = frame.request_id
        n = key.pending.get(rid)
        if n is not None:
            if n.agent.id != frame.agent_id:
                out.append(Send((conn,), _used_for_another_agent(rid, n.agent.id)))
                return True
            if n.owner is not conn:
                old = self._owned.get(n.owner) if n.owner is not None else None
                if old is not None:
                    old.discard(n)
                n.owner = conn
                owned = self._owned.get(conn)
                if owned is None:
                    owned = self._owned[conn] = set()
                owned.add(n)
            out.append(Send((conn,), f.Status(request_id=rid, notification_id=n.id, cancellation_token=n.token,
                                              state=n.state.value)))
            return True
        kept = key.ended.get(rid)
        if kept is None:
            return False
        if kept.agent_id != frame.agent_id:
            out.append(Send((conn,), _used_for_another_agent(rid, kept.agent_id)))
        else:
            out.append(Send((conn,), kept.result))
        return True

    def _place(self, n: _Notification, now: float, out: list[Effect]) -> None:
        """Display a new notification, queue it, or end it if the queue is full."""
        agent = n.agent
        limits = self.limits
        if len(agent.displayed) >= limits.display_limit and len(agent.queue) >= limits.queue_limit:
            self._end(n, QUEUE_LIMIT, now, out)
            return
        conn = n.owner
        self._live[n.id] = n
        self._tokens[(n.integrator, n.token)] = n
        self._keys[n.integrator].pending[n.request_id] = n
        owned = self._owned.get(conn)
        if owned is None:
            owned = self._owned[conn] = set()
        owned.add(n)
        if n.progress:
            out.append(Send((conn,), f.Status(request_id=n.request_id, notification_id=n.id,
                                              cancellation_token=n.token, state="queued")))
        if len(agent.displayed) < limits.display_limit:
            self._display(n, now, out)
        else:
            n.deadline = when = self._deadline(now, limits.queue_timeout)
            agent.queue.append(n)
            self._arm(when, _QueueTimer(n))
            self._queue_changed(agent, out)

    def _cancel(self, conn: Conn, frame: f.CancelEvent, now: float, out: list[Effect]) -> None:
        """End the notification of the token if pending; answer with its outcome either way.

        Asked again, it gives the same answer: the token's recorded outcome.
        """
        integrator = self._integrators[conn].name
        token = frame.cancellation_token
        n = self._tokens.get((integrator, token))
        if n is not None:
            self._end(n, CANCELLED, now, out)
            outcome = CANCELLED
        else:
            ended = self._recent_tokens.get((integrator, token))
            if ended is None:
                out.append(Send((conn,), _cancel_error(frame.request_id, ErrorMessage.TOKEN_NOT_FOUND,
                                                       f"no notification with cancellationToken {token!r}")))
                return
            outcome = ended.outcome
        out.append(Send((conn,), f.Result(
            request_id=frame.request_id,
            value=f.CancelValue(cancellation_token=token, action_name=outcome.action_name,
                                response_reason=outcome.response_reason),
        )))

    # ------------------------------------------------------------------
    # Time

    def handle_timer(self, now: float, limit: int | None = None) -> list[Effect]:
        """Run every deadline at or before ``now``, or at most ``limit`` of them.

        With a ``limit`` the caller can let I/O through between batches when
        thousands fall due at once; ``next_deadline()`` then is still <= now.
        """
        out: list[Effect] = []
        self._run_due(now, limit, out)
        return out

    def _run_due(self, now: float, limit: int | None, out: list[Effect]) -> None:
        """End what is due at ``now``, at most ``limit`` timers of it (None: all)."""
        timers = self._timers
        earliest = timers.earliest()
        if earliest is None or earliest > now:
            return  # the usual case for an event: nothing is due
        end = self._end
        for timer in timers.pop_due(now, limit):
            kind = type(timer)
            if kind is _DisplayTimer:
                end(timer.notification, DISPLAY_TIMEOUT, now, out)
            elif kind is _QueueTimer:
                end(timer.notification, QUEUE_TIME_LIMIT, now, out)
            else:
                self._grace_expired(timer.agent, now, out)

    def _deadline(self, now: float, seconds: float) -> float:
        """``now`` plus ``seconds``, rounded up to a multiple of ``timer_resolution``.

        Offers that arrive within one resolution step end in the same
        ``handle_timer`` call, so a burst of timeouts costs one write per
        connection instead of one per offer. ``expiresAt`` carries the rounded
        time: nobody gets less than the template's timeout.
        """
        when = now + seconds * 1000.0
        step = self.limits.timer_resolution * 1000.0
        return -(-when // step) * step if step else when

    def _arm(self, when: float, timer: _Timer) -> None:
        """Set ``timer`` for ``when``."""
        timers = self._timers
        # Timers of notifications that ended early stay until they surface;
        # sweep them when they outnumber what can still count, so memory
        # follows what is pending, not the rate of offers. (Not while a run
        # of timers is under way: Timers.sweep waits, and the next _arm asks again.)
        size = timers.size
        if size > _SWEEP_ABOVE and size > 2 * (len(self._live) + len(self._agents)):
            timers.sweep()
        timers.add(when, timer)

    def _grace_expired(self, agent: _Agent, now: float, out: list[Effect]) -> None:
        """No session came back in time: end what the agent had pending and forget it."""
        agent.grace_deadline = None
        for n in list(agent.queue) + list(agent.displayed):
            if n.state is not ENDED:
                self._end(n, AGENT_DISCONNECTED, now, out)
        if not agent.sessions and self._agents.get(agent.id) is agent:
            del self._agents[agent.id]

    # ------------------------------------------------------------------
    # Transitions

    def _display(self, n: _Notification, now: float, out: list[Effect]) -> None:
        """Show ``n`` to every session of its agent and start its display deadline."""
        agent = n.agent
        t = n.template
        n.state = DISPLAYED
        n.deadline = when = self._deadline(now, t.timeout)
        n.frame = frame = f.Notification(
            notification_id=n.id,
            template_name=t.name,
            title=n.title,
            icon=t.icon,
            fields=n.fields,
            accept_text=t.accept_text,
            reject_text=t.reject_text,
            show_timeout=t.show_timeout,
            auto_accept=t.auto_accept,
            timeout_seconds=t.timeout,
            expires_at=int(when),
            correlation_id=n.correlation_id,
        )
        agent.displayed.append(n)
        if agent.targets:
            out.append(Send(agent.targets, frame))
        if n.progress and n.owner is not None:
            out.append(Send((n.owner,), f.Status(request_id=n.request_id, notification_id=n.id,
                                                 cancellation_token=n.token, state="displayed")))
        if t.auto_accept:
            self._end(n, AUTO_ACCEPTED, now, out)
        else:
            self._arm(when, _DisplayTimer(n))

    def _end(self, n: _Notification, outcome: Outcome, now: float, out: list[Effect]) -> None:
        """The one place a notification gets its outcome."""
        was = n.state
        assert was is not ENDED, "a notification ends once"
        n.state = ENDED
        agent = n.agent
        integrator = n.integrator
        owner = n.owner
        n.owner = None  # answered below: owed nothing, and not kept open by a stale timer
        self.outcomes += 1
        token_key = (integrator, n.token)
        if self._live.pop(n.id, None) is not None:
            if self._tokens.get(token_key) is n:
                del self._tokens[token_key]
            if owner is not None:
                owned = self._owned.get(owner)
                if owned is not None:
                    owned.discard(n)
        if self.limits.recent_outcomes:
            self._remember(_Remembered(n.id, agent.id, integrator, n.token, outcome), token_key)

        if self._history_start is None:
            self._start(now)
        rid = n.request_id
        outcome_id = self._ids.next(now)
        result = f.Result(request_id=rid, value=_VALUES[outcome], outcome_id=outcome_id)
        key = self._keys[integrator]
        if key.pending.get(rid) is n:
            del key.pending[rid]
        kept = _Kept(outcome_id, result, agent.id, now)
        key.history.append(kept)
        key.ended[rid] = kept
        limits = self.limits
        if (len(key.history) > limits.outcome_history
                or key.history[0].ended_at < now - limits.outcome_retention * 1000.0):
            self._trim(key, now)
        if owner is not None:
            out.append(Send((owner,), result))
            delivered = True
        else:
            delivered = bool(key.resuming)
            if delivered:
                out.append(Send(key.resuming, result))
        created = n.created
        out.append(Ended(n.id, agent.id, integrator, n.correlation_id, outcome, delivered,
                         None if created is None else now - created))

        if was is DISPLAYED:
            agent.displayed.remove(n)
            if agent.targets:
                out.append(Send(agent.targets, f.Resolved(
                    notification_id=n.id, action_name=outcome.action_name,
                    response_reason=outcome.response_reason)))
            if agent.queue:
                self._display_next(agent, now, out)
        elif was is QUEUED and n in agent.queue:
            agent.queue.remove(n)
            self._queue_changed(agent, out)

    def _display_next(self, agent: _Agent, now: float, out: list[Effect]) -> None:
        # An auto-accept template ends as it is displayed, which lands back
        # here; the outer loop carries on instead of recursing once per item.
        if agent.draining:
            return
        limit = self.limits.display_limit
        changed = False
        agent.draining = True
        try:
            while agent.queue and len(agent.displayed) < limit:
                n = agent.queue.popleft()
                changed = True
                self._display(n, now, out)
        finally:
            agent.draining = False
        if changed:
            self._queue_changed(agent, out)

    def _queue_changed(self, agent: _Agent, out: list[Effect]) -> None:
        """Tell the agent's sessions the queue length, if it differs from the last one told."""
        queued = len(agent.queue)
        if queued != agent.queued_sent:
            agent.queued_sent = queued
            if agent.targets:
                out.append(Send(agent.targets, f.QueueLength(queued=queued)))

    def _remember(self, ended: _Remembered, token_key: tuple[str, str]) -> None:
        """Keep ``ended`` among the ``recent_outcomes``, forgetting the oldest beyond them."""
        recent = self._recent
        recent[ended.id] = ended
        tokens = self._recent_tokens
        tokens[token_key] = ended
        cap = self.limits.recent_outcomes
        while len(recent) > cap:
            _, old = recent.popitem(last=False)
            old_token = (old.integrator, old.token)
            if tokens.get(old_token) is old:
                del tokens[old_token]

    # ------------------------------------------------------------------
    # Keeping pending notifications across a restart

    def snapshot(self, now: float) -> Snapshot:
        """The pending notifications and the outcome histories, to hand to ``restore`` in the next process."""
        saved = []
        for agent in self._agents.values():
            for n in itertools.chain(agent.displayed, agent.queue):
                saved.append(SavedNotification(
                    id=n.id, agent_id=agent.id, integrator=n.integrator, request_id=n.request_id,
                    cancellation_token=n.token, correlation_id=n.correlation_id, progress=n.progress,
                    template=n.template, title=n.title, fields=n.fields, state=n.state.value,
                    deadline=n.deadline, frame=n.frame, created_at=n.created,
                ))
        histories = []
        for key in self._keys.values():
            self._trim(key, now)
            histories.append(SavedHistory(integrator=key.name, forgotten=key.forgotten, outcomes=tuple(
                SavedOutcome(outcome_id=k.outcome_id, request_id=k.result.request_id, agent_id=k.agent_id,
                             action_name=k.result.value.action_name, response_reason=k.result.value.response_reason,
                             ended_at=k.ended_at)
                for k in key.history)))
        return Snapshot(saved_at=now, notifications=tuple(saved), history_start=self._history_start,
                        last_outcome_id=self._ids.last() if self._history_start is not None else None,
                        histories=tuple(histories))

    def restore(self, snapshot: Snapshot, now: float) -> list[Effect]:
        """Take back the notifications and outcome histories of ``snapshot``, keeping deadlines and ids.

        Their agents start with no session and a fresh presence grace, so a
        desktop that reconnects in time gets its displayed notifications
        replayed; their integrator connections are gone, so results go to the
        history until a resuming connection (or a retried notifyEvent) claims
        them. A deadline that passed while the server was down fires at the
        next ``handle_timer``. Call it before any other event.

        Raises:
            ValueError: ``snapshot.version`` is not one of ``SNAPSHOT_VERSIONS``
                (nothing is taken back).
        """
        if snapshot.version not in SNAPSHOT_VERSIONS:
            raise ValueError(f"snapshot version {snapshot.version} is not one this server reads "
                             f"({', '.join(map(str, SNAPSHOT_VERSIONS))})")
        out: list[Effect] = []
        if snapshot.history_start is not None and self._history_start is None:
            self._history_start = snapshot.history_start
            if snapshot.last_outcome_id is not None:
                self._ids = OutcomeClock.parse(snapshot.last_outcome_id)
            for h in snapshot.histories:
                key = self._key(h.integrator)
                key.forgotten = h.forgotten
                for o in h.outcomes:
                    outcome = Outcome(o.action_name, o.response_reason)
                    value = _VALUES.get(outcome) or f.NotifyValue(o.action_name, o.response_reason)
                    result = f.Result(request_id=o.request_id, value=value, outcome_id=o.outcome_id)
                    kept = _Kept(o.outcome_id, result, o.agent_id, o.ended_at)
                    key.history.append(kept)
                    key.ended[o.request_id] = kept
                self._trim(key, now)
        grace = now + self.limits.presence_grace * 1000.0
        for s in snapshot.notifications:
            if s.id in self._live or (s.integrator, s.cancellation_token) in self._tokens:
                continue
            agent = self._agents.get(s.agent_id)
            if agent is None:
                agent = self._agents[s.agent_id] = _Agent(s.agent_id, grace_deadline=grace)
                self._arm(grace, _GraceTimer(agent))
            n = _Notification(
                id=s.id, agent=agent, integrator=s.integrator, owner=None, request_id=s.request_id,
                token=s.cancellation_token, correlation_id=s.correlation_id, progress=s.progress,
                template=s.template, title=s.title, fields=s.fields, state=State(s.state),
                deadline=s.deadline, frame=s.frame, created=s.created_at,
            )
            self._live[n.id] = n
            self._tokens[(n.integrator, n.token)] = n
            self._key(n.integrator).pending[n.request_id] = n
            if n.state is DISPLAYED and n.frame is not None:
                agent.displayed.append(n)
                self._arm(n.deadline, _DisplayTimer(n))
            else:
                n.state = QUEUED
                agent.queue.append(n)
                self._arm(n.deadline, _QueueTimer(n))
        for agent in self._agents.values():
            agent.queued_sent = len(agent.queue)
            self._display_next(agent, now, out)
        return out
