"""The two WebSocket endpoints, ``/agent`` and ``/integrator``, on one code path.

A ``Session`` is one open WebSocket connection on an endpoint. Every message
takes the same path, whichever the endpoint:

1. before authentication, the message must be the endpoint's ``hello`` and
   its credential must check out, within ``helloTimeout`` of the TCP
   connection being accepted (one bound for the opening handshake and the
   hello together); anything else closes the connection with 4401;
2. after it, the rate limit (a token bucket per connection; past it: close
   1008), then the message is decoded with the endpoint's decoder; one that
   does not decode gets the endpoint's error frame and the connection stays;
3. a decoded frame goes to the engine, and its effects to the dispatcher.

What differs is in ``Endpoint``: the decoder, the hello and how to check it,
which engine events a session maps to, the error frame for a bad frame, and
the rate. An integrator may also authenticate on the upgrade request
(``Authorization: Bearer``), and then sends no hello; its resume point (v1.1)
is then the request's ``resumeAfter`` query parameter.

An endpoint may have a ``Guard`` against guessing: a hello from an address
that failed too often is closed with 4429 unchecked, and a hello whose
credential is wrong counts as a failure of its address. The integrator
endpoint has one; the agent endpoint has none (``app`` says why).
"""

from __future__ import annotations

import logging
import re
import secrets
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import msgspec
from websockets.http11 import Request, Response

from ..protocol import Effect, Engine, Send
from ..protocol.engine import TOO_DEEP
from ..protocol import frames as f
from ..protocol.vocabulary import (
    CLOSE_AUTH_THROTTLED,
    CLOSE_RATE_LIMITED,
    CLOSE_UNAUTHORIZED,
    AgentErrorCode,
    ErrorMessage,
    MsdynName,
)
from .auth import AgentTokens, ApiKeys
from .clock import Cancellable, Clock
from .connection import Connection
from .dispatch import Dispatcher
from .metrics import EndpointCounts
from .web import plain

__all__ = ["Endpoint", "Guard", "Session", "agent_endpoint", "integrator_endpoint"]

log = logging.getLogger("deskpush")


def decode(decoder: msgspec.json.Decoder, data: bytes) -> Any:
    """``decoder.decode(data)``, with JSON nested too deeply as one more ``DecodeError``.

    msgspec decodes nested arrays and objects (in ``templateParameters``'
    values, or in an unknown field it skips) recursively, under Python's
    recursion limit: about 1,000 levels, 2 KB of ``[``, raise
    ``RecursionError``. That is bad input like any other, not a bug of the
    server, so it gets the endpoint's error frame (or 4401 before the hello)
    like any frame that does not decode, and nothing is logged.
    """
    try:
        return decoder.decode(data)
    except RecursionError:
        raise msgspec.DecodeError(TOO_DEEP) from None


class Bucket:
    """Token bucket: ``rate`` frames per second with ``burst`` in reserve; times in epoch ms."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate / 1000.0
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class Guard(Protocol):
    """Failed authentications by the address of a connection (``app`` keeps the table)."""

    def refused_for(self, conn: Connection) -> float:
        """Seconds until ``conn``'s address may try to authenticate again (0: now)."""

    def failed(self, conn: Connection) -> None:
        """``conn`` presented a credential, and it was wrong."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What an endpoint's sessions do with their messages. See the module docstring."""

    name: str
    decoder: msgspec.json.Decoder
    hello: type
    #: The identity a hello proves (agent id, integrator name), or None.
    authenticate: Callable[[Any], str | None]
    #: The engine event for an authenticated session: (connection, identity, its hello or None, now).
    connected: Callable[[Connection, str, Any, float], list[Effect]]
    frame: Callable[[Connection, Any, float], list[Effect]]
    disconnected: Callable[[Connection, float], list[Effect]]
    #: The error frame for a message that does not decode.
    bad_frame: Callable[[bytes, msgspec.MsgspecError], f.Outbound]
    rate: float
    burst: float
    hello_timeout: float
    #: An identity proved by the upgrade request itself, or None (then a hello is due).
    identity_of_request: Callable[[Request], str | None] = lambda request: None
    #: Against guessing credentials in hellos, or None.
    guard: Guard | None = None


