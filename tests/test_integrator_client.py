"""The Python integrator client and ``deskpush notify``, against a real server.

Agents are driven with raw websockets (``open_agent``); the integrator side is
``deskpush.client``. Connection drops are made with a small TCP proxy
between the client and the server (so the network, not the server, breaks:
the proxy aborts both TCP connections, no close handshake) or by restarting a
server on the same port. The proxy can also swallow one direction first, so a
request is lost before the server got it, or its answers after.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import serve

from deskpush.client import (
    RESUME_NOW,
    CIFError,
    Integrator,
    IntegratorConnectionError,
    OutcomeUnknownError,
    Reconnect,
    Resumed,
    Status,
    UnauthorizedError,
)
from deskpush.client.integrator import resume_url
from deskpush.protocol import Ended, Limits, Template
from deskpush.protocol.vocabulary import ErrorMessage
from deskpush.server import Config, DeskpushServer
from deskpush.server.cli import main as cli_main
from deskpush.server.config import ServerSection

from .conftest import API_KEY, SECRET, UNIT, open_agent, open_integrator, recv_json, send_json

BOTH_MODES = True  # the server fixture: embedded, and three cluster nodes on Redis (the SDK's drops land it on another node)

CHAT = "msdyn_chat_incoming_unauthenticated"
FAST = Reconnect(attempts=None, timeout=10.0, initial=0.02, maximum=0.2)


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/integrator"


async def within(aw: Any, seconds: float = 5.0) -> Any:
    async with asyncio.timeout(seconds * UNIT):
        return await aw


async def next_frame(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The agent's next frame of type ``kind`` (skipping queue counts and the like)."""
    while True:
        msg = await recv_json(ws)
        if msg["type"] == kind:
            return msg


async def until(condition: Any, seconds: float = 5.0) -> None:
    """Wait until ``condition()`` holds, polling."""
    async with asyncio.timeout(seconds * UNIT):
        while not condition():
            await asyncio.sleep(0.01)


async def frames_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """The agent's frames up to and including the next one of type ``kind``."""
    frames = [await recv_json(ws)]
    while frames[-1]["type"] != kind:
        frames.append(await recv_json(ws))
    return frames


