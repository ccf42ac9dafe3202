"""Hypothesis strategies for bad input: JSON frames from the frame schemas, raw WebSocket bytes, HTTP requests.

* ``json_messages(endpoint, ctx)``: frames the endpoint decodes, built from
  the msgspec Structs of ``deskpush.protocol.frames`` (``msgspec.inspect``:
  every field with its type and limits), then mutated: a field dropped, a
  wrong type, a string past its limit, an unknown ``type``, extra fields,
  deep nesting, huge numbers, invalid UTF-8 (in a used field or an ignored
  one), truncation, garbage, a BOM, duplicate keys... Each message goes in a
  text or binary frame, whole or fragmented, with pings in between.
* ``frame_streams()``: raw frames with every header field chosen: opcode (all
  16), FIN, reserved bits, mask bit and key, the length and how it is written
  (a lie, a non-minimal width, up to 2**64 - 1), control frames (close codes
  valid and not, reasons in bad UTF-8, oversized pings, fragmented control
  frames), fragments in and out of order, floods.
* ``http_requests(ctx)``: the opening request with its method, path, version
  and headers varied, pipelined, truncated.

Everything is a ``Case``: the bytes to send and what the generator knows
about them (whether they end on a frame boundary, which text messages are
not UTF-8), so the runner knows what to expect without parsing them again.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from hypothesis import strategies as st

from deskpush.protocol import frames as f

from .wire import frame

__all__ = ["Case", "Context", "json_messages", "frame_streams", "http_requests", "schema_values"]

encode = msgspec.json.encode
keys = st.binary(min_size=4, max_size=4)  # masking keys: drawn, so a seed gives the same bytes
TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


class Context(msgspec.Struct, frozen=True):
    """What a case may use: credentials that work, ids that exist."""

    agent_tokens: tuple[str, ...]  # valid JWTs of the fuzz agents
    api_key: str  # the fuzz integrator's key
    agent_ids: tuple[str, ...]  # agents a notifyEvent may name (never a bystander)
    templates: tuple[str, ...]


class Case(msgspec.Struct, frozen=True, kw_only=True):
    """One input: the bytes, and what they are."""

    data: bytes
    complete: bool = True  # ends on a frame boundary, no length lies: a ping after it gets its pong
    bad_utf8_text: bool = False  # a complete text message in it is not UTF-8 (RFC 6455 8.1: fail, 1007)
    notes: tuple[str, ...] = ()  # what was done to it, for the report
    messages: tuple[bytes, ...] = ()  # the JSON cases' messages, unmasked

    def describe(self, limit: int = 400) -> str:
        """What a reader needs to send it again: the notes, and the messages or the bytes, repeats folded."""
        what = " + ".join(shorten(m) for m in self.messages) if self.messages else shorten(self.data)
        if len(what) > limit:
            what = what[:limit] + f"... ({len(self.data):,} bytes on the wire)"
        notes = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in "; ".join(self.notes))
        return f"[{notes or 'as generated'}] {what}"


_REPEAT = re.compile(rb"(.{1,8}?)\1{7,}", re.S)


def shorten(data: bytes) -> str:
    """``repr`` of ``data`` with each run of a repeated unit written ``unit×count``."""
    out, pos = [], 0
    for m in _REPEAT.finditer(data):
        if m.start() > pos:
            out.append(repr(data[pos:m.start()]))
        unit = m.group(1)
        out.append(f"{unit!r}×{len(m.group(0)) // len(unit)}")
        pos = m.start() + len(m.group(0)) // len(unit) * len(unit)
    if pos < len(data) or not out:
        out.append(repr(data[pos:]))
    return " ".join(out)


# --------------------------------------------------------------------------
# Values from the schemas

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64), st.floats(allow_nan=False,
                         allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=8)


def schema_values(info: msgspec.inspect.Type, hints: dict[str, st.SearchStrategy] | None = None,
                  name: str = "") -> st.SearchStrategy[Any]:
    """Values valid for ``info`` (a ``msgspec.inspect`` type): what the decoder accepts.

    ``hints`` gives, by wire field name, a strategy that mixes in values that
    mean something to the server (a real agent id, a working token).
    """
    hints = hints or {}
    i = msgspec.inspect
    if name in hints:
        return hints[name]
    if isinstance(info, i.StrType):
        if info.pattern:
            return st.from_regex(info.pattern, fullmatch=True)
        lo = info.min_length or 0
        hi = min(info.max_length if info.max_length is not None else 40, 40)
        return st.text(min_size=lo, max_size=max(lo, hi))
    if isinstance(info, i.BoolType):
        return st.booleans()
    if isinstance(info, i.IntType):
        return st.integers(0, 2**31)
    if isinstance(info, i.FloatType):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(info, i.NoneType):
        return st.none()
    if isinstance(info, i.LiteralType):
        return st.sampled_from(list(info.values))
    if isinstance(info, i.AnyType):
        return json_values
    if isinstance(info, i.DictType):
        return st.dictionaries(st.text(max_size=12), json_values, max_size=min(info.max_length or 8, 6))
    if isinstance(info, (i.ListType, i.VarTupleType)):
        return st.lists(schema_values(info.item_type, hints), max_size=4)
    if isinstance(info, i.UnionType):
        return st.one_of([schema_values(t, hints, name) for t in info.types])
    if isinstance(info, i.StructType):
        required = {fl.encode_name: schema_values(fl.type, hints, fl.encode_name) for fl in info.fields if fl.required}
        optional = {fl.encode_name: schema_values(fl.type, hints, fl.encode_name) for fl in info.fields
                    if not fl.required}
        if info.tag_field is not None:
            required[info.tag_field] = st.just(info.tag)
        return st.fixed_dictionaries(required, optional=optional)
    return json_values


def frames_of(union: Any, ctx: Context, first: bool) -> st.SearchStrategy[dict]:
    """Valid frames of an endpoint's union; ``first``: the hello is likely (the first frame)."""
    info = msgspec.inspect.type_info(union)
    hints = {
        "token": st.one_of(st.sampled_from(ctx.agent_tokens), st.text(min_size=1, max_size=60)),
        "apiKey": st.one_of(st.just(ctx.api_key), st.text(min_size=1, max_size=40)),
        "agentId": st.one_of(st.sampled_from(ctx.agent_ids), st.text(min_size=1, max_size=20).filter(
            lambda s: s not in ("bystander",))),
        "templateName": st.one_of(st.sampled_from(ctx.templates), st.text(min_size=1, max_size=20)),
    }
    structs = [schema_values(t, hints) for t in info.types]
    if first:
        return st.one_of(structs[0], *structs)  # hello first in the union: twice the weight
    return st.one_of(structs)


