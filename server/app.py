"""The I/O around the engine: websockets endpoints, one timer, health, static files.

Everything that touches the engine runs on the event loop thread and never
awaits in between, so the engine needs no lock: a handler decodes a frame,
calls the engine, and hands the effects to ``_apply``, which encodes each frame
once, frames it for each target without waiting, and writes what each
connection got in one loop iteration with one ``write``. A connection
whose write buffer passes ``outboundLimit`` cannot keep up: it is aborted and
treated as disconnected, and nobody else waits for it.

Time: the engine gets ``now`` in epoch milliseconds derived from the loop's
monotonic clock (anchored to the wall clock once at start), so a wall-clock
jump never fires or stalls timers. One ``call_at`` handle is re-armed to the
engine's ``next_deadline()``; there is no timer per notification. A burst of
deadlines is ended in one timer run, and a long flush of writes stops every
FLUSH_SLICE connections to end what fell due meanwhile, so neither holds up
the other.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import secrets
import time
from http import HTTPStatus
from pathlib import Path
from collections.abc import Callable
from typing import Any

import msgspec
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State as WsState

from ..protocol import Ended, Engine, Send
from ..protocol import Snapshot
from ..protocol import frames as f

from . import logs
from .auth import AgentTokens, ApiKeys
from .config import Config
from .connection import Connection, _drop, text_frame

__all__ = ["DeskpushServer", "CLOSE_UNAUTHORIZED", "CLOSE_RATE_LIMITED"]

log = logging.getLogger("deskpush")
outcome_log = logging.getLogger("deskpush.outcome")

CLOSE_UNAUTHORIZED = 4401
CLOSE_RATE_LIMITED = 1008
# Deadlines are ended TIMER_CHUNK at a time, for up to TIMER_BUDGET seconds
# per timer callback (or per flush, see _flush_writes) before I/O gets a
# turn. Only a burst of thousands due at once reaches the budget; the longer
# a run, the more of each connection's frames share one write (when this was
# chosen, the timeout storm bench's p99 lateness was about 34 ms at 0.1 s,
# 37 ms at 0.05 s and 38 ms at 0.03 s).
TIMER_CHUNK = 500
TIMER_BUDGET = 0.1
# A connection with this many frames queued is written at once, not at the
# end of the loop iteration.
WRITE_AT = 64
# _flush_writes looks for deadlines that fell due after this many writes.
FLUSH_SLICE = 256

DEMO_DIR = Path(str(importlib.resources.files("deskpush.client")))
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# The demo pages load nothing from elsewhere and run no inline script.
CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class _Bucket:
    """Token bucket: ``rate`` frames per second with ``burst`` in reserve."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
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


def _agent_error(raw: bytes, exc: Exception) -> f.AgentError:
    """BadFrame for an agent frame that failed to decode, naming the field."""
    message = str(exc) if isinstance(exc, msgspec.ValidationError) else f"malformed JSON: {exc}"
    return f.AgentError(code="BadFrame", message=message)


def _integrator_error(raw: bytes, exc: Exception) -> f.IntegratorError:
    """RejectAfterClientError for a frame that failed to decode.

    The frame is parsed again leniently only to find its requestId and type,
    so the integrator's pending promise can be rejected; msgspec's message
    names the bad field (``... - at `$.input.templateName```).
    """
    request_id = None
    name = "NotifyEvent"
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        obj = None
    if isinstance(obj, dict):
        rid = obj.get("requestId")
        if isinstance(rid, str) and 0 < len(rid) <= 128:
            request_id = rid
        if obj.get("type") == "cancelEvent":
            name = "CancelEvent"
    details = str(exc) if isinstance(exc, msgspec.ValidationError) else f"malformed JSON: {exc}"
    return f.IntegratorError(
        request_id=request_id,
        error=f.ErrorBody(message="RejectAfterClientError", msdyn_name=name, details=details),
    )


