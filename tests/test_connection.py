"""server.connection: the handshake, the frames deskpush parses itself, those it hands to websockets."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
# The sans-I/O client protocol that websockets.asyncio's client drives.
from websockets.asyncio.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets import ServerProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection
from deskpush.server.connection import text_frame, unmask

from .conftest import API_KEY, SECRET, UNIT, open_agent, open_integrator, recv_json, send_json

NOTIFY = {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "progress": False,
          "input": {"templateName": "msdyn_chat_incoming_unauthenticated", "templateParameters": {}}}


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_text_frame_is_what_websockets_would_send(size):
    data = b"x" * size
    assert text_frame(data) == Frame(Opcode.TEXT, data).serialize(mask=False)


@given(st.binary(max_size=300))
def test_text_frame_round_trips_through_a_client_parser(data):
    client = ClientProtocol(parse_uri("ws://h/agent"), state=State.OPEN)  # frames only, no handshake
    client.receive_data(text_frame(data))
    (frame,) = client.events_received()
    assert frame.opcode is Opcode.TEXT and frame.fin and bytes(frame.data) == data


@given(st.binary(max_size=70_000))
def test_unmask_undoes_a_clients_mask(data):
    client = ClientProtocol(parse_uri("ws://h/agent"), state=State.OPEN)
    client.send_text(data)
    (wire,) = client.data_to_send()
    start = len(wire) - len(data)
    assert unmask(wire[start:], wire[start - 4:start]) == data


async def test_fragmented_message_is_one_frame(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    text = json.dumps(NOTIFY)
    await ig.send([text[:10], text[10:40], text[40:]])  # three frames, one message
    assert (await recv_json(agent))["type"] == "notification"


async def test_frames_sent_with_the_handshake_are_all_handled(server):
    """A client that does not wait for the 101 before its frames loses none of them."""
    client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{server.port}/agent"))
    client.send_request(client.connect())
    handshake = b"".join(client.data_to_send())
    framer = ClientProtocol(parse_uri(f"ws://127.0.0.1:{server.port}/agent"), state=State.OPEN)
    hello = {"type": "hello", "token": server.tokens.issue("agent-7")}
    for frame in (hello, {"type": "ping"}, {"type": "ping"}):
        framer.send_text(json.dumps(frame).encode())
    frames = b"".join(framer.data_to_send())  # framed as an open client would, ahead of the answer

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(handshake + frames)
    got: list[dict] = []
    async with asyncio.timeout(5 * UNIT):
        while len(got) < 3:
            client.receive_data(await reader.read(65536))
            for event in client.events_received():
                if isinstance(event, Frame):
                    got.append(json.loads(event.data))
    assert [g["type"] for g in got] == ["welcome", "pong", "pong"]
    writer.close()


async def test_a_bug_while_handling_closes_that_connection_with_1011(server, monkeypatch, caplog):
    def broken(effects):
        raise RuntimeError("boom")

    victim, _ = await open_agent(server, "victim")
    monkeypatch.setattr(server.dispatcher, "apply", broken)
    await send_json(victim, {"type": "ping"})
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(5 * UNIT):
            while True:
                await victim.recv()
    assert victim.close_code == 1011
    assert "error handling a message" in caplog.text
    # Everybody else carries on.
    monkeypatch.undo()
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    await send_json(ig, NOTIFY)
    assert (await recv_json(agent))["type"] == "notification"


async def test_keepalive_pings_are_answered(server):
    agent, _ = await open_agent(server)
    latency = await asyncio.wait_for(await agent.ping(), 5 * UNIT)
    assert latency >= 0
    await send_json(agent, {"type": "ping"})
    assert (await recv_json(agent))["type"] == "pong"


async def test_a_flood_gets_its_burst_answered_then_1008():
    """Every frame within the burst is answered, in order, before the close frame."""
    config = Config(server=ServerSection(host="127.0.0.1", port=0, agent_rate=0.001, agent_burst=20))
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        agent, _ = await open_agent(srv)
        for _ in range(30):
            await send_json(agent, {"type": "ping"})
        pongs = 0
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5 * UNIT):
                while True:
                    assert json.loads(await agent.recv())["type"] == "pong"
                    pongs += 1
        assert pongs == 20  # the burst; the hello is not counted
        assert agent.close_code == 1008


def _client_bytes(port: int) -> tuple[ClientProtocol, bytes]:
    """A sans-I/O client and the bytes of its handshake request."""
    client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/agent"))
    client.send_request(client.connect())
    return client, b"".join(client.data_to_send())


def _frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


PING = json.dumps({"type": "ping"}).encode()


async def _raw_agent(server) -> tuple[ClientProtocol, asyncio.StreamReader, asyncio.StreamWriter]:
    """An agent on a raw socket, past its hello: frames can then be written byte by byte."""
    client, request = _client_bytes(server.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request)
    while client.state is not client.state.OPEN:
        client.receive_data(await reader.read(65536))
    client.events_received()  # the handshake response
    hello = json.dumps({"type": "hello", "token": server.tokens.issue("agent-7")}).encode()
    writer.write(_frame(Opcode.TEXT, hello))
    while not client.events_received():  # the welcome: the fast path is on from here
        client.receive_data(await reader.read(65536))
    return client, reader, writer


async def _goodbye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close as a client should, so the server's shutdown need not wait for us."""
    writer.write(_frame(Opcode.CLOSE, (1000).to_bytes(2, "big")))
    async with asyncio.timeout(5 * UNIT):
        while await reader.read(65536):
            pass
    writer.close()