# --------------------------------------------------------------------------
# Mutations of a JSON frame

BAD_UTF8 = [b"\xff", b"\xfe\xfe", b"\xc3\x28", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
            b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"]
MUTATIONS = ["none", "none", "drop_field", "wrong_type", "oversize", "unknown_type", "extra_fields", "deep_nesting",
             "big_number", "bad_utf8_used", "bad_utf8_ignored", "surrogate_escape", "truncate", "garbage", "not_object",
             "duplicate_key", "bom", "whitespace", "empty", "nul"]
NESTING = [10, 100, 500, 1000, 2000, 5000, 50000]


def _nest(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict]) -> tuple[bytes, list[str], bool]:
    """(message bytes, what was done, whether it is meant as text that is not UTF-8)."""
    obj = dict(draw(base))
    m = draw(st.sampled_from(MUTATIONS))
    notes = [f"{obj.get('type')}:{m}"]
    keys = [k for k in obj if k != "type"] or ["type"]
    bad = False
    if m == "drop_field":
        obj.pop(draw(st.sampled_from(sorted(obj))), None)
    elif m == "wrong_type":
        k = draw(st.sampled_from(sorted(obj)))
        obj[k] = draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.booleans(), st.none(),
                                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.floats()))
    elif m == "oversize":
        k = draw(st.sampled_from(keys))
        obj[k] = "x" * draw(st.sampled_from([129, 257, 4097, 70000]))
    elif m == "unknown_type":
        obj["type"] = draw(st.one_of(st.text(max_size=12), st.sampled_from(["Hello", "HELLO", "notifyevent", "welcome",
                                                                             "result", "", "hello "])))
    elif m == "extra_fields":
        obj.update(draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in obj), json_values, max_size=4)))
    elif m == "big_number":
        k = draw(st.sampled_from(keys))
        raw = encode({**obj, k: 0}).replace(b'"' + k.encode() + b'":0',
                                           b'"' + k.encode() + b'":' + draw(st.sampled_from(
                                               [b"1" * 400, b"-0", b"1e400", b"-1e400", b"NaN", b"Infinity",
                                                b"1.5e-400", b"18446744073709551616"])))
        return raw, notes, False
    elif m == "deep_nesting":
        depth = draw(st.sampled_from(NESTING))
        kind = draw(st.sampled_from(["array", "object"]))
        notes[0] += f"({depth} {kind}s)"
        where = draw(st.sampled_from(["value", "frame", "parameters"]))
        if where == "frame":
            return _nest(depth, kind), notes, False
        k = "templateParameters" if where == "parameters" else draw(st.sampled_from(keys))
        raw = encode({**obj, k: 0}).replace(b'"' + k.encode() + b'":0', b'"' + k.encode() + b'":' + _nest(depth, kind))
        return raw, notes, False
    elif m in ("bad_utf8_used", "bad_utf8_ignored"):
        seq = draw(st.sampled_from(BAD_UTF8))
        if m == "bad_utf8_used":
            k = draw(st.sampled_from(keys))
            obj[k] = "@@BAD@@"
        else:
            obj["note"] = "@@BAD@@"
        return encode(obj).replace(b"@@BAD@@", b"x" + seq + b"y"), notes, True
    elif m == "surrogate_escape":
        k = draw(st.sampled_from(keys))
        obj[k] = "@@SUR@@"
        return encode(obj).replace(b"@@SUR@@", draw(st.sampled_from([b"\\ud800", b"\\udfff", b"\\ud800\\u0041",
                                                                     b"\\u0000"]))), notes, False
    elif m == "truncate":
        raw = encode(obj)
        return raw[:draw(st.integers(0, max(0, len(raw) - 1)))], notes, False
    elif m == "garbage":
        data = draw(st.binary(max_size=64))
        try:
            data.decode()
        except UnicodeDecodeError:
            bad = True
        return data, notes, bad
    elif m == "not_object":
        return draw(st.sampled_from([b"[1,2]", b'"hello"', b"123", b"null", b"true", b"[]", b"{}", b'[{"type":"ping"}]',
                                     b"{", b"}", b'{"type":}', b"{'type':'ping'}"])), notes, False
    elif m == "duplicate_key":
        raw = encode(obj)
        again = encode(draw(st.sampled_from(["hello", "ping", "respond", "notifyEvent", 1])))
        return raw[:-1] + b',"type":' + again + b"}", notes, False
    elif m == "bom":
        return b"\xef\xbb\xbf" + encode(obj), notes, False
    elif m == "whitespace":
        pad = b" \n\t\r" * draw(st.integers(1, 4000))
        return pad + encode(obj) + pad, notes, False
    elif m == "empty":
        return b"", notes, False
    elif m == "nul":
        return encode(obj) + b"\x00", notes, False
    return encode(obj), notes, bad