async def answer(ws: ClientConnection, action: str) -> dict[str, Any]:
    note = await next_frame(ws, "notification")
    await send_json(ws, {"type": "respond", "notificationId": note["notificationId"], "action": action})
    return note


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """A TCP forwarder in front of the server, so a test can cut the network.

    ``swallow("up")`` (client to server) or ``swallow("down")`` drops what
    flows that way until the next ``cut()``: what was sent is lost with the
    connection, as when the network fails mid-flight.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._swallowed: set[str] = set()
        self._listener: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._listener = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._listener.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
            try:
                while data := await src.read(65536):
                    if direction in self._swallowed:
                        continue
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(pipe(reader, up_writer, "up"), pipe(up_reader, writer, "down"))
        finally:
            self._tasks.discard(task)
            self._writers -= {writer, up_writer}

    def swallow(self, direction: str) -> None:
        """Drop what flows ``"up"`` (to the server) or ``"down"`` until the next cut."""
        self._swallowed.add(direction)

    def cut(self) -> None:
        """Abort every forwarded connection, both ways (no close handshake)."""
        self._swallowed.clear()
        if self._writers:
            self.cuts += 1
        for w in list(self._writers):
            w.transport.abort()

    async def stop(self) -> None:
        """Cut and stop listening; ``start()`` listens again on the same port."""
        assert self._listener is not None
        self._listener.close()
        self.cut()
        await self._listener.wait_closed()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)


@pytest.fixture
async def proxy(server: DeskpushServer) -> AsyncIterator[Proxy]:
    p = Proxy(server.port)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


# --------------------------------------------------------------------------
# notifyEvent / cancelEvent


async def test_notify_accepted_with_progress(server: DeskpushServer) -> None:
    agent, _ = await open_agent(server, "agent-7")
    seen: list[Status] = []
    async with Integrator(url(server.port), API_KEY, agent_id="agent-7") as ig:
        call = asyncio.ensure_future(ig.notify_event(
            {"templateName": CHAT, "templateParameters": {"customerName": "Jane"}},
            "corr-1", on_status=seen.append,
        ))
        note = await answer(agent, "Accept")
        value = await within(call)
    assert value == {"actionName": "Accept", "responseReason": "Accept"}
    assert note["correlationId"] == "corr-1"
    assert [s.state for s in seen] == ["queued", "displayed"]
    assert {s.notification_id for s in seen} == {note["notificationId"]}
    assert seen[0].cancellation_token  # the server made one
    assert (await next_frame(agent, "resolved"))["actionName"] == "Accept"
    await agent.close()


async def test_notify_rejected_and_agent_in_input(server: DeskpushServer) -> None:
    agent, _ = await open_agent(server, "agent-9")
    async with Integrator(url(server.port), API_KEY) as ig:  # no default agent
        call = asyncio.ensure_future(ig.notify_event(
            {"templateName": CHAT, "templateParameters": {}, "agentId": "agent-9"}, progress=False))
        await answer(agent, "Reject")
        assert await within(call) == {"actionName": "Reject", "responseReason": "DeclinedByAgent"}
    await agent.close()


async def test_template_not_found_is_a_cif_error(server: DeskpushServer) -> None:
    async with Integrator(url(server.port), API_KEY, agent_id="agent-7") as ig:
        with pytest.raises(CIFError) as info:
            await within(ig.notify_event({"templateName": "no-such-template"}))
        err = info.value
        assert isinstance(err, Exception)
        assert (err.message, err.msdyn_name) == ("NotificationTemplateNotFoundError", "NotifyEvent")
        assert "no-such-template" in err.details
        assert err.to_dict()["msdyn_name"] == "NotifyEvent"

        with pytest.raises(CIFError) as info:
            await within(ig.notify_event({"templateName": CHAT}, agent_id="nobody"))
        assert info.value.message == "AgentNotConnectedError"

        # Validation happens on the server; its details name the field.
        with pytest.raises(CIFError) as info:
            await within(ig.notify_event({"templateParameters": {}}))
        assert info.value.message == "RejectAfterClientError"
        assert "templateName" in info.value.details


async def test_cancel_event(server: DeskpushServer) -> None:
    agent, _ = await open_agent(server, "agent-7")
    async with Integrator(url(server.port), API_KEY, agent_id="agent-7") as ig:
        call = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}, cancellation_token="tok-1"))
        note = await next_frame(agent, "notification")
        value = await within(ig.cancel_event("tok-1", "corr-c"))
        assert value == {"cancellationToken": "tok-1", "actionName": "Cancel",
                         "responseReason": "CancelledByIntegrator"}
        assert await within(call) == {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"}
        resolved = await next_frame(agent, "resolved")
        assert resolved["notificationId"] == note["notificationId"]

        # A second cancel learns the outcome that already happened.
        again = await within(ig.cancel_event("tok-1"))
        assert again["actionName"] == "Cancel"

        with pytest.raises(CIFError) as info:
            await within(ig.cancel_event("no-such-token"))
        assert (info.value.message, info.value.msdyn_name) == ("CancellationTokenNotFoundError", "CancelEvent")
    await agent.close()


async def test_concurrent_calls_are_matched_by_request_id(server: DeskpushServer) -> None:
    agents = {name: (await open_agent(server, name))[0] for name in ("a1", "a2", "a3")}
    actions = {"a1": "Reject", "a2": "Accept", "a3": "Reject"}
    async with Integrator(url(server.port), API_KEY) as ig:
        calls = {name: asyncio.ensure_future(ig.notify_event({"templateName": CHAT}, agent_id=name))
                 for name in agents}
        for name in ("a3", "a1", "a2"):
            await answer(agents[name], actions[name])
        results = {name: await within(call) for name, call in calls.items()}
    assert {n: v["actionName"] for n, v in results.items()} == actions
    for ws in agents.values():
        await ws.close()


async def test_errors_in_the_block_propagate_unwrapped(server: DeskpushServer) -> None:
    with pytest.raises(CIFError):  # not an ExceptionGroup from the reader's task group
        async with Integrator(url(server.port), API_KEY, agent_id="agent-7") as ig:
            await within(ig.notify_event({"templateName": "nope"}))
    with pytest.raises(IntegratorConnectionError, match="closed"):
        await ig.notify_event({"templateName": CHAT})


# --------------------------------------------------------------------------
# Connecting


async def test_bad_api_key_is_refused_without_retry(server: DeskpushServer) -> None:
    started = time.monotonic()
    with pytest.raises(UnauthorizedError, match="unauthorized"):
        async with Integrator(url(server.port), "wrong-key", agent_id="agent-7"):
            pass
    assert time.monotonic() - started < 2 * UNIT


async def test_connection_refused() -> None:
    port = free_port()
    with pytest.raises(IntegratorConnectionError, match=f"cannot connect to ws://127.0.0.1:{port}/integrator: connection refused"):
        async with Integrator(f"ws://127.0.0.1:{port}", API_KEY):  # the path is added
            pass


async def test_drop_keeps_a_pending_notify_and_the_replay_settles_it(server: DeskpushServer, proxy: Proxy) -> None:
    agent, _ = await open_agent(server, "agent-7")  # directly, not through the proxy
    resumes: list[Resumed] = []
    async with Integrator(url(proxy.port), API_KEY, agent_id="agent-7", reconnect=FAST,
                          on_resumed=resumes.append) as ig:
        assert ig.connects == 1 and resumes[0].count == 0 and resumes[0].complete
        assert ig.last_outcome_id == resumes[0].last_outcome_id
        call = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}, cancellation_token="kept"))
        note = await next_frame(agent, "notification")
        await proxy.stop()  # cut, and refuse new connections for a while
        await until(lambda: not ig.connected)
        # The agent answers while the integrator is away: the outcome waits in the history.
        await send_json(agent, {"type": "respond", "notificationId": note["notificationId"], "action": "Accept"})
        await next_frame(agent, "resolved")
        await asyncio.sleep(0.1)
        assert not call.done()
        await proxy.start()  # same port
        assert await within(call) == {"actionName": "Accept", "responseReason": "Accept"}
        assert ig.connects == 2
        assert (resumes[1].count, resumes[1].complete) == (1, True)
        assert ig.last_outcome_id == resumes[1].last_outcome_id
        assert server.engine.outcomes == 1
    await agent.close()


async def test_a_resumed_integrator_sends_calls_again_without_a_second_offer(
    server: DeskpushServer, proxy: Proxy
) -> None:
    """Pending across a drop: the resend with the same requestId gets a status, not a new offer."""
    agent, _ = await open_agent(server, "agent-7")
    seen: list[Status] = []
    async with Integrator(url(proxy.port), API_KEY, agent_id="agent-7", reconnect=FAST) as ig:
        call = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}, on_status=seen.append))
        note = await next_frame(agent, "notification")
        await until(lambda: len(seen) == 2)
        proxy.cut()
        await until(lambda: len(seen) == 3)  # the answer to the resend: the current state
        assert [s.state for s in seen] == ["queued", "displayed", "displayed"]
        assert {s.notification_id for s in seen} == {note["notificationId"]}
        assert len({s.request_id for s in seen}) == 1
        await send_json(agent, {"type": "respond", "notificationId": note["notificationId"], "action": "Reject"})
        assert await within(call) == {"actionName": "Reject", "responseReason": "DeclinedByAgent"}
        assert ig.connects == 2
    assert (await next_frame(agent, "resolved"))["notificationId"] == note["notificationId"]
    await agent.close()


@pytest.mark.parametrize("lost", ["request", "answers"])
async def test_a_notify_cut_before_any_status_is_offered_once(
    server: DeskpushServer, proxy: Proxy, lost: str
) -> None:
    """Cut right after sending a notifyEvent: lost on its way ("request") or after the server got it."""
    agent, _ = await open_agent(server, "agent-7")
    statuses: list[Status] = []
    async with Integrator(url(proxy.port), API_KEY, agent_id="agent-7", reconnect=FAST) as ig:
        proxy.swallow("up" if lost == "request" else "down")
        call = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}, correlation_id="once",
                                                     on_status=statuses.append))
        if lost == "answers":
            first = await next_frame(agent, "notification")  # the server has it; its status is swallowed
        else:
            await asyncio.sleep(0.2)
            assert server.engine.statistics()["live"] == 0  # the server never got it
        assert statuses == []
        proxy.cut()
        note = await next_frame(agent, "notification") if lost == "request" else first
        await send_json(agent, {"type": "respond", "notificationId": note["notificationId"], "action": "Accept"})
        assert await within(call) == {"actionName": "Accept", "responseReason": "Accept"}
        assert ig.connects == 2
    # One offer on the desktop, one outcome.
    await send_json(agent, {"type": "ping"})
    later = [frame["type"] for frame in await frames_until(agent, "pong")]
    assert "notification" not in later and later.count("resolved") == 1
    assert server.engine.outcomes == 1
    await agent.close()


@pytest.mark.parametrize("lost", ["request", "answers"])
async def test_a_cancel_cut_right_after_sending_settles_both_calls_once(
    server: DeskpushServer, proxy: Proxy, lost: str
) -> None:
    agent, _ = await open_agent(server, "agent-7")
    outcomes: list[tuple[str, dict[str, Any], str]] = []
    async with Integrator(url(proxy.port), API_KEY, agent_id="agent-7", reconnect=FAST,
                          on_outcome=lambda *a: outcomes.append(a)) as ig:
        notify = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}, cancellation_token="tok-c"))
        note = await next_frame(agent, "notification")
        proxy.swallow("up" if lost == "request" else "down")
        cancel = asyncio.ensure_future(ig.cancel_event("tok-c"))
        if lost == "answers":
            assert (await next_frame(agent, "resolved"))["responseReason"] == "CancelledByIntegrator"
        else:
            await asyncio.sleep(0.2)
            assert server.engine.statistics()["live"] == 1  # not cancelled yet
        proxy.cut()
        expected = {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"}
        assert await within(notify) == expected
        assert await within(cancel) == {"cancellationToken": "tok-c", **expected}
        assert ig.connects == 2
    await send_json(agent, {"type": "ping"})
    later = await frames_until(agent, "pong")
    assert [f["notificationId"] for f in later if f["type"] == "resolved"] == (
        [note["notificationId"]] if lost == "request" else [])  # "answers": it came before the cut
    assert not [f for f in later if f["type"] == "notification"]
    assert server.engine.outcomes == 1
    assert [(v, o) for _, v, o in outcomes] == [(expected, ig.last_outcome_id)]
    await agent.close()


async def test_calls_pending_past_the_history_fail_with_outcome_unknown() -> None:
    """The outcome was forgotten while the integrator was away: OutcomeUnknownError, the server's details."""
    config = Config(server=ServerSection(host="127.0.0.1", port=0), limits=Limits(outcome_history=1))
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        proxy = Proxy(srv.port)
        await proxy.start()
        agent, _ = await open_agent(srv, "agent-7")
        resumes: list[Resumed] = []
        try:
            async with Integrator(url(proxy.port), API_KEY, agent_id="agent-7", reconnect=FAST,
                                  on_resumed=resumes.append) as ig:
                call = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}, cancellation_token="gone"))
                note = await next_frame(agent, "notification")
                await proxy.stop()
                await until(lambda: not ig.connected)
                # Two outcomes while it is away; the history keeps one, so ours is forgotten.
                await send_json(agent, {"type": "respond", "notificationId": note["notificationId"],
                                        "action": "Accept"})
                other = await open_integrator(srv)
                await send_json(other, {"type": "notifyEvent", "requestId": "other-1", "agentId": "agent-7",
                                        "progress": False, "input": {"templateName": CHAT}})
                await send_json(agent, {"type": "respond", "action": "Reject",
                                        "notificationId": (await next_frame(agent, "notification"))["notificationId"]})
                assert (await recv_json(other))["type"] == "result"
                await proxy.start()
                with pytest.raises(OutcomeUnknownError) as info:
                    await within(call)
                err = info.value
                assert isinstance(err, CIFError)
                assert (err.message, err.msdyn_name) == (ErrorMessage.OUTCOME_UNKNOWN, "NotifyEvent")
                assert not resumes[-1].complete
                assert err.details and err.details == resumes[-1].details  # the server's words
                assert (err.notification_id, err.cancellation_token) == (note["notificationId"], "gone")
                assert ig.connects == 2
                # The connection carries on.
                new = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}))
                await answer(agent, "Accept")
                assert await within(new) == {"actionName": "Accept", "responseReason": "Accept"}
                await other.close()
        finally:
            await proxy.stop()
            await agent.close()