@pytest.fixture
async def roomy():
    """A server whose rate limit leaves room for a long mix of frames."""
    config = Config(server=ServerSection(host="127.0.0.1", port=0, agent_rate=1000, agent_burst=1000))
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        yield srv


@pytest.mark.parametrize("seed", range(8))
async def test_any_mix_of_frames_in_any_chunks(roomy, monkeypatch, seed):
    """Whole, fragmented and control frames, cut anywhere: every one answered, in order."""
    import random

    # Bytes websockets' parser is given after the hello: only the frames it
    # must parse (control frames and fragments), never a whole data frame.
    fed: list[bytes] = []
    receive_data = ServerProtocol.receive_data

    def counting(self, data):
        fed.append(bytes(data))
        receive_data(self, data)

    server = roomy
    rng = random.Random(seed)
    client, reader, writer = await _raw_agent(server)
    monkeypatch.setattr(ServerProtocol, "receive_data", counting)
    stream = []
    expected = []
    for_websockets = 0
    for i in range(60):
        kind = rng.choice(["text", "text", "text", "binary", "fragments", "ping", "big"])
        if kind == "text":
            stream.append(_frame(Opcode.TEXT, PING))
            expected.append("pong")
        elif kind == "binary":
            stream.append(_frame(Opcode.BINARY, PING))
            expected.append("pong")
        elif kind == "big":  # a 16-bit length: padded past 125 bytes with an unknown field
            body = json.dumps({"type": "ping", "pad": "x" * rng.randrange(120, 3000)}).encode()
            stream.append(_frame(Opcode.TEXT, body))
            expected.append("pong")  # unknown fields are ignored
        elif kind == "fragments":
            cut = rng.randrange(1, len(PING))
            first, last = _frame(Opcode.TEXT, PING[:cut], fin=False), _frame(Opcode.CONT, PING[cut:])
            stream.append(first)
            for_websockets += len(first) + len(last)
            if rng.random() < 0.5:  # a control frame may come between fragments
                stream.append(_frame(Opcode.PING, b"mid%d" % i))
                expected.append(f"PONG mid{i}")
                for_websockets += len(stream[-1])
            stream.append(last)
            expected.append("pong")
        else:
            stream.append(_frame(Opcode.PING, b"p%d" % i))
            expected.append(f"PONG p{i}")
            for_websockets += len(stream[-1])
    data = b"".join(stream)
    while data:
        n = rng.choice([1, 2, 3, 5, 7, 40, 300, 5000])
        writer.write(data[:n])
        data = data[n:]
        await writer.drain()
        if rng.random() < 0.3:
            await asyncio.sleep(0.001)
    got: list[str] = []
    async with asyncio.timeout(10 * UNIT):
        while len(got) < len(expected):
            client.receive_data(await reader.read(65536))
            for event in client.events_received():
                if event.opcode is Opcode.PONG:
                    got.append(f"PONG {event.data.decode()}")
                elif event.opcode is Opcode.TEXT:
                    got.append(json.loads(event.data)["type"])
    # Control frames are answered as they are parsed, messages once handled,
    # so a pong may overtake the replies to messages of the same read (as in
    # websockets itself): each kind in order, none missing.
    assert [g for g in got if g.startswith("PONG")] == [e for e in expected if e.startswith("PONG")]
    assert [g for g in got if not g.startswith("PONG")] == [e for e in expected if not e.startswith("PONG")]
    assert sum(map(len, fed)) == for_websockets  # every whole data frame was deskpush's to parse
    await _goodbye(reader, writer)


async def test_an_oversized_frame_on_the_fast_path_closes_1009():
    config = Config(server=ServerSection(host="127.0.0.1", port=0, max_size=1000))
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        agent, _ = await open_agent(srv)
        await send_json(agent, {"type": "ping"})
        assert (await recv_json(agent))["type"] == "pong"
        await agent.send(json.dumps({"type": "ping", "pad": "x" * 2000}))
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5 * UNIT):
                while True:
                    await agent.recv()
        assert agent.close_code == 1009


def _masked(head1: int, payload: bytes, length_bytes: bytes | None = None) -> bytes:
    """A frame built by hand: ``head1`` as given, masked with a zero key."""
    n = len(payload)
    if length_bytes is None:
        length_bytes = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return bytes([head1]) + length_bytes + b"\0\0\0\0" + payload