@st.composite
def json_messages(draw: st.DrawFn, endpoint: str, ctx: Context, first: bool) -> Case:
    """1 to 4 messages (1 when ``first``: the case is about the first frame), each framed its own way."""
    union = f.AgentInbound if endpoint == "agent" else f.IntegratorInbound
    base = frames_of(union, ctx, first)
    count = 1 if first else draw(st.integers(1, 4))
    out, notes, bad_utf8, messages = b"", [], False, []
    for _ in range(count):
        data, why, bad = draw(mutated(base))
        messages.append(data)
        opcode = draw(st.sampled_from([TEXT] * 6 + [BINARY]))
        bad_utf8 |= bad and opcode == TEXT
        pieces = draw(st.sampled_from([1] * 6 + [2, 3]))
        if pieces > 1 and len(data) >= pieces:
            why.append(f"in {pieces} fragments")
            cuts = sorted(draw(st.lists(st.integers(1, len(data) - 1), min_size=pieces - 1, max_size=pieces - 1,
                                        unique=True))) if len(data) > pieces else list(range(1, pieces))
            parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            for n, part in enumerate(parts):
                out += frame(part, opcode if n == 0 else CONT, fin=n == len(parts) - 1, key=draw(keys))
                if draw(st.booleans()) and n < len(parts) - 1:
                    out += frame(b"between", PING, key=draw(keys))  # control frames may come between fragments
        else:
            out += frame(data, opcode, key=draw(keys))
        if opcode == BINARY:
            why.append("binary")
        notes += why
    return Case(data=out, complete=True, bad_utf8_text=bad_utf8, notes=tuple(notes), messages=tuple(messages))


# --------------------------------------------------------------------------
# Raw frames

CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4000, 4401, 4999,
               0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]