async def test_a_later_process_resumes_after_a_stored_position(server: DeskpushServer) -> None:
    """on_outcome gets the outcomes of requests an earlier process made; an old position is incomplete."""
    agent, _ = await open_agent(server, "agent-7")
    statuses: list[Status] = []
    async with Integrator(url(server.port), API_KEY, agent_id="agent-7") as first:
        stored = first.last_outcome_id
        assert stored is not None and stored != RESUME_NOW
        orphan = asyncio.ensure_future(first.notify_event({"templateName": CHAT}, on_status=statuses.append))
        note = await next_frame(agent, "notification")
        await until(lambda: statuses)
    with pytest.raises(IntegratorConnectionError, match="closed"):
        await orphan  # the process "ended" with its call pending; the offer runs on
    await send_json(agent, {"type": "respond", "notificationId": note["notificationId"], "action": "Accept"})
    await next_frame(agent, "resolved")

    got: list[tuple[str, dict[str, Any], str]] = []
    resumes: list[Resumed] = []
    async with Integrator(url(server.port), API_KEY, resume_after=stored,
                          on_outcome=lambda *a: got.append(a), on_resumed=resumes.append) as second:
        assert second.last_outcome_id == resumes[0].last_outcome_id
        assert (resumes[0].count, resumes[0].complete) == (1, True)
        ((request_id, value, outcome_id),) = got
        assert request_id == statuses[0].request_id
        assert value == {"actionName": "Accept", "responseReason": "Accept"}
        assert outcome_id == second.last_outcome_id and outcome_id > stored
        await second.ack()  # "stored": no answer, the connection stays
        await second.ack(outcome_id)
        assert second.connected

    # A position older than anything the server knows: incomplete, with the server's reason.
    async with Integrator(url(server.port), API_KEY, resume_after="0000000000001-000000",
                          on_resumed=resumes.append) as third:
        assert not resumes[-1].complete and resumes[-1].details
        assert third.last_outcome_id == resumes[-1].last_outcome_id
    await agent.close()


