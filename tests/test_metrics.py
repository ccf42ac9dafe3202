"""GET /metrics: what an operator graphs, scraped from a real server and parsed as Prometheus does."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from deskpush.protocol import Limits, Template
from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection
from deskpush.server.dispatch import Dispatcher
from deskpush.server.metrics import EXPORTED_STATISTICS, Counts

from .conftest import API_KEY, SECRET, UNIT, open_agent, open_integrator, recv_json, send_json
from .test_dispatch import FakeClock, FakeConn

FAST = Template(name="fast", title="Fast", timeout=0.3)
CHAT = "msdyn_chat_incoming_unauthenticated"


def config(**server) -> Config:
    return Config(server=ServerSection(host="127.0.0.1", port=0, max_size=4096, **server),
                  limits=Limits(queue_limit=0), templates=(FAST,))


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


async def scrape(port: int, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, by (name, labels), parsed with prometheus_client's own parser."""
    status, response_headers, body = await asyncio.to_thread(
        get, port, "/metrics", {"Authorization": f"Bearer {API_KEY}"} if headers is None else headers)
    assert status == 200, body
    assert response_headers["Content-Type"].startswith("text/plain; version=")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def notify(rid: str, template: str = CHAT, **extra) -> dict:
    return {"type": "notifyEvent", "requestId": rid, "agentId": "agent-7", "progress": False,
            "input": {"templateName": template}, **extra}


async def result_of(ig, rid: str) -> dict:
    while True:
        frame = await recv_json(ig)
        if frame.get("requestId") == rid and frame["type"] in ("result", "error"):
            return frame


async def closed_with(ws) -> int:
    try:
        async with asyncio.timeout(5 * UNIT):
            while True:
                await ws.recv()
    except ConnectionClosed:
        pass
    return ws.close_code