BAD_FRAMES = {
    "unmasked": (Frame(Opcode.TEXT, PING).serialize(mask=False), 1002),
    "reserved bit": (_masked(0x80 | 0x40 | 0x1, PING), 1002),
    "reserved opcode": (_masked(0x80 | 0x3, PING), 1002),
    "continuation first": (_masked(0x80 | 0x0, PING), 1002),
    "64-bit length past max_size": (_masked(0x81, b"", bytes([0x80 | 127]) + (1 << 20).to_bytes(8, "big")), 1009),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
async def test_a_bad_frame_fails_only_its_connection(server, name):
    data, code = BAD_FRAMES[name]
    other, _ = await open_agent(server, "other")
    client, reader, writer = await _raw_agent(server)
    writer.write(_frame(Opcode.TEXT, PING) + data)
    got = []
    async with asyncio.timeout(5 * UNIT):
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            client.receive_data(chunk)
            got += client.events_received()
    assert json.loads(got[0].data)["type"] == "pong"  # the good frame before it was handled
    closes = [e for e in got if e.opcode is Opcode.CLOSE]
    assert closes and closes[0].data[:2] == code.to_bytes(2, "big")
    writer.close()
    await send_json(other, {"type": "ping"})
    assert (await recv_json(other))["type"] == "pong"


async def test_a_client_gone_mid_frame_is_just_disconnected(server, caplog):
    """Half a frame, then the socket closes: the session ends, nothing is logged as an error."""
    client, reader, writer = await _raw_agent(server)
    assert server.engine.statistics()["agentSessions"] == 1
    frame = _frame(Opcode.TEXT, PING)
    writer.write(frame[: len(frame) // 2])
    await writer.drain()
    writer.close()
    async with asyncio.timeout(5 * UNIT):
        while server.engine.statistics()["agentSessions"]:
            await asyncio.sleep(0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_start_of_a_bad_frame_then_eof_fails_as_websockets_would(server):
    """Three bytes of a frame with an invalid opcode, then EOF: 1002, as websockets alone
    answers when it reads them (found by the reliability run's differential check)."""
    client, reader, writer = await _raw_agent(server)
    writer.write(b"\x8e\xfe\x01")
    await writer.drain()
    writer.write_eof()
    got = []
    async with asyncio.timeout(5 * UNIT):
        while chunk := await reader.read(65536):
            client.receive_data(chunk)
            got += client.events_received()
    closes = [e for e in got if e.opcode is Opcode.CLOSE]
    assert closes and closes[0].data == (1002).to_bytes(2, "big") + b"invalid opcode"
    writer.close()


async def test_a_client_that_stops_answering_pings_is_closed_1011():
    """The server pings every pingInterval; no pong within pingTimeout: 1011, and its session ends."""
    config = Config(server=ServerSection(host="127.0.0.1", port=0, ping_interval=0.2, ping_timeout=0.2))
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        answering, _ = await open_agent(srv, "answering")  # websockets' client answers pings itself
        client, reader, writer = await _raw_agent(srv)  # a raw one does not
        got = []
        async with asyncio.timeout(5 * UNIT):
            while not any(e.opcode is Opcode.CLOSE for e in got):
                client.receive_data(await reader.read(65536))
                got += client.events_received()
        assert any(e.opcode is Opcode.PING for e in got)
        (close,) = [e for e in got if e.opcode is Opcode.CLOSE]
        assert close.data == (1011).to_bytes(2, "big") + b"keepalive ping timeout"
        writer.close()
        await asyncio.sleep(0.6)  # three more intervals: the answering client stays
        await send_json(answering, {"type": "ping"})
        assert (await recv_json(answering))["type"] == "pong"
        assert srv.engine.statistics()["agentSessions"] == 1


async def test_a_connection_that_sends_no_request_is_dropped():
    config = Config(server=ServerSection(host="127.0.0.1", port=0, hello_timeout=0.3))
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /agent HTTP/1.1\r\nHost: x\r\n")  # never finished
        async with asyncio.timeout(5 * UNIT):
            assert await reader.read() == b""  # closed by the server
        writer.close()


async def test_a_request_split_anywhere_is_answered(server):
    client, request = _client_bytes(server.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for i in range(len(request)):
        writer.write(request[i:i + 1])
        await writer.drain()
    while client.state is not client.state.OPEN:
        client.receive_data(await reader.read(65536))
    (response,) = client.events_received()
    assert response.status_code == 101 and response.headers["Server"] == "deskpush"
    await _goodbye(reader, writer)


async def test_a_request_head_too_large_gets_431(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /agent HTTP/1.1\r\n" + b"X-Pad: " + b"x" * 70_000)
    async with asyncio.timeout(5 * UNIT):
        answer = await reader.read()
    assert answer.startswith(b"HTTP/1.1 431 ")
    writer.close()
