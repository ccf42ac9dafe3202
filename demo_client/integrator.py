"""The Python SDK for integrators: ``Integrator``, deskpush's integrator endpoint from asyncio.

It speaks the integrator side of wire protocol v1 (``docs/protocol.md``) and
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
frames and completes the waiting call by ``requestId``.

Connection loss
---------------
If the connection drops, the reader reconnects with exponential backoff and
jitter, re-authenticating each time, within the bounds of a :class:`Reconnect`
policy (attempts and total time). While it does, new calls wait for it; if it
gives up, the waiting calls and every later call raise
:class:`IntegratorConnectionError` (open a new ``Integrator`` to try again).

A notifyEvent still pending when its connection drops cannot get its outcome
on the new connection: the server keeps running the notification (the agent
can still answer it, and it can still be cancelled with its cancellationToken
from the new connection, since tokens belong to the API key), but protocol v1
does not re-deliver outcomes; the server keeps them as "unclaimed" for a later
feature. Such a call therefore fails with ``CIFError("RejectAfterClientError",
"NotifyEvent", "connection lost before the outcome arrived; the notification
keeps running on the server")``; the error's ``notification_id`` and
``cancellation_token`` are set when a ``status`` frame had named them. A
pending cancelEvent, which is idempotent, is sent again after the reconnect.
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
    "CIFError",
    "IntegratorError",
    "IntegratorConnectionError",
    "UnauthorizedError",
    "LOST_DETAILS",
]

log = logging.getLogger("deskpush.integrator")

REJECT_AFTER_CLIENT = ErrorMessage.REJECT_AFTER_CLIENT.value
NOTIFY_EVENT, CANCEL_EVENT = MsdynName.NOTIFY_EVENT.value, MsdynName.CANCEL_EVENT.value

LOST_DETAILS = "connection lost before the outcome arrived; the notification keeps running on the server"


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


class IntegratorError(Exception):
    """The client cannot talk to the server (as opposed to a refused request)."""


class IntegratorConnectionError(IntegratorError):
    """Cannot connect, or the connection was lost and could not be re-established."""


class UnauthorizedError(IntegratorError):
    """The server refused the API key (HTTP 401 on the upgrade). Never retried."""


class _Lost(Exception):
    """Internal: a cancelEvent's connection dropped; send it again."""


# --------------------------------------------------------------------------
# Inbound frames (the integrator side of protocol v1)


class _In(msgspec.Struct, tag_field="type", rename="camel", frozen=True, kw_only=True):
    pass


class Status(_In, tag="status"):
    """Progress of a notifyEvent, given to ``on_status``: ``state`` is "queued" or "displayed"."""

    request_id: str
    notification_id: str
    cancellation_token: str
    state: str


class _Result(_In, tag="result"):
    request_id: str
    value: dict[str, Any]


class _ErrorBody(msgspec.Struct, frozen=True):
    message: str
    msdyn_name: str = ""
    details: str = ""


class _Error(_In, tag="error"):
    error: _ErrorBody
    request_id: str | None = None


_DECODER = msgspec.json.Decoder(Union[Status, _Result, _Error])
_encode = msgspec.json.Encoder().encode


# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reconnect:
    """How hard to try to re-establish a dropped connection.

    Attempt ``n`` (from 0) waits ``min(maximum, initial * factor**n)`` seconds
    with "equal jitter" (a uniformly random value between half of that and all
    of it), then connects. Reconnecting gives up after ``attempts`` failed
    attempts or once ``timeout`` seconds have passed since the drop, whichever
    comes first (``None``: no such bound). A 401 is never retried.
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
    kind: str  # "notify" or "cancel"
    future: asyncio.Future[dict[str, Any]]
    generation: int
    on_status: Callable[[Status], Any] | None = None
    notification_id: str | None = None
    cancellation_token: str | None = None


def normalize_url(url: str) -> str:
    """``http(s)://`` becomes ``ws(s)://``; a URL with no path gets ``/integrator``."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/integrator"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, parts.query, ""))


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