async def test_what_a_dashboard_shows_after_offers_outcomes_errors_and_closes():
    async with DeskpushServer(config(), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        agent, _ = await open_agent(srv)
        ig = await open_integrator(srv)
        before = await scrape(srv.port)
        assert value(before, "deskpush_connections", endpoint="agent") == 1
        assert value(before, "deskpush_connections", endpoint="integrator") == 1
        assert value(before, "deskpush_agents") == 1
        assert value(before, "deskpush_build_info", version="0.1.0") == 1

        # Accepted, declined, refused by a full queue (queueLimit 0), cancelled, timed out.
        await send_json(ig, notify("r1"))
        card = await recv_json(agent)
        await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        assert (await result_of(ig, "r1"))["value"]["responseReason"] == "Accept"
        await send_json(ig, notify("r2", cancellationToken="t2"))
        card = await recv_json(agent)
        while card["type"] != "notification":
            card = await recv_json(agent)
        await send_json(ig, notify("r3"))
        assert (await result_of(ig, "r3"))["value"]["responseReason"] == "NotificationQueueLimitExceeded"
        mid = await scrape(srv.port)
        assert value(mid, "deskpush_notifications", state="displayed") == 1
        assert value(mid, "deskpush_notifications", state="queued") == 0
        await send_json(ig, {"type": "cancelEvent", "requestId": "c2", "cancellationToken": "t2"})
        assert (await result_of(ig, "r2"))["value"]["actionName"] == "Cancel"
        await send_json(ig, notify("r4", "fast"))
        assert (await result_of(ig, "r4"))["value"]["actionName"] == "Timeout"

        # Errors: an unknown template (integrator), a frame that does not decode (agent).
        await send_json(ig, notify("r5", "nope"))
        assert (await result_of(ig, "r5"))["error"]["message"] == "NotificationTemplateNotFoundError"
        await agent.send("{")
        while (await recv_json(agent))["type"] != "error":
            pass

        # Closes: rate limit 1008, too big 1009, not UTF-8 1007, bad hello 4401, and a desktop that leaves (1000).
        flood, _ = await open_agent(srv, "flood")
        for _ in range(250):
            await send_json(flood, {"type": "ping"})
        assert await closed_with(flood) == 1008
        big, _ = await open_agent(srv, "big")
        await big.send("x" * 5000)
        assert await closed_with(big) == 1009
        garbled, _ = await open_agent(srv, "garbled")
        await garbled.send(b"\xff\xfe")
        assert await closed_with(garbled) == 1007
        stranger = await connect(f"ws://127.0.0.1:{srv.port}/agent")
        await send_json(stranger, {"type": "hello", "token": "not-a-token"})
        assert await closed_with(stranger) == 4401
        leaving, _ = await open_agent(srv, "leaving")
        await leaving.close()

        # Handshake failures: a wrong Bearer key (401), a plain GET to an endpoint (426).
        status, _, _ = await asyncio.to_thread(get, srv.port, "/integrator", {"Authorization": "Bearer wrong",
                                                                               "Upgrade": "websocket",
                                                                               "Connection": "Upgrade"})
        assert status == 401
        status, _, _ = await asyncio.to_thread(get, srv.port, "/agent")
        assert status == 426

        async with asyncio.timeout(5 * UNIT):
            while srv.statistics()["agentSessions"] != 1 or srv.statistics()["connections"] > 2:
                await asyncio.sleep(0.02)
        m = await scrape(srv.port)

    assert value(m, "deskpush_offers_total") == 4  # r1 to r4 (r3 refused by the full queue); r5 made none
    for action, reason in [("Accept", "Accept"), ("Cancel", "CancelledByIntegrator"),
                           ("Reject", "NotificationQueueLimitExceeded"), ("Timeout", "DisplayTimeout")]:
        assert value(m, "deskpush_outcomes_total", action_name=action, response_reason=reason) == 1, reason
        assert value(m, "deskpush_offer_duration_seconds_count", action_name=action, response_reason=reason) == 1
    timeout = {"action_name": "Timeout", "response_reason": "DisplayTimeout"}
    # The 0.3 s template: its offer took at least that (rounded up to timerResolution), and under 2.5 s.
    assert value(m, "deskpush_offer_duration_seconds_bucket", le="0.25", **timeout) == 0
    assert value(m, "deskpush_offer_duration_seconds_bucket", le="2.5", **timeout) == 1
    assert value(m, "deskpush_offer_duration_seconds_sum", **timeout) >= 0.3
    assert value(m, "deskpush_offer_duration_seconds_bucket", le="+Inf", action_name="Reject",
                 response_reason="NotificationQueueLimitExceeded") == 1
    assert value(m, "deskpush_timer_lateness_seconds_count") >= 1  # the display timeout's timer ran
    assert value(m, "deskpush_connections", endpoint="agent") == 1
    assert value(m, "deskpush_connections_opened_total", endpoint="agent") == 5  # not the stranger
    assert value(m, "deskpush_connections_opened_total", endpoint="integrator") == 1
    assert value(m, "deskpush_notifications", state="displayed") == 0

    assert value(m, "deskpush_errors_total", endpoint="integrator", code="NotificationTemplateNotFoundError") == 1
    assert value(m, "deskpush_errors_total", endpoint="agent", code="BadFrame") == 1
    assert value(m, "deskpush_frames_sent_total", endpoint="agent", type="notification") == 3
    assert value(m, "deskpush_frames_sent_total", endpoint="integrator", type="result") == 5  # 4 offers and a cancel
    assert value(m, "deskpush_frames_sent_total", endpoint="agent", type="welcome") == 5
    assert value(m, "deskpush_frames_sent_total", endpoint="agent", type="error") == 1
    assert value(m, "deskpush_frames_sent_total", endpoint="integrator", type="error") == 1
    assert value(m, "deskpush_frames_received_total", endpoint="integrator") == 6  # 5 notifyEvents and a cancelEvent
    # hello and respond and "{" from agent-7, hello and 250 pings from the flood, ... : at least these
    assert value(m, "deskpush_frames_received_total", endpoint="agent") >= 3 + 201

    for code in ("1008", "1009", "1007", "4401"):
        assert value(m, "deskpush_closes_total", endpoint="agent", initiator="server", code=code) == 1, code
    assert value(m, "deskpush_closes_total", endpoint="agent", initiator="client", code="1000") == 1
    assert value(m, "deskpush_handshake_failures_total", reason="unauthorized") == 1
    assert value(m, "deskpush_handshake_failures_total", reason="upgrade_required") == 1
    assert value(m, "deskpush_open_files_limit") != 0
    assert value(m, "process_open_fds") > 0  # the process's own, from prometheus-client


async def test_a_desktop_too_slow_to_read_is_counted_as_dropped_by_the_server():
    """server.outboundLimit: the abort the client sees as 1006, counted as the server's."""
    cfg = Config(server=ServerSection(host="127.0.0.1", port=0, outbound_limit=64 * 1024),
                 limits=Limits(display_limit=1000, queue_limit=0, max_notification_bytes=64 * 1024))
    async with DeskpushServer(cfg, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        slow = await connect(f"ws://127.0.0.1:{srv.port}/agent", max_queue=1)
        await send_json(slow, {"type": "hello", "token": srv.tokens.issue("slow")})
        await recv_json(slow)
        ig = await open_integrator(srv)
        for i in range(300):
            await send_json(ig, {"type": "notifyEvent", "requestId": f"s{i}", "agentId": "slow", "progress": False,
                                 "input": {"templateName": CHAT, "templateParameters": {"comment": "x" * 60_000}}})
        async with asyncio.timeout(10 * UNIT):
            while srv.statistics()["agentSessions"]:
                await asyncio.sleep(0.02)
        m = await scrape(srv.port)
        slow.transport.abort()
    assert value(m, "deskpush_closes_total", endpoint="agent", initiator="server", code="1006") == 1


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key"])
async def test_metrics_on_the_main_port_need_an_integrator_key(server, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    status, response_headers, body = await asyncio.to_thread(get, server.port, "/metrics", headers)
    assert status == 401 and body == "UnauthorizedError\n"
    assert response_headers["WWW-Authenticate"] == 'Bearer realm="deskpush"'


async def test_metrics_port_answers_without_a_key_and_nothing_else():
    async with DeskpushServer(config(metrics_port=0), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        port = srv.metrics_port
        assert port and port != srv.port
        await open_agent(srv)
        m = await scrape(port, headers={})
        assert value(m, "deskpush_connections", endpoint="agent") == 1
        for path in ("/", "/healthz", "/stats", "/agent"):
            status, _, _ = await asyncio.to_thread(get, port, path)
            assert status == 404, path
        # A scraper that asks for OpenMetrics gets it.
        status, headers, body = await asyncio.to_thread(
            get, port, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith("# EOF\n")
    with pytest.raises(OSError):  # closed with the server
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_metrics_off_counts_nothing_and_serves_no_metrics():
    async with DeskpushServer(config(metrics=False, metrics_port=0), jwt_secret=SECRET,
                              api_keys={"crm": API_KEY}) as srv:
        assert srv.counts is None and srv.dispatcher.counts is None
        assert srv.metrics_port is None
        status, _, _ = await asyncio.to_thread(get, srv.port, "/metrics", {"Authorization": f"Bearer {API_KEY}"})
        assert status == 404
        agent, _ = await open_agent(srv)
        ig = await open_integrator(srv)
        await send_json(ig, notify("r1"))
        assert (await recv_json(agent))["type"] == "notification"


async def test_every_statistic_is_exported(server):
    """/stats and /metrics show the same figures: a key added to statistics() needs its metric."""
    assert set(server.statistics()) == EXPORTED_STATISTICS


def test_timer_lateness_is_how_late_the_timer_ran():
    from deskpush.protocol import Engine

    from .test_dispatch import FAST as FAST_TEMPLATE

    clock = FakeClock()
    counts = Counts()
    engine = Engine({FAST_TEMPLATE.name: FAST_TEMPLATE}, Limits(timer_resolution=0))
    d = Dispatcher(engine, clock, counts=counts)
    agent, ig = FakeConn(clock, "agent"), FakeConn(clock, "ig")
    from deskpush.protocol import frames as f

    d.apply(engine.agent_connected(agent, "a1", "s1", clock.now()))
    d.apply(engine.integrator_connected(ig, "k1", clock.now()))
    d.apply(engine.integrator_frame(ig, f.NotifyEvent(request_id="r1", agent_id="a1",
                                                      input=f.NotifyInput(template_name="fast")), clock.now()))
    clock.t += 300 + 40  # the loop was busy: the 300 ms deadline's timer runs 40 ms late
    clock.advance(0)
    assert counts.lateness.count == 1
    assert counts.lateness.sum == pytest.approx(0.040)
    assert dict(counts.lateness.buckets())["0.05"] == 1 and dict(counts.lateness.buckets())["0.025"] == 0
    # Every outcome has its histogram from the start; the timeout's took 340 ms.
    assert {o: h.count for o, h in counts.durations.items() if h.count} == {("Timeout", "DisplayTimeout"): 1}
    assert counts.durations[("Timeout", "DisplayTimeout")].sum == pytest.approx(0.340)
