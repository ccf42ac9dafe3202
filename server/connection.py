"""One TCP connection: HTTP/1.1, then RFC 6455, on websockets' public sans-I/O API.

``Connection`` is an ``asyncio.Protocol``. It owns the bytes of one client:
the opening handshake, the frames in both directions, keepalive and the
closing handshake. What the connection is *for* is not its business: a
``Handler`` (the server) answers the handshake request and, once the
WebSocket is open, gives a ``Session`` (an endpoint's) that gets each
complete message and is told once when the connection is gone.

Who parses what
---------------
websockets' ``ServerProtocol`` (its documented sans-I/O layer: ``receive_data``,
``events_received``, ``data_to_send``, ``accept``, ``send_response``,
``send_close``, ``send_ping``, ``fail``, ``close_expected``, ``state``) does
everything the protocol asks of a server except the common data frame:

* the handshake: it parses the request and builds the answer; the handler may
  answer with plain HTTP instead (health, static files, 401);
* control frames, fragmented messages, oversized frames and every frame that
  breaks RFC 6455, with its close codes (1002, 1009) and reasons;
* the closing handshake and when to close TCP.

deskpush parses frame *headers* itself (RFC 6455 section 5.2), so it always
knows where a frame ends, and handles the frame that is nearly all the
traffic: complete, masked, final, text or binary, no reserved bits, within
``max_size``, outside a fragmented message. It unmasks it and hands the
message to the session, in the loop iteration that read it. websockets'
sans-I/O layer does not check that a message is UTF-8 (its asyncio layer
does, when it decodes), so every message, from either path, is checked on
its way to the session: one that is not UTF-8 fails the connection with 1007. Any other frame
is fed to websockets whole, from its first byte to its last, so websockets'
parser only ever sees whole frames and is always at a frame boundary when
deskpush parses the next header. The request is fed to it the same way: up
to the blank line that ends it, nothing more. Once websockets has started
closing (it received or sent a close frame, or failed the connection), every
byte goes to it.

HTTP methods are deskpush's to check, before websockets sees the request
(websockets 15 closes the connection without an answer on any method but
GET): GET is the handshake or a plain request; HEAD is answered as the same
GET would be, without the body, and never opens a WebSocket; any other method
gets 405. Every answer that is not the 101 carries ``http_headers`` (the
server's security headers) on top of its own, and closes the connection:
deskpush answers the first request of a connection only. Pipelined requests
behind it are read and discarded until the client closes (``close_timeout``
at most), as RFC 9112 section 9.6 asks of a server that sends
``Connection: close``; closing at once, with them unread, would make the
kernel reset the connection and could destroy the answer in flight.

Outgoing, deskpush frames its own server-to-client text frames
(``text_frame``) and queues them; ``flush()`` writes the queue with one
``write``. What websockets writes (the 101, a pong, a close frame) goes after
the frames already queued, since nothing may follow a close frame.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol, cast

from websockets import ServerProtocol
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from ..protocol.vocabulary import CLOSE_INTERNAL_ERROR, CLOSE_KEEPALIVE_TIMEOUT, CloseCode

__all__ = ["Connection", "ConnectionOptions", "Handler", "Session", "text_frame", "unmask"]

log = logging.getLogger("deskpush")
ws_log = logging.getLogger("websockets.server")

OPEN, CONNECTING = State.OPEN, State.CONNECTING
OP_TEXT, OP_BINARY, OP_CONT, OP_PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG
_SHORT = [bytes((0x81, n)) for n in range(126)]  # FIN + text, 7-bit length
_MEDIUM = struct.Struct("!BBH").pack  # FIN + text, 126, 16-bit length
_LONG = struct.Struct("!BBQ").pack  # FIN + text, 127, 64-bit length
_PING = struct.Struct("!I").pack
# A request whose head is not complete after this many bytes is refused
# (websockets' own limits allow more, but no browser or SDK sends that much).
MAX_REQUEST_HEAD = 64 * 1024
# RFC 9112 section 3: request-line = method SP request-target SP HTTP-version;
# RFC 9110 section 5.6.2: method = token (case-sensitive, section 9.1).
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) [^ \r\n]+ HTTP/[0-9]\.[0-9]\r\n")
#: The methods deskpush answers (RFC 9110 section 9.1: "All general-purpose
#: servers MUST support the methods GET and HEAD"); the WebSocket handshake is a GET.
ALLOWED_METHODS = "GET, HEAD"


def text_frame(data: bytes) -> bytes:
    """A complete server-to-client text frame carrying ``data`` (already UTF-8)."""
    n = len(data)
    if n < 126:
        return _SHORT[n] + data
    if n < 65536:
        return _MEDIUM(0x81, 126, n) + data
    return _LONG(0x81, 127, n) + data


def unmask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 section 5.3).

    As one integer operation, which runs in C: the mask, repeated over the
    whole length, XORed with the data read as one integer.
    """
    n = len(data)
    if n > _SPREAD_UP_TO:
        key = int.from_bytes((mask * ((n + 3) >> 2))[:n], "little")
        return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")
    spread = _SPREAD.get(n)
    if spread is None:
        # 1 + 2**32 + 2**64 + ...: times the mask, it repeats the mask.
        spread = _SPREAD[n] = int.from_bytes(b"\1\0\0\0" * ((n + 3) >> 2), "little"), (1 << (8 * n)) - 1
    repeat, keep = spread
    return ((int.from_bytes(data, "little") ^ int.from_bytes(mask, "little") * repeat) & keep).to_bytes(n, "little")