class Integrator:
    """An integrator connection to deskpush: ``notify_event`` and ``cancel_event``.

    ``url`` is the integrator endpoint (``ws://HOST:PORT/integrator``; a URL
    without a path gets ``/integrator``). ``api_key`` is sent as
    ``Authorization: Bearer <key>`` on every (re)connect. ``agent_id`` is the
    default target agent. ``reconnect`` bounds reconnecting after a drop
    (``None``: do not reconnect; calls then fail once the connection is gone).
    Opening the first connection is not retried: ``__aenter__`` raises
    :class:`UnauthorizedError` or :class:`IntegratorConnectionError` at once.

    Not thread-safe: use it from the event loop that opened it.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        agent_id: str | None = None,
        reconnect: Reconnect | None = Reconnect(),
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
        # requestIds are unique across this client's connections, so outcomes the
        # server keeps as unclaimed can be matched to their calls later.
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._ws: ClientConnection | None = None
        self._generation = 0
        self._ready = asyncio.Event()  # set while connected, or once failed/closed
        self._failure: IntegratorError | None = None
        self._closing = False
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        """How many connections were opened (1 + successful reconnects)."""

    # ------------------------------------------------------------------
    # Lifecycle

    async def __aenter__(self) -> Integrator:
        if self._tg is not None:
            raise RuntimeError("an Integrator can be entered once")
        ws = await self._open(self._open_timeout)
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        self._set_connection(ws)
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
        return self._ws is not None

    async def wait_connected(self) -> None:
        """Wait for a live connection (e.g. after a drop); raises if reconnecting gave up."""
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
        ``agent_id``. Returns CIF's value, e.g. ``{"actionName": "Accept",
        "responseReason": "Accept"}``; raises :class:`CIFError` when the server
        refuses the request, or when the connection drops before the outcome
        arrives (``RejectAfterClientError``, see the module docstring).
        ``on_status`` is called (from the reader task; keep it quick) with a
        :class:`Status` when the notification is queued and when it is
        displayed; ``progress=False`` asks the server for no status frames.
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
        # A notifyEvent is sent once: after a drop nobody knows whether it ran.
        return await self._call("notify", frame, on_status, token if isinstance(token, str) else None)

    async def cancel_event(self, cancellation_token: str, correlation_id: str | None = None) -> dict[str, Any]:
        """Withdraw the notification holding ``cancellation_token``.

        Returns CIF's value ``{"cancellationToken", "actionName",
        "responseReason"}``: ``Cancel/CancelledByIntegrator`` when the cancel
        won, otherwise the outcome that had already happened. Raises
        :class:`CIFError` (``CancellationTokenNotFoundError``, ``CancelEvent``)
        for an unknown token. Cancelling is idempotent, so a cancel whose
        connection drops is sent again once reconnected.
        """
        frame: dict[str, Any] = {"type": "cancelEvent", "requestId": "", "cancellationToken": cancellation_token}
        if correlation_id is not None:
            frame["correlationId"] = correlation_id
        while True:
            try:
                return await self._call("cancel", frame, None, cancellation_token)
            except _Lost:
                log.info("cancelEvent %s: connection lost, sending it again after reconnecting", cancellation_token)

    # ------------------------------------------------------------------
    # Requests

    async def _call(
        self, kind: str, frame: dict[str, Any], on_status: Callable[[Status], Any] | None, token: str | None
    ) -> dict[str, Any]:
        ws, generation = await self._connection()
        # No await between checking the connection and registering the call:
        # a drop is either seen before (we waited) or sweeps this call after.
        request_id = f"{self._prefix}-{next(self._ids)}"
        frame["requestId"] = request_id
        name = NOTIFY_EVENT if kind == "notify" else CANCEL_EVENT
        try:
            data = _encode(frame)
        except (TypeError, ValueError, OverflowError) as exc:
            raise CIFError(REJECT_AFTER_CLIENT, name, f"cannot encode the request as JSON: {exc}") from None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending = _Pending(kind, future, generation, on_status, cancellation_token=token)
        self._pending[request_id] = pending
        try:
            try:
                await ws.send(data.decode())
            except ConnectionClosed:
                # Maybe sent, maybe not; the reader sweeps this call as lost.
                self._lose(request_id)
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def _connection(self) -> tuple[ClientConnection, int]:
        if self._tg is None:
            raise RuntimeError("use 'async with Integrator(...) as ig'")
        while True:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise IntegratorConnectionError("the Integrator was closed")
            if self._ws is not None:
                return self._ws, self._generation
            await self._ready.wait()

    def _lose(self, request_id: str) -> None:
        p = self._pending.pop(request_id, None)
        if p is None or p.future.done():
            return
        if p.kind == "cancel":
            p.future.set_exception(_Lost())
        else:
            p.future.set_exception(CIFError(
                REJECT_AFTER_CLIENT, NOTIFY_EVENT, LOST_DETAILS,
                notification_id=p.notification_id, cancellation_token=p.cancellation_token,
            ))

    def _fail_pending(self, error: Exception) -> None:
        for request_id in list(self._pending):
            p = self._pending.pop(request_id)
            if not p.future.done():
                p.future.set_exception(error)

    # ------------------------------------------------------------------
    # The reader task

    def _set_connection(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._generation += 1
        self.connects += 1
        self._ready.set()

    async def _supervise(self, ws: ClientConnection) -> None:
        """Read frames; after a drop, reconnect (bounded) or fail for good."""
        try:
            while True:
                await self._read(ws)
                generation = self._generation
                self._ws = None
                if not self._closing:
                    self._ready.clear()
                for request_id in [r for r, p in self._pending.items() if p.generation == generation]:
                    self._lose(request_id)
                if self._closing:
                    return
                if ws.close_code == CloseCode.UNAUTHORIZED:
                    raise UnauthorizedError(f"unauthorized: the server closed the connection with {ws.close_code}")
                log.warning("connection to %s lost (close code %s%s)", self.url, ws.close_code,
                            f" {ws.close_reason}" if ws.close_reason else "")
                if self._reconnect is None:
                    raise IntegratorConnectionError(f"connection to {self.url} lost (reconnecting is off)")
                ws = await self._reconnect_loop(self._reconnect)
                self._set_connection(ws)
                log.info("reconnected to %s", self.url)
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
        decode = _DECODER.decode
        try:
            while True:
                raw = await ws.recv(decode=False)
                try:
                    frame = decode(raw)
                except msgspec.MsgspecError as exc:
                    # A frame type from a newer server, or garbage: not ours to handle.
                    log.debug("ignoring frame %r: %s", raw[:200], exc)
                    continue
                self._dispatch(frame)
        except ConnectionClosed:
            pass

    def _dispatch(self, frame: Status | _Result | _Error) -> None:
        if type(frame) is Status:
            p = self._pending.get(frame.request_id)
            if p is None:
                return
            p.notification_id = frame.notification_id
            p.cancellation_token = frame.cancellation_token
            if p.on_status is not None:
                try:
                    p.on_status(frame)
                except Exception:
                    log.exception("on_status callback failed")
            return
        if type(frame) is _Result:
            p = self._pending.pop(frame.request_id, None)
            if p is not None and not p.future.done():
                p.future.set_result(frame.value)
            return
        # _Error
        body = frame.error
        if frame.request_id is None:
            log.warning("server error without requestId: %s (%s): %s", body.message, body.msdyn_name, body.details)
            return
        p = self._pending.pop(frame.request_id, None)
        if p is not None and not p.future.done():
            default_name = NOTIFY_EVENT if p.kind == "notify" else CANCEL_EVENT
            p.future.set_exception(CIFError(
                body.message, body.msdyn_name or default_name, body.details,
                notification_id=p.notification_id, cancellation_token=p.cancellation_token,
            ))

    # ------------------------------------------------------------------
    # Connecting

    async def _open(self, timeout: float) -> ClientConnection:
        url = self.url
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
                raise UnauthorizedError(f"unauthorized: {url} refused the API key (HTTP {status})") from None
            raise IntegratorConnectionError(
                f"cannot connect to {url}: HTTP {status} {exc.response.reason_phrase}".rstrip()
            ) from None
        except InvalidURI as exc:
            raise IntegratorConnectionError(f"invalid URL {url!r}: {exc}") from None
        except TimeoutError:
            raise IntegratorConnectionError(f"cannot connect to {url}: timed out after {timeout:g} s") from None
        except OSError as exc:
            raise IntegratorConnectionError(f"cannot connect to {url}: {_describe_oserror(exc)}") from None
        except InvalidHandshake as exc:
            raise IntegratorConnectionError(f"cannot connect to {url}: WebSocket handshake failed: {exc}") from None

    async def _reconnect_loop(self, policy: Reconnect) -> ClientConnection:
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
