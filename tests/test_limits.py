"""Connection limits over real sockets: sessions per agent, the pre-auth time, pending handshakes.

Each test runs a server on 127.0.0.1 port 0 and talks to it as a desktop, a
browser integrator or an attacker would.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from deskpush.protocol import Limits
from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection

from .conftest import API_KEY, SECRET, UNIT, open_agent, open_integrator, recv_json, send_json


async def expect_closed(ws, code: int, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout * UNIT):
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
    assert ws.close_code == code, (ws.close_code, ws.close_reason)


def server_with(limits: Limits = Limits(), **server) -> DeskpushServer:
    config = Config(server=ServerSection(host="127.0.0.1", port=0, **server), limits=limits)
    return DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY})


# ---------------------------------------------------------------------------
# limits.sessionsPerAgent


async def test_a_session_over_the_limit_closes_the_agents_oldest_with_4409():
    async with server_with(Limits(sessions_per_agent=2)) as srv:
        first, _ = await open_agent(srv)
        second, _ = await open_agent(srv)
        other, _ = await open_agent(srv, "agent-8")  # another agent: its own count
        third, _ = await open_agent(srv)
        await expect_closed(first, 4409)
        assert first.close_reason == "replaced by a newer session of this agent"
        # The two newest get the offer and its end; the other agent is untouched.
        ig = await open_integrator(srv)
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "progress": False,
                             "input": {"templateName": "msdyn_chat_incoming_unauthenticated"}})
        card = await recv_json(third)
        assert (await recv_json(second))["notificationId"] == card["notificationId"]
        await send_json(third, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        assert (await recv_json(ig))["value"] == {"actionName": "Accept", "responseReason": "Accept"}
        assert (await recv_json(second))["type"] == "resolved"
        await send_json(other, {"type": "ping"})
        assert (await recv_json(other))["type"] == "pong"
        assert srv.engine.statistics()["agentSessions"] == 3


async def test_one_token_cannot_hold_more_than_the_limit_of_sessions():
    """What the attack did (2,000 sessions on one token) ends with 10 open, each extra one closing the oldest."""
    async with server_with() as srv:
        token = srv.tokens.issue("agent-7")
        socks = []
        for _ in range(30):
            ws = await connect(f"ws://127.0.0.1:{srv.port}/agent")
            await send_json(ws, {"type": "hello", "token": token})
            assert (await recv_json(ws))["type"] == "welcome"
            socks.append(ws)
        for ws in socks[:20]:
            await expect_closed(ws, 4409)
        assert srv.engine.statistics()["agentSessions"] == 10
        for ws in socks[20:]:
            await send_json(ws, {"type": "ping"})
            assert (await recv_json(ws))["type"] == "pong"


# ---------------------------------------------------------------------------
# server.helloTimeout: one bound from the TCP accept to authentication


async def tcp(srv: DeskpushServer) -> socket.socket:
    """A plain TCP connection to the server, accepted and silent."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.setblocking(False)
    return sock


async def test_the_handshake_and_the_hello_share_one_hello_timeout():
    """A client that spends most of helloTimeout on its handshake has only the rest for its hello."""
    async with server_with(hello_timeout=1.0 * UNIT) as srv:
        sock = await tcp(srv)
        await asyncio.sleep(0.7 * UNIT)  # the handshake starts late, but in time
        ws = await connect(f"ws://127.0.0.1:{srv.port}/agent", sock=sock)
        await asyncio.sleep(0.6 * UNIT)  # 0.6 s after the opening, 1.3 s after the accept
        try:
            await send_json(ws, {"type": "hello", "token": srv.tokens.issue("agent-7")})
        except ConnectionClosed:
            pass  # closed already: as good
        await expect_closed(ws, 4401)
        assert srv.engine.statistics()["agentSessions"] == 0
        # In time, the same hello works.
        agent, _ = await open_agent(srv)
        assert srv.pending_handshakes == 0


async def test_a_silent_connection_is_dropped_at_hello_timeout():
    async with server_with(hello_timeout=0.3 * UNIT) as srv:
        sock = await tcp(srv)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5 * UNIT):
            try:
                assert await loop.sock_recv(sock, 1024) == b""  # closed without a word
            except ConnectionResetError:
                pass  # or reset: as closed
        sock.close()
        assert srv.pending_handshakes == 0


# ---------------------------------------------------------------------------
# server.maxPendingHandshakes


async def test_upgrades_past_max_pending_handshakes_get_503_and_health_still_answers(caplog):
    caplog.set_level("WARNING", logger="deskpush")
    async with server_with(max_pending_handshakes=3) as srv:
        authenticated = [await open_agent(srv, f"agent-{i}") for i in range(4)]  # they do not count
        ig = await open_integrator(srv)  # authenticated by its upgrade request: does not count either
        silent = [await tcp(srv) for _ in range(3)]
        await eventually(lambda: srv.pending_handshakes, 3)
        for path, headers in (("/agent", {}), ("/integrator", {"Authorization": f"Bearer {API_KEY}"})):
            with pytest.raises(InvalidStatus) as exc:
                await connect(f"ws://127.0.0.1:{srv.port}{path}", additional_headers=headers)
            response = exc.value.response
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            assert b"waiting to authenticate" in response.body
        figures = srv.statistics()
        assert figures["refusedPendingHandshakes"] == 2 and figures["pendingHandshakes"] == 3
        # Plain HTTP is answered at once and closes: a load balancer's probe still works.
        status, _ = await http_get(srv, "/healthz")
        assert status == 200
        # The sessions already there carry on.
        ws, _ = authenticated[0]
        await send_json(ws, {"type": "ping"})
        assert (await recv_json(ws))["type"] == "pong"
        await send_json(ig, {"type": "cancelEvent", "requestId": "c1", "cancellationToken": "nope"})
        assert (await recv_json(ig))["type"] == "error"
        # Once the silent ones go, upgrades are accepted again.
        for sock in silent:
            sock.close()
        await eventually(lambda: srv.pending_handshakes, 0)
        await open_agent(srv)
    # Said at once, then at most once a second (the second refusal came within it, on a machine not
    # too slow), not once per refusal.
    lines = [r.getMessage() for r in caplog.records if "503" in r.getMessage()]
    assert len(lines) <= 2 and lines[0] == ("answered 1 WebSocket upgrade(s) with 503: 4 connections are waiting to authenticate "
                    "(server.maxPendingHandshakes = 3)")


async def test_connections_waiting_for_their_hello_count_until_it_comes():
    async with server_with(max_pending_handshakes=2) as srv:
        waiting = [await connect(f"ws://127.0.0.1:{srv.port}/agent") for _ in range(2)]
        with pytest.raises(InvalidStatus) as exc:
            await connect(f"ws://127.0.0.1:{srv.port}/agent")
        assert exc.value.response.status_code == 503
        await send_json(waiting[0], {"type": "hello", "token": srv.tokens.issue("agent-7")})
        assert (await recv_json(waiting[0]))["type"] == "welcome"
        await eventually(lambda: srv.pending_handshakes, 1)
        third, _ = await open_agent(srv)  # one slot free again


async def http_get(srv: DeskpushServer, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    async with asyncio.timeout(5 * UNIT):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def eventually(fn, expected, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout * UNIT
    while (value := fn()) != expected:
        assert loop.time() < deadline, f"expected {expected!r}, last got {value!r}"
        await asyncio.sleep(0.01)
