"""The Python integrator client and ``deskpush notify``, against a real server.

Agents are driven with raw websockets (``open_agent``); the integrator side is
``deskpush.client``. Connection drops are made with a small TCP proxy
between the client and the server (so the network, not the server, breaks) or
by restarting a server on the same port.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from deskpush.client import (
    LOST_DETAILS,
    CIFError,
    Integrator,
    IntegratorConnectionError,
    Reconnect,
    Status,
    UnauthorizedError,
)
from deskpush.protocol import Limits
from deskpush.server import Config, DeskpushServer
from deskpush.server.cli import main as cli_main
from deskpush.server.config import ServerSection

from .conftest import API_KEY, SECRET, UNIT, open_agent, recv_json, send_json

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


async def answer(ws: ClientConnection, action: str) -> dict[str, Any]:
    note = await next_frame(ws, "notification")
    await send_json(ws, {"type": "respond", "notificationId": note["notificationId"], "action": action})
    return note


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """A TCP forwarder in front of the server, so a test can cut the network."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._listener: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._listener = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._listener.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
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
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)
            self._writers -= {writer, up_writer}

    def cut(self) -> None:
        """Abort every forwarded connection, both ways (no close handshake)."""
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


async def test_drop_fails_pending_notify_then_reconnects(server: DeskpushServer, proxy: Proxy) -> None:
    agent, _ = await open_agent(server, "agent-7")  # directly, not through the proxy
    async with Integrator(url(proxy.port), API_KEY, agent_id="agent-7", reconnect=FAST) as ig:
        old = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}, cancellation_token="old"))
        note = await next_frame(agent, "notification")
        proxy.cut()
        with pytest.raises(CIFError) as info:
            await within(old)
        err = info.value
        assert (err.message, err.msdyn_name, err.details) == ("RejectAfterClientError", "NotifyEvent", LOST_DETAILS)
        assert err.notification_id == note["notificationId"]
        assert err.cancellation_token == "old"

        await within(ig.wait_connected())
        assert ig.connects == 2
        # The old notification kept running on the server; its token still
        # belongs to this API key, so the new connection can cancel it.
        value = await within(ig.cancel_event("old"))
        assert (value["actionName"], value["responseReason"]) == ("Cancel", "CancelledByIntegrator")
        assert (await next_frame(agent, "resolved"))["notificationId"] == note["notificationId"]

        new = asyncio.ensure_future(ig.notify_event({"templateName": CHAT}))
        await answer(agent, "Accept")
        assert await within(new) == {"actionName": "Accept", "responseReason": "Accept"}
    await agent.close()


async def test_calls_during_an_outage_wait_for_the_reconnect(server: DeskpushServer, proxy: Proxy) -> None:
    agent, _ = await open_agent(server, "agent-7")
    async with Integrator(url(proxy.port), API_KEY, agent_id="agent-7", reconnect=FAST) as ig:
        await proxy.stop()  # cut, and refuse new connections for a while
        while ig.connected:
            await asyncio.sleep(0.01)
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
        while ig.connected:
            await asyncio.sleep(0.01)
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
