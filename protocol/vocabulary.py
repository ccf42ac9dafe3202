"""Every name of wire protocol v1, defined once: outcomes, error codes, close codes.

The engine, the server and the clients all take these from here; nothing else
spells them. The browser code cannot import Python, so ``demo_client/vocabulary.js``
is generated from this module by ``make vocabulary``; a test fails when the two
disagree, when a script uses a name the vocabulary does not define, and when
``docs/protocol.md`` lacks a row for a name or has a row for a name that is
not here.

* ``Outcome``: the CIF 2.0 ``actionName``/``responseReason`` pairs that end
  a notification, and deskpush's two additions (cancel, agent disconnected).
* ``AgentErrorCode``: ``code`` of the agent endpoint's ``error`` frame.
* ``ErrorMessage`` and ``MsdynName``: ``error.message`` and
  ``error.msdyn_name`` of the integrator endpoint's ``error`` frame, CIF's
  error object.
* ``CloseCode`` and ``Closing``: the WebSocket close codes the server uses,
  and the code and reason of each close the server itself decides on.
"""

from __future__ import annotations

import enum
import json
from typing import NamedTuple

__all__ = [
    "Outcome",
    "ACCEPTED",
    "AUTO_ACCEPTED",
    "DECLINED",
    "QUEUE_LIMIT",
    "QUEUE_TIME_LIMIT",
    "DISPLAY_TIMEOUT",
    "CANCELLED",
    "AGENT_DISCONNECTED",
    "OUTCOMES",
    "AgentErrorCode",
    "ErrorMessage",
    "MsdynName",
    "CloseCode",
    "Closing",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_RATE_LIMITED",
    "CLOSE_KEEPALIVE_TIMEOUT",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_SESSION_REPLACED",
    "CLOSE_AUTH_THROTTLED",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_NODE_RESYNC",
    "CLOSE_REDIS_UNREACHABLE",
    "CLOSINGS",
    "javascript_module",
]


class Outcome(NamedTuple):
    """How a notification ended, as CIF reports it."""

    action_name: str
    response_reason: str

    def __str__(self) -> str:
        return f"{self.action_name}/{self.response_reason}"


ACCEPTED = Outcome("Accept", "Accept")
AUTO_ACCEPTED = Outcome("Accept", "AutoAccept")
DECLINED = Outcome("Reject", "DeclinedByAgent")
QUEUE_LIMIT = Outcome("Reject", "NotificationQueueLimitExceeded")
QUEUE_TIME_LIMIT = Outcome("Reject", "NotificationQueueTimeLimitExceeded")
DISPLAY_TIMEOUT = Outcome("Timeout", "DisplayTimeout")
CANCELLED = Outcome("Cancel", "CancelledByIntegrator")
AGENT_DISCONNECTED = Outcome("Reject", "AgentDisconnected")

#: Every outcome, by the name the code uses for it.
OUTCOMES: dict[str, Outcome] = {
    "ACCEPTED": ACCEPTED,
    "AUTO_ACCEPTED": AUTO_ACCEPTED,
    "DECLINED": DECLINED,
    "QUEUE_LIMIT": QUEUE_LIMIT,
    "QUEUE_TIME_LIMIT": QUEUE_TIME_LIMIT,
    "DISPLAY_TIMEOUT": DISPLAY_TIMEOUT,
    "CANCELLED": CANCELLED,
    "AGENT_DISCONNECTED": AGENT_DISCONNECTED,
}


class AgentErrorCode(enum.StrEnum):
    """``code`` of an agent ``error`` frame."""

    BAD_FRAME = "BadFrame"
    ALREADY_AUTHENTICATED = "AlreadyAuthenticated"
    UNKNOWN_NOTIFICATION = "UnknownNotification"
    NOTIFICATION_NOT_PENDING = "NotificationNotPending"
    NOTIFICATION_NOT_DISPLAYED = "NotificationNotDisplayed"


class ErrorMessage(enum.StrEnum):
    """``error.message`` of an integrator ``error`` frame (CIF's error names).

    ``UNAUTHORIZED`` is no error frame: it is the body of the HTTP 401 answer
    to a bad ``Authorization`` header, and what the clients report for a
    close with ``CloseCode.UNAUTHORIZED``. ``OUTCOME_UNKNOWN`` is no error
    frame either: the clients make it (see below).
    """

    TEMPLATE_NOT_FOUND = "NotificationTemplateNotFoundError"
    REJECT_AFTER_CLIENT = "RejectAfterClientError"
    TOKEN_IN_USE = "CancellationTokenInUseError"
    TOKEN_NOT_FOUND = "CancellationTokenNotFoundError"
    AGENT_NOT_CONNECTED = "AgentNotConnectedError"
    UNAUTHORIZED = "UnauthorizedError"
    # Made by the clients, never sent by the server: a call pending across a
    # reconnect whose outcome the server's history no longer reaches
    # (``resumed`` with ``complete: false``).
    OUTCOME_UNKNOWN = "OutcomeUnknownError"


