"""The Python SDK for integrators: ``Integrator``, deskpush's integrator endpoint from asyncio.

It speaks the integrator side of wire protocol v1.1 (``docs/protocol.md``) and
mirrors CIF 2.0's ``Microsoft.CIFramework.notifyEvent`` / ``cancelEvent``::

    async with Integrator("ws://127.0.0.1:8765/integrator", api_key, agent_id="agent-7") as ig:
        try:
            value = await ig.notify_event(
                {"templateName": "msdyn_chat_incoming_unauthenticated",
                 "templateParameters": {"customerName": "Jane"}},
                correlation_id="case-42",
            )
        except CIFError as err:          # CIF's error callback: err.message, err.msdyn_name
            ...
        value  # {"actionName": "Accept", "responseReason": "Accept"}

One connection carries every call. A single reader task, started in
``__aenter__`` and cancelled and awaited in ``__aexit__`` (it lives in an
``asyncio.TaskGroup`` owned by the ``async with`` block), reads the server's
frames and completes the waiting call by ``requestId``. It also does the
reconnecting, so the order of everything the server sends is the order in
which calls are settled.

Connection loss
---------------
Every connection opts in to protocol v1.1 (outcomes across reconnects): it
asks for ``/integrator?resumeAfter=<position>``, where the position is ``$``
("from now") on the first connection, or the ``resume_after`` the Integrator
was made with (a process that stored its position), and afterwards the last
``outcomeId`` received. The server first replays, in order, every
notifyEvent ``result`` of the API key after that position, then sends
``resumed``. A connection is *ready* (calls go out on it) only once
``resumed`` has arrived; calls made before that wait for it.

If the connection drops (anything but a 4401/401 refusal of the key or the
Integrator being closed; a close with 1001 "going away" or 1012 "service
restart" is a drop like any other), pending notifyEvent and cancelEvent calls
stay pending. The reader reconnects with exponential backoff and jitter
within the bounds of a :class:`Reconnect` policy and resumes after the last
outcomeId it received. Replayed results settle the calls they answer (a
requestId settles at most once). Then, according to ``resumed``:

* ``complete: true``: every call still unanswered is sent again with the same
  ``requestId``. The server recognises the requestId on a v1.1 connection: a
  notification still pending answers with its ``status`` (no second offer to
  the agent), one that has ended with its ``result`` again, and a request it
  never received is taken as new. So nothing is offered twice and nothing is
  lost.
* ``complete: false``: the server's history no longer reaches back to the
  position (outcomes were forgotten by count, age or ack, or the server
  restarted without ``server.stateFile``), so a pending notifyEvent may have
  ended unseen. It fails with :class:`OutcomeUnknownError`, whose ``details``
  are the server's explanation and whose ``notification_id`` and
  ``cancellation_token`` are set when a ``status`` had named them (the
  notification may still run: it can be cancelled with that token). Pending
  cancelEvents are sent again: cancelling twice gives the same answer.

One drop is not followed by a resend: a close with 1009 means the server
refused a frame as too large, and sending it again would close every new
connection the same way; the largest request pending on that connection (at
least as large as the refused one) fails with ``RejectAfterClientError``.

If reconnecting gives up, the waiting calls and every later call raise
:class:`IntegratorConnectionError` (open a new ``Integrator`` to try again;
given ``resume_after=ig.last_outcome_id`` it picks up where this one was,
and the outcomes of this one's calls reach its ``on_outcome``).

A routing system that outlives its process stores :attr:`last_outcome_id`
(for instance after handling each outcome), passes it as ``resume_after`` to
the next process's Integrator, and handles in ``on_outcome`` the outcomes of
requests the earlier process made: ``on_outcome`` sees every distinct outcome
that reaches this Integrator, replayed or live, whether or not one of its own
calls waits for it. :meth:`ack` tells the server what it may forget.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import random
import secrets
import socket
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from ..protocol.vocabulary import CloseCode, ErrorMessage, MsdynName

__all__ = [
    "Integrator",
    "Reconnect",
    "Status",
    "Resumed",
    "CIFError",
    "OutcomeUnknownError",
    "IntegratorError",
    "IntegratorConnectionError",
    "UnauthorizedError",
    "RESUME_NOW",
]

log = logging.getLogger("deskpush.integrator")

REJECT_AFTER_CLIENT = ErrorMessage.REJECT_AFTER_CLIENT.value
OUTCOME_UNKNOWN = ErrorMessage.OUTCOME_UNKNOWN.value
NOTIFY_EVENT, CANCEL_EVENT = MsdynName.NOTIFY_EVENT.value, MsdynName.CANCEL_EVENT.value

#: The resume position of a client with none yet: "replay nothing, start me now".
RESUME_NOW = "$"

# How many outcomeIds are remembered to recognise one received again (the
# answer to a request sent again after a reconnect can repeat an outcome that
# was just broadcast). Repeats arrive within a round trip of the original.
_SEEN_OUTCOMES = 10_000


# --------------------------------------------------------------------------
# Errors


class CIFError(Exception):
    """The server refused a notifyEvent or cancelEvent: CIF 2.0's error object.

    ``message`` is the error name (``NotificationTemplateNotFoundError``,
    ``AgentNotConnectedError``, ``CancellationTokenNotFoundError``, ...),
    ``msdyn_name`` the API (``NotifyEvent`` or ``CancelEvent``), ``details``
    the server's explanation.
    """

    def __init__(
        self,
        message: str,
        msdyn_name: str,
        details: str = "",
        *,
        notification_id: str | None = None,
        cancellation_token: str | None = None,
    ) -> None:
        super().__init__(message, msdyn_name, details)
        self.message = message
        self.msdyn_name = msdyn_name
        self.details = details
        self.notification_id = notification_id
        self.cancellation_token = cancellation_token

    def __str__(self) -> str:
        text = f"{self.message} ({self.msdyn_name})"
        return f"{text}: {self.details}" if self.details else text

    def to_dict(self) -> dict[str, str]:
        """The object CIF passes to a rejected promise's handler."""
        out = {"message": self.message, "msdyn_name": self.msdyn_name}
        if self.details:
            out["details"] = self.details
        return out


