"""Hostile message contents on both endpoints, before and after authentication, over real sockets.

Deeply nested JSON and text frames that are not UTF-8: each gets its
documented answer, nothing is logged as an error, and other clients carry on.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from websockets.asyncio.client import connect

from .conftest import API_KEY, open_agent, open_integrator, recv_json, send_json
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
