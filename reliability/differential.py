"""deskpush's own frame parser against websockets' ``ServerProtocol`` alone: the same bytes, split everywhere.

``server.connection.Connection`` reads frame headers itself, handles the
common data frame on its own fast path and feeds every other frame, whole, to
websockets' ``ServerProtocol`` (see its module docstring). The claim to check
is that this changes nothing a client could notice: whatever bytes arrive,
however TCP splits them, the server behaves as websockets' parser alone would.

The deskpush side is a real ``Connection`` driven through its public
``asyncio.Protocol`` methods (``connection_made``, ``data_received``,
``eof_received``, ``connection_lost``) with a recording transport, a fake
loop (only ``call_later``/``call_at``/``time``; pings are off) and a handler
that accepts the handshake and records each message its session is given.
The reference is a bare ``ServerProtocol`` used as its documentation says a
server uses it: the request head, ``accept()`` and ``send_response()``, then
every byte after the head, one ``receive_data()`` each with its events handled
before the next, then ``receive_eof()``; its messages are its data frames
from ``events_received()``, fragments joined. Where deskpush adds a rule of
its own on top of websockets, failing a message that is not UTF-8 with 1007
(RFC 6455 section 8.1; websockets' sans-I/O layer leaves that to its caller),
the reference applies the same rule; whether deskpush has it is asked of its
``Connection`` first (``utf8_rule``) and reported.

For each stream (an upgrade request followed by generated frames, see
``strategies.frame_streams``), deskpush's side runs once per split point (the
stream in two writes, cut after byte 1, 2, ... n-1), once whole and once a byte
per write, and each run must match the reference in

1. the messages handed to the application, in order, byte for byte (not
   whether each came as text or binary: deskpush's session is not told, by
   design, and decodes both the same);
2. every byte the server writes after its 101 response's head: pongs, the
   close frame with its code and reason;
3. whether the server ends the TCP stream (half-close or abort), after the
   stream and after the client's EOF.

websockets logging an error (its parser failing inside) on either side
counts as a mismatch too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from websockets import Frame, Opcode, ServerProtocol
from websockets.http11 import Request, Response

from deskpush.server.connection import Connection, ConnectionOptions

from .strategies import Case, frame_streams

__all__ = ["ConnectionOptions", "Observed", "deskpush_side", "websockets_side", "utf8_rule", "check_stream",
           "run_differential", "REQUEST"]

REQUEST = (b"GET /agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
MAX_SIZE = 256  # small, so that generated frames cross it


class Observed(msgspec.Struct, frozen=True):
    """What one side did with a stream."""

    messages: tuple[bytes, ...]
    written: bytes  # after the 101 response's head
    ended: bool  # the server ended the TCP stream (EOF written or connection aborted)


# --------------------------------------------------------------------------
# deskpush's side: a real Connection on fakes


class _Handle:
    def cancel(self) -> None:
        pass


class _Loop:
    """What ``Connection`` asks of its loop, with no time passing."""

    def time(self) -> float:
        return 0.0

    def call_later(self, delay: float, callback: Any, *args: Any) -> _Handle:
        return _Handle()

    def call_at(self, when: float, callback: Any, *args: Any) -> _Handle:
        return _Handle()


class _Transport:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.closing = False
        self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.closing and not self.eof, "write after the end"
        self.data.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default


class _Recorder:
    """Handler and session at once: accepts the handshake, records messages."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def respond(self, conn: Connection, request: Request) -> Response | None:
        return None

    def open(self, conn: Connection) -> _Recorder:
        return self

    def message(self, data: bytes) -> None:
        self.messages.append(bytes(data))

    def closed(self, conn: Connection | None = None) -> None:
        pass


OPTIONS = ConnectionOptions(max_size=MAX_SIZE, ping_interval=0, ping_timeout=0)


def deskpush_side(pieces: list[bytes], options: ConnectionOptions = OPTIONS) -> Observed:
    """``Connection`` fed ``pieces`` one ``data_received`` each, then EOF."""
    rec, transport = _Recorder(), _Transport()
    conn = Connection(rec, options, _Loop())  # type: ignore[arg-type]
    conn.connection_made(transport)  # type: ignore[arg-type]
    for piece in pieces:
        if transport.closing:
            break  # asyncio delivers nothing to a closed transport's protocol
        conn.data_received(piece)
    if not transport.closing:
        conn.eof_received()
    conn.connection_lost(None)
    written = b"".join(transport.data)
    return Observed(tuple(rec.messages), written.partition(b"\r\n\r\n")[2], transport.eof or transport.closing)


# --------------------------------------------------------------------------
# websockets' side: ServerProtocol alone