class OutcomeUnknownError(CIFError):
    """A notifyEvent pending across a reconnect whose outcome the server can no longer replay.

    Made by this client, never sent by the server: after a drop, the server
    answered the resume with ``resumed`` ``complete: false`` (its history of
    outcomes no longer reaches back to where this client stood), so the
    notification may have ended unseen. ``message`` is ``OutcomeUnknownError``,
    ``msdyn_name`` ``NotifyEvent``, ``details`` the server's reason. The
    notification may still be pending on the server: ``cancellation_token``
    (when known) can cancel it.
    """

    def __init__(self, details: str = "", *, notification_id: str | None = None,
                 cancellation_token: str | None = None) -> None:
        super().__init__(OUTCOME_UNKNOWN, NOTIFY_EVENT, details,
                         notification_id=notification_id, cancellation_token=cancellation_token)


class IntegratorError(Exception):
    """The client cannot talk to the server (as opposed to a refused request)."""


class IntegratorConnectionError(IntegratorError):
    """Cannot connect, or the connection was lost and could not be re-established."""


class UnauthorizedError(IntegratorError):
    """The server refused the API key (HTTP 401 on the upgrade). Never retried."""


# --------------------------------------------------------------------------
# Inbound frames (the integrator side of protocol v1.1)


class _In(msgspec.Struct, tag_field="type", rename="camel", frozen=True, kw_only=True):
    pass


class Status(_In, tag="status"):
    """Progress of a notifyEvent, given to ``on_status``: ``state`` is "queued" or "displayed"."""

    request_id: str
    notification_id: str
    cancellation_token: str
    state: str


class Resumed(_In, tag="resumed"):
    """The end of a resume, given to ``on_resumed`` once per connection.

    ``count`` results were replayed just before it; ``complete`` is False when
    the server's history did not reach back to the resume point (``details``
    says why); ``last_outcome_id`` is where this client stands now.
    """

    count: int
    complete: bool
    last_outcome_id: str
    details: str = ""


