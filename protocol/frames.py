"""Every frame of wire protocol v1.1, as msgspec Structs.

All frames are WebSocket text frames holding one JSON object whose ``type``
field selects the frame. Field names are camelCase on the wire (``rename="camel"``);
the one exception is ``msdyn_name`` in integrator errors, spelled as CIF 2.0 does.

There is one tagged union per direction and endpoint, each decoded by one
Decoder built once at import time:

* ``AgentInbound``: what an agent desktop sends (hello, respond, ping).
* ``IntegratorInbound``: what an integrator sends (hello, notifyEvent, cancelEvent, ack,
  templates).

v1.1 adds, on the integrator endpoint only, what lets outcomes survive a
reconnect: ``resumeAfter`` in hello, ``outcomeId`` in a notifyEvent's result,
the ``resumed`` frame and ``ack``. A client that sends none of it speaks v1.
``templates`` (a request and its answer) lists the templates an integrator
may name; it is no CIF call, and changes nothing else.

The frames the server sends have their unions too, for typing (nothing decodes
them here): ``AgentOutbound``, ``IntegratorOutbound`` and ``Outbound``, either.
They are encoded by the single ``ENCODER``. Constraints
(``Meta(max_length=...)``) apply only when decoding, so they bound what clients
may send without costing anything on the way out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

__all__ = [
    "AgentHello",
    "Respond",
    "Ping",
    "AgentInbound",
    "Welcome",
    "Notification",
    "Field",
    "Resolved",
    "QueueLength",
    "Pong",
    "AgentError",
    "AgentOutbound",
    "IntegratorHello",
    "Ack",
    "ListTemplates",
    "TemplateInfo",
    "Templates",
    "Resumed",
    "OutcomeId",
    "ResumePoint",
    "RESUME_NOW",
    "NotifyInput",
    "NotifyEvent",
    "CancelEvent",
    "IntegratorInbound",
    "Status",
    "NotifyValue",
    "CancelValue",
    "Result",
    "ErrorBody",
    "IntegratorError",
    "IntegratorOutbound",
    "Outbound",
    "ENCODER",
    "AGENT_DECODER",
    "INTEGRATOR_DECODER",
    "encode",
]

# Bounds on what a client may send. Generous for real use, small enough that a
# hostile client cannot make the server hold much.
Id = Annotated[str, Meta(min_length=1, max_length=128)]
ShortText = Annotated[str, Meta(max_length=256)]
Token = Annotated[str, Meta(min_length=1, max_length=4096)]
Params = Annotated[dict[str, Any], Meta(max_length=64)]
#: An outcome's place in its API key's history: epoch milliseconds (13
#: digits), "-", a sequence within the millisecond (6 digits). Sorts as a string.
OutcomeId = Annotated[str, Meta(pattern=r"^[0-9]{13}-[0-9]{6}$")]
#: Where a v1.1 integrator resumes: after an outcomeId, or "$": from now.
RESUME_NOW = "$"
ResumePoint = Annotated[str, Meta(pattern=r"^(\$|[0-9]{13}-[0-9]{6})$")]


class _Frame(msgspec.Struct, tag_field="type", rename="camel", frozen=True, kw_only=True, gc=False):
    """Base of every frame: tagged by ``type``, camelCase on the wire.

    ``gc=False``: a frame holds strings, numbers and other frames, never
    itself, so it cannot be part of a reference cycle. Keeping the frames of
    thousands of displayed notifications out of the garbage collector's
    traversal keeps its pauses short.
    """


# --------------------------------------------------------------------------
# Agent endpoint, client -> server


class AgentHello(_Frame, tag="hello"):
    """First frame of an agent session: the agent's JWT."""

    token: Token


class Respond(_Frame, tag="respond"):
    """The agent's answer to a displayed notification."""

    notification_id: Id
    action: Literal["Accept", "Reject"]


class Ping(_Frame, tag="ping"):
    """Application keepalive; browsers cannot send protocol pings."""


AgentInbound = Union[AgentHello, Respond, Ping]

# --------------------------------------------------------------------------
# Agent endpoint, server -> client


class Welcome(_Frame, tag="welcome"):
    agent_id: str
    session_id: str
    server_time: int
    # Ids of the notifications replayed right after this frame: a desktop can
    # drop at once every card it still shows that is not among them.
    displayed: tuple[str, ...] = ()


class Field(msgspec.Struct, frozen=True, gc=False):
    header: str
    value: str