async def test_a_request_too_large_for_the_server_fails_and_is_not_sent_again(server: DeskpushServer) -> None:
    """The server closes with 1009: the big request fails; the others are resent on the new connection."""
    agent, _ = await open_agent(server, "agent-7")
    async with Integrator(url(server.port), API_KEY, agent_id="agent-7", reconnect=FAST) as ig:
        small = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}))
        note = await next_frame(agent, "notification")
        with pytest.raises(CIFError) as info:
            await within(ig.notify_event({"templateName": CHAT, "templateParameters": {"blob": "x" * 70_000}}))
        assert (info.value.message, info.value.msdyn_name) == ("RejectAfterClientError", "NotifyEvent")
        assert "larger than the server accepts (close 1009" in info.value.details
        await within(ig.wait_connected())
        await send_json(agent, {"type": "respond", "notificationId": note["notificationId"], "action": "Accept"})
        assert await within(small) == {"actionName": "Accept", "responseReason": "Accept"}
        assert ig.connects == 2 and server.engine.outcomes == 1
    await agent.close()


def test_the_resume_point_goes_in_the_query() -> None:
    assert resume_url("ws://h:1/integrator", RESUME_NOW) == "ws://h:1/integrator?resumeAfter=$"
    assert (resume_url("wss://h/integrator?tenant=a&resumeAfter=$", "1764460800123-000004")
            == "wss://h/integrator?tenant=a&resumeAfter=1764460800123-000004")