class _Result(_In, tag="result"):
    request_id: str
    value: dict[str, Any]
    outcome_id: str | None = None  # a notifyEvent's outcome; None for a cancelEvent's answer


class _ErrorBody(msgspec.Struct, frozen=True):
    message: str
    msdyn_name: str = ""
    details: str = ""


class _Error(_In, tag="error"):
    error: _ErrorBody
    request_id: str | None = None


_DECODER = msgspec.json.Decoder(Union[Status, Resumed, _Result, _Error])
_encode = msgspec.json.Encoder().encode


# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reconnect:
    """How hard to try to re-establish a dropped connection.

    Attempt ``n`` (from 0) waits ``min(maximum, initial * factor**n)`` seconds
    with "equal jitter" (a uniformly random value between half of that and all
    of it), then connects and resumes. Reconnecting gives up after
    ``attempts`` failed attempts or once ``timeout`` seconds have passed since
    the drop, whichever comes first (``None``: no such bound). A 401 is never
    retried.
    """

    attempts: int | None = 10
    timeout: float | None = 60.0
    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return base / 2 + random.uniform(0, base / 2)


@dataclass(eq=False)
class _Pending:
    """A call waiting for its answer, with what it sent, to send it again after a reconnect."""

    kind: str  # "notify" or "cancel"
    data: str  # the request frame, requestId included: resent as it is
    future: asyncio.Future[dict[str, Any]]
    on_status: Callable[[Status], Any] | None = None
    notification_id: str | None = None
    cancellation_token: str | None = None
    connection: int = 0  # the connection it was last sent on (Integrator.connects at the time)


