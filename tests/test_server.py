"""End to end over real sockets: the wire protocol as an integrator and an agent see it."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from deskpush.protocol import Limits, Template
from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection

from .engine_helpers import OUTCOME_ID
from .conftest import API_KEY, SECRET, Cluster, UNIT, make_config, open_agent, open_integrator, recv_json, send_json

BOTH_MODES = True  # every test on the server fixture: embedded, and three cluster nodes on Redis

CIF_INPUT = {"templateName": "msdyn_chat_incoming_unauthenticated", "templateParameters": {}}


def notify(request_id: str = "r1", agent_id: str = "agent-7", **extra) -> dict:
    frame = {"type": "notifyEvent", "requestId": request_id, "agentId": agent_id, "input": dict(CIF_INPUT)}
    frame.update(extra)
    return frame


async def expect_closed(ws, code: int, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout * UNIT):
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
    assert ws.close_code == code, (ws.close_code, ws.close_reason)


async def offer(srv, ig, agent, request_id="r1", **extra) -> dict:
    """Send a notifyEvent and return the agent's notification frame."""
    await send_json(ig, notify(request_id, **extra))
    frame = await recv_json(agent)
    assert frame["type"] == "notification", frame
    return frame


# ---------------------------------------------------------------------------
# The CIF example


async def test_cif_example_accepted(server):
    agent, welcome = await open_agent(server)
    assert welcome["agentId"] == "agent-7" and welcome["sessionId"]
    assert abs(welcome["serverTime"] - time.time() * 1000) < 5000
    ig = await open_integrator(server)
    await send_json(ig, notify())
    queued = await recv_json(ig)
    displayed = await recv_json(ig)
    assert queued["type"] == "status" and queued["state"] == "queued"
    assert displayed["state"] == "displayed" and displayed["notificationId"] == queued["notificationId"]
    assert queued["cancellationToken"]  # neither given: the server made one

    card = await recv_json(agent)
    assert card["type"] == "notification"
    assert card["notificationId"] == queued["notificationId"]
    assert card["templateName"] == "msdyn_chat_incoming_unauthenticated"
    assert card["title"] == "New chat request" and card["fields"] == []
    assert card["acceptText"] == "Accept" and card["showTimeout"] is True
    assert card["expiresAt"] - welcome["serverTime"] == pytest.approx(120_000, abs=5000)

    await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
    result = await recv_json(ig)
    assert result == {"type": "result", "requestId": "r1", "value": {"actionName": "Accept", "responseReason": "Accept"},
                      "outcomeId": OUTCOME_ID}
    resolved = await recv_json(agent)
    assert resolved == {"type": "resolved", "notificationId": card["notificationId"],
                        "actionName": "Accept", "responseReason": "Accept"}


