"""Hostile message contents on both endpoints, before and after authentication, over real sockets.

Deeply nested JSON and text frames that are not UTF-8: each gets its
documented answer, nothing is logged as an error, and other clients carry on.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from websockets.asyncio.client import ClientProtocol, connect
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from deskpush.server import DeskpushServer

from .conftest import API_KEY, SECRET, UNIT, make_config, open_agent, open_integrator, recv_json, send_json
from .test_server import expect_closed, notify

# Within the default maxSize (64 KiB): 10,000 levels are 20 KB of brackets.
DEPTHS = [100, 1000, 10_000]
# msgspec decodes this deep and deeper without trouble.
SHALLOW = 100


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def bystanders_fine(server, agent, ig) -> None:
    """An agent and an integrator connected before the attack still work."""
    await send_json(agent, {"type": "ping"})
    assert (await recv_json(agent))["type"] == "pong"
    await send_json(ig, {"type": "cancelEvent", "requestId": "c0", "cancellationToken": "nope"})
    assert (await recv_json(ig))["error"]["message"] == "CancellationTokenNotFoundError"


@pytest.mark.parametrize("depth", DEPTHS)
async def test_deep_nesting_after_auth_is_a_bad_frame_for_an_agent(server, caplog, depth):
    caplog.set_level(logging.DEBUG, logger="deskpush")
    bystander, _ = await open_agent(server, "bystander")
    bystander_ig = await open_integrator(server)
    agent, _ = await open_agent(server)
    for _ in range(3):  # in an unknown field: skipped, but parsed all the same
        await agent.send(f'{{"type":"ping","pad":{nested(depth)}}}')
        reply = await recv_json(agent)
        if depth == SHALLOW:
            assert reply["type"] == "pong"
        else:
            assert reply == {"type": "error", "code": "BadFrame", "message": "malformed JSON: JSON nested too deeply",
                             "notificationId": None}
    await send_json(agent, {"type": "ping"})  # the connection stays
    assert (await recv_json(agent))["type"] == "pong"
    await bystanders_fine(server, bystander, bystander_ig)
    no_errors_logged(caplog)


@pytest.mark.parametrize("depth", DEPTHS)
async def test_deep_nesting_after_auth_is_reject_after_client_error(server, caplog, depth):
    caplog.set_level(logging.DEBUG, logger="deskpush")
    bystander, _ = await open_agent(server, "bystander")
    bystander_ig = await open_integrator(server)
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    frame = notify("deep", progress=False)
    frame["input"]["templateParameters"] = {"customerName": "__DEEP__"}
    await ig.send(json.dumps(frame).replace('"__DEEP__"', nested(depth)))
    if depth == SHALLOW:
        assert (await recv_json(agent))["type"] == "notification"
    else:
        # Too deep to parse even leniently for its requestId: answered as bytes that are not JSON.
        assert await recv_json(ig) == {
            "type": "error",
            "error": {"message": "RejectAfterClientError", "msdyn_name": "NotifyEvent",
                      "details": "malformed JSON: JSON nested too deeply"},
        }
    await send_json(ig, {"type": "cancelEvent", "requestId": "c1", "cancellationToken": "nope"})
    assert (await recv_json(ig))["error"]["message"] == "CancellationTokenNotFoundError"  # the connection stays
    await bystanders_fine(server, bystander, bystander_ig)
    no_errors_logged(caplog)


async def test_every_depth_around_the_decoders_limit_gets_an_answer(caplog):
    """Just short of what decodes, a parameter must still render (it is encoded as JSON then)."""
    caplog.set_level(logging.DEBUG, logger="deskpush")
    # No queue, and the one display slot taken: each offer that renders ends at once with a result.
    async with DeskpushServer(make_config(queue_limit=0), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        await open_agent(srv)
        ig = await open_integrator(srv)
        await send_json(ig, notify("first"))
        assert [(await recv_json(ig))["state"] for _ in range(2)] == ["queued", "displayed"]
        answers = []
        for depth in range(900, 1100, 2):
            frame = notify(f"d{depth}")
            frame["input"]["templateParameters"] = {"comment": "__DEEP__"}
            await ig.send(json.dumps(frame).replace('"__DEEP__"', nested(depth)))
            reply = await recv_json(ig)
            answers.append(reply["type"] if reply["type"] == "result" else reply["error"]["details"])
    assert answers[0] == "result" and answers[-1] == "malformed JSON: JSON nested too deeply", answers
    assert set(answers) <= {"result", "malformed JSON: JSON nested too deeply",
                            "JSON nested too deeply - at $.input.templateParameters"}, answers
    no_errors_logged(caplog)


@pytest.mark.parametrize("endpoint", ["agent", "integrator"])
@pytest.mark.parametrize("depth", DEPTHS)
async def test_deep_nesting_before_auth_closes_4401(server, caplog, endpoint, depth):
    """A hello nested too deeply is a hello that does not decode: 4401, like any other."""
    caplog.set_level(logging.DEBUG, logger="deskpush")
    bystander, _ = await open_agent(server, "bystander")
    bystander_ig = await open_integrator(server)
    credential = {"token": server.tokens.issue("agent-7")} if endpoint == "agent" else {"apiKey": API_KEY}
    ws = await connect(f"ws://127.0.0.1:{server.port}/{endpoint}")
    hello = json.dumps({"type": "hello", "pad": "__DEEP__", **credential})
    await ws.send(hello.replace('"__DEEP__"', nested(depth)))
    if depth == SHALLOW:  # a valid hello with an unknown field
        if endpoint == "agent":
            assert (await recv_json(ws))["type"] == "welcome"
        else:
            await send_json(ws, notify("shallow", agent_id="bystander", progress=False))
            assert (await recv_json(bystander))["type"] == "notification"
        await ws.close()
    else:
        await expect_closed(ws, 4401)
    await bystanders_fine(server, bystander, bystander_ig)
    no_errors_logged(caplog)


async def test_a_burst_of_deep_frames_before_auth_logs_nothing(server, caplog):
    """The attack that found it: 300 deep hellos wrote 3,900 lines of tracebacks."""
    caplog.set_level(logging.DEBUG, logger="deskpush")

    async def one() -> None:
        async with connect(f"ws://127.0.0.1:{server.port}/agent") as ws:
            await ws.send(f'{{"type":"hello","pad":{nested(1000)}}}')
            await expect_closed(ws, 4401)

    await asyncio.gather(*(one() for _ in range(100)))
    no_errors_logged(caplog)
    assert len(caplog.records) < 10


# ---------------------------------------------------------------------------
# Messages that are not UTF-8: 1007, text or binary, before or after the hello


async def raw_client(server, path: str, hello: dict | None):
    """A client on a raw socket (websockets' own client will not send bad UTF-8 as text)."""
    client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{server.port}{path}"))
    client.send_request(client.connect())
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"".join(client.data_to_send()))
    async with asyncio.timeout(5 * UNIT):
        while client.state is not State.OPEN:
            client.receive_data(await reader.read(65536))
    client.events_received()
    if hello is not None:
        writer.write(Frame(Opcode.TEXT, json.dumps(hello).encode()).serialize(mask=True))
        if path == "/agent":  # the welcome
            async with asyncio.timeout(5 * UNIT):
                while not client.events_received():
                    client.receive_data(await reader.read(65536))
    return client, reader, writer