def normalize_url(url: str) -> str:
    """``http(s)://`` becomes ``ws(s)://``; a URL with no path gets ``/integrator``."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/integrator"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def resume_url(url: str, position: str) -> str:
    """``url`` with ``resumeAfter=position`` in its query (replacing one already there).

    ``$`` and the outcomeIds (digits and ``-``) need no escaping; anything else
    a caller stored is escaped.
    """
    parts = urllib.parse.urlsplit(url)
    query = [kv for kv in parts.query.split("&") if kv and kv.partition("=")[0] != "resumeAfter"]
    query.append("resumeAfter=" + urllib.parse.quote(position, safe="$-"))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "&".join(query), parts.fragment))


def _describe_oserror(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    text = str(exc)
    # asyncio joins the errors of several addresses (localhost: ::1 and 127.0.0.1).
    refused = f"[Errno {errno.ECONNREFUSED}]"
    if text.startswith("Multiple exceptions") and text.count("[Errno") == text.count(refused):
        return "connection refused"
    return (exc.strerror.lower() if exc.strerror else text) or type(exc).__name__


def _call_quietly(callback: Callable[..., Any], *args: Any) -> None:
    """Run a user callback from the reader task: its exception must not end the reader."""
    try:
        callback(*args)
    except Exception:
        log.exception("%s callback failed", getattr(callback, "__name__", "a"))


class Integrator:
    """An integrator connection to deskpush: ``notify_event``, ``cancel_event`` and ``ack``.

    Args:
        url: the integrator endpoint (``ws://HOST:PORT/integrator``; a URL
            without a path gets ``/integrator``).
        api_key: sent as ``Authorization: Bearer <key>`` on every (re)connect.
        agent_id: the default target agent.
        reconnect: bounds reconnecting after a drop (``None``: do not
            reconnect; pending and later calls then fail once the connection
            is gone).
        resume_after: where the first connection resumes: an outcomeId a
            previous process stored (its ``last_outcome_id``), so the outcomes
            it missed are replayed to ``on_outcome``. Default ``"$"``: from now.
        on_outcome: ``on_outcome(request_id, value, outcome_id)``, called once
            per distinct outcomeId received, replayed or live, whether a call
            of this Integrator waits for it or not (an earlier process's
            request; another connection's of the same key whose connection
            was gone). Called from the reader task before the call it answers
            is settled; keep it quick.
        on_resumed: called with each connection's :class:`Resumed`, once that
            connection is ready (the first one included).
        on_lost: called with a description when a connection drops and
            reconnecting starts.
        open_timeout: seconds to open a connection, and to wait for each
            frame of its replay and for ``resumed``.
        close_timeout: seconds to wait for the closing handshake.

    Opening the first connection is not retried: ``__aenter__`` raises
    :class:`UnauthorizedError` or :class:`IntegratorConnectionError` at once
    (also when the server sends no ``resumed``: it does not speak v1.1).

    Not thread-safe: use it from the event loop that opened it.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        agent_id: str | None = None,
        reconnect: Reconnect | None = Reconnect(),
        resume_after: str | None = None,
        on_outcome: Callable[[str, dict[str, Any], str], Any] | None = None,
        on_resumed: Callable[[Resumed], Any] | None = None,
        on_lost: Callable[[str], Any] | None = None,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
    ) -> None:
        if not api_key:
            raise ValueError("an API key is required")
        self.url = normalize_url(url)
        self.agent_id = agent_id
        self._api_key = api_key
        self._reconnect = reconnect
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._on_outcome = on_outcome
        self._on_resumed = on_resumed
        self._on_lost = on_lost
        # The server is idempotent by requestId per API key (and remembers one
        # as long as its outcome), so requestIds must be unique across every
        # process using the key: 64 random bits per Integrator, then a counter.
        self._prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._last_outcome_id = resume_after if resume_after != RESUME_NOW else None
        self._seen: OrderedDict[str, None] = OrderedDict()  # recent outcomeIds, oldest first
        self._ws: ClientConnection | None = None  # set while a connection is ready
        self._ready = asyncio.Event()  # set while ready, or once failed/closed
        self._failure: IntegratorError | None = None
        self._closing = False
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        """How many connections became ready (1 + successful reconnects)."""

    # ------------------------------------------------------------------
    # Lifecycle

    async def __aenter__(self) -> Integrator:
        if self._tg is not None:
            raise RuntimeError("an Integrator can be entered once")
        ws, resumed = await self._open(self._open_timeout)
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        await self._resume(ws, resumed)  # nothing pending yet: it only makes ws the ready connection
        self._task = tg.create_task(self._supervise(ws), name="deskpush-integrator-reader")
        return self

    async def __aexit__(self, et: Any, exc: BaseException | None, tb: Any) -> None:
        self._closing = True
        self._ready.set()
        if self._task is not None:
            self._task.cancel()
        ws = self._ws
        try:
            if ws is not None:
                await ws.close()
        finally:
            try:
                # The body's own exception is not handed to the task group, which
                # would wrap it in an ExceptionGroup; cancellation and
                # BaseExceptions are, so it propagates them correctly.
                passed = (et, exc, tb) if exc is not None and not isinstance(exc, Exception) else (None, None, None)
                assert self._tg is not None
                await self._tg.__aexit__(*passed)
            finally:
                self._ws = None
                self._fail_pending(IntegratorConnectionError("the Integrator was closed"))

    @property
    def connected(self) -> bool:
        """Whether a connection is ready (resumed), so calls go out at once."""
        return self._ws is not None

    @property
    def last_outcome_id(self) -> str | None:
        """Where this client stands in its API key's outcomes: what to resume after.

        The last outcomeId received (from a ``result`` or from ``resumed``);
        ``None`` before the first connection when no ``resume_after`` was
        given. Store it to resume from it in another process.
        """
        return self._last_outcome_id

    async def wait_connected(self) -> None:
        """Wait for a ready connection (e.g. after a drop); raises if reconnecting gave up."""
        await self._connection()

    # ------------------------------------------------------------------
    # CIF API

    async def notify_event(
        self,
        input: Mapping[str, Any],
        correlation_id: str | None = None,
        cancellation_token: str | None = None,
        *,
        agent_id: str | None = None,
        progress: bool = True,
        on_status: Callable[[Status], Any] | None = None,
    ) -> dict[str, Any]:
        """Offer a notification to an agent and wait for its one outcome.

        ``input`` is CIF's notifyEvent input: ``templateName``,
        ``templateParameters`` and optionally ``cancellationToken``. The target
        is ``agent_id``, else ``input["agentId"]``, else the Integrator's
        ``agent_id``.

        Returns:
            CIF's value, e.g. ``{"actionName": "Accept", "responseReason": "Accept"}``.

        Raises:
            CIFError: the server refused the request.
            OutcomeUnknownError: the connection dropped and the server could
                no longer replay this call's outcome (see the module docstring).
            IntegratorConnectionError: reconnecting gave up, or the Integrator
                was closed.

        ``on_status`` is called (from the reader task; keep it quick) with a
        :class:`Status` when the notification is queued and when it is
        displayed, and with the current state again when the request is sent
        again after a reconnect. ``progress=False`` asks for no status frames.
        """
        if not isinstance(input, Mapping):
            raise CIFError(REJECT_AFTER_CLIENT, NOTIFY_EVENT, "input must be an object - at `$.input`")
        target = agent_id or input.get("agentId") or self.agent_id
        if not target:
            raise CIFError(REJECT_AFTER_CLIENT, NOTIFY_EVENT,
                           "no agentId: pass agent_id or set it on the Integrator - at `$.agentId`")
        frame: dict[str, Any] = {"type": "notifyEvent", "requestId": "", "agentId": target, "input": dict(input)}
        if cancellation_token is not None:
            frame["cancellationToken"] = cancellation_token
        if correlation_id is not None:
            frame["correlationId"] = correlation_id
        if not progress:
            frame["progress"] = False
        token = cancellation_token or input.get("cancellationToken")
        return await self._call("notify", frame, on_status, token if isinstance(token, str) else None)

    async def cancel_event(self, cancellation_token: str, correlation_id: str | None = None) -> dict[str, Any]:
        """Withdraw the notification holding ``cancellation_token``.

        Returns CIF's value ``{"cancellationToken", "actionName",
        "responseReason"}``: ``Cancel/CancelledByIntegrator`` when the cancel
        won, otherwise the outcome that had already happened. Raises
        :class:`CIFError` (``CancellationTokenNotFoundError``, ``CancelEvent``)
        for an unknown token. Cancelling is idempotent, so a cancel pending
        when the connection drops is sent again once reconnected.
        """
        frame: dict[str, Any] = {"type": "cancelEvent", "requestId": "", "cancellationToken": cancellation_token}
        if correlation_id is not None:
            frame["correlationId"] = correlation_id
        return await self._call("cancel", frame, None, cancellation_token)

    async def ack(self, outcome_id: str | None = None) -> None:
        """Tell the server every outcome of this API key up to ``outcome_id`` is stored.

        The server may then forget them before its retention would. Default:
        :attr:`last_outcome_id`. With several consumers of one API key, ack
        only what all of them have stored. There is no answer; an ack lost
        with a dropped connection is not sent again (the next one covers it).

        Raises:
            ValueError: no ``outcome_id`` and none received yet.
        """
        outcome_id = outcome_id if outcome_id is not None else self._last_outcome_id
        if outcome_id is None:
            raise ValueError("nothing to ack: no outcomeId received yet")
        ws = await self._connection()
        try:
            await ws.send(_encode({"type": "ack", "outcomeId": outcome_id}).decode())
        except ConnectionClosed:
            log.info("ack %s not sent: the connection dropped", outcome_id)

    # ------------------------------------------------------------------
    # Requests

    async def _call(
        self, kind: str, frame: dict[str, Any], on_status: Callable[[Status], Any] | None, token: str | None
    ) -> dict[str, Any]:
        ws = await self._connection()
        # No await between getting the ready connection and registering the
        # call: a reconnect either happened before (we waited for it) or
        # resends this call after.
        request_id = f"{self._prefix}-{next(self._ids)}"
        frame["requestId"] = request_id
        name = NOTIFY_EVENT if kind == "notify" else CANCEL_EVENT
        try:
            data = _encode(frame).decode()
        except (TypeError, ValueError, OverflowError) as exc:
            raise CIFError(REJECT_AFTER_CLIENT, name, f"cannot encode the request as JSON: {exc}") from None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(kind, data, future, on_status, cancellation_token=token,
                                             connection=self.connects)
        try:
            try:
                await ws.send(data)
            except ConnectionClosed:
                pass  # maybe sent, maybe not: the reader sends it again after resuming
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def _connection(self) -> ClientConnection:
        """The ready connection, waiting for it during a reconnect."""
        if self._tg is None:
            raise RuntimeError("use 'async with Integrator(...) as ig'")
        while True:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise IntegratorConnectionError("the Integrator was closed")
            if self._ws is not None:
                return self._ws
            await self._ready.wait()

    def _settle(self, request_id: str, value: dict[str, Any] | None = None, error: Exception | None = None) -> None:
        """Complete the call of ``request_id``, if one waits: the one place a call is settled."""
        p = self._pending.pop(request_id, None)
        if p is None or p.future.done():
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(value)  # type: ignore[arg-type]

    def _fail_pending(self, error: Exception) -> None:
        for request_id in list(self._pending):
            self._settle(request_id, error=error)

    # ------------------------------------------------------------------
    # Frames

    def _dispatch(self, frame: Status | Resumed | _Result | _Error) -> None:
        """Handle one frame from the server (a connection's ``resumed`` is its opener's)."""
        match frame:
            case _Result(request_id=request_id, value=value, outcome_id=outcome_id):
                if outcome_id is not None and self._new_outcome(outcome_id):
                    self._last_outcome_id = outcome_id
                    if self._on_outcome is not None:
                        _call_quietly(self._on_outcome, request_id, value, outcome_id)
                # A result nobody waits for (another process's request, or a
                # repeat of one already settled) settles nothing.
                self._settle(request_id, value)
            case Status():
                p = self._pending.get(frame.request_id)
                if p is None:
                    return
                p.notification_id = frame.notification_id
                p.cancellation_token = frame.cancellation_token
                if p.on_status is not None:
                    _call_quietly(p.on_status, frame)
            case _Error(error=body, request_id=None):
                log.warning("server error without requestId: %s (%s): %s", body.message, body.msdyn_name, body.details)
            case _Error(error=body, request_id=request_id) if (p := self._pending.get(request_id)) is not None:
                default_name = NOTIFY_EVENT if p.kind == "notify" else CANCEL_EVENT
                self._settle(request_id, error=CIFError(
                    body.message, body.msdyn_name or default_name, body.details,
                    notification_id=p.notification_id, cancellation_token=p.cancellation_token,
                ))
            case Resumed():
                log.debug("ignoring a second resumed frame: %r", frame)

    def _new_outcome(self, outcome_id: str) -> bool:
        """Whether ``outcome_id`` was not received before (then remember it)."""
        seen = self._seen
        if outcome_id in seen:
            return False
        seen[outcome_id] = None
        if len(seen) > _SEEN_OUTCOMES:
            seen.popitem(last=False)
        return True

    # ------------------------------------------------------------------
    # The reader task

    async def _supervise(self, ws: ClientConnection) -> None:
        """Read frames; after a drop, reconnect and resume (bounded) or fail for good."""
        try:
            while True:
                await self._read(ws)
                self._ws = None
                if self._closing:
                    return
                self._ready.clear()
                if ws.close_code == CloseCode.UNAUTHORIZED:
                    raise UnauthorizedError(f"unauthorized: the server closed the connection with {ws.close_code}")
                if ws.close_code == CloseCode.MESSAGE_TOO_BIG:
                    self._refuse_too_big(ws)
                what = f"connection to {self.url} lost (close code {ws.close_code}" + (
                    f" {ws.close_reason})" if ws.close_reason else ")")
                if self._reconnect is None:
                    raise IntegratorConnectionError(f"{what}; reconnecting is off")
                log.warning("%s; reconnecting, %d call(s) pending", what, len(self._pending))
                if self._on_lost is not None:
                    _call_quietly(self._on_lost, what)
                ws, resumed = await self._reconnect_loop(self._reconnect)
                await self._resume(ws, resumed)
                log.info("reconnected to %s and resumed (%d replayed, complete=%s)",
                         self.url, resumed.count, resumed.complete)
        except IntegratorError as exc:
            self._fail(exc)
        except BaseException as exc:
            # A bug or a cancellation: nobody must wait forever; the task group
            # (owned by the ``async with``) gets the exception.
            if not self._closing:
                self._fail(IntegratorConnectionError(f"the reader task ended: {exc!r}"))
            raise

    def _fail(self, exc: IntegratorError) -> None:
        self._failure = exc
        self._ws = None
        self._ready.set()
        self._fail_pending(exc)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            while True:
                frame = self._decode(await ws.recv(decode=False))
                if frame is not None:
                    self._dispatch(frame)
        except ConnectionClosed:
            pass

    @staticmethod
    def _decode(raw: bytes) -> Status | Resumed | _Result | _Error | None:
        try:
            return _DECODER.decode(raw)
        except msgspec.MsgspecError as exc:
            # A frame type from a newer server, or garbage: not ours to handle.
            log.debug("ignoring frame %r: %s", raw[:200], exc)
            return None

    def _refuse_too_big(self, ws: ClientConnection) -> None:
        """After a close 1009, fail the call whose request the server will never take.

        The server closes a connection when a frame is over its ``maxSize``;
        sending that request again would close every new connection the same
        way. The largest request pending on the closed connection is at least
        as big as the one that was refused, so it fails instead (usually it
        is that one).
        """
        sent_there = [(len(p.data), rid) for rid, p in self._pending.items() if p.connection == self.connects]
        if not sent_there:
            return
        _, request_id = max(sent_there)
        p = self._pending[request_id]
        self._settle(request_id, error=CIFError(
            REJECT_AFTER_CLIENT, NOTIFY_EVENT if p.kind == "notify" else CANCEL_EVENT,
            f"the request is larger than the server accepts (close {ws.close_code} {ws.close_reason})".rstrip(),
            notification_id=p.notification_id, cancellation_token=p.cancellation_token,
        ))

    # ------------------------------------------------------------------
    # Resuming

    async def _replay(self, ws: ClientConnection, timeout: float) -> Resumed:
        """Read a new connection's replayed results up to its ``resumed``, settling calls."""
        try:
            while True:
                async with asyncio.timeout(timeout):
                    raw = await ws.recv(decode=False)
                frame = self._decode(raw)
                if type(frame) is Resumed:
                    return frame
                if frame is not None:
                    self._dispatch(frame)
        except TimeoutError:
            raise IntegratorConnectionError(
                f"{self.url} sent no `resumed` within {timeout:g} s: is it deskpush's integrator endpoint, "
                "and does the server speak protocol v1.1?"
            ) from None
        except ConnectionClosed:
            if ws.close_code == CloseCode.UNAUTHORIZED:
                raise UnauthorizedError(f"unauthorized: the server closed the connection with {ws.close_code}") from None
            raise IntegratorConnectionError(
                f"connection to {self.url} closed while resuming (close code {ws.close_code})") from None

    async def _resume(self, ws: ClientConnection, resumed: Resumed) -> None:
        """Finish a resume: settle or send again what is pending, then make ``ws`` the ready one.

        Every call pending now was sent on an earlier connection (no call is
        registered before a connection is ready), and the replay has settled
        those whose outcome it carried.
        """
        self._last_outcome_id = resumed.last_outcome_id
        self.connects += 1
        if not resumed.complete:
            log.warning("%s: resumed incomplete, outcomes may be missing: %s", self.url,
                        resumed.details or "(no details)")
            for request_id, p in list(self._pending.items()):
                if p.kind == "notify":
                    self._settle(request_id, error=OutcomeUnknownError(
                        resumed.details, notification_id=p.notification_id,
                        cancellation_token=p.cancellation_token))
        # complete: every unanswered request again, same requestId (the server
        # knows it: status or the same result, no second offer). Incomplete:
        # what is left are cancels, which are always safe to repeat.
        for p in list(self._pending.values()):
            p.connection = self.connects
            try:
                await ws.send(p.data)
            except ConnectionClosed:
                break  # the reader sees the close at once and resumes again
        self._ws = ws
        self._ready.set()
        if self._on_resumed is not None:
            _call_quietly(self._on_resumed, resumed)

    # ------------------------------------------------------------------
    # Connecting

    async def _open(self, timeout: float) -> tuple[ClientConnection, Resumed]:
        """Connect, resuming after the last outcomeId, and read up to ``resumed``."""
        ws = await self._connect(resume_url(self.url, self._last_outcome_id or RESUME_NOW), timeout)
        try:
            return ws, await self._replay(ws, timeout)
        except BaseException:
            await ws.close()
            raise

    async def _connect(self, url: str, timeout: float) -> ClientConnection:
        path = urllib.parse.urlsplit(url).path.rstrip("/")
        if path.endswith("/agent"):
            # The agent endpoint takes the upgrade and then waits for an agent's
            # hello: without this, the mistake would show as a timeout.
            scheme, netloc, _, query, _ = urllib.parse.urlsplit(self.url)
            fixed = urllib.parse.urlunsplit((scheme, netloc, path[:-6] + "/integrator", query, ""))
            raise IntegratorConnectionError(
                f"{self.url} is the agent endpoint (for desktops), not the integrator endpoint: use {fixed}")
        try:
            return await connect(
                url,
                additional_headers={"Authorization": f"Bearer {self._api_key}"},
                open_timeout=timeout,
                close_timeout=self._close_timeout,
                compression=None,
                user_agent_header="deskpush-integrator",
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise UnauthorizedError(f"unauthorized: {self.url} refused the API key (HTTP {status})") from None
            # The server's one-line reason, e.g. a resumeAfter it cannot read (400).
            body = bytes(exc.response.body or b"").decode(errors="replace").strip().partition("\n")[0][:200]
            raise IntegratorConnectionError(
                f"cannot connect to {self.url}: HTTP {status} {exc.response.reason_phrase}".rstrip()
                + (f": {body}" if body else "")
            ) from None
        except InvalidURI as exc:
            raise IntegratorConnectionError(f"invalid URL {self.url!r}: {exc}") from None
        except TimeoutError:
            raise IntegratorConnectionError(f"cannot connect to {self.url}: timed out after {timeout:g} s") from None
        except OSError as exc:
            raise IntegratorConnectionError(f"cannot connect to {self.url}: {_describe_oserror(exc)}") from None
        except InvalidHandshake as exc:
            raise IntegratorConnectionError(f"cannot connect to {self.url}: WebSocket handshake failed: {exc}") from None

    async def _reconnect_loop(self, policy: Reconnect) -> tuple[ClientConnection, Resumed]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = None if policy.timeout is None else start + policy.timeout
        attempts = itertools.count() if policy.attempts is None else range(policy.attempts)
        tried = 0
        last: IntegratorError | None = None
        for attempt in attempts:
            delay = policy.delay(attempt)
            if deadline is not None and loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            timeout = self._open_timeout
            if deadline is not None:
                timeout = max(0.01, min(timeout, deadline - loop.time()))
            tried += 1
            try:
                return await self._open(timeout)
            except UnauthorizedError:
                raise
            except IntegratorConnectionError as exc:
                last = exc
                log.info("reconnect attempt %d to %s failed: %s", tried, self.url, exc)
        raise IntegratorConnectionError(
            f"connection to {self.url} lost; gave up reconnecting after {tried} attempt(s) in "
            f"{loop.time() - start:.1f} s" + (f" ({last})" if last else "")
        )