class Notification(_Frame, tag="notification"):
    notification_id: str
    template_name: str
    title: str
    icon: str
    fields: tuple[Field, ...]
    accept_text: str
    reject_text: str
    show_timeout: bool
    auto_accept: bool
    timeout_seconds: float
    expires_at: int
    correlation_id: str | None = None


class Resolved(_Frame, tag="resolved"):
    notification_id: str
    action_name: str
    response_reason: str


class QueueLength(_Frame, tag="queue"):
    """How many of the agent's notifications wait behind the displayed ones."""

    queued: int


class Pong(_Frame, tag="pong"):
    server_time: int


class AgentError(_Frame, tag="error"):
    code: str
    message: str
    notification_id: str | None = None


AgentOutbound = Union[Welcome, Notification, Resolved, QueueLength, Pong, AgentError]


# --------------------------------------------------------------------------
# Integrator endpoint, client -> server


class IntegratorHello(_Frame, tag="hello"):
    """First frame of a browser integrator, which cannot set headers.

    ``resume_after`` (v1.1) makes it a resuming connection: see ``Resumed``.
    """

    api_key: Token
    resume_after: ResumePoint | None = None


class NotifyInput(msgspec.Struct, rename="camel", frozen=True, kw_only=True):
    """CIF 2.0 ``notifyEvent`` input. Unknown keys are ignored, as CIF does."""

    template_name: Id
    template_parameters: Params = {}
    cancellation_token: Id | None = None


class NotifyEvent(_Frame, tag="notifyEvent"):
    request_id: Id
    agent_id: Id
    input: NotifyInput
    cancellation_token: Id | None = None
    correlation_id: ShortText | None = None
    progress: bool = True


class CancelEvent(_Frame, tag="cancelEvent"):
    request_id: Id
    cancellation_token: Id
    correlation_id: ShortText | None = None


class Ack(_Frame, tag="ack"):
    """v1.1: the integrator has stored every outcome of its key up to ``outcome_id``."""

    outcome_id: OutcomeId


class ListTemplates(_Frame, tag="templates"):
    """Which templates may a notifyEvent name? Answered by ``Templates`` (not a CIF call)."""

    request_id: Id


IntegratorInbound = Union[IntegratorHello, NotifyEvent, CancelEvent, Ack, ListTemplates]

# --------------------------------------------------------------------------
# Integrator endpoint, server -> client


class Status(_Frame, tag="status"):
    request_id: str
    notification_id: str
    cancellation_token: str
    state: Literal["queued", "displayed"]


class NotifyValue(msgspec.Struct, rename="camel", frozen=True):
    action_name: str
    response_reason: str


class CancelValue(msgspec.Struct, rename="camel", frozen=True):
    cancellation_token: str
    action_name: str
    response_reason: str


class Result(_Frame, tag="result", omit_defaults=True):
    request_id: str
    value: NotifyValue | CancelValue
    # v1.1: a notifyEvent's outcome, in its key's history (None: a cancelEvent's answer).
    outcome_id: str | None = None


class Resumed(_Frame, tag="resumed", omit_defaults=True):
    """v1.1: the replay after ``resumeAfter`` is over; ``count`` results came before it.

    ``complete`` is False when the history did not reach back to the resume
    point (``details`` says why); ``last_outcome_id`` is where the integrator
    stands now: what to resume after next time.
    """

    count: int
    complete: bool
    last_outcome_id: str
    details: str = ""


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    """CIF 2.0's error object: ``{"message": ..., "msdyn_name": ...}``."""

    message: str
    msdyn_name: str
    details: str = ""


class IntegratorError(_Frame, tag="error", omit_defaults=True):
    error: ErrorBody
    request_id: str | None = None


class TemplateInfo(msgspec.Struct, rename="camel", frozen=True, kw_only=True, gc=False):
    """What an integrator needs to know of a template: its name, its card, and the slugs it fills."""

    name: str
    title: str
    icon: str
    timeout: float
    auto_accept: bool
    #: The ``{slug}`` placeholders of its title and fields, in order of first appearance.
    parameters: tuple[str, ...]


class Templates(_Frame, tag="templates"):
    """The answer to ``ListTemplates``: every template of the server, in configuration order."""

    request_id: str
    templates: tuple[TemplateInfo, ...]


IntegratorOutbound = Union[Status, Result, Resumed, IntegratorError, Templates]

Outbound = AgentOutbound | IntegratorOutbound


# --------------------------------------------------------------------------

ENCODER = msgspec.json.Encoder()
AGENT_DECODER = msgspec.json.Decoder(AgentInbound)
INTEGRATOR_DECODER = msgspec.json.Decoder(IntegratorInbound)
encode = ENCODER.encode