async def test_a_resume_point_the_server_cannot_read_is_refused_with_its_reason(server: DeskpushServer) -> None:
    with pytest.raises(IntegratorConnectionError, match="HTTP 400 Bad Request: resumeAfter must be"):
        async with Integrator(url(server.port), API_KEY, resume_after="not-an-outcome-id"):
            pass


async def test_ack_needs_a_position() -> None:
    ig = Integrator("ws://127.0.0.1:1/integrator", API_KEY)
    assert ig.last_outcome_id is None
    with pytest.raises(ValueError, match="nothing to ack"):
        await ig.ack()


async def test_calls_during_an_outage_wait_for_the_reconnect(server: DeskpushServer, proxy: Proxy) -> None:
    agent, _ = await open_agent(server, "agent-7")
    async with Integrator(url(proxy.port), API_KEY, agent_id="agent-7", reconnect=FAST) as ig:
        await proxy.stop()  # cut, and refuse new connections for a while
        await until(lambda: not ig.connected)
        call = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}))
        await asyncio.sleep(0.3)
        assert not call.done()
        await proxy.start()  # same port
        await answer(agent, "Accept")
        assert await within(call) == {"actionName": "Accept", "responseReason": "Accept"}
        assert ig.connects == 2
    await agent.close()


def _config(port: int) -> Config:
    return Config(server=ServerSection(host="127.0.0.1", port=port), limits=Limits())