async def closed_with(client, reader, writer) -> tuple[int, str]:
    """Read to the end; the server's close frame as (code, reason)."""
    frames = []
    async with asyncio.timeout(5 * UNIT):
        while chunk := await reader.read(65536):
            client.receive_data(chunk)
            frames += client.events_received()
    writer.close()
    (close,) = [f for f in frames if f.opcode is Opcode.CLOSE]
    return int.from_bytes(close.data[:2], "big"), close.data[2:].decode()


NOT_UTF8 = {
    "invalid start byte": b"\xff",
    "continuation byte alone": b"\x80",
    "truncated sequence": b"\xe2\x82",
    "overlong slash": b"\xc0\xaf",
    "surrogate half": b"\xed\xa0\x80",
    "past U+10FFFF": b"\xf4\x90\x80\x80",
}


def ping_with(raw: bytes) -> bytes:
    """A ping whose ignored field holds ``raw``: fine JSON, but for the bytes."""
    return b'{"type":"ping","pad":"' + raw + b'"}'


@pytest.mark.parametrize("name", list(NOT_UTF8))
async def test_a_text_frame_that_is_not_utf8_closes_1007(server, caplog, name):
    """On the fast path (one whole frame), in an ignored field, after the hello."""
    bystander, _ = await open_agent(server, "bystander")
    bystander_ig = await open_integrator(server)
    hello = {"type": "hello", "token": server.tokens.issue("agent-7")}
    client, reader, writer = await raw_client(server, "/agent", hello)
    writer.write(Frame(Opcode.TEXT, ping_with(b"ok")).serialize(mask=True)
                 + Frame(Opcode.TEXT, ping_with(NOT_UTF8[name])).serialize(mask=True))
    code, reason = await closed_with(client, reader, writer)
    assert code == 1007 and reason.endswith(f"at position {len(ping_with(b'')) - 2}")
    await bystanders_fine(server, bystander, bystander_ig)
    no_errors_logged(caplog)


@pytest.mark.parametrize("how", ["fragmented text", "binary", "before the hello", "integrator", "integrator hello"])
async def test_every_message_that_is_not_utf8_closes_1007(server, caplog, how):
    bystander, _ = await open_agent(server, "bystander")
    bystander_ig = await open_integrator(server)
    path = "/integrator" if how.startswith("integrator") else "/agent"
    hello = None
    if how in ("fragmented text", "binary"):
        hello = {"type": "hello", "token": server.tokens.issue("agent-7")}
    elif how == "integrator":
        hello = {"type": "hello", "apiKey": API_KEY}
    client, reader, writer = await raw_client(server, path, hello)
    bad = ping_with(b"\xc3(")
    if how == "fragmented text":  # through websockets' parser, then joined
        data = (Frame(Opcode.TEXT, bad[:22], fin=False).serialize(mask=True)
                + Frame(Opcode.CONT, bad[22:]).serialize(mask=True))
    elif how == "binary":
        data = Frame(Opcode.BINARY, bad).serialize(mask=True)
    else:
        data = Frame(Opcode.TEXT, bad).serialize(mask=True)
    writer.write(data)
    code, reason = await closed_with(client, reader, writer)
    assert (code, reason) == (1007, "invalid continuation byte at position 22")
    await bystanders_fine(server, bystander, bystander_ig)
    no_errors_logged(caplog)


async def test_utf8_beyond_ascii_is_fine(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    name = "Zoë 日本 \U0001f600"
    await send_json(ig, notify("u1", progress=False,
                               input={"templateName": "msdyn_chat_incoming_authenticated",
                                      "templateParameters": {"customerName": name}}))
    card = await recv_json(agent)
    assert card["title"].endswith(name)
    await agent.send(ping_with("ß ✓ \U0001f600".encode()), text=False)  # binary, and UTF-8: fine
    assert (await recv_json(agent))["type"] == "pong"