class Session:
    """One open WebSocket connection on an endpoint."""

    __slots__ = ("conn", "endpoint", "dispatcher", "clock", "identity", "bucket", "hello_timer", "hello_deadline",
                 "on_authenticated", "counts")

    def __init__(self, conn: Connection, endpoint: Endpoint, dispatcher: Dispatcher, clock: Clock, *,
                 accepted_at: float | None = None,
                 on_authenticated: Callable[[Connection], None] | None = None,
                 counts: EndpointCounts | None = None) -> None:
        """Start the session of ``conn``, which just opened.

        Args:
            accepted_at: when the TCP connection was accepted (epoch ms; None:
                now). The endpoint's ``hello_timeout`` counts from there, so the
                handshake and the hello share one bound.
            on_authenticated: called with ``conn`` once it has proved who it is.
            counts: where its messages and its authentication are counted for
                the metrics (None: not counted).
        """
        self.conn = conn
        self.endpoint = endpoint
        self.dispatcher = dispatcher
        self.clock = clock
        self.on_authenticated = on_authenticated
        self.counts = counts
        now = clock.now()
        self.bucket = Bucket(endpoint.rate, endpoint.burst, now)
        self.hello_timer: Cancellable | None = None
        self.hello_deadline = (now if accepted_at is None else accepted_at) + endpoint.hello_timeout * 1000.0
        assert conn.request is not None
        self.identity = endpoint.identity_of_request(conn.request)
        if self.identity is None:
            self.hello_timer = clock.call_at(self.hello_deadline, self._hello_timed_out)
        else:
            self._authenticated(self.identity, None, now)

    def message(self, data: bytes) -> None:
        counts = self.counts
        if counts is not None:
            counts.frames_in += 1
        now = self.clock.now()
        if self.identity is None:
            self._hello(data, now)  # one message, whatever it is: no rate to limit
            return
        if not self.bucket.take(now):
            self.conn.close(*CLOSE_RATE_LIMITED)
            return
        endpoint = self.endpoint
        try:
            frame = decode(endpoint.decoder, data)
        except msgspec.MsgspecError as exc:
            self.dispatcher.apply([Send((self.conn,), endpoint.bad_frame(data, exc))])
            return
        self.dispatcher.apply(endpoint.frame(self.conn, frame, now))

    def closed(self) -> None:
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        if self.identity is not None:
            self.dispatcher.apply(self.endpoint.disconnected(self.conn, self.clock.now()))
            log.debug("%s %s disconnected", self.endpoint.name, self.identity)

    def _hello(self, data: bytes, now: float) -> None:
        endpoint = self.endpoint
        if now > self.hello_deadline:
            # Late, though its timer has not run yet (a busy loop handles the
            # bytes of an iteration before its timers): as late as no hello.
            self.conn.close(*CLOSE_UNAUTHORIZED)
            return
        guard = endpoint.guard
        if guard is not None and guard.refused_for(self.conn) > 0:
            self.conn.close(*CLOSE_AUTH_THROTTLED)
            return
        try:
            hello = decode(endpoint.decoder, data)
        except msgspec.MsgspecError:
            hello = None
        presented = type(hello) is endpoint.hello
        identity = endpoint.authenticate(hello) if presented else None
        if identity is None:
            if presented and guard is not None:
                guard.failed(self.conn)
            self.conn.close(*CLOSE_UNAUTHORIZED)
            return
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        self.identity = identity
        self._authenticated(identity, hello, now)

    def _authenticated(self, identity: str, hello: Any, now: float) -> None:
        if self.on_authenticated is not None:
            self.on_authenticated(self.conn)
        if self.counts is not None:
            self.counts.sessions += 1
        self.dispatcher.apply(self.endpoint.connected(self.conn, identity, hello, now))
        log.debug("%s %s connected from %s", self.endpoint.name, identity, self.conn.remote_address)

    def _hello_timed_out(self) -> None:
        self.hello_timer = None
        if self.identity is None:
            self.conn.close(*CLOSE_UNAUTHORIZED)


# --------------------------------------------------------------------------
# The two endpoints


def agent_endpoint(engine: Engine, tokens: AgentTokens, *, rate: float, burst: float,
                   hello_timeout: float) -> Endpoint:
    """``/agent``: a desktop session, authenticated by the agent's JWT in its hello."""

    def connected(conn: Connection, agent_id: str, hello: Any, now: float) -> list[Effect]:
        return engine.agent_connected(conn, agent_id, secrets.token_hex(8), now)

    return Endpoint(
        name="agent",
        decoder=f.AGENT_DECODER,
        hello=f.AgentHello,
        authenticate=lambda hello: tokens.verify(hello.token),
        connected=connected,
        frame=engine.agent_frame,
        disconnected=engine.agent_disconnected,
        bad_frame=agent_bad_frame,
        rate=rate,
        burst=burst,
        hello_timeout=hello_timeout,
    )