class MsdynName(enum.StrEnum):
    """``error.msdyn_name``: which CIF call failed."""

    NOTIFY_EVENT = "NotifyEvent"
    CANCEL_EVENT = "CancelEvent"
    #: deskpush's own call, not CIF's: the ``templates`` request.
    LIST_TEMPLATES = "ListTemplates"


class CloseCode(enum.IntEnum):
    """WebSocket close codes of the server (RFC 6455 section 7.4.1, and ours in 4000-4999)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001  # the server is shutting down
    PROTOCOL_ERROR = 1002  # a frame that breaks RFC 6455 (websockets' reason)
    ABNORMAL_CLOSURE = 1006  # no close frame: the TCP connection was aborted
    INVALID_DATA = 1007  # a message that is not UTF-8 (RFC 6455 section 8.1; JSON is UTF-8)
    POLICY_VIOLATION = 1008  # over the rate limit
    MESSAGE_TOO_BIG = 1009  # a frame over server.maxSize (websockets' reason)
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # the server is draining for a restart: reconnect now, with jitter
    TRY_AGAIN_LATER = 1013  # cluster mode: the node cannot reach Redis and holds too much already
    UNAUTHORIZED = 4401  # hello missing, late or refused
    # The agent opened more than limits.sessionsPerAgent sessions: the oldest
    # is closed so the newest works. Not to be retried on its own: that would
    # close another session of the agent, which would retry in turn.
    SESSION_REPLACED = 4409
    # Too many failed authentications from the client's address
    # (auth.failedAuthLimit): the hello was not even checked. Retry later.
    AUTH_THROTTLED = 4429


class Closing(NamedTuple):
    """A close the server decides on: its code and reason."""

    code: CloseCode
    reason: str


CLOSE_UNAUTHORIZED = Closing(CloseCode.UNAUTHORIZED, "unauthorized")
CLOSE_RATE_LIMITED = Closing(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
CLOSE_KEEPALIVE_TIMEOUT = Closing(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
CLOSE_INTERNAL_ERROR = Closing(CloseCode.INTERNAL_ERROR, "internal error")
CLOSE_SESSION_REPLACED = Closing(CloseCode.SESSION_REPLACED, "replaced by a newer session of this agent")
CLOSE_AUTH_THROTTLED = Closing(CloseCode.AUTH_THROTTLED, "too many failed authentications, retry later")
CLOSE_SERVICE_RESTART = Closing(CloseCode.SERVICE_RESTART, "server restarting")
# Cluster mode: the node was declared down, or fell behind the log; reconnect (to any node).
CLOSE_NODE_RESYNC = Closing(CloseCode.SERVICE_RESTART, "cluster node resynchronising")
# Cluster mode: Redis is unreachable and the node holds cluster.maxBuffered events already.
CLOSE_REDIS_UNREACHABLE = Closing(CloseCode.TRY_AGAIN_LATER, "cluster storage unreachable, try again later")

#: Every close the server decides on, by the name the code uses for it.
CLOSINGS: dict[str, Closing] = {
    "CLOSE_UNAUTHORIZED": CLOSE_UNAUTHORIZED,
    "CLOSE_RATE_LIMITED": CLOSE_RATE_LIMITED,
    "CLOSE_KEEPALIVE_TIMEOUT": CLOSE_KEEPALIVE_TIMEOUT,
    "CLOSE_INTERNAL_ERROR": CLOSE_INTERNAL_ERROR,
    "CLOSE_SESSION_REPLACED": CLOSE_SESSION_REPLACED,
    "CLOSE_AUTH_THROTTLED": CLOSE_AUTH_THROTTLED,
    "CLOSE_SERVICE_RESTART": CLOSE_SERVICE_RESTART,
    "CLOSE_NODE_RESYNC": CLOSE_NODE_RESYNC,
    "CLOSE_REDIS_UNREACHABLE": CLOSE_REDIS_UNREACHABLE,
}


def javascript_module() -> str:
    """The text of ``demo_client/vocabulary.js``: this module as frozen JS objects.

    Names are the Python names; an outcome is its ``"actionName/responseReason"``
    string, the form the browser code keys its labels by.
    """
    groups = {
        "OUTCOME": {name: str(o) for name, o in OUTCOMES.items()},
        "AGENT_ERROR": {m.name: m.value for m in AgentErrorCode},
        "ERROR_MESSAGE": {m.name: m.value for m in ErrorMessage},
        "MSDYN_NAME": {m.name: m.value for m in MsdynName},
        "CLOSE_CODE": {m.name: m.value for m in CloseCode},
    }
    lines = [
        "// deskpush wire protocol v1: every outcome, error code and close code.",
        "// Generated from deskpush.protocol.vocabulary by `make vocabulary`; do not edit.",
    ]
    for name, members in groups.items():
        lines.append("")
        lines.append(f"export const {name} = Object.freeze({{")
        lines.extend(f"  {key}: {json.dumps(value)}," for key, value in members.items())
        lines.append("});")
    return "\n".join(lines) + "\n"