@st.composite
def one_frame(draw: st.DrawFn, big: int = 300) -> tuple[bytes, bool, str]:
    """(bytes, ends where it says it ends, a note); payloads up to ``big`` bytes."""
    kind = draw(st.sampled_from(["data", "data", "control", "close", "header", "huge", "lie", "unmasked",
                                 "reserved", "non_minimal"]))
    key = draw(keys)
    payload = draw(st.one_of(st.binary(max_size=min(big, 200)),
                             st.sampled_from([b'{"type":"ping"}', b'{"type":"hello"}', b"", b"\xff\xfe", b"x" * big])))
    if kind == "data":
        op = draw(st.sampled_from([TEXT, BINARY, CONT]))
        fin = draw(st.booleans())
        return frame(payload, op, fin=fin, key=key), True, f"op{op}{'' if fin else ' !fin'} {len(payload)}B"
    if kind == "control":
        op = draw(st.sampled_from([PING, PONG]))
        fin = draw(st.sampled_from([True, True, False]))
        body = payload if draw(st.booleans()) else payload[:125]
        return frame(body, op, fin=fin, key=key), True, f"op{op}{'' if fin else ' !fin'} {len(body)}B"
    if kind == "close":
        shape = draw(st.sampled_from(["code", "code+reason", "empty", "one_byte", "bad_reason", "long_reason"]))
        code = draw(st.sampled_from(CLOSE_CODES)).to_bytes(2, "big")
        body = {"code": code, "code+reason": code + b"bye", "empty": b"", "one_byte": b"\x03",
                "bad_reason": code + b"\xff\xfe", "long_reason": code + b"r" * 124}[shape]
        return frame(body, CLOSE, key=key), True, f"close {shape} {int.from_bytes(code, 'big')}"
    if kind == "header":
        # Only a header (1 or 2 bytes, or up to the mask): the stream ends inside a frame.
        head = frame(payload, draw(st.integers(0, 15)), key=key)
        cut = draw(st.integers(1, min(len(head), 14)))
        return head[:cut], False, f"header cut at {cut}"
    if kind == "huge":
        n = draw(st.sampled_from([65536, 2**20, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]))
        op = draw(st.sampled_from([TEXT, BINARY, CONT, PING, CLOSE, 3]))
        return frame(payload[:16], op, key=key, length=n, width=64), False, f"op{op} says {n:,} bytes"
    if kind == "lie":
        n = len(payload) + draw(st.sampled_from([-3, -1, 1, 7, 100]))
        return frame(payload, TEXT, key=key, length=max(0, n)), n <= len(payload), f"text says {n} of {len(payload)}B"
    if kind == "unmasked":
        op = draw(st.sampled_from([TEXT, BINARY, PING, CLOSE]))
        return frame(payload, op, masked=False), True, f"op{op} unmasked"
    if kind == "reserved":
        op = draw(st.integers(0, 15))
        rsv = draw(st.integers(0, 7))
        return frame(payload, op, rsv=rsv, key=key), True, f"op{op} rsv{rsv}"
    # non_minimal: a small length written in 16 or 64 bits (RFC 6455 5.2: "the minimal number of bytes MUST be used")
    width = draw(st.sampled_from([16, 64]))
    return frame(payload[:100], TEXT, key=key, width=width), True, f"text {min(len(payload), 100)}B in {width} bits"


@st.composite
def frame_streams(draw: st.DrawFn, flood: bool = True, big: int = 300, most: int = 6) -> Case:
    """1 to ``most`` frames, or a flood of one valid frame, or a fragmented message in some order."""
    shape = draw(st.sampled_from(["frames"] * 6 + ["fragments"] + (["flood"] if flood else [])))
    if shape == "flood":
        n = draw(st.sampled_from([50, 250, 1000]))
        one = frame(draw(st.sampled_from([b'{"type":"ping"}', b"{}", b"x"])), TEXT, key=draw(keys))
        return Case(data=one * n, notes=(f"flood of {n} frames",))
    if shape == "fragments":
        parts = draw(st.lists(st.tuples(st.sampled_from([TEXT, BINARY, CONT, PING]), st.booleans(),
                                        st.binary(max_size=20)), min_size=2, max_size=6))
        data = b"".join(frame(p, op, fin=fin, key=draw(keys)) for op, fin, p in parts)
        shape_note = " ".join(f"op{op}{'' if fin else '!fin'}" for op, fin, _ in parts)
        return Case(data=data, notes=(f"fragments: {shape_note}",))
    frames = draw(st.lists(one_frame(big), min_size=1, max_size=most))
    data, complete, notes = b"", True, []
    for raw, whole, note in frames:
        if not complete:
            break  # nothing after a frame that never ends would be read as a frame
        data += raw
        complete = whole
        notes.append(note)
    return Case(data=data, complete=complete, notes=tuple(notes))


# --------------------------------------------------------------------------
# HTTP requests

METHODS = ["GET"] * 8 + ["HEAD", "HEAD", "POST", "PUT", "DELETE", "TRACE", "OPTIONS", "PATCH", "CONNECT", "get",
                         "BREW", "G\x00T"]