def websockets_side(stream: bytes, utf8: tuple[bool, bool] = (False, False)) -> Observed:
    """A bare ``ServerProtocol`` fed the stream a byte at a time, its events handled after each byte.

    ``utf8`` (text, binary): fail a message that is not UTF-8 with 1007, as
    deskpush does on top of websockets once it checks that (websockets'
    sans-I/O layer does not; its asyncio layer does, for text, when it
    decodes). Handling the events after each byte is what an application
    does that reacts to each event before reading on: nothing after a
    message that fails the connection is read.
    """
    p = ServerProtocol(max_size=MAX_SIZE)
    end = stream.index(b"\r\n\r\n") + 4
    p.receive_data(stream[:end])
    (request,) = [e for e in p.events_received() if isinstance(e, Request)]
    p.send_response(p.accept(request))
    head = b"".join(p.data_to_send())
    assert head.endswith(b"\r\n\r\n")
    messages: list[bytes] = []
    fragments: list[bytes] | None = None
    first: Opcode | None = None
    out: list[bytes] = []
    ended = failed = False

    def message(data: bytes, opcode: Opcode) -> None:
        nonlocal failed
        if failed:
            return
        if utf8[0 if opcode is Opcode.TEXT else 1]:
            try:
                data.decode()
            except UnicodeDecodeError as exc:
                p.fail(1007, f"{exc.reason} at position {exc.start}")
                failed = True
                return
        messages.append(data)

    def drain() -> None:
        nonlocal fragments, first, ended
        for e in p.events_received():
            if not isinstance(e, Frame):
                continue
            if e.opcode in (Opcode.TEXT, Opcode.BINARY):
                if e.fin:
                    message(bytes(e.data), e.opcode)
                else:
                    fragments, first = [bytes(e.data)], e.opcode
            elif e.opcode is Opcode.CONT and fragments is not None:
                fragments.append(bytes(e.data))
                if e.fin:
                    assert first is not None
                    message(b"".join(fragments), first)
                    fragments = None
        for data in p.data_to_send():
            if data:
                out.append(data)
            else:
                ended = True

    for i in range(end, len(stream)):
        p.receive_data(stream[i:i + 1])
        drain()
    if not ended:
        p.receive_eof()
        drain()
    return Observed(tuple(messages), b"".join(out), ended or p.close_expected())


def utf8_rule() -> tuple[bool, bool]:
    """Whether this deskpush fails a message that is not UTF-8 (text, binary), asked of its Connection."""
    from .wire import frame

    def fails(opcode: int) -> bool:
        got = deskpush_side([REQUEST + frame(b"\xff", opcode, key=b"abcd")])
        return not got.messages and got.written[:2] == b"\x88" + bytes([len(got.written) - 2]) \
            and got.written[2:4] == (1007).to_bytes(2, "big")

    return fails(1), fails(2)


# --------------------------------------------------------------------------
# The check


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@dataclass
class DiffResult:
    streams: int = 0
    runs: int = 0
    bytes: int = 0
    mismatches: list[dict] = field(default_factory=list)
    closes: dict[str, int] = field(default_factory=dict)


def check_stream(case: Case, result: DiffResult, utf8: tuple[bool, bool] = (False, False)) -> None:
    stream = REQUEST + case.data
    errors = _Errors()
    ws_log = logging.getLogger("websockets")
    ws_log.addHandler(errors)
    try:
        want = websockets_side(stream, utf8)
        splits = [[stream[:k], stream[k:]] for k in range(1, len(stream))]
        splits += [[stream], [stream[i:i + 1] for i in range(len(stream))]]
        result.streams += 1
        result.bytes += len(stream)
        code = _close_code(want.written)
        result.closes[code] = result.closes.get(code, 0) + 1
        for pieces in splits:
            result.runs += 1
            got = deskpush_side(pieces)
            if got != want or errors.records:
                result.mismatches.append({
                    "input": case.describe(), "split": [len(x) for x in pieces][:3],
                    "deskpush": _show(got), "websockets": _show(want), "logged": errors.records[:2]})
                break  # one split is enough to show it; the next stream
    finally:
        ws_log.removeHandler(errors)


def server_frames(written: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked frame the server wrote."""
    out, pos = [], 0
    while pos + 2 <= len(written):
        op, n = written[pos] & 0x0F, written[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n, pos = int.from_bytes(written[pos:pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(written[pos:pos + 8], "big"), pos + 8
        out.append((op, written[pos:pos + n]))
        pos += n
    return out


def _close_code(written: bytes) -> str:
    """The code of the close frame the server wrote, if it wrote one."""
    for op, payload in server_frames(written):
        if op == 8:
            return str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "close without a code"
    return "no close frame"


def _show(o: Observed) -> str:
    return f"messages {[m[:40] for m in o.messages][:4]}, wrote {o.written[:60]!r}, ended {o.ended}"


def run_differential(n: int, seed: int) -> dict[str, Any]:
    """``n`` generated streams, each checked at every split."""
    result = DiffResult()
    utf8 = utf8_rule()

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate], derandomize=False,
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, print_blob=False)
    @hypothesis_seed(seed)
    @given(frame_streams(flood=False, big=MAX_SIZE + 20, most=5))
    def test(case: Case) -> None:
        check_stream(case, result, utf8)

    test()
    return {"streams": result.streams, "runs": result.runs, "bytes": result.bytes,
            "mismatches": result.mismatches[:10], "mismatch_count": len(result.mismatches),
            "closes": dict(sorted(result.closes.items(), key=lambda kv: -kv[1])), "utf8_rule": utf8}
