"""WebSocket clients for the runs: websockets' sans-I/O ``ClientProtocol`` on a socket the run owns.

websockets' asyncio client would do for a well-behaved client, but the runs
need what no client library offers: to cut a connection without a closing
handshake (a TCP reset, as when a laptop's network drops), to stop reading (a
desktop that never reads), to write bytes no client would write (the fuzz),
and to hold 2,000 agents that answer from a callback rather than with a task
each. So the HTTP and WebSocket parsing is websockets' (its documented
sans-I/O layer, the same one the server uses), and the socket is ours.

* ``Client``: an asyncio connection; messages go to a callback or a queue.
* ``SyncClient``: the same on a blocking socket, for the fuzz, which writes
  raw bytes after the handshake and records everything the server answers.
* ``frame()``: a client-to-server frame built by hand, masked or not.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from websockets import ClientProtocol, Frame, Opcode, State
from websockets.frames import Close
from websockets.http11 import Response
from websockets.uri import parse_uri

__all__ = ["Client", "ClientClosed", "Proxy", "SyncClient", "Seen", "frame", "mask"]

encode = msgspec.json.encode
decode = msgspec.json.decode
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


class ClientClosed(Exception):
    """The connection ended before what was awaited arrived."""


def mask(data: bytes, key: bytes) -> bytes:
    """``data`` XOR the 4-byte ``key`` repeated (RFC 6455 section 5.3)."""
    n = len(data)
    if not n:
        return b""
    k = int.from_bytes((key * ((n + 3) // 4))[:n], "big")
    return (int.from_bytes(data, "big") ^ k).to_bytes(n, "big")


def frame(payload: bytes, opcode: int = 1, *, fin: bool = True, rsv: int = 0, masked: bool = True,
          key: bytes | None = None, length: int | None = None, width: int | None = None) -> bytes:
    """One client frame, byte for byte as asked (RFC 6455 section 5.2), including what the RFC forbids.

    Args:
        payload: the payload, unmasked.
        opcode: 0 to 15.
        fin, rsv: the FIN bit and the three reserved bits (0 to 7).
        masked: set the MASK bit and mask the payload with ``key`` (random when None).
        length: the length to declare (default: the payload's); a lie makes the frame
            end early or swallow what follows.
        width: how to write the length: 7, 16 or 64 bits (default: the shortest).
    """
    n = len(payload) if length is None else length
    if width is None:
        width = 7 if n < 126 else 16 if n < 65536 else 64
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)])
    m = 0x80 if masked else 0
    if width == 7:
        head += bytes([m | (n & 0x7F)])
    elif width == 16:
        head += bytes([m | 126]) + (n & 0xFFFF).to_bytes(2, "big")
    else:
        head += bytes([m | 127]) + (n & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
    if masked:
        key = os.urandom(4) if key is None else key
        return head + key + mask(payload, key)
    return head + payload


# --------------------------------------------------------------------------
# asyncio


class Client(asyncio.Protocol):
    """One client connection. Open with ``await Client.open(...)``.

    Messages go to ``on_message(client, data)`` when given, else to a queue
    read with ``recv()``. ``ended`` resolves when TCP is gone, with the close
    code and reason the server sent (None, "" when it sent no close frame).
    """

    def __init__(self, host: str, port: int, path: str, headers: Iterable[tuple[str, str]],
                 on_message: Callable[[Client, bytes], None] | None, max_size: int | None) -> None:
        self.protocol = ClientProtocol(parse_uri(f"ws://{host}:{port}{path}"), max_size=max_size)
        self.headers = list(headers)
        self.on_message = on_message
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[Response] = loop.create_future()
        self.ended: asyncio.Future[tuple[int | None, str]] = loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.fragments: list[bytes] | None = None

    @classmethod
    async def open(cls, host: str, port: int, path: str, *, headers: Iterable[tuple[str, str]] = (),
                   on_message: Callable[[Client, bytes], None] | None = None, timeout: float = 10.0,
                   rcvbuf: int | None = None, max_size: int | None = None) -> Client:
        """Connect and complete the handshake; raises ``ConnectionError`` if it is refused."""
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        if rcvbuf is not None:  # before connect, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (host, port))
                _, client = await loop.create_connection(
                    lambda: cls(host, port, path, headers, on_message, max_size), sock=sock)
                response = await client.opened
        except BaseException:
            sock.close()
            raise
        if response.status_code != 101:
            client.cut()
            raise ConnectionError(f"{path}: HTTP {response.status_code} {response.body!r}")
        return client

    # -- what the run does with it

    @property
    def open_now(self) -> bool:
        return self.protocol.state is State.OPEN and self.transport is not None and not self.transport.is_closing()

    def send(self, obj: Any) -> bool:
        """Send one JSON text message; False when the connection is no longer open."""
        return self.send_bytes(encode(obj))

    def send_bytes(self, data: bytes, *, text: bool = True) -> bool:
        if not self.open_now:
            return False
        if text:
            self.protocol.send_text(data)
        else:
            self.protocol.send_binary(data)
        self._write()
        return True

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are, after the handshake (frames built with ``frame()``)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def recv(self, timeout: float = 10.0) -> dict:
        """The next message as JSON (only without ``on_message``)."""
        get = asyncio.ensure_future(self.queue.get())
        try:
            done, _ = await asyncio.wait({get, self.ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        if get in done:
            return decode(get.result())
        if self.ended.done():
            raise ClientClosed(f"closed {self.ended.result()}")
        raise TimeoutError("no message")

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the server closes TCP."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._write()

    def cut(self) -> None:
        """Drop the connection at once with a TCP reset: no close frame, no FIN."""
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.transport.abort()

    def pause_reading(self) -> None:
        """Stop reading: what the server sends piles up in its buffers."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def wait_ended(self, timeout: float = 10.0) -> tuple[int | None, str]:
        return await asyncio.wait_for(asyncio.shield(self.ended), timeout)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = self.protocol.connect()
        for name, value in self.headers:
            request.headers[name] = value
        self.protocol.send_request(request)
        self._write()

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Response):
                if not self.opened.done():
                    self.opened.set_result(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._write()

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self._write()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost in the handshake: {exc}"))
        if not self.ended.done():
            self.ended.set_result((self.close_code, self.close_reason))

    def _frame(self, event: Frame) -> None:
        op = event.opcode
        if op is Opcode.TEXT or op is Opcode.BINARY:
            if event.fin:
                self._message(bytes(event.data))
            else:
                self.fragments = [bytes(event.data)]
        elif op is Opcode.CONT and self.fragments is not None:
            self.fragments.append(bytes(event.data))
            if event.fin:
                data, self.fragments = b"".join(self.fragments), None
                self._message(data)
        elif op is Opcode.CLOSE:
            close = Close.parse(event.data)
            self.close_code, self.close_reason = close.code, close.reason

    def _message(self, data: bytes) -> None:
        if self.on_message is not None:
            self.on_message(self, data)
        else:
            self.queue.put_nowait(data)

    def _write(self) -> None:
        transport = self.transport
        for data in self.protocol.data_to_send():
            if transport is None or transport.is_closing():
                return
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                try:
                    transport.write_eof()
                except OSError:
                    transport.abort()


# --------------------------------------------------------------------------
# Blocking, for the fuzz


class Seen(msgspec.Struct, kw_only=True):
    """What a fuzz case's connection saw from the server."""

    status: int | None = None  # HTTP status of the answer to the request
    head: bytes = b""  # the HTTP response head, as sent
    body: bytes = b""  # an HTTP response's body (for a non-101 answer)
    messages: list[bytes] = []
    pongs: list[bytes] = []
    close_code: int | None = None
    close_reason: str = ""
    eof: bool = False  # the server closed TCP
    reset: bool = False  # ... with a reset
    hung: bool = False  # it did neither within the time allowed
    raw: bytes = b""  # every byte received, for a non-WebSocket answer


class SyncClient:
    """A fuzz connection: a blocking socket whose server side websockets parses.

    The handshake is websockets' (``ClientProtocol``); after it the fuzz writes
    what it likes with ``send_raw``. Everything the server sends is parsed as
    a client would and recorded in ``seen``; what the client protocol would
    answer (pongs, close frames) is not sent unless asked: the fuzz decides
    every byte that goes out.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.protocol: ClientProtocol | None = None
        self.seen = Seen()
        self.fragments: list[bytes] | None = None

    def handshake(self, path: str, headers: Iterable[tuple[str, str]] = ()) -> bool:
        """Send websockets' upgrade request for ``path``; True once the 101 came."""
        self.protocol = ClientProtocol(parse_uri(f"ws://{self.host}:{self.port}{path}"), max_size=None)
        request = self.protocol.connect()
        for name, value in headers:
            request.headers[name] = value
        self.protocol.send_request(request)
        self.sock.sendall(b"".join(self.protocol.data_to_send()))
        deadline = time.monotonic() + self.sock.gettimeout()
        while self.seen.status is None and not self.seen.eof:
            if not self._read(deadline):
                break
        return self.seen.status == 101

    def send_raw(self, data: bytes) -> bool:
        """False when the server has already gone (a reset or a closed socket)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.seen.reset = True
            return False

    def wait_for(self, done: Callable[[Seen], bool], timeout: float) -> bool:
        """Read until ``done(seen)``, the end of the connection, or ``timeout``; True if done."""
        deadline = time.monotonic() + timeout
        while not done(self.seen):
            if self.seen.eof or not self._read(deadline):
                return done(self.seen)
        return True

    def finish(self, timeout: float) -> Seen:
        """Half-close (EOF to the server) and read until the server closes, or mark it hung."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while not self.seen.eof:
            if not self._read(deadline):
                if not self.seen.eof:
                    self.seen.hung = True
                break
        self.sock.close()
        return self.seen

    def _read(self, deadline: float) -> bool:
        """One recv into the parser; False on timeout."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            self.seen.reset = self.seen.eof = True
            return True
        except OSError:
            self.seen.eof = True
            return True
        if not data:
            self.seen.eof = True
        self._parse(data)
        return True

    def _parse(self, data: bytes) -> None:
        seen = self.seen
        seen.raw += data
        if self.protocol is None:
            return
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                seen.status = event.status_code
                seen.body = bytes(event.body or b"")
                seen.head = seen.raw.partition(b"\r\n\r\n")[0]
            elif isinstance(event, Frame):
                op = event.opcode
                if op is Opcode.TEXT or op is Opcode.BINARY:
                    if event.fin:
                        seen.messages.append(bytes(event.data))
                    else:
                        self.fragments = [bytes(event.data)]
                elif op is Opcode.CONT and self.fragments is not None:
                    self.fragments.append(bytes(event.data))
                    if event.fin:
                        seen.messages.append(b"".join(self.fragments))
                        self.fragments = None
                elif op is Opcode.PONG:
                    seen.pongs.append(bytes(event.data))
                elif op is Opcode.CLOSE and seen.close_code is None:
                    try:
                        close = Close.parse(event.data)
                        seen.close_code, seen.close_reason = close.code, close.reason
                    except Exception:  # the server sent a malformed close frame: record it as such
                        seen.close_code, seen.close_reason = -1, repr(bytes(event.data))
        self.protocol.data_to_send()  # the fuzz writes its own bytes; the protocol's answers are dropped


# --------------------------------------------------------------------------
# A relay whose connections the run can cut, for a client whose socket it cannot reach


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a FIN."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abort()


class _Leg(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.peer: _Leg | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if not peer.transport.is_closing():
                peer.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.pairs.discard(self)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.close()


class Proxy:
    """A TCP relay from a port of its own to the server's, whose connections ``cut()`` resets.

    For a client that owns its socket (the Python SDK): its connection runs
    through the relay, and a cut resets both legs, so the client sees what a
    dropped network gives it.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.pairs: set[_Leg] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Proxy:
        loop = asyncio.get_running_loop()

        def accept() -> _Leg:
            down = _Leg(self)
            self.pairs.add(down)
            asyncio.ensure_future(self._connect(down))
            return down

        self.server = await loop.create_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _connect(self, down: _Leg) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: _Leg(self), "127.0.0.1", self.upstream_port)
        except OSError:
            _reset(down.transport)
            return
        up.peer, down.peer = down, up
        for data in down.early:
            up.transport.write(data)  # type: ignore[union-attr]
        down.early.clear()

    def cut(self, abrupt: bool = True) -> int:
        """End every relayed connection, both legs: with resets, or with FINs; how many."""
        n = 0
        for down in list(self.pairs):
            for leg in (down, down.peer):
                if leg is not None:
                    if abrupt:
                        _reset(leg.transport)
                    elif leg.transport is not None:
                        leg.transport.close()
            n += 1
        self.pairs.clear()
        return n

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
