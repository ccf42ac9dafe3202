"""A websockets ``ServerConnection`` with a synchronous path for messages.

deskpush's work for one message never awaits: decode it, call the engine, frame
what the engine answers. Running that through ``recv()`` costs more than the
work itself: every message goes through the connection's queue, wakes the
handler task and resumes a chain of coroutines. ``Connection`` hands each
complete message to ``on_message`` from ``data_received`` instead, in the loop
iteration that read it, and queues outgoing text frames in a list that
``flush()`` writes with one ``write``.

What stays with websockets: the handshake, parsing and unmasking frames,
fragmented messages, ``max_size``, ping/pong and keepalive, and the closing
handshake. What this module does itself is the one frame a server sends most,
an unmasked, unfragmented, uncompressed text frame (RFC 6455, section 5.2),
which ``tests/test_connection.py`` checks byte for byte against websockets'
own ``Frame.serialize``.

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
from websockets.frames import Frame, Opcode
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Called with each complete message (text or binary) as bytes.
        self.on_message: Callable[[bytes], None] | None = None
        self._held: list[bytes] = []
        self._waiter: asyncio.Future[bytes] | None = None
        self._parts: list[bytes] | None = None
        self._out: list[bytes] = []

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

    async def next_message(self) -> bytes:
        """The next message not yet handed to ``on_message``; ConnectionClosed once closed."""
        if self._held:
            return self._held.pop(0)
        if self.protocol.state is not OPEN:
            raise self.close_exc
        waiter = self._waiter = self.loop.create_future()
        try:
            return await waiter
        finally:
            self._waiter = None

    def set_on_message(self, on_message: Callable[[bytes], None]) -> None:
        """Route messages to ``on_message``, starting with any held ones."""
        held, self._held = self._held, []
        self.on_message = on_message
        for data in held:
            if self.on_message is not on_message:  # it closed the connection
                break
            on_message(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.on_message = None
        self._held.clear()
        self._out.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.close_exc)

    # ------------------------------------------------------------------
    # Outgoing

    def queue_frame(self, frame: bytes) -> None:
        """Queue a frame made by ``text_frame``; ``flush()`` writes it.

        The caller checks that the connection is open, and may share one
        frame among many connections.
        """
        self._out.append(frame)

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


def _drop(data: bytes) -> None:
    """``on_message`` for a connection that is closing: ignore what still arrives."""