def integrator_endpoint(engine: Engine, keys: ApiKeys, *, rate: float, burst: float,
                        hello_timeout: float, guard: Guard | None = None) -> Endpoint:
    """``/integrator``: an API key, on the upgrade request (Bearer) or in the hello."""

    def connected(conn: Connection, integrator: str, hello: f.IntegratorHello | None, now: float) -> list[Effect]:
        resume = hello.resume_after if hello is not None else None
        if resume is None:
            assert conn.request is not None
            resume = resume_point(conn.request)
        return engine.integrator_connected(conn, integrator, now, resume)

    return Endpoint(
        name="integrator",
        decoder=f.INTEGRATOR_DECODER,
        hello=f.IntegratorHello,
        authenticate=lambda hello: keys.check(hello.api_key),
        connected=connected,
        frame=engine.integrator_frame,
        disconnected=engine.integrator_disconnected,
        bad_frame=integrator_bad_frame,
        rate=rate,
        burst=burst,
        hello_timeout=hello_timeout,
        identity_of_request=lambda request: keys.check_bearer(request.headers.get("Authorization")),
        guard=guard,
    )


def refuse_bad_bearer(keys: ApiKeys, request: Request) -> Response | None:
    """401 for an upgrade request to ``/integrator`` with a wrong ``Authorization`` header."""
    header = request.headers.get("Authorization")
    if header is not None and keys.check_bearer(header) is None:
        return plain(HTTPStatus.UNAUTHORIZED, f"{ErrorMessage.UNAUTHORIZED}\n",
                     [("WWW-Authenticate", 'Bearer realm="deskpush"')])
    return None


_RESUME_POINT = re.compile(r"\$|[0-9]{13}-[0-9]{6}")  # frames.ResumePoint


def resume_point(request: Request) -> str | None:
    """The ``resumeAfter`` query parameter of an upgrade request (None if absent or malformed)."""
    query = request.path.partition("?")[2]
    if "resumeAfter" not in query:
        return None
    values = urllib.parse.parse_qs(query).get("resumeAfter")
    if not values or len(values) > 1 or not _RESUME_POINT.fullmatch(values[0]):
        return None
    return values[0]


def refuse_bad_resume_point(request: Request) -> Response | None:
    """400 for an upgrade request to ``/integrator`` whose ``resumeAfter`` is not an outcomeId or ``$``."""
    query = request.path.partition("?")[2]
    if "resumeAfter" in query and resume_point(request) is None:
        return plain(HTTPStatus.BAD_REQUEST, "resumeAfter must be an outcomeId (as 1764460800123-000004) or $\n")
    return None


def _decode_error(exc: msgspec.MsgspecError) -> str:
    return str(exc) if isinstance(exc, msgspec.ValidationError) else f"malformed JSON: {exc}"


def agent_bad_frame(raw: bytes, exc: msgspec.MsgspecError) -> f.AgentError:
    """BadFrame for an agent frame that failed to decode, naming the field."""
    return f.AgentError(code=AgentErrorCode.BAD_FRAME, message=_decode_error(exc))


def integrator_bad_frame(raw: bytes, exc: msgspec.MsgspecError) -> f.IntegratorError:
    """RejectAfterClientError for a frame that failed to decode.

    The frame is parsed again leniently only to find its requestId and type,
    so the integrator's pending promise can be rejected; msgspec's message
    names the bad field (``... - at `$.input.templateName```).
    """
    request_id = None
    name = MsdynName.NOTIFY_EVENT
    try:
        obj = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        rid = obj.get("requestId")
        if isinstance(rid, str) and 0 < len(rid) <= 128:
            request_id = rid
        if obj.get("type") == "cancelEvent":
            name = MsdynName.CANCEL_EVENT
        elif obj.get("type") == "templates":
            name = MsdynName.LIST_TEMPLATES
    return f.IntegratorError(
        request_id=request_id,
        error=f.ErrorBody(message=ErrorMessage.REJECT_AFTER_CLIENT, msdyn_name=name, details=_decode_error(exc)),
    )