PATHS = ["/agent", "/integrator", "/integrator?resumeAfter=$", "/integrator?resumeAfter=bad", "/healthz", "/",
         "/index.html", "/cif.js", "/integrator.html", "/vocabulary.js", "/missing.js", "/../pyproject.toml",
         "/%2e%2e/server/app.py", "/agent?x=1", "//agent", "/healthz?x", "*", "http://x/agent", "/" + "a" * 9000,
         "/\xff", "/agent#frag"]


@st.composite
def one_request(draw: st.DrawFn, ctx: Context) -> tuple[bytes, str, str, bool]:
    """(bytes, method, a note, whether the request line is valid: RFC 9112 section 3)."""
    method = draw(st.sampled_from(METHODS))
    path = draw(st.sampled_from(PATHS))
    version = draw(st.sampled_from(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2", "HTTP/1.1 x", "HTTP/9.9", ""]))
    upgrade = draw(st.sampled_from([True, True, False]))
    headers: list[tuple[str, str]] = []
    if draw(st.sampled_from([True] * 9 + [False])):
        headers.append(("Host", "127.0.0.1"))
    if upgrade:
        headers += [("Upgrade", draw(st.sampled_from(["websocket"] * 5 + ["WebSocket", "h2c", ""]))),
                    ("Connection", draw(st.sampled_from(["Upgrade"] * 5 + ["keep-alive", "upgrade, close", ""])))]
        keys = draw(st.sampled_from([["dGhlIHNhbXBsZSBub25jZQ=="]] * 5 + [[], ["short"], ["a", "b"], ["!" * 24]]))
        headers += [("Sec-WebSocket-Key", k) for k in keys]
        headers.append(("Sec-WebSocket-Version", draw(st.sampled_from(["13"] * 5 + ["8", "", "13, 8"]))))
    auth = draw(st.sampled_from([None] * 4 + [f"Bearer {ctx.api_key}", "Bearer wrong", "Basic dXNlcjpwdw==",
                                                "Bearer", "bearer " + ctx.api_key]))
    if auth is not None:
        headers.append(("Authorization", auth))
    extra = draw(st.sampled_from(["none"] * 6 + ["many", "long", "no_colon", "fold", "body", "chunked",
                                                  "origin", "nul"]))
    body = b""
    if extra == "many":
        headers += [(f"X-H{i}", "v") for i in range(draw(st.sampled_from([100, 300])))]
    elif extra == "long":
        headers.append(("X-Long", "v" * draw(st.sampled_from([8000, 70000]))))
    elif extra == "no_colon":
        headers.append(("X-No-Colon-Here", None))  # type: ignore[arg-type]
    elif extra == "fold":
        headers.append(("X-Fold", "a\r\n b"))
    elif extra == "body":
        body = b'{"type":"ping"}'
        headers.append(("Content-Length", str(len(body))))
    elif extra == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = b"5\r\nhello\r\n0\r\n\r\n"
    elif extra == "origin":
        headers.append(("Origin", draw(st.sampled_from(["http://evil.example", "null", "http://127.0.0.1"]))))
    elif extra == "nul":
        headers.append(("X-Nul", "a\x00b"))
    lines = [f"{method} {path} {version}".rstrip()]
    lines += [name if value is None else f"{name}: {value}" for name, value in headers]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    note = f"{method} {path[:40]} {version}{' upgrade' if upgrade else ''}{'' if extra == 'none' else ' +' + extra}"
    line_ok = (re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", method) is not None and version in ("HTTP/1.1", "HTTP/1.0")
               and all(33 <= ord(c) < 127 for c in path))
    return raw, method, note, line_ok


@st.composite
def http_requests(draw: st.DrawFn, ctx: Context) -> tuple[Case, list[tuple[str, bool]]]:
    """One request, or two or three pipelined in one write, maybe cut short; their methods, and whether
    each request line is valid."""
    n = draw(st.sampled_from([1] * 6 + [2, 3]))
    reqs = [draw(one_request(ctx)) for _ in range(n)]
    data = b"".join(r for r, _, _, _ in reqs)
    notes = [note for _, _, note, _ in reqs]
    if n > 1:
        notes.insert(0, f"{n} pipelined")
    complete = True
    if draw(st.sampled_from([False] * 9 + [True])):
        cut = draw(st.integers(1, len(data) - 1))
        data, complete = data[:cut], False
        notes.append(f"cut at byte {cut}")
    return Case(data=data, complete=complete, notes=tuple(notes)), [(m, ok) for _, m, _, ok in reqs]
