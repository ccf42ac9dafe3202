"""server.connection: the synchronous message path and the hand-made text frame."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from server import Config, DeskpushServer
from server.config import ServerSection
from server.connection import text_frame

from .conftest import API_KEY, SECRET, UNIT, open_agent, open_integrator, recv_json, send_json

NOTIFY = {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "progress": False,
          "input": {"templateName": "msdyn_chat_incoming_unauthenticated", "templateParameters": {}}}


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_text_frame_is_what_websockets_would_send(size):
    data = b"x" * size
    assert text_frame(data) == Frame(Opcode.TEXT, data).serialize(mask=False)


@given(st.binary(max_size=300))
def test_text_frame_round_trips_through_a_client_parser(data):
    client = ClientProtocol(parse_uri("ws://h/agent"))
    client.state = client.state.OPEN  # skip the handshake: parse frames only
    client.parser = client.parse()
    next(client.parser)
    client.receive_data(text_frame(data))
    (frame,) = client.events_received()
    assert frame.opcode is Opcode.TEXT and frame.fin and bytes(frame.data) == data


async def test_fragmented_message_is_one_frame(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    text = json.dumps(NOTIFY)
    await ig.send([text[:10], text[10:40], text[40:]])  # three frames, one message
    assert (await recv_json(agent))["type"] == "notification"


async def test_frames_sent_with_the_handshake_are_all_handled(server):
    """A client that does not wait for the 101 before its frames loses none of them."""
    client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{server.port}/agent"))
    request = client.connect()
    client.send_request(request)
    handshake = b"".join(client.data_to_send())
    client.state = client.state.OPEN  # frame as an open client would, ahead of the answer
    hello = {"type": "hello", "token": server.tokens.issue("agent-7")}
    for frame in (hello, {"type": "ping"}, {"type": "ping"}):
        client.send_text(json.dumps(frame).encode())
    frames = b"".join(client.data_to_send())
    client.state = client.state.CONNECTING

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
    def broken(conn, frame, now):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine, "agent_frame", broken)
    victim, _ = await open_agent(server, "victim")
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