async def test_cif_example_rejected(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    card = await offer(server, ig, agent, progress=False)
    await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Reject"})
    # progress false: no status frames, only the result.
    assert await recv_json(ig) == {"type": "result", "requestId": "r1",
                                   "value": {"actionName": "Reject", "responseReason": "DeclinedByAgent"},
                                   "outcomeId": OUTCOME_ID}


async def test_template_parameters_fill_fields(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    card = await offer(server, ig, agent, input={
        "templateName": "msdyn_chat_incoming_authenticated",
        "templateParameters": {"customerName": "Jane <b>Doe</b>", "queueName": "Billing"},
    }, correlationId="c-42")
    assert card["title"] == "New chat request from Jane <b>Doe</b>"
    assert card["fields"] == [{"header": "Customer", "value": "Jane <b>Doe</b>"}, {"header": "Queue", "value": "Billing"}]
    assert card["correlationId"] == "c-42"


async def test_auto_accept_template(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    card = await offer(server, ig, agent, progress=False,
                       input={"templateName": "msdyn_chat_incoming_autoaccept", "templateParameters": {}})
    assert card["autoAccept"] is True
    assert (await recv_json(agent))["type"] == "resolved"
    assert (await recv_json(ig))["value"] == {"actionName": "Accept", "responseReason": "AutoAccept"}


async def test_refusals_are_cif_errors(server):
    ig = await open_integrator(server)
    await send_json(ig, notify("r1", input={"templateName": "nope", "templateParameters": {}}))
    err = await recv_json(ig)
    assert err["requestId"] == "r1"
    assert err["error"]["message"] == "NotificationTemplateNotFoundError"
    assert err["error"]["msdyn_name"] == "NotifyEvent"

    await send_json(ig, notify("r2", agent_id="nobody"))
    assert (await recv_json(ig))["error"]["message"] == "AgentNotConnectedError"

    await send_json(ig, {"type": "cancelEvent", "requestId": "r3", "cancellationToken": "unknown"})
    err = await recv_json(ig)
    assert err["requestId"] == "r3"
    assert err["error"] == {"message": "CancellationTokenNotFoundError", "msdyn_name": "CancelEvent",
                            "details": "no notification with cancellationToken 'unknown'"}


# ---------------------------------------------------------------------------
# Timing, queueing, cancel


def short_config(timeout: float = 0.3, **limits) -> Config:
    fast = Template(name="fast", title="Fast {customerName}", timeout=timeout)
    return Config(server=ServerSection(host="127.0.0.1", port=0), templates=(fast,), limits=Limits(**limits))


async def test_display_timeout_runs_on_the_server(serve):
    async with serve(short_config(), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        agent, _ = await open_agent(srv)
        ig = await open_integrator(srv)
        sent = time.monotonic()
        card = await offer(srv, ig, agent, progress=False, input={"templateName": "fast"})
        assert card["timeoutSeconds"] == 0.3
        result = await recv_json(ig)
        assert result["value"] == {"actionName": "Timeout", "responseReason": "DisplayTimeout"}
        assert time.monotonic() - sent >= 0.29
        assert (await recv_json(agent))["responseReason"] == "DisplayTimeout"
        # Too late: the outcome stays, the agent gets a definite error.
        await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        err = await recv_json(agent)
        assert err["type"] == "error" and err["code"] == "NotificationNotPending"
        assert err["notificationId"] == card["notificationId"]


async def test_queue_limit_and_queue_timeout(serve):
    config = short_config(timeout=30, queue_limit=1, queue_timeout=0.3)
    async with serve(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        agent, _ = await open_agent(srv)
        ig = await open_integrator(srv)
        for rid in ("r1", "r2", "r3"):
            await send_json(ig, notify(rid, progress=False, input={"templateName": "fast"}))
        # r1 displayed, r2 queued, r3 finds the queue full.
        assert (await recv_json(ig)) == {"type": "result", "requestId": "r3", "value": {
            "actionName": "Reject", "responseReason": "NotificationQueueLimitExceeded"}, "outcomeId": OUTCOME_ID}
        assert (await recv_json(ig))["value"]["responseReason"] == "NotificationQueueTimeLimitExceeded"
        frames = [await recv_json(agent) for _ in range(3)]
        assert [fr["type"] for fr in frames] == ["notification", "queue", "queue"]
        assert [fr.get("queued") for fr in frames[1:]] == [1, 0]


async def test_cancel_withdraws_the_offer(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    card = await offer(server, ig, agent, progress=False,
                       input={**CIF_INPUT, "cancellationToken": "tok-1"})
    await send_json(ig, {"type": "cancelEvent", "requestId": "c1", "cancellationToken": "tok-1", "correlationId": "x"})
    assert await recv_json(ig) == {"type": "result", "requestId": "r1",
                                   "value": {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"},
                                   "outcomeId": OUTCOME_ID}
    assert await recv_json(ig) == {"type": "result", "requestId": "c1", "value": {
        "cancellationToken": "tok-1", "actionName": "Cancel", "responseReason": "CancelledByIntegrator"}}
    assert (await recv_json(agent)) == {"type": "resolved", "notificationId": card["notificationId"],
                                        "actionName": "Cancel", "responseReason": "CancelledByIntegrator"}


async def test_cancel_after_accept_reports_the_accept(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    card = await offer(server, ig, agent, progress=False, cancellationToken="tok-2")
    await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
    assert (await recv_json(ig))["value"]["actionName"] == "Accept"
    await send_json(ig, {"type": "cancelEvent", "requestId": "c1", "cancellationToken": "tok-2"})
    assert (await recv_json(ig))["value"] == {"cancellationToken": "tok-2", "actionName": "Accept",
                                              "responseReason": "Accept"}


async def test_token_in_input_and_beside_it_must_agree(server):
    await open_agent(server)
    ig = await open_integrator(server)
    await send_json(ig, notify(input={**CIF_INPUT, "cancellationToken": "a"}, cancellationToken="b"))
    err = await recv_json(ig)
    assert err["error"]["message"] == "RejectAfterClientError"
    assert "cancellationToken" in err["error"]["details"]
    await send_json(ig, notify("r2", cancellationToken="same", progress=False))
    await send_json(ig, notify("r3", cancellationToken="same", progress=False))
    assert (await recv_json(ig))["error"]["message"] == "CancellationTokenInUseError"


async def test_two_sessions_first_answer_wins(server):
    s1, _ = await open_agent(server)
    s2, _ = await open_agent(server)
    ig = await open_integrator(server)
    await send_json(ig, notify(progress=False))
    c1, c2 = await recv_json(s1), await recv_json(s2)
    assert c1 == c2
    nid = c1["notificationId"]
    await send_json(s2, {"type": "respond", "notificationId": nid, "action": "Reject"})
    await send_json(s1, {"type": "respond", "notificationId": nid, "action": "Accept"})
    assert (await recv_json(ig))["value"]["responseReason"] == "DeclinedByAgent"
    assert (await recv_json(s2))["type"] == "resolved"
    first = await recv_json(s1)
    second = await recv_json(s1)
    assert {first["type"], second["type"]} == {"resolved", "error"}
    # Exactly one result: nothing more arrives for the integrator.
    with pytest.raises(TimeoutError):
        await recv_json(ig, timeout=0.2)


async def test_reconnect_replays_displayed_with_original_expiry(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    card = await offer(server, ig, agent, progress=False)
    await agent.close()
    again, welcome = await open_agent(server)
    assert welcome["displayed"] == [card["notificationId"]]
    replay = await recv_json(again)
    assert replay == card  # same id, same expiresAt
    await send_json(again, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
    assert (await recv_json(ig))["value"]["actionName"] == "Accept"


async def test_grace_expiry_rejects_with_agent_disconnected(serve):
    config = make_config(presence_grace=0.2)
    async with serve(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        agent, _ = await open_agent(srv)
        ig = await open_integrator(srv)
        await offer(srv, ig, agent, progress=False)
        await agent.close()
        assert (await recv_json(ig))["value"] == {"actionName": "Reject", "responseReason": "AgentDisconnected"}
        await send_json(ig, notify("r2"))
        assert (await recv_json(ig))["error"]["message"] == "AgentNotConnectedError"


async def test_integrator_disconnect_does_not_cancel(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    card = await offer(server, ig, agent, progress=False)
    await ig.close()
    await asyncio.sleep(0.05)
    await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
    assert (await recv_json(agent))["type"] == "resolved"
    [kept] = server.engine.history("crm")
    assert (kept.request_id, kept.value.action_name, kept.value.response_reason) == ("r1", "Accept", "Accept")


async def test_restart_with_state_file_keeps_offers(tmp_path):
    state = tmp_path / "state.json"
    config = Config(server=ServerSection(host="127.0.0.1", port=0, state_file=str(state)))
    srv = DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    agent, _ = await open_agent(srv)
    ig = await open_integrator(srv)
    card = await offer(srv, ig, agent, progress=False, cancellationToken="keep-me")
    await srv.close()
    await expect_closed(agent, 1001)
    assert state.exists()

    port = srv.port
    config2 = Config(server=ServerSection(host="127.0.0.1", port=port, state_file=str(state)))
    async with DeskpushServer(config2, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv2:
        assert not state.exists()
        again, _ = await open_agent(srv2)
        assert await recv_json(again) == card
        ig2 = await open_integrator(srv2)
        await send_json(ig2, {"type": "cancelEvent", "requestId": "c1", "cancellationToken": "keep-me"})
        assert (await recv_json(ig2))["value"]["responseReason"] == "CancelledByIntegrator"
        assert (await recv_json(again))["type"] == "resolved"


# ---------------------------------------------------------------------------
# Bad input of every kind


@pytest.mark.parametrize("token", ["", "not-a-jwt", "expired", "wrong-secret", "no-sub"])
async def test_bad_agent_token_closes_4401(server, token):
    import jwt

    now = time.time()
    if token == "expired":
        token = jwt.encode({"sub": "agent-7", "exp": int(now - 60)}, SECRET, algorithm="HS256")
    elif token == "wrong-secret":
        token = jwt.encode({"sub": "agent-7", "exp": int(now + 60)}, "other-secret-" + "y" * 32, algorithm="HS256")
    elif token == "no-sub":
        token = jwt.encode({"exp": int(now + 60)}, SECRET, algorithm="HS256")
    ws = await connect(f"ws://127.0.0.1:{server.port}/agent")
    await send_json(ws, {"type": "hello", "token": token})
    await expect_closed(ws, 4401)


async def test_agent_must_say_hello_first_and_in_time(serve):
    config = Config(server=ServerSection(host="127.0.0.1", port=0, hello_timeout=0.3))
    async with serve(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        ws = await connect(f"ws://127.0.0.1:{srv.port}/agent")
        await send_json(ws, {"type": "ping"})
        await expect_closed(ws, 4401)
        silent = await connect(f"ws://127.0.0.1:{srv.port}/agent")
        await expect_closed(silent, 4401)


async def test_integrator_bad_key(server):
    with pytest.raises(InvalidStatus) as exc:
        await connect(f"ws://127.0.0.1:{server.port}/integrator", additional_headers={"Authorization": "Bearer wrong"})
    assert exc.value.response.status_code == 401
    ws = await connect(f"ws://127.0.0.1:{server.port}/integrator")
    await send_json(ws, {"type": "hello", "apiKey": "wrong"})
    await expect_closed(ws, 4401)


async def test_browser_integrator_hello(server):
    agent, _ = await open_agent(server)
    ws = await connect(f"ws://127.0.0.1:{server.port}/integrator")
    await send_json(ws, {"type": "hello", "apiKey": API_KEY})
    await send_json(ws, notify(progress=False))
    assert (await recv_json(agent))["type"] == "notification"


async def test_malformed_frames_get_errors_and_the_connection_stays(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    await ig.send("{not json")
    err = await recv_json(ig)
    assert err["type"] == "error" and "requestId" not in err
    assert err["error"]["message"] == "RejectAfterClientError"
    assert err["error"]["details"].startswith("malformed JSON")

    await ig.send(json.dumps({"type": "bogus", "requestId": "x1"}))
    err = await recv_json(ig)
    assert err["requestId"] == "x1" and "$.type" in err["error"]["details"]

    await ig.send(json.dumps({"type": "notifyEvent", "requestId": "x2", "agentId": "agent-7",
                              "input": {"templateParameters": {}}}))
    err = await recv_json(ig)
    assert err["requestId"] == "x2"
    assert err["error"] == {"message": "RejectAfterClientError", "msdyn_name": "NotifyEvent",
                            "details": "Object missing required field `templateName` - at `$.input`"}

    await ig.send(json.dumps({"type": "cancelEvent", "requestId": "x3", "cancellationToken": 5}))
    err = await recv_json(ig)
    assert err["error"]["msdyn_name"] == "CancelEvent" and "$.cancellationToken" in err["error"]["details"]

    await agent.send("[1,2")
    assert (await recv_json(agent))["code"] == "BadFrame"
    await send_json(agent, {"type": "respond", "notificationId": "n", "action": "Maybe"})
    err = await recv_json(agent)
    assert err["code"] == "BadFrame" and "$.action" in err["message"]
    await send_json(agent, {"type": "respond", "notificationId": "unknown", "action": "Accept"})
    assert (await recv_json(agent))["code"] == "UnknownNotification"

    # Both connections still work.
    await send_json(agent, {"type": "ping"})
    assert (await recv_json(agent))["type"] == "pong"
    await send_json(ig, notify("ok", progress=False))
    assert (await recv_json(agent))["type"] == "notification"


async def test_oversized_frame_closes_1009_and_others_carry_on(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    big = json.dumps(notify(input={"templateName": "x", "templateParameters": {"a": "x" * 70_000}}))
    await ig.send(big)
    await expect_closed(ig, 1009)
    await send_json(agent, {"type": "ping"})
    assert (await recv_json(agent))["type"] == "pong"


async def test_flooding_agent_is_closed_and_others_are_not_affected(serve):
    config = Config(server=ServerSection(host="127.0.0.1", port=0, agent_rate=10, agent_burst=20))
    async with serve(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        calm, _ = await open_agent(srv, "calm")
        flood, _ = await open_agent(srv, "flood")
        with pytest.raises(ConnectionClosed):
            for _ in range(200):
                await send_json(flood, {"type": "ping"})
            while True:
                await flood.recv()
        assert flood.close_code == 1008
        ig = await open_integrator(srv)
        await send_json(ig, notify(agent_id="calm", progress=False))
        assert (await recv_json(calm))["type"] == "notification"


async def test_slow_agent_is_dropped_without_stalling_others(serve):
    config = Config(
        server=ServerSection(host="127.0.0.1", port=0, outbound_limit=64 * 1024),
        # 60 KB cards, past the default maxNotificationBytes, fill its buffer quickly.
        limits=Limits(display_limit=1000, queue_limit=0, presence_grace=60, max_notification_bytes=64 * 1024),
    )
    async with serve(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        # The slow desktop stops reading after its welcome.
        slow = await connect(f"ws://127.0.0.1:{srv.port}/agent", max_queue=1)
        await send_json(slow, {"type": "hello", "token": srv.tokens.issue("slow")})
        await recv_json(slow)
        fast, _ = await open_agent(srv, "fast")
        ig = await open_integrator(srv)
        params = {"comment": "x" * 60_000}
        for i in range(300):
            await send_json(ig, notify(f"s{i}", agent_id="slow", progress=False,
                                       input={**CIF_INPUT, "templateParameters": params}))
        async with asyncio.timeout(10 * UNIT):
            while srv.engine.statistics()["agentSessions"] != 1:
                await asyncio.sleep(0.02)
        await send_json(ig, notify("f1", agent_id="fast", progress=False))
        assert (await recv_json(fast))["type"] == "notification"
        slow.transport.abort()


# ---------------------------------------------------------------------------
# HTTP


def http_get(port: int, path: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def http_get_with(port: int, path: str, authorization: str | None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_healthz_and_static_files(server):
    agent, _ = await open_agent(server)
    status, headers, body = await asyncio.to_thread(http_get, server.port, "/healthz")
    assert status == 200 and headers["Content-Type"] == "application/json"
    # A bare status: it answers anyone, so no counts.
    assert msgspec.json.decode(body) == {"status": "ok"}
    for path in ("/../server/app.py", "/app.py", "/nope.html", "/.hidden.js"):
        status, _, _ = await asyncio.to_thread(http_get, server.port, path)
        assert status == 404, path


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}", "Bearer"])
async def test_stats_need_an_integrator_key(server, authorization):
    status, headers, body = await asyncio.to_thread(http_get_with, server.port, "/stats", authorization)
    assert status == 401 and body == b"UnauthorizedError\n"
    assert headers["WWW-Authenticate"] == 'Bearer realm="deskpush"'


async def test_stats_with_an_integrator_key_show_the_counts(server):
    agent, _ = await open_agent(server)
    ig = await open_integrator(server)
    agent_port, integrator_port = agent.remote_address[1], ig.remote_address[1]
    await offer(server, ig, agent)
    stats_port = server.port
    status, headers, body = await asyncio.to_thread(http_get_with, stats_port, "/stats?x=1", f"Bearer {API_KEY}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    figures = msgspec.json.decode(body)
    # The same figures in-process (less the HTTP request's connection, which may be gone by now).
    now = server.statistics()
    assert {k: v for k, v in figures.items() if k != "connections"} == {k: v for k, v in now.items() if k != "connections"}
    assert figures["agentSessions"] == 1 and figures["integrators"] == 1 and figures["displayed"] == 1
    # Two WebSockets, and the HTTP request itself (in cluster mode: this node's connections only).
    assert figures["connections"] == (3 if not isinstance(server, Cluster) else 1 + (stats_port == agent_port)
                                      + (stats_port == integrator_port)) and figures["refusedOutOfFds"] == 0 and figures["acceptPauses"] == 0
    assert figures["openFilesLimit"] > 0


async def test_shutdown_closes_agents_with_1001(server):
    agent, _ = await open_agent(server)
    await server.close()
    await expect_closed(agent, 1001)