async def test_reconnects_after_a_server_restart() -> None:
    first = DeskpushServer(_config(0), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await first.start()
    port = first.port
    async with Integrator(url(port), API_KEY, agent_id="agent-7", reconnect=FAST) as ig:
        await first.close()  # agents and integrators get 1001
        await until(lambda: not ig.connected)
        async with DeskpushServer(_config(port), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as second:
            agent, _ = await open_agent(second, "agent-7")
            await within(ig.wait_connected())
            call = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}))
            await answer(agent, "Accept")
            assert await within(call) == {"actionName": "Accept", "responseReason": "Accept"}
            await agent.close()


async def test_reconnecting_gives_up_within_its_bounds() -> None:
    srv = DeskpushServer(_config(0), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    policy = Reconnect(attempts=3, timeout=5.0, initial=0.01, maximum=0.05)
    async with Integrator(url(srv.port), API_KEY, agent_id="agent-7", reconnect=policy) as ig:
        await srv.close()
        started = time.monotonic()
        with pytest.raises(IntegratorConnectionError, match="gave up reconnecting after 3 attempt"):
            await within(ig.notify_event({"templateName": CHAT}))
        assert time.monotonic() - started < 2 * UNIT
        with pytest.raises(IntegratorConnectionError):  # and stays failed
            await ig.cancel_event("x")


async def test_a_server_without_resumed_is_refused_clearly() -> None:
    """A v1 server replays nothing and sends no ``resumed``: the first connection says so."""
    async def silent(ws: Any) -> None:
        await ws.wait_closed()

    async with serve(silent, "127.0.0.1", 0) as fake:
        port = fake.sockets[0].getsockname()[1]
        with pytest.raises(IntegratorConnectionError, match="sent no `resumed` within 0.3 s"):
            async with Integrator(url(port), API_KEY, open_timeout=0.3):
                pass


@pytest.mark.parametrize("code", [1001, 1012])
async def test_going_away_and_service_restart_closes_are_drops(code: int) -> None:
    """1001 and 1012 are ordinary drops: reconnect and resume (a stand-in server closes with them)."""
    asked: list[str] = []

    async def handler(ws: Any) -> None:
        asked.append(ws.request.path)
        await ws.send(json.dumps({"type": "resumed", "count": 0, "complete": True,
                                  "lastOutcomeId": f"1764460800123-{len(asked):06d}"}))
        if len(asked) == 1:
            await ws.close(code)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as fake:
        port = fake.sockets[0].getsockname()[1]
        async with Integrator(url(port), API_KEY, reconnect=FAST) as ig:
            await until(lambda: ig.connects == 2)
            assert ig.last_outcome_id == "1764460800123-000002"
    assert asked == ["/integrator?resumeAfter=$", "/integrator?resumeAfter=1764460800123-000001"]


# --------------------------------------------------------------------------
# Many calls through many cuts


QUICK = "quick_offer"  # a template whose display timeout fires while the test runs


async def test_200_calls_through_random_cuts_settle_once_with_the_servers_outcome() -> None:
    """200 notifyEvents over 6 agents; the integrator's network is cut at random points 6 times.

    Agents answer Accept or Reject after random delays; a quarter of the
    offers use a template with a 0.4 s display timeout that agents answer
    late or not at all, so timeouts keep firing too. Every call must settle
    exactly once, with the outcome the server logged for it; the server must
    have made exactly one notification per call, and each agent seen each
    offer once.
    """
    seed = int(os.environ.get("DESKPUSH_TEST_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    agents_n, calls_n = 6, 200
    config = Config(
        server=ServerSection(host="127.0.0.1", port=0),
        limits=Limits(display_limit=3, queue_limit=calls_n, queue_timeout=120.0),
        templates=(Template(name=QUICK, title="Quick offer", timeout=0.4),),
    )
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        ended: list[Ended] = []
        log_outcome = srv.dispatcher.log_outcome

        def capture(e: Ended) -> None:
            ended.append(e)
            if log_outcome is not None:
                log_outcome(e)

        srv.dispatcher.log_outcome = capture
        proxy = Proxy(srv.port)
        await proxy.start()
        offers: Counter[str] = Counter()  # correlationId -> notification frames seen by its agent
        sessions = [(await open_agent(srv, f"agent-{i}"))[0] for i in range(agents_n)]

        async def desk(ws: ClientConnection) -> None:
            answering: set[asyncio.Task[None]] = set()

            async def respond(note: dict[str, Any]) -> None:
                quick = note["templateName"] == QUICK
                if quick and rng.random() < 0.5:
                    return  # let it time out
                await asyncio.sleep(rng.uniform(0.2, 0.6) if quick else rng.uniform(0.0, 0.15))
                action = rng.choice(["Accept", "Reject"])
                await send_json(ws, {"type": "respond", "notificationId": note["notificationId"], "action": action})

            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] == "notification":
                    offers[msg["correlationId"]] += 1
                    task = asyncio.create_task(respond(msg))
                    answering.add(task)
                    task.add_done_callback(answering.discard)

        desks = [asyncio.create_task(desk(ws)) for ws in sessions]
        outcome_ids: Counter[str] = Counter()
        try:
            async with Integrator(url(proxy.port), API_KEY, reconnect=FAST,
                                  on_outcome=lambda rid, value, oid: outcome_ids.update([oid])) as ig:

                async def call(i: int) -> dict[str, Any]:
                    await asyncio.sleep(rng.uniform(0.0, 2.0))  # some are made during an outage
                    template = QUICK if i % 4 == 0 else CHAT
                    return await ig.notify_event({"templateName": template}, correlation_id=f"c-{i}",
                                                 agent_id=f"agent-{i % agents_n}")

                async def cutter() -> None:
                    for _ in range(6):
                        await asyncio.sleep(rng.uniform(0.05, 0.5))
                        proxy.cut()

                calls = [asyncio.create_task(call(i)) for i in range(calls_n)]
                cutting = asyncio.create_task(cutter())
                values = await within(asyncio.gather(*calls), 60)
                await cutting
                connects = ig.connects
        finally:
            for ws in sessions:
                await ws.close()
            await asyncio.gather(*desks, return_exceptions=True)
            await proxy.stop()

    context = f"seed {seed} (DESKPUSH_TEST_SEED={seed} repeats the draws)"
    assert connects > 1 and proxy.cuts > 0, context
    by_call: dict[str, list[Ended]] = {}
    for e in ended:
        by_call.setdefault(e.correlation_id or "", []).append(e)
    assert sorted(by_call) == sorted(f"c-{i}" for i in range(calls_n)), context
    for i, value in enumerate(values):
        (e,) = by_call[f"c-{i}"]  # one notification per call: no duplicate offer was made
        assert value == {"actionName": e.outcome.action_name, "responseReason": e.outcome.response_reason}, context
        assert srv.engine.outcome_of(e.notification_id) == e.outcome, context
    assert offers == Counter({f"c-{i}": 1 for i in range(calls_n)}), context
    assert len(outcome_ids) == calls_n and set(outcome_ids.values()) == {1}, context  # on_outcome once each
    reasons = Counter(e.outcome.response_reason for e in ended)
    assert reasons["DisplayTimeout"] and reasons["Accept"] and reasons["DeclinedByAgent"], (reasons, context)


# --------------------------------------------------------------------------
# deskpush notify


async def run_cli(*argv: str) -> asyncio.Task[int]:
    return asyncio.create_task(asyncio.to_thread(cli_main, ["notify", *argv]))


async def test_cli_prints_progress_and_outcome(server: DeskpushServer, capsys: pytest.CaptureFixture[str]) -> None:
    agent, _ = await open_agent(server, "agent-7")
    cli = await run_cli("--url", url(server.port), "--api-key", API_KEY, "--agent", "agent-7",
                        "--param", "customerName=Jane", "--correlation-id", "case-1")
    note = await answer(agent, "Accept")
    assert await within(cli) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["Accept/Accept", '{"actionName":"Accept","responseReason":"Accept"}']
    assert f"queued: notificationId={note['notificationId']} cancellationToken=" in err
    assert f"displayed: notificationId={note['notificationId']}" in err
    assert note["correlationId"] == "case-1"
    assert "Jane" in json.dumps(note)
    await agent.close()


async def test_cli_cancel_after(server: DeskpushServer, capsys: pytest.CaptureFixture[str]) -> None:
    agent, _ = await open_agent(server, "agent-7")
    cli = await run_cli("--url", url(server.port), "--api-key", API_KEY, "--agent", "agent-7",
                        "--cancellation-token", "t-9", "--cancel-after", "0.3")
    await next_frame(agent, "notification")  # and never answer
    assert await within(cli) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "Cancel/CancelledByIntegrator"
    assert json.loads(lines[1]) == {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"}
    assert json.loads(lines[2].removeprefix("cancel: ")) == {
        "cancellationToken": "t-9", "actionName": "Cancel", "responseReason": "CancelledByIntegrator"}
    assert "cancelEvent: cancellationToken=t-9 after 0.3 s" in err
    await agent.close()


async def test_cli_unknown_template_exits_1(server: DeskpushServer, capsys: pytest.CaptureFixture[str]) -> None:
    cli = await run_cli("--url", url(server.port), "--api-key", API_KEY, "--agent", "agent-7",
                        "--template", "nope")
    assert await within(cli) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "error: NotificationTemplateNotFoundError (NotifyEvent): no template named 'nope'" in err


async def test_cli_wrong_key_exits_2(server: DeskpushServer, capsys: pytest.CaptureFixture[str]) -> None:
    cli = await run_cli("--url", url(server.port), "--api-key", "wrong", "--agent", "agent-7")
    assert await within(cli) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "unauthorized" in err and "check --api-key" in err


async def test_cli_missing_key_and_refused_connection_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DESKPUSH_API_KEY", raising=False)
    assert cli_main(["notify", "--agent", "agent-7"]) == 2
    assert "no API key: pass --api-key or set DESKPUSH_API_KEY" in capsys.readouterr().err

    port = free_port()
    cli = await run_cli("--url", url(port), "--api-key", API_KEY, "--agent", "agent-7")
    assert await within(cli) == 2
    err = capsys.readouterr().err
    assert f"cannot connect to ws://127.0.0.1:{port}/integrator: connection refused" in err


def _restart_config(port: int, state_file: Path | None) -> Config:
    server = ServerSection(host="127.0.0.1", port=port, state_file=str(state_file) if state_file else None)
    return Config(server=server, limits=Limits())


async def test_cli_waits_through_a_server_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The offer is displayed when the server restarts (with a stateFile); the agent accepts after it."""
    state = tmp_path / "state.json"
    first = DeskpushServer(_restart_config(0, state), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await first.start()
    port = first.port
    agent, _ = await open_agent(first, "agent-7")
    cli = await run_cli("--url", url(port), "--api-key", API_KEY, "--agent", "agent-7", "--correlation-id", "rs")
    note = await next_frame(agent, "notification")
    await first.close()  # every connection gets 1001; the offer goes to the state file
    async with DeskpushServer(_restart_config(port, state), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as second:
        again, welcome = await open_agent(second, "agent-7")
        assert welcome["displayed"] == [note["notificationId"]]
        assert (await next_frame(again, "notification"))["notificationId"] == note["notificationId"]
        # The CLI is back (its backoff is at most 2 s) and has sent its request again.
        await until(lambda: second.engine.statistics()["integrators"], 10)
        await asyncio.sleep(0.2)
        await send_json(again, {"type": "respond", "notificationId": note["notificationId"], "action": "Accept"})
        assert await within(cli, 20) == 0
        assert second.engine.outcomes == 1
        await again.close()
    await agent.close()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["Accept/Accept", '{"actionName":"Accept","responseReason":"Accept"}']
    assert "(close code 1001" in err and "reconnecting for up to 60 s" in err
    assert "reconnected and resumed: 0 outcome(s) replayed" in err
    assert err.count(f"displayed: notificationId={note['notificationId']}") == 2  # before, and the resend's status


async def test_cli_says_outcome_unknown_after_a_restart_that_lost_it(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a stateFile a restart forgets the offer and its history: exit 2, OutcomeUnknownError."""
    first = DeskpushServer(_restart_config(0, None), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await first.start()
    port = first.port
    agent, _ = await open_agent(first, "agent-7")
    cli = await run_cli("--url", url(port), "--api-key", API_KEY, "--agent", "agent-7",
                        "--cancellation-token", "lost-1")
    await next_frame(agent, "notification")
    await first.close()
    await agent.close()
    async with DeskpushServer(_restart_config(port, None), jwt_secret=SECRET, api_keys={"crm": API_KEY}):
        assert await within(cli, 20) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "deskpush notify: OutcomeUnknownError: " in err
    assert "cancel it with cancellationToken lost-1" in err


async def test_cli_help_documents_the_reconnect_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["notify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--reconnect-timeout SECONDS" in text and "(default 60; 0: fail at once)" in text