def _without_upgrade(request: Request) -> Request:
    """``request`` without the headers that ask for a WebSocket (for a HEAD, answered as such a GET)."""
    headers = Headers((name, value) for name, value in request.headers.raw_items()
                      if name.lower() not in ("upgrade", "connection"))
    return Request(request.path, headers)


# Per message length, for the common short messages: the multiplier that
# repeats a mask over that length, and the bits to keep.
_SPREAD_UP_TO = 4096
_SPREAD: dict[int, tuple[int, int]] = {}


class Session(Protocol):
    """What an open WebSocket connection delivers to (an endpoint's)."""

    def message(self, data: bytes) -> None:
        """A complete message (text or binary), in order."""

    def closed(self) -> None:
        """The connection is gone. Called once, last."""


class Handler(Protocol):
    """What a connection asks about its handshake (the server)."""

    def respond(self, conn: Connection, request: Request) -> Response | None:
        """A plain HTTP answer to ``request``, or None to open the WebSocket."""

    def open(self, conn: Connection) -> Session:
        """The session for a connection whose WebSocket just opened."""

    def closed(self, conn: Connection) -> None:
        """``conn`` is gone (after its session, if it had one, was told)."""


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Settings shared by every connection of a server; times in seconds."""

    max_size: int = 64 * 1024
    #: The whole request must arrive within this, or the connection is dropped.
    open_timeout: float = 10.0
    #: After the server sends or receives a close frame, TCP must be closed within this.
    close_timeout: float = 5.0
    #: A protocol ping every ``ping_interval``; no pong within ``ping_timeout``: close 1011. 0: off.
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: Bytes that may wait in the write buffer; past it the client is too slow and is dropped.
    outbound_limit: int = 1024 * 1024
    server_header: str = "deskpush"
    #: Headers every plain HTTP answer (anything but the 101) carries, unless it sets its own.
    http_headers: tuple[tuple[str, str], ...] = ()


class Connection(asyncio.Protocol):
    """One client connection. See the module docstring."""

    __slots__ = (
        "handler", "options", "loop", "transport", "protocol", "request", "session", "remote_address",
        "_buf", "_reading_request", "_to_websockets", "_fragments", "_out", "_timer", "_keepalive", "_ping",
        "_pings", "status", "timed_out", "dropped_slow",
    )

    def __init__(self, handler: Handler, options: ConnectionOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.handler = handler
        self.options = options
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.protocol = ServerProtocol(max_size=options.max_size, logger=ws_log)
        #: The handshake request, once received (its ``path``, its ``headers``).
        self.request: Request | None = None
        self.session: Session | None = None
        self.remote_address: tuple | None = None
        self._buf = b""  # bytes read and not parsed yet
        self._reading_request = True  # until the request's head is fed to websockets
        self._to_websockets = 0  # bytes of the current frame still to feed to websockets
        self._fragments: list[bytes] | None = None  # a fragmented message, as websockets parses it
        self._out: list[bytes] = []  # frames queued by queue_frame
        self._timer: asyncio.TimerHandle | None = None  # open or close deadline
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping: tuple[bytes, float] | None = None  # unanswered ping: payload, sent at
        self._pings = 0
        # How it ended, for the metrics: the status it was answered with (101:
        # a WebSocket), whether a deadline aborted it, whether it was dropped
        # as too slow (server.outboundLimit).
        self.status: int | None = None
        self.timed_out = False
        self.dropped_slow = False

    # ------------------------------------------------------------------
    # For the session and the server

    @property
    def open(self) -> bool:
        """Whether the WebSocket is open: messages are delivered and frames written."""
        return self.protocol.state is OPEN

    def queue_frame(self, frame: bytes) -> int:
        """Queue a frame made by ``text_frame``; ``flush()`` writes it. Returns how many are queued.

        One frame may be queued on many connections. Frames queued on a
        connection that is no longer open are dropped at the flush.
        """
        out = self._out
        out.append(frame)
        return len(out)

    def flush(self) -> None:
        """Write every queued frame with one ``write``, unless closing or too slow to keep up."""
        out = self._out
        if not out:
            return
        transport = self.transport
        if self.protocol.state is not OPEN or transport is None or transport.is_closing():
            out.clear()
            return
        if transport.get_write_buffer_size() > self.options.outbound_limit:
            # It cannot keep up: drop it rather than buffer without bound.
            # Its session sees it closed; nobody else waits for it.
            log.warning("closing %s: write buffer over %d bytes", self.remote_address, self.options.outbound_limit)
            out.clear()
            self.dropped_slow = True
            transport.abort()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport.write(data)

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake (frames queued before go out first)."""
        if self.protocol.state is not OPEN:
            return
        self.flush()
        self.protocol.send_close(code, reason)
        self._send_protocol_data()

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------
    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, without the base class
        self.remote_address = transport.get_extra_info("peername")
        self._timer = self.loop.call_later(self.options.open_timeout, self._abort_late)

    def data_received(self, data: bytes) -> None:
        state = self.protocol.state
        if state is OPEN:
            self._receive_frames(self._buf + data if self._buf else data)
        elif self._reading_request:
            self._receive_request(self._buf + data if self._buf else data)
        else:
            self._feed(data)

    def eof_received(self) -> None:
        if self._buf and self.protocol.state is OPEN:
            # The start of a frame that will never be completed: websockets
            # sees it as it would have byte by byte (an invalid opcode in
            # it fails the connection with 1002 before the EOF counts).
            buf, self._buf = self._buf, b""
            self._feed(buf)
        self.protocol.receive_eof()
        self._send_protocol_data()
        # Returning None closes the transport: the WebSocket has its own
        # closing handshake, so nothing is written after the client's EOF.

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the state is now CLOSED
        self.protocol.data_to_send()
        self._out.clear()
        self._buf = b""
        for handle in (self._timer, self._keepalive):
            if handle is not None:
                handle.cancel()
        self._timer = self._keepalive = None
        session, self.session = self.session, None
        try:
            if session is not None:
                session.closed()
        finally:
            self.handler.closed(self)

    # ------------------------------------------------------------------
    # The opening handshake

    def _receive_request(self, buf: bytes) -> None:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_REQUEST_HEAD:
                self._buf = b""
                self._reading_request = False
                self._respond(self.protocol.reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                                   "Failed to open a WebSocket connection: request too large.\n"))
            else:
                self._buf = buf
            return
        end += 4
        self._buf = b""
        self._reading_request = False
        protocol = self.protocol
        head = buf[:end]
        line = _REQUEST_LINE.match(head)
        if line is None:
            # RFC 9112 section 3: "Recipients of an invalid request-line SHOULD
            # respond with a 400 (Bad Request) error". websockets would parse
            # a method that is no token (G\x00T) as one it passes on.
            self._respond(protocol.reject(HTTPStatus.BAD_REQUEST, "Bad Request: invalid request line\n"))
            if end < len(buf):
                self._feed(buf[end:])
            return
        method = line[1]
        if method == b"HEAD":
            # RFC 9110 section 9.3.2: "identical to GET except that the server
            # MUST NOT send content in the response". websockets parses GETs only.
            head = b"GET" + head[4:]
        elif method != b"GET":
            # RFC 9110 section 15.5.6: "The origin server MUST generate an Allow
            # header field in a 405 response". websockets never sees the request.
            response = protocol.reject(HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n")
            response.headers["Allow"] = ALLOWED_METHODS
            self._respond(response)
            if end < len(buf):
                self._feed(buf[end:])  # a body, or more requests: websockets discards them
            return
        protocol.receive_data(head)
        for event in protocol.events_received():
            if isinstance(event, Request):
                self.request = event
        if self.request is None:  # not HTTP: websockets closes the connection
            self._send_protocol_data()
            return
        try:
            response = self.handler.respond(self, self.request)
        except Exception:
            log.exception("error answering a request for %s", self.request.path)
            response = protocol.reject(HTTPStatus.INTERNAL_SERVER_ERROR,
                                       "Failed to open a WebSocket connection.\nSee server log for more information.\n")
        if response is None:
            if method == b"HEAD":  # never a 101: what a GET that asks for no upgrade gets (426)
                response = protocol.accept(_without_upgrade(self.request))
            else:
                response = protocol.accept(self.request)
        if method == b"HEAD":
            response = dataclasses.replace(response, body=b"")  # its Content-Length stays the GET's
        self._respond(response)
        if protocol.state is OPEN:
            self._opened()
            if end < len(buf):
                self._receive_frames(buf[end:])  # frames sent without waiting for the 101
        elif end < len(buf):
            self._feed(buf[end:])  # websockets discards them

    def _respond(self, response: Response) -> None:
        if self._timer is not None:  # answered in time
            self._timer.cancel()
            self._timer = None
        self.status = response.status_code
        headers = response.headers
        if response.status_code != 101:
            for name, value in self.options.http_headers:
                if name not in headers:
                    headers[name] = value
        headers["Server"] = self.options.server_header
        self.protocol.send_response(response)
        self._send_protocol_data()

    def _opened(self) -> None:
        options = self.options
        if options.ping_interval:
            self._keepalive = self.loop.call_later(options.ping_interval, self._send_ping)
        try:
            self.session = self.handler.open(self)
        except Exception:
            self._internal_error("error opening a session for")

    def _abort_late(self) -> None:
        self._timer = None
        self.timed_out = True
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------
    # Frames from the client

    def _receive_frames(self, buf: bytes) -> None:
        """Parse ``buf``: the common data frame here, any other frame through websockets."""
        end = len(buf)
        pos = 0
        max_size = self.options.max_size
        protocol = self.protocol
        while pos < end:
            if protocol.state is not OPEN:  # closing: websockets takes every byte from here
                self._buf = b""
                self._feed(buf[pos:])
                return
            if self._to_websockets:
                take = min(self._to_websockets, end - pos)
                self._to_websockets -= take
                self._feed(buf[pos:pos + take])
                pos += take
                continue
            if end - pos < 2:
                break
            head1 = buf[pos]
            head2 = buf[pos + 1]
            length = head2 & 0x7F
            start = pos + 2
            if length == 126:
                if end - start < 2:
                    break
                length = (buf[start] << 8) | buf[start + 1]
                start += 2
            elif length == 127:
                if end - start < 8:
                    break
                length = int.from_bytes(buf[start:start + 8], "big")
                start += 8
            masked = head2 & 0x80
            if masked:
                start += 4
            if ((head1 == 0x81 or head1 == 0x82) and masked and length <= max_size
                    and self._fragments is None):
                # FIN, no reserved bits, text or binary, masked, not too big.
                stop = start + length
                if stop > end:
                    break
                pos = stop
                self._deliver(unmask(buf[start:stop], buf[start - 4:start]))
            else:
                # websockets takes this frame from its first byte to its last
                # (and fails the connection at its header if it is not valid).
                self._to_websockets = start - pos + length
        self._buf = buf[pos:] if pos < end else b""

    def _feed(self, data: bytes) -> None:
        """Let websockets parse ``data`` and act on what it makes of it."""
        protocol = self.protocol
        if self._out and protocol.state is OPEN:
            # What websockets may write now (a pong, a close frame) goes
            # after the frames queued before it; nothing may follow a close.
            self.flush()
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
        self._send_protocol_data()

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is OP_TEXT or opcode is OP_BINARY:
            if frame.fin:
                self._deliver(bytes(frame.data))
            else:
                self._fragments = [bytes(frame.data)]
        elif opcode is OP_CONT:
            # websockets checked the order of the fragments and max_size
            # over the whole message; only the pieces are kept here.
            assert self._fragments is not None
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = None
                self._deliver(data)
        elif opcode is OP_PONG:
            ping = self._ping
            if ping is not None and bytes(frame.data) == ping[0]:
                self._ping = None
                if self._keepalive is not None:
                    self._keepalive.cancel()
                self._keepalive = self.loop.call_at(ping[1] + self.options.ping_interval, self._send_ping)
        # A ping is answered by websockets; a close frame too (data_to_send).

    def _deliver(self, data: bytes) -> None:
        session = self.session
        if session is None or self.protocol.state is not OPEN:
            return
        if not data.isascii():  # nearly every message is ASCII: one quick scan, no decode
            try:
                data.decode()
            except UnicodeDecodeError as exc:
                # RFC 6455 section 8.1: "When an endpoint is to interpret a byte
                # stream as UTF-8 but finds that the byte stream is not, in fact,
                # a valid UTF-8 stream, that endpoint MUST _Fail the WebSocket
                # Connection_." Every message is JSON, which is UTF-8 (RFC 8259
                # section 8.1), so a binary one is held to it too. The reason
                # is websockets' own for the same fault.
                self.flush()
                self.protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                self._send_protocol_data()
                return
        try:
            session.message(data)
        except Exception:
            # A bug, not bad input (bad input gets an error frame): log it and
            # fail this connection only.
            self._internal_error("error handling a message from")

    def _internal_error(self, what: str) -> None:
        log.exception("%s %s", what, self.remote_address)
        if self.protocol.state is OPEN:
            self.flush()
            self.protocol.fail(*CLOSE_INTERNAL_ERROR)
            self._send_protocol_data()

    # ------------------------------------------------------------------
    # Keepalive: a protocol ping every ping_interval, 1011 without its pong

    def _send_ping(self) -> None:
        self._keepalive = None
        if self.protocol.state is not OPEN:
            return
        self._pings += 1
        payload = _PING(self._pings)
        self._ping = (payload, self.loop.time())
        self.flush()
        self.protocol.send_ping(payload)
        self._send_protocol_data()
        if self.options.ping_timeout:
            self._keepalive = self.loop.call_later(self.options.ping_timeout, self._ping_timed_out)

    def _ping_timed_out(self) -> None:
        self._keepalive = None
        if self.protocol.state is OPEN and self._ping is not None:
            self.flush()
            self.protocol.fail(*CLOSE_KEEPALIVE_TIMEOUT)
            self._send_protocol_data()

    # ------------------------------------------------------------------
    # Writing what websockets has to send

    def _send_protocol_data(self) -> None:
        protocol = self.protocol
        transport = self.transport
        for data in protocol.data_to_send():
            if transport is None or transport.is_closing():
                continue
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                # websockets' end of stream: the server half-closes TCP and
                # waits (close_timeout at most) for the client to close.
                try:
                    transport.write_eof()
                except (OSError, RuntimeError):
                    transport.abort()
            else:  # pragma: no cover - TLS is terminated in front of deskpush
                transport.close()
        if protocol.close_expected() and self._timer is None and protocol.state is not State.CLOSED:
            self._timer = self.loop.call_later(self.options.close_timeout, self._abort_late)