class DeskpushServer:
    """One deskpush node.

    Use ``await start()`` then ``await close()``, or ``async with``.
    ``port`` is the bound port (useful with port 0).
    """

    def __init__(self, config: Config, *, jwt_secret: str | None = None, api_keys: dict[str, str] | None = None) -> None:
        self.config = config
        s = config.server
        self.tokens = AgentTokens(jwt_secret or config.jwt_secret() or secrets.token_urlsafe(32))
        self.api_keys = ApiKeys(api_keys if api_keys is not None else config.api_keys())
        self.engine = Engine(config.template_map(), config.limits)
        self._outbound_limit = s.outbound_limit
        self._hello_timeout = s.hello_timeout
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._dirty: dict[Connection, None] = {}
        self._tasks: set[asyncio.Task] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._armed: float | None = None
        self._epoch0 = 0.0
        self._mono0 = 0.0
        self._debug = False
        self._log_outcome: Callable[[Ended], None] | None = None
        self.port = 0

    # ------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._mono0 = loop.time()
        self._epoch0 = time.time() * 1000.0
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._log_outcome = self._outcome_logger()
        s = self.config.server
        self._server = await serve(
            self._handler,
            s.host,
            s.port,
            process_request=self._process_request,
            max_size=s.max_size,
            max_queue=16,
            compression=None,
            ping_interval=s.ping_interval or None,
            ping_timeout=s.ping_timeout or None,
            open_timeout=s.hello_timeout,
            close_timeout=5,
            server_header="deskpush",
            backlog=s.backlog,
            create_connection=Connection,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._restore_state()

    async def close(self) -> None:
        """Close every connection with 1001 (going away) and stop."""
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._save_state()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def __aenter__(self) -> DeskpushServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def now(self) -> float:
        """Server time in epoch milliseconds, advancing with the monotonic clock."""
        return self._epoch0 + (self._loop.time() - self._mono0) * 1000.0

    # ------------------------------------------------------------------
    # Pending notifications across a restart

    def _restore_state(self) -> None:
        path = self.config.server.state_file
        if not path:
            return
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return
        try:
            snapshot = msgspec.json.decode(data, type=Snapshot)
        except msgspec.MsgspecError as exc:
            log.error("ignoring state file %s: %s", path, exc)
            return
        self._apply(self.engine.restore(snapshot, self.now()))
        # Taken back: a crash from here on must not bring these back twice.
        Path(path).unlink(missing_ok=True)
        log.info("restored %d pending notifications from %s", len(snapshot.notifications), path)

    def _save_state(self) -> None:
        path = self.config.server.state_file
        if not path:
            return
        snapshot = self.engine.snapshot(self.now())
        tmp = Path(f"{path}.tmp")
        tmp.write_bytes(msgspec.json.encode(snapshot))
        tmp.replace(path)
        log.info("saved %d pending notifications to %s", len(snapshot.notifications), path)

    # ------------------------------------------------------------------
    # Effects and the one timer

    def _apply(self, effects: list) -> None:
        encode = f.ENCODER.encode
        dirty = self._dirty
        debug = self._debug
        log_outcome = self._log_outcome
        for effect in effects:
            if type(effect) is Send:
                # Encoded and framed once, whatever the number of targets;
                # queued on each, written at the end of this loop iteration by
                # _flush_writes (one write per connection, if still open).
                message = text_frame(encode(effect.frame))
                for conn in effect.targets:
                    if conn.queue_frame(message) >= WRITE_AT:
                        # A full batch (an integrator's results during a burst
                        # of outcomes): write it now rather than at the end of
                        # a long loop iteration.
                        self._write(conn)
                    dirty[conn] = None
                if debug:
                    log.debug("send %s to %d", encode(effect.frame)[:200].decode(errors="replace"),
                              len(effect.targets))
            elif log_outcome is not None:  # Ended
                log_outcome(effect)
        if dirty and self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_writes)
        self._rearm()

    def _outcome_logger(self) -> Callable[[Ended], None] | None:
        """What writes the INFO line of each outcome, or None when INFO is off."""
        write = logs.direct_writer(outcome_log, logging.INFO)
        if write is None and not outcome_log.isEnabledFor(logging.INFO):
            return None
        emit = write if write is not None else outcome_log.info
        # The end of the line depends only on the outcome and whether it was delivered.
        tails: dict[tuple[Any, bool], str] = {}

        def log_outcome(e: Ended) -> None:
            key = (e.outcome, e.delivered)
            tail = tails.get(key)
            if tail is None:
                o = e.outcome
                tail = tails[key] = (f" actionName={o.action_name} responseReason={o.response_reason} "
                                     f"delivered={e.delivered}")
            emit(f"outcome notificationId={e.notification_id} agentId={e.agent_id} "
                 f"correlationId={e.correlation_id} integrator={e.integrator}{tail}")

        return log_outcome

    def _flush_writes(self) -> None:
        # Writing to thousands of connections takes a while (10 µs and more a
        # write, mostly the kernel's). Deadlines that fall due meanwhile are
        # not kept waiting: every FLUSH_SLICE writes, what is due is ended,
        # the connections it gave frames to are written next (an integrator's
        # results first), then the rest, each once with all it has queued.
        # Ending takes TIMER_BUDGET at most per flush, so reading gets its turn too.
        engine = self.engine
        pending = list(self._dirty)
        self._dirty = {}
        budget = TIMER_BUDGET
        i = 0
        try:
            while i < len(pending):
                self._write(pending[i])
                i += 1
                if not i % FLUSH_SLICE and budget > 0:
                    floor = engine.deadline_floor()
                    now = self.now()
                    if floor is not None and floor <= now:
                        started = time.perf_counter()
                        self._end_due(now, budget)
                        budget -= time.perf_counter() - started
                        fresh = self._dirty
                        if fresh:
                            self._dirty = {}
                            pending = [*fresh, *(c for c in pending[i:] if c not in fresh)]
                            i = 0
        finally:
            # _apply queues frames meanwhile but schedules no other flush until
            # here. (Whatever is left after a bug in a write goes next turn.)
            self._dirty.update(dict.fromkeys(pending[i:]))
            self._flush_handle = None
            if self._dirty:
                self._flush_handle = self._loop.call_soon(self._flush_writes)
        self._loop.time()  # see _on_timer

    def _write(self, conn: Connection) -> None:
        """Write what ``conn`` has queued, unless it is closing or cannot keep up."""
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        if conn.protocol.state is not WsState.OPEN:
            # Closing: what it had before its close frame went out with it
            # (Connection.send_data); nothing may follow that frame.
            conn.discard_queued()
            return
        if transport.get_write_buffer_size() > self._outbound_limit:
            # It cannot keep up; close it rather than buffer without bound.
            # Its handler sees the close and the engine treats it as gone.
            log.warning("closing %s: write buffer over %d bytes", conn.remote_address, self._outbound_limit)
            transport.abort()
            return
        conn.flush()

    def _rearm(self) -> None:
        armed = self._armed
        if armed is not None:
            # The usual case, in O(1): nothing earlier than the armed timer
            # was added (deadlines mostly grow), so the timer can stay.
            floor = self.engine.deadline_floor()
            if floor is None or floor >= armed:
                return
        deadline = self.engine.next_deadline()
        # A timer armed no later than the next deadline can stay: if it fires
        # first, handle_timer finds nothing due and re-arms. Most outcomes move
        # the next deadline later, so this saves a cancel and a call_at each.
        if armed is not None and (deadline is None or armed <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = deadline
        if deadline is not None:
            when = self._mono0 + (deadline - self._epoch0) / 1000.0
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._armed
        self._armed = None
        # call_at may fire a hair early; the deadline it was armed for is due.
        now = self.now()
        if deadline is not None and deadline > now:
            now = deadline
        self._end_due(now)
        # uvloop (libuv) computes how long to sleep from a clock it caches at
        # the start of each loop iteration, and reading the loop's time is what
        # refreshes it. Without this, after a long callback the next timer
        # fires late by that callback's length (a burst's next deadlines by
        # 30 ms and more); _flush_writes does the same.
        self._loop.time()

    def _end_due(self, now: float, budget: float | None = None) -> None:
        # Thousands may fall due together (a burst of offers displayed at once,
        # or a pause). End them in chunks for up to TIMER_BUDGET seconds, then
        # write and let other clients in; the timer, re-armed in the past,
        # carries on with the rest in the next loop iteration. Ending many per
        # iteration is what makes a burst cheap: each connection gets all its
        # frames of the iteration in one write.
        engine = self.engine
        stop = time.perf_counter() + (TIMER_BUDGET if budget is None else budget)
        while True:
            self._apply(engine.handle_timer(now, limit=TIMER_CHUNK))
            due = engine.next_deadline()
            if due is None or due > now or time.perf_counter() > stop:
                break

    # ------------------------------------------------------------------
    # HTTP before the upgrade: auth, health, static files

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/agent":
            return None
        if path == "/integrator":
            header = request.headers.get("Authorization")
            if header is not None and self.api_keys.check_bearer(header) is None:
                return self._plain(HTTPStatus.UNAUTHORIZED, "UnauthorizedError\n",
                                   [("WWW-Authenticate", 'Bearer realm="deskpush"')])
            return None
        if path == "/healthz":
            body = msgspec.json.encode({"status": "ok", **self.engine.statistics()})
            return self._response(HTTPStatus.OK, body, "application/json")
        if self.config.server.demo:
            return self._static(path)
        return self._plain(HTTPStatus.NOT_FOUND, "Not Found\n")

    def _static(self, path: str) -> Response:
        if path == "/":
            path = "/index.html"
        name = path.lstrip("/")
        suffix = Path(name).suffix
        if "/" in name or "\\" in name or name.startswith(".") or suffix not in CONTENT_TYPES:
            return self._plain(HTTPStatus.NOT_FOUND, "Not Found\n")
        file = DEMO_DIR / name
        try:
            body = file.read_bytes()
        except OSError:
            return self._plain(HTTPStatus.NOT_FOUND, "Not Found\n")
        return self._response(HTTPStatus.OK, body, CONTENT_TYPES[suffix],
                              [("Content-Security-Policy", CSP), ("Cache-Control", "no-cache")])

    @staticmethod
    def _response(status: HTTPStatus, body: bytes, ctype: str, extra: list[tuple[str, str]] = ()) -> Response:
        headers = Headers([
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
            *extra,
        ])
        return Response(status.value, status.phrase, headers, body)

    def _plain(self, status: HTTPStatus, text: str, extra: list[tuple[str, str]] = ()) -> Response:
        return self._response(status, text.encode(), "text/plain; charset=utf-8", extra)

    # ------------------------------------------------------------------
    # WebSocket endpoints

    async def _handler(self, conn: Connection) -> None:
        path = conn.request.path.partition("?")[0]
        if path == "/agent":
            await self._agent(conn)
        elif path == "/integrator":
            await self._integrator(conn)

    async def _hello(self, conn: Connection, decoder: msgspec.json.Decoder, kind: type) -> Any:
        """The first frame if it arrives in time and is a ``kind``, else None."""
        try:
            raw = await conn.next_message(self._hello_timeout)
            hello = decoder.decode(raw)
        except (TimeoutError, ConnectionClosed, msgspec.MsgspecError):
            return None
        return hello if type(hello) is kind else None

    async def _agent(self, conn: Connection) -> None:
        hello = await self._hello(conn, f.AGENT_DECODER, f.AgentHello)
        agent_id = self.tokens.verify(hello.token) if hello is not None else None
        if agent_id is None:
            await conn.close(CLOSE_UNAUTHORIZED, "unauthorized")
            return
        engine = self.engine
        session_id = secrets.token_hex(8)
        self._apply(engine.agent_connected(conn, agent_id, session_id, self.now()))
        log.debug("agent %s session %s connected from %s", agent_id, session_id, conn.remote_address)
        s = self.config.server
        try:
            conn.set_on_message(self._on_message(conn, f.AGENT_DECODER, engine.agent_frame, _agent_error,
                                                 s.agent_rate, s.agent_burst))
            await conn.wait_closed()
        finally:
            self._apply(engine.agent_disconnected(conn, self.now()))
            log.debug("agent %s session %s disconnected", agent_id, session_id)

    async def _integrator(self, conn: Connection) -> None:
        key = self.api_keys.check_bearer(conn.request.headers.get("Authorization"))
        if key is None:
            hello = await self._hello(conn, f.INTEGRATOR_DECODER, f.IntegratorHello)
            key = self.api_keys.check(hello.api_key) if hello is not None else None
            if key is None:
                await conn.close(CLOSE_UNAUTHORIZED, "unauthorized")
                return
        engine = self.engine
        engine.integrator_connected(conn, key, self.now())
        log.debug("integrator %s connected from %s", key, conn.remote_address)
        s = self.config.server
        try:
            conn.set_on_message(self._on_message(conn, f.INTEGRATOR_DECODER, engine.integrator_frame,
                                                 _integrator_error, s.integrator_rate, s.integrator_burst))
            await conn.wait_closed()
        finally:
            self._apply(engine.integrator_disconnected(conn, self.now()))
            log.debug("integrator %s disconnected", key)

    def _on_message(
        self,
        conn: Connection,
        decoder: msgspec.json.Decoder,
        handle: Callable[[Connection, Any, float], list],
        bad_frame: Callable[[bytes, msgspec.MsgspecError], Any],
        rate: float,
        burst: float,
    ) -> Callable[[bytes], None]:
        """What feeds each frame of an authenticated connection to the engine.

        It runs as the frame is parsed, in ``data_received`` (see
        ``server.connection``). A frame that does not decode gets
        ``bad_frame``'s error and the connection stays open; past the rate
        limit the connection is closed.
        """
        loop_time = self._loop.time
        bucket = _Bucket(rate, burst, loop_time())
        decode = decoder.decode
        apply = self._apply
        now = self.now

        def on_message(raw: bytes) -> None:
            if not bucket.take(loop_time()):
                conn.on_message = _drop
                self._spawn(conn.close(CLOSE_RATE_LIMITED, "rate limit exceeded"))
                return
            try:
                frame = decode(raw)
            except msgspec.MsgspecError as exc:
                apply([Send((conn,), bad_frame(raw, exc))])
                return
            apply(handle(conn, frame, now()))

        return on_message

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
