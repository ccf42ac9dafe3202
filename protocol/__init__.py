"""deskpush's sans-I/O core: the wire frames, their vocabulary and the notification engine.

Nothing here does I/O or reads a clock; the server passes ``now`` in.
``frames`` holds the wire frames, ``vocabulary`` every name they carry,
``templates`` the notification templates, ``engine`` the lifecycle and
``timers`` the deadlines it keeps.
"""

from .engine import (
    ACCEPTED,
    AGENT_DISCONNECTED,
    AUTO_ACCEPTED,
    CANCELLED,
    DECLINED,
    DISPLAY_TIMEOUT,
    QUEUE_LIMIT,
    QUEUE_TIME_LIMIT,
    Close,
    Effect,
    Ended,
    Engine,
    Limits,
    Outcome,
    Send,
    State,
)
from .engine import SNAPSHOT_VERSIONS, SavedNotification, Snapshot
from .templates import BUILTIN_TEMPLATES, FieldTemplate, Template
from .vocabulary import AgentErrorCode, CloseCode, Closing, ErrorMessage, MsdynName

__all__ = [
    "ACCEPTED",
    "AGENT_DISCONNECTED",
    "AgentErrorCode",
    "AUTO_ACCEPTED",
    "BUILTIN_TEMPLATES",
    "CANCELLED",
    "Close",
    "CloseCode",
    "Closing",
    "DECLINED",
    "DISPLAY_TIMEOUT",
    "QUEUE_LIMIT",
    "QUEUE_TIME_LIMIT",
    "Effect",
    "Ended",
    "Engine",
    "ErrorMessage",
    "FieldTemplate",
    "Limits",
    "MsdynName",
    "Outcome",
    "SavedNotification",
    "Send",
    "SNAPSHOT_VERSIONS",
    "Snapshot",
    "State",
    "Template",
]
