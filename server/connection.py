"""A websockets ``ServerConnection`` with a synchronous path for messages.

deskpush's work for one message never awaits: decode it, call the engine, frame
what the engine answers. Running that through ``recv()`` costs more than the
work itself: every message goes through the connection's queue, wakes the
handler task and resumes a chain of coroutines. ``Connection`` hands each
complete message to ``on_message`` from ``data_received`` instead, in the loop
iteration that read it (``recv()`` is not available), and queues outgoing text
frames in a list that ``flush()`` writes with one ``write``.

Two frames are handled here rather than by websockets' generic code, because
they are nearly all the traffic: the client's complete, masked, unfragmented
text or binary frame (parsed in ``_parse_fast`` while websockets' parser waits
at a frame boundary; anything else goes to websockets, see below), and the
server's unmasked, unfragmented, uncompressed text frame (``text_frame``,
RFC 6455 section 5.2). ``tests/test_connection.py`` checks the first against
any mix of frames cut at any byte and the second byte for byte against
websockets' own ``Frame.serialize``. Everything else stays with websockets:
the handshake, control frames, fragmented messages, ``max_size``, protocol
errors, keepalive and the closing handshake.

Before the handler sets ``on_message``, messages are held in arrival order
(at most one read's worth, since the handler runs in the next loop turn), and
``next_message()`` gives the first one to a handler waiting for a hello.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode, apply_mask
from websockets.protocol import State

__all__ = ["Connection", "text_frame"]

log = logging.getLogger("deskpush")

OPEN = State.OPEN
OP_TEXT, OP_BINARY, OP_CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_SHORT = [bytes((0x81, n)) for n in range(126)]  # FIN + text, 7-bit length
_MEDIUM = struct.Struct("!BBH").pack  # FIN + text, 126, 16-bit length
_LONG = struct.Struct("!BBQ").pack  # FIN + text, 127, 64-bit length


def text_frame(data: bytes) -> bytes:
    """A complete server-to-client text frame carrying ``data`` (already UTF-8)."""
    n = len(data)
    if n < 126:
        return _SHORT[n] + data
    if n < 65536:
        return _MEDIUM(0x81, 126, n) + data
    return _LONG(0x81, 127, n) + data


class Connection(ServerConnection):
    """``ServerConnection`` plus ``on_message``, ``next_message()``, ``queue_frame()`` and ``flush()``."""

    # In slots: ServerConnection's instance dict is near a size step, and a
    # few more keys in it cost more per connection than the slots do.
    __slots__ = ("on_message", "_held", "_waiter", "_parts", "_out", "_fast", "_buf", "_max_size")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Called with each complete message (text or binary) as bytes.
        self.on_message: Callable[[bytes], None] | None = None
        self._held: list[bytes] = []
        self._waiter: asyncio.Future[bytes] | None = None
        self._parts: list[bytes] | None = None
        self._out: list[bytes] = []
        self._fast = False  # parsing frames in _parse_fast
        self._buf = b""  # a frame not complete yet, in fast mode
        self._max_size: int | None = None

    # ------------------------------------------------------------------
    # Incoming

    def process_event(self, event: Any) -> None:
        if self.request is None or type(event) is not Frame:
            super().process_event(event)  # the handshake request
            return
        opcode = event.opcode
        if opcode is OP_TEXT or opcode is OP_BINARY:
            if not event.fin:
                self._parts = [event.data]
                return
            data = event.data
        elif opcode is OP_CONT:
            # websockets' parser enforces max_size over the whole message and
            # the order of continuation frames; only the pieces are kept here.
            assert self._parts is not None
            self._parts.append(event.data)
            if not event.fin:
                return
            data = b"".join(self._parts)
            self._parts = None
        else:
            super().process_event(event)  # pongs answer keepalive pings
            return
        if type(data) is not bytes:
            data = bytes(data)
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        on_message = self.on_message
        if on_message is None:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(data)
            else:
                self._held.append(data)
            return
        try:
            on_message(data)
        except Exception:
            # A bug, not bad input (bad input gets an error frame): log it and
            # close this connection, as websockets does for a handler that raises.
            log.exception("error handling a message from %s", self.remote_address)
            self.on_message = _drop
            self.protocol.fail(1011, "internal error")
            self.send_data()

    # The common frame, parsed here. websockets' parser is a chain of
    # generators that costs more per frame than deskpush's work on it. While
    # the connection is open and websockets' parser waits at a frame boundary
    # with nothing buffered, data_received parses complete, masked, final,
    # uncompressed text or binary frames within max_size itself. At the first
    # anything else (a ping, pong or close frame, a fragment, reserved bits,
    # an oversized or unmasked frame) it hands the rest of the data, from that
    # frame on, to websockets, which then sees exactly the byte stream it would
    # have seen, starting on a frame boundary; the fast path resumes when
    # websockets is back at a boundary.

    def data_received(self, data: bytes) -> None:
        if self._fast:
            self._parse_fast(data)
        else:
            self._receive_slow(data)

    def _receive_slow(self, data: bytes) -> None:
        """websockets parses ``data``; the fast path resumes if it ends on a frame boundary."""
        super().data_received(data)
        if self.on_message is not None and self.on_message is not _drop:
            self._fast = self._at_frame_boundary()

    def _at_frame_boundary(self) -> bool:
        protocol = self.protocol
        try:
            if protocol.state is not OPEN or protocol.current_size is not None or protocol.reader.buffer:
                return False
            # Where websockets' parser is suspended: waiting for the first byte
            # of a frame (at_eof), or inside a frame whose header it took.
            gen = protocol.parser
            while gen.gi_yieldfrom is not None:
                gen = gen.gi_yieldfrom
            return gen.gi_code.co_name == "at_eof" and self._parts is None
        except AttributeError:  # another websockets release: websockets parses everything
            return False

    def _parse_fast(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = len(buf)
        pos = 0
        max_size = self._max_size
        protocol = self.protocol
        while pos < end:
            if protocol.state is not OPEN:
                break
            head1 = buf[pos]
            if head1 != 0x81 and head1 != 0x82:  # FIN, no RSV bits, text or binary
                break
            if end - pos < 2:
                self._buf = buf[pos:]
                return
            head2 = buf[pos + 1]
            if head2 < 0x80:  # a client must mask
                break
            length = head2 & 0x7F
            if length == 126:
                if end - pos < 4:
                    self._buf = buf[pos:]
                    return
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 8
            elif length == 127:
                break
            else:
                start = pos + 6
            if max_size is not None and length > max_size:
                break
            stop = start + length
            if stop > end:
                self._buf = buf[pos:]
                return
            pos = stop
            self._deliver(apply_mask(buf[start:stop], buf[start - 4:start]))
        else:
            self._buf = b""
            return
        # Not a frame for this path (or the connection is closing): websockets
        # takes the stream from this frame on.
        self._fast = False
        self._buf = b""
        self._receive_slow(buf[pos:] if pos else buf)

    async def next_message(self, timeout: float | None = None) -> bytes:
        """The next message not yet handed to ``on_message``.

        Raises ConnectionClosed once closed, TimeoutError after ``timeout``
        seconds. (One timer handle: ``asyncio.timeout`` around the await
        cost about 8 µs more per connection, 2% of a reconnect storm.)
        """
        if self._held:
            return self._held.pop(0)
        if self.protocol.state is not OPEN:
            raise self.close_exc
        waiter = self._waiter = self.loop.create_future()
        timer = None if timeout is None else self.loop.call_later(timeout, _time_out, waiter)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def set_on_message(self, on_message: Callable[[bytes], None]) -> None:
        """Route messages to ``on_message``, starting with any held ones."""
        held, self._held = self._held, []
        self.on_message = on_message
        protocol = self.protocol
        sizes = [n for n in (getattr(protocol, "max_message_size", None), getattr(protocol, "max_fragment_size", None))
                 if n is not None]
        self._max_size = min(sizes) if sizes else None
        self._fast = self._at_frame_boundary()
        for data in held:
            if self.on_message is not on_message:  # it closed the connection
                break
            on_message(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Messages go to on_message or next_message(), never through recv():
        # websockets' message queue would sit empty for the life of the
        # connection, at about 1.5 KiB each.
        self.recv_messages = _NO_MESSAGES  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._fast = False
        self._buf = b""
        self.on_message = None
        self._held.clear()
        self._out.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.close_exc)

    # ------------------------------------------------------------------
    # Outgoing

    def queue_frame(self, frame: bytes) -> int:
        """Queue a frame made by ``text_frame``; ``flush()`` writes it.

        One frame may be shared among many connections. Whoever flushes
        checks that the connection is still open (``discard_queued`` if not).
        Returns how many frames are queued now.
        """
        out = self._out
        out.append(frame)
        return len(out)

    def discard_queued(self) -> None:
        self._out.clear()

    def flush(self) -> None:
        """Write every queued frame with one ``write``."""
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.transport.write(data)

    def send_data(self) -> None:
        # Whatever websockets writes (a pong, a close frame) goes after the
        # frames already queued: nothing may follow a close frame.
        if self._out:
            self.flush()
        super().send_data()


class _NoMessages:
    """Stands in for websockets' Assembler: this connection delivers messages itself."""

    def close(self) -> None:
        pass

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("deskpush's Connection hands messages to on_message; recv() is not available")

    get = get_iter = put = _refuse


_NO_MESSAGES = _NoMessages()


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _drop(data: bytes) -> None:
    """``on_message`` for a connection that is closing: ignore what still arrives."""
