"""Protocol v1.1 on a real server: resume on both authentication paths, a TCP
connection cut under pending offers, retried requests, and a restart with
``server.stateFile``. Raw websockets clients, so the frames are the contract;
the SDKs' own tests build on this."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection

from .conftest import API_KEY, SECRET, open_agent, recv_json, send_json
from .engine_helpers import OUTCOME_ID

BOTH_MODES = True  # the server fixture: embedded, and three cluster nodes on Redis

CHAT = {"templateName": "msdyn_chat_incoming_unauthenticated", "templateParameters": {}}


async def resuming(srv: DeskpushServer, after: str = "$", *, bearer: bool = True):
    """An integrator connection that resumes after ``after``: (ws, replayed results, resumed)."""
    base = f"ws://127.0.0.1:{srv.port}/integrator"
    if bearer:
        ws = await connect(f"{base}?resumeAfter={after}", additional_headers={"Authorization": f"Bearer {API_KEY}"})
    else:
        ws = await connect(base)
        await send_json(ws, {"type": "hello", "apiKey": API_KEY, "resumeAfter": after})
    replayed = []
    while (frame := await recv_json(ws))["type"] != "resumed":
        replayed.append(frame)
    return ws, replayed, frame


async def drain(ws, quiet: float = 0.2) -> list[dict]:
    """Every frame that arrives until ``quiet`` seconds pass without one."""
    frames = []
    while True:
        try:
            frames.append(await recv_json(ws, timeout=quiet))
        except TimeoutError:
            return frames


async def card_of(agent) -> dict:
    while (frame := await recv_json(agent))["type"] != "notification":
        pass
    return frame


@pytest.mark.parametrize("bearer", [True, False], ids=["bearer-query", "hello"])
async def test_resume_now_answers_resumed_at_once(server, bearer):
    ws, replayed, resumed = await resuming(server, bearer=bearer)
    assert replayed == []
    assert resumed == {"type": "resumed", "count": 0, "complete": True, "lastOutcomeId": OUTCOME_ID}


async def test_a_malformed_resume_point_is_refused(server):
    with pytest.raises(InvalidStatus) as caught:
        await connect(f"ws://127.0.0.1:{server.port}/integrator?resumeAfter=yesterday",
                      additional_headers={"Authorization": f"Bearer {API_KEY}"})
    assert caught.value.response.status_code == 400
    assert b"resumeAfter must be an outcomeId" in caught.value.response.body
    ws = await connect(f"ws://127.0.0.1:{server.port}/integrator")
    await send_json(ws, {"type": "hello", "apiKey": API_KEY, "resumeAfter": "yesterday"})
    await ws.wait_closed()
    assert ws.close_code == 4401  # a hello that does not decode, as before


async def test_outcomes_that_ended_during_a_cut_are_replayed(server):
    agent, _ = await open_agent(server)
    ig, _, start = await resuming(server)
    for rid in ("r1", "r2"):
        await send_json(ig, {"type": "notifyEvent", "requestId": rid, "agentId": "agent-7", "input": CHAT,
                             "progress": False})
    first = await card_of(agent)
    # Cut the TCP connection under the integrator (no close frame), as a network failure would.
    [conn] = [c for c in server.connections if c.request is not None and c.request.path.startswith("/integrator")]
    conn.abort()
    await ig.wait_closed()
    await send_json(agent, {"type": "respond", "notificationId": first["notificationId"], "action": "Accept"})
    second = await card_of(agent)  # r2 displayed once r1 ended
    await send_json(agent, {"type": "respond", "notificationId": second["notificationId"], "action": "Reject"})
    await asyncio.sleep(0.05)

    ig2, replayed, resumed = await resuming(server, start["lastOutcomeId"], bearer=False)
    assert [(r["requestId"], r["value"]["responseReason"]) for r in replayed] == [
        ("r1", "Accept"), ("r2", "DeclinedByAgent")]
    assert resumed == {"type": "resumed", "count": 2, "complete": True, "lastOutcomeId": replayed[-1]["outcomeId"]}
    # Retried: both ended, so each gets its same result again, and the agent sees no new offer.
    for rid in ("r1", "r2"):
        await send_json(ig2, {"type": "notifyEvent", "requestId": rid, "agentId": "agent-7", "input": CHAT})
    assert [await recv_json(ig2) for _ in range(2)] == replayed
    assert "notification" not in [frame["type"] for frame in await drain(agent)]


async def test_a_retry_of_a_pending_request_claims_its_result(server):
    agent, _ = await open_agent(server)
    ig, _, _ = await resuming(server)
    await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT})
    card = await card_of(agent)
    await ig.close()
    ig2, replayed, resumed = await resuming(server, "$")
    await send_json(ig2, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT})
    status = await recv_json(ig2)
    assert status == {"type": "status", "requestId": "r1", "notificationId": card["notificationId"],
                      "cancellationToken": status["cancellationToken"], "state": "displayed"}
    await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
    result = await recv_json(ig2)
    assert (result["requestId"], result["value"]["actionName"]) == ("r1", "Accept")


async def test_ack_then_resume_before_it_is_incomplete(server):
    agent, _ = await open_agent(server)
    ig, _, start = await resuming(server)
    await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT,
                         "progress": False})
    card = await card_of(agent)
    await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
    result = await recv_json(ig)
    await send_json(ig, {"type": "ack", "outcomeId": result["outcomeId"]})
    await asyncio.sleep(0.05)
    assert server.engine.history("crm") == []
    _, replayed, resumed = await resuming(server, start["lastOutcomeId"])
    assert replayed == [] and resumed["complete"] is False and "forgotten" in resumed["details"]


async def test_history_survives_a_graceful_restart_with_a_state_file(tmp_path):
    state = tmp_path / "state.json"
    config = Config(server=ServerSection(host="127.0.0.1", port=0, state_file=str(state)))
    srv = DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    agent, _ = await open_agent(srv)
    ig, _, start = await resuming(srv)
    await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "input": CHAT,
                         "progress": False})
    await send_json(ig, {"type": "notifyEvent", "requestId": "r2", "agentId": "agent-7", "input": CHAT,
                         "progress": False})
    card = await card_of(agent)
    await ig.close()
    await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Reject"})
    await card_of(agent)  # r2 displayed
    await srv.close()
    saved = json.loads(state.read_text())
    assert saved["version"] == 2 and [len(h["outcomes"]) for h in saved["histories"]] == [1]

    config2 = Config(server=ServerSection(host="127.0.0.1", port=srv.port, state_file=str(state)))
    async with DeskpushServer(config2, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv2:
        again, welcome = await open_agent(srv2)
        r2 = await card_of(again)
        ig2, replayed, resumed = await resuming(srv2, start["lastOutcomeId"])
        assert [(r["requestId"], r["value"]["responseReason"]) for r in replayed] == [("r1", "DeclinedByAgent")]
        assert resumed["complete"] is True
        # r2 is still pending on the new server: retried, it is claimed, not offered twice.
        await send_json(ig2, {"type": "notifyEvent", "requestId": "r2", "agentId": "agent-7", "input": CHAT})
        assert (await recv_json(ig2))["state"] == "displayed"
        await send_json(again, {"type": "respond", "notificationId": r2["notificationId"], "action": "Accept"})
        result = await recv_json(ig2)
        assert (result["requestId"], result["value"]["actionName"]) == ("r2", "Accept")
        assert result["outcomeId"] > replayed[-1]["outcomeId"]


async def test_restart_without_a_state_file_cannot_vouch(tmp_path):
    config = Config(server=ServerSection(host="127.0.0.1", port=0))
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        _, _, start = await resuming(srv)
    await asyncio.sleep(0.01)
    config2 = Config(server=ServerSection(host="127.0.0.1", port=srv.port))
    async with DeskpushServer(config2, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv2:
        _, _, resumed = await resuming(srv2, start["lastOutcomeId"])
        assert resumed["complete"] is False and "stateFile" in resumed["details"]
