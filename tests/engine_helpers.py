"""A small harness for driving ``protocol.engine.Engine`` directly in tests.

Connections are plain strings, ``now`` is a fake clock (epoch milliseconds,
floats), ids come from a counter (``"id1"``, ``"id2"``, ...) so they are
deterministic. Inbound frames are built as JSON and decoded with the real
decoders, so every test also exercises the wire shape of what clients send.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from deskpush.protocol import frames as f
from deskpush.protocol.engine import Effect, Ended, Engine, Limits, Send
from deskpush.protocol.templates import BUILTIN_TEMPLATES, Template

T0 = 1_700_000_000_000.0
"""The fake clock's start: a realistic epoch-milliseconds value."""

CHAT = "msdyn_chat_incoming_unauthenticated"
CHAT_AUTH = "msdyn_chat_incoming_authenticated"
VOICE = "msdyn_voicecall_incoming_unauthenticated"
AUTO = "msdyn_chat_incoming_autoaccept"

BUILTINS: dict[str, Template] = {t.name: t for t in BUILTIN_TEMPLATES}


class _OutcomeIdPattern:
    """Equal to any string shaped like an outcomeId, for comparing wire frames."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.fullmatch(r"[0-9]{13}-[0-9]{6}", other) is not None

    def __repr__(self) -> str:
        return "OUTCOME_ID"


OUTCOME_ID: Any = _OutcomeIdPattern()


def id_number(ident: str) -> int:
    """The counter value behind an id made by ``Harness`` (``"id7"`` -> 7)."""
    assert ident.startswith("id"), ident
    return int(ident[2:])


def wire(frame: Any) -> dict[str, Any]:
    """A frame as the JSON object that goes on the wire."""
    return json.loads(f.encode(frame))


def notify_frame(
    request_id: str,
    agent_id: str,
    template: str = CHAT,
    *,
    params: Mapping[str, Any] | None = None,
    token: str | None = None,
    outer_token: str | None = None,
    correlation_id: str | None = None,
    progress: bool | None = None,
) -> f.NotifyEvent:
    """A notifyEvent decoded from JSON, as the server would receive it."""
    inp: dict[str, Any] = {"templateName": template}
    if params is not None:
        inp["templateParameters"] = dict(params)
    if token is not None:
        inp["cancellationToken"] = token
    msg: dict[str, Any] = {"type": "notifyEvent", "requestId": request_id, "agentId": agent_id, "input": inp}
    if outer_token is not None:
        msg["cancellationToken"] = outer_token
    if correlation_id is not None:
        msg["correlationId"] = correlation_id
    if progress is not None:
        msg["progress"] = progress
    frame = f.INTEGRATOR_DECODER.decode(json.dumps(msg))
    assert isinstance(frame, f.NotifyEvent)
    return frame


def cancel_frame(request_id: str, token: str) -> f.CancelEvent:
    frame = f.INTEGRATOR_DECODER.decode(
        json.dumps({"type": "cancelEvent", "requestId": request_id, "cancellationToken": token})
    )
    assert isinstance(frame, f.CancelEvent)
    return frame


def respond_frame(notification_id: str, action: str) -> f.Respond:
    frame = f.AGENT_DECODER.decode(
        json.dumps({"type": "respond", "notificationId": notification_id, "action": action})
    )
    assert isinstance(frame, f.Respond)
    return frame


def sent_to(effects: Iterable[Effect], conn: Any, kind: type | None = None) -> list[Any]:
    """Frames sent to ``conn`` (optionally only those of type ``kind``), in order."""
    return [
        e.frame
        for e in effects
        if isinstance(e, Send) and conn in e.targets and (kind is None or isinstance(e.frame, kind))
    ]


def sends(effects: Iterable[Effect]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def ended(effects: Iterable[Effect]) -> list[Ended]:
    return [e for e in effects if isinstance(e, Ended)]


def targets(effects: Iterable[Effect]) -> set[Any]:
    return {c for e in effects if isinstance(e, Send) for c in e.targets}


class Harness:
    """An engine, a fake clock and a log of every effect it returned."""

    def __init__(
        self,
        limits: Limits = Limits(),
        templates: Mapping[str, Template] | None = None,
        now: float = T0,
    ) -> None:
        self.counter = itertools.count(1)
        self.engine = Engine(BUILTINS if templates is None else templates, limits,
                             new_id=lambda: f"id{next(self.counter)}")
        self.now = now
        self.log: list[Effect] = []

    def _record(self, effects: list[Effect]) -> list[Effect]:
        assert isinstance(effects, list)
        self.log.extend(effects)
        return effects

    # Agents -------------------------------------------------------------

    def connect(self, conn: str, agent_id: str, session_id: str | None = None) -> list[Effect]:
        return self._record(self.engine.agent_connected(conn, agent_id, session_id or f"sess-{conn}", self.now))

    def disconnect(self, conn: str) -> list[Effect]:
        return self._record(self.engine.agent_disconnected(conn, self.now))

    def respond(self, conn: str, notification_id: str, action: str = "Accept") -> list[Effect]:
        return self._record(self.engine.agent_frame(conn, respond_frame(notification_id, action), self.now))

    def agent_frame(self, conn: str, frame: Any) -> list[Effect]:
        return self._record(self.engine.agent_frame(conn, frame, self.now))

    # Integrators ----------------------------------------------------------

    def integrator(self, conn: str, integrator: str = "k1", resume_after: str | None = None) -> list[Effect]:
        return self._record(self.engine.integrator_connected(conn, integrator, self.now, resume_after))

    def ack(self, conn: str, outcome_id: str) -> list[Effect]:
        frame = f.INTEGRATOR_DECODER.decode(json.dumps({"type": "ack", "outcomeId": outcome_id}))
        return self._record(self.engine.integrator_frame(conn, frame, self.now))

    def integrator_gone(self, conn: str) -> list[Effect]:
        return self._record(self.engine.integrator_disconnected(conn, self.now))

    def notify(self, conn: str, request_id: str, agent_id: str, template: str = CHAT, **kw: Any) -> list[Effect]:
        frame = notify_frame(request_id, agent_id, template, **kw)
        return self._record(self.engine.integrator_frame(conn, frame, self.now))

    def cancel(self, conn: str, request_id: str, token: str) -> list[Effect]:
        return self._record(self.engine.integrator_frame(conn, cancel_frame(request_id, token), self.now))

    def integrator_frame(self, conn: str, frame: Any) -> list[Effect]:
        return self._record(self.engine.integrator_frame(conn, frame, self.now))

    # Time -----------------------------------------------------------------

    def at(self, when: float) -> list[Effect]:
        """Move the clock to ``when`` and run the timers."""
        assert when >= self.now
        self.now = when
        return self._record(self.engine.handle_timer(when))

    def advance(self, seconds: float) -> list[Effect]:
        return self.at(self.now + seconds * 1000.0)

    # Shorthands -------------------------------------------------------------

    def displayed_id(self, effects: list[Effect], conn: str) -> str:
        """The id of the one notification frame sent to ``conn`` in ``effects``."""
        notes = sent_to(effects, conn, f.Notification)
        assert len(notes) == 1, notes
        return notes[0].notification_id

    def status_id(self, effects: list[Effect], conn: str, state: str = "queued") -> str:
        st = [s for s in sent_to(effects, conn, f.Status) if s.state == state]
        assert len(st) == 1, st
        return st[0].notification_id
