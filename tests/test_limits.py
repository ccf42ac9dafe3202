"""Connection limits over real sockets: sessions per agent, the pre-auth time, pending handshakes.

Each test runs a server on 127.0.0.1 port 0 and talks to it as a desktop, a
browser integrator or an attacker would.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

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
