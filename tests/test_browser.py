"""The agent desktop and cif.js in a real Chromium, against a real server.

Playwright for Python drives Debian's Chromium (``/usr/bin/chromium``, or
``DESKPUSH_CHROMIUM``); Playwright's own browser download is not used. One
browser is launched per test: simple and independent of pytest-asyncio's loop
scopes, and cheap (well under a second).

``DESKPUSH_UPDATE_SCREENSHOT=1`` makes test_screenshot write
docs/screenshot-desktop.png (otherwise it writes to a temporary directory).
"""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from deskpush.protocol import AgentErrorCode, Limits
from deskpush.protocol.templates import FieldTemplate, Template
from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection

from .conftest import API_KEY, SECRET, UNIT, open_integrator, recv_json, send_json

from playwright.async_api import async_playwright, expect  # noqa: E402

CHROMIUM = os.environ.get("DESKPUSH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent

# `make test` installs Debian's Chromium when it is missing; without it these
# tests fail (launch error naming the path) rather than skip.

TIMEOUT_MS = 5000 * UNIT
expect.set_options(timeout=TIMEOUT_MS)

CHAT = "msdyn_chat_incoming_unauthenticated"
_ids = itertools.count(1)


# ---------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


def watch(page: Any) -> list[str]:
    """Collect uncaught errors and console errors (CSP violations land there)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    return errors


async def open_desktop(ctx: Any, srv: DeskpushServer, agent_id: str = "agent-7") -> Any:
    """A page of the agent desktop, signed in with a token in the fragment, connected."""
    page = await ctx.new_page()
    watch(page)
    await page.goto(f"http://127.0.0.1:{srv.port}/#token={srv.tokens.issue(agent_id)}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#agent-id")).to_have_text(agent_id)
    return page


def card(page: Any, nid: str) -> Any:
    return page.locator(f'.card[data-notification-id="{nid}"]')


class Integrator:
    """The Python side of an integrator: sends frames, waits for the ones it wants."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def notify(
        self,
        agent_id: str,
        template: str = CHAT,
        params: dict[str, Any] | None = None,
        token: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        rid = f"r{next(_ids)}"
        frame: dict[str, Any] = {
            "type": "notifyEvent",
            "requestId": rid,
            "agentId": agent_id,
            "input": {"templateName": template, "templateParameters": params or {}},
        }
        if token:
            frame["cancellationToken"] = token
        if correlation_id:
            frame["correlationId"] = correlation_id
        await send_json(self.ws, frame)
        return rid

    async def cancel(self, token: str) -> str:
        rid = f"r{next(_ids)}"
        await send_json(self.ws, {"type": "cancelEvent", "requestId": rid, "cancellationToken": token})
        return rid

    async def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout * UNIT
        i = 0
        while True:
            while i < len(self.frames):
                if pred(self.frames[i]):
                    return self.frames.pop(i)
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching frame; got {self.frames}")
            self.frames.append(await recv_json(self.ws, timeout=left / UNIT))

    async def displayed(self, rid: str) -> str:
        """Wait for the offer to reach the agent; returns its notificationId."""
        frame = await self.wait(lambda m: m.get("requestId") == rid and m.get("state") == "displayed")
        return frame["notificationId"]

    async def result(self, rid: str, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.wait(lambda m: m.get("requestId") == rid and m["type"] in ("result", "error"), timeout)
        assert frame["type"] == "result", frame
        return frame["value"]


@pytest.fixture
async def integrator(server: DeskpushServer) -> AsyncIterator[Integrator]:
    ws = await open_integrator(server)
    try:
        yield Integrator(ws)
    finally:
        await ws.close()


async def eventually(fn: Callable[[], Any], expected: Any, timeout: float = 5.0) -> None:
    """Poll ``fn`` (sync or async) until it returns ``expected``."""
    deadline = time.monotonic() + timeout * UNIT
    while True:
        value = fn()
        if asyncio.iscoroutine(value):
            value = await value
        if value == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {expected!r}, last got {value!r}")
        await asyncio.sleep(0.02)


def config_with(*templates: Template, port: int = 0, **limits: Any) -> Config:
    return Config(server=ServerSection(host="127.0.0.1", port=port), limits=Limits(**limits), templates=templates)


# ---------------------------------------------------------------------------
# The agent desktop


@pytest.mark.parametrize("serve", ["embedded", "cluster"], indirect=True)  # cluster: 3 nodes, pages on different ones
async def test_offer_appears_as_card_and_accept(browser: Any, server: DeskpushServer, integrator: Integrator) -> None:
    page = await open_desktop(browser, server)
    rid = await integrator.notify("agent-7", params={"customerName": "Jane Doe", "queueName": "Billing"})
    nid = await integrator.displayed(rid)

    c = card(page, nid)
    await expect(c).to_be_visible()
    await expect(c.locator(".card-title")).to_have_text("New chat request")
    await expect(c.locator(".field-header")).to_have_text(["Customer", "Queue"])
    await expect(c.locator(".field-value")).to_have_text(["Jane Doe", "Billing"])
    await expect(c.locator(".card-icon svg")).to_have_count(1)
    await expect(c.locator(".countdown")).to_have_text("2:00")  # ceil of 120 s, server clock
    accept = c.get_by_role("button", name="Accept: New chat request")
    await expect(accept).to_be_enabled()
    await expect(c.get_by_role("button", name="Reject: New chat request")).to_be_enabled()
    await expect(page.locator("#announcer")).to_have_text("New offer: New chat request.")

    await accept.click()
    assert await integrator.result(rid) == {"actionName": "Accept", "responseReason": "Accept"}
    await expect(c).to_have_count(0)
    await expect(page.locator(".activity-item").first).to_contain_text("Accepted")
    await expect(page.locator(".toast")).to_contain_text("Accepted: New chat request")
    await expect(page.locator("#empty")).to_be_visible()
    assert page.errors == []


async def test_reject_with_keyboard(browser: Any, server: DeskpushServer, integrator: Integrator) -> None:
    page = await open_desktop(browser, server)
    rid = await integrator.notify("agent-7", template="msdyn_voicecall_incoming_unauthenticated",
                                  params={"callerId": "+44 20 7946 0321"})
    nid = await integrator.displayed(rid)
    c = card(page, nid)
    reject = c.get_by_role("button", name="Decline: Incoming call")
    await expect(reject).to_be_visible()
    await expect(c.locator(".countdown")).to_have_text("0:30")
    # Keyboard only: the buttons are reachable by Tab and pressed with Enter.
    for _ in range(12):
        await page.keyboard.press("Tab")
        if await reject.evaluate("(b) => b === document.activeElement"):
            break
    else:
        raise AssertionError("the Decline button is not reachable with Tab")
    assert await reject.evaluate("(b) => b.matches(':focus-visible')")
    await page.keyboard.press("Enter")
    assert await integrator.result(rid) == {"actionName": "Reject", "responseReason": "DeclinedByAgent"}
    await expect(c).to_have_count(0)
    await expect(page.locator(".activity-item").first).to_contain_text("Declined")
    assert page.errors == []


async def test_countdown_reaches_zero_and_times_out(browser: Any) -> None:
    # 4 s: a loaded machine may render the card a second or two late, and the
    # test must still see the countdown run (0:04 or 0:03, then 0:01, then 0:00).
    short = Template(name="short", title="Short offer", icon="chat", timeout=4,
                     fields=(FieldTemplate(header="Customer", value="{customerName}"),))
    async with DeskpushServer(config_with(short), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        page = await browser.new_page()
        watch(page)
        # Hold back `resolved` frames so the expired state can be seen before
        # the server removes the card (they arrive in the same millisecond).
        held: list[str] = []
        routes: list[Any] = []

        def route(ws_route: Any) -> None:
            upstream = ws_route.connect_to_server()
            routes.append(ws_route)

            def from_server(message: str | bytes) -> None:
                if isinstance(message, str) and '"resolved"' in message:
                    held.append(message)
                else:
                    ws_route.send(message)

            upstream.on_message(from_server)

        await page.route_web_socket("**/agent", route)
        await page.goto(f"http://127.0.0.1:{srv.port}/#token={srv.tokens.issue('agent-7')}")
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")

        ig = Integrator(await open_integrator(srv))
        rid = await ig.notify("agent-7", template="short", params={"customerName": "Ann"})
        nid = await ig.displayed(rid)
        c = card(page, nid)
        await expect(c.locator(".countdown")).to_have_text(re.compile(r"^0:0[34]$"))
        await expect(c.locator(".countdown")).to_have_text("0:01")
        await expect(c.locator(".countdown")).to_have_text("0:00")
        await expect(c).to_have_class(re.compile(r"\bis-expired\b"))
        await expect(c.locator(".card-status")).to_have_text("Expired")
        await expect(c.get_by_role("button", name="Accept: Short offer")).to_be_disabled()
        await expect(c.get_by_role("button", name="Reject: Short offer")).to_be_disabled()
        assert await ig.result(rid) == {"actionName": "Timeout", "responseReason": "DisplayTimeout"}
        # The card stays until the server says it ended.
        await expect(c).to_be_visible()
        await eventually(lambda: len(held), 1)
        for message in held:
            routes[-1].send(message)
        await expect(c).to_have_count(0)
        await expect(page.locator(".activity-item").first).to_contain_text("Timed out")
        await ig.ws.close()
        assert page.errors == []


async def test_answer_to_a_forgotten_offer_says_so(browser: Any) -> None:
    """The server no longer knows an offer the desktop still shows: the agent reads why, in words.

    With ``limits.recentOutcomes = 0`` the server forgets an offer the moment
    it ends. Its ``resolved`` is dropped on the way, so the card stays; the
    integrator cancels it; Accept then gets ``UnknownNotification``, and the
    desktop shows its own text for that code rather than the server's message.
    """
    async with DeskpushServer(config_with(recent_outcomes=0), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        page = await browser.new_page()
        watch(page)
        errors: list[dict[str, Any]] = []

        def route(ws_route: Any) -> None:
            upstream = ws_route.connect_to_server()

            def from_server(message: str | bytes) -> None:
                frame = json.loads(message)
                if frame["type"] == "error":
                    errors.append(frame)
                if frame["type"] != "resolved":
                    ws_route.send(message)

            upstream.on_message(from_server)

        await page.route_web_socket("**/agent", route)
        await page.goto(f"http://127.0.0.1:{srv.port}/#token={srv.tokens.issue('agent-7')}")
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")

        ig = Integrator(await open_integrator(srv))
        rid = await ig.notify("agent-7", token="ct-forgotten")
        c = card(page, await ig.displayed(rid))
        await expect(c).to_be_visible()
        cancelled = {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"}
        assert await ig.result(await ig.cancel("ct-forgotten")) == {"cancellationToken": "ct-forgotten", **cancelled}
        assert await ig.result(rid) == cancelled

        await c.get_by_role("button", name="Accept: New chat request").click()
        await expect(page.locator(".toast")).to_have_text("That offer is no longer available.")
        assert [e["code"] for e in errors] == [AgentErrorCode.UNKNOWN_NOTIFICATION]
        await ig.ws.close()
        assert page.errors == []


async def test_countdown_uses_server_clock(browser: Any, server: DeskpushServer, integrator: Integrator) -> None:
    """A desktop whose clock is 45 s slow still shows the server's remaining time."""
    ctx = await browser.new_context()
    await ctx.add_init_script("{ const real = Date.now; Date.now = () => real() - 45000; }")
    page = await open_desktop(ctx, server)
    skew = await page.evaluate("Date.now() - new Date().getTime()")
    assert -46000 < skew < -44000
    rid = await integrator.notify("agent-7", template="msdyn_voicecall_incoming_unauthenticated")
    nid = await integrator.displayed(rid)
    # 30 s on the server's clock; a local countdown would show 1:15.
    await expect(card(page, nid).locator(".countdown")).to_have_text(re.compile(r"^0:(30|29|28)$"))
    await ctx.close()


async def test_cancel_event_removes_card(browser: Any, server: DeskpushServer, integrator: Integrator) -> None:
    page = await open_desktop(browser, server)
    rid = await integrator.notify("agent-7", token="ct-1", params={"customerName": "Bob"})
    nid = await integrator.displayed(rid)
    await expect(card(page, nid)).to_be_visible()
    crid = await integrator.cancel("ct-1")
    assert await integrator.result(crid) == {
        "cancellationToken": "ct-1", "actionName": "Cancel", "responseReason": "CancelledByIntegrator"}
    assert await integrator.result(rid) == {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"}
    await expect(card(page, nid)).to_have_count(0)
    await expect(page.locator(".activity-item").first).to_contain_text("Withdrawn")
    assert page.errors == []


async def test_queue_indicator(browser: Any, server: DeskpushServer, integrator: Integrator) -> None:
    page = await open_desktop(browser, server)
    first = await integrator.notify("agent-7", params={"customerName": "One"})
    nid = await integrator.displayed(first)
    await integrator.notify("agent-7", params={"customerName": "Two"})
    await integrator.notify("agent-7", params={"customerName": "Three"})
    await expect(page.locator("#queue")).to_have_text("2 more waiting")
    await card(page, nid).get_by_role("button", name="Accept: New chat request").click()
    await expect(page.locator("#queue")).to_have_text("1 more waiting")
    await expect(page.locator(".card .field-value")).to_have_text("Two")
    assert page.errors == []


@pytest.mark.parametrize("serve", ["embedded", "cluster"], indirect=True)  # cluster: 3 nodes, pages on different ones
async def test_two_tabs_answer_in_one_hides_in_other(browser: Any, server: DeskpushServer,
                                                     integrator: Integrator) -> None:
    ctx = await browser.new_context()
    tab1 = await open_desktop(ctx, server)
    tab2 = await ctx.new_page()
    watch(tab2)
    # A new tab has its own sessionStorage, so it is signed in by its own link.
    await tab2.goto(f"http://127.0.0.1:{server.port}/#token={server.tokens.issue('agent-7')}")
    await expect(tab2.locator("#status")).to_have_attribute("data-state", "connected")

    rid = await integrator.notify("agent-7", params={"customerName": "Both"})
    nid = await integrator.displayed(rid)
    await expect(card(tab1, nid)).to_be_visible()
    await expect(card(tab2, nid)).to_be_visible()
    await card(tab2, nid).get_by_role("button", name="Accept: New chat request").click()
    assert await integrator.result(rid) == {"actionName": "Accept", "responseReason": "Accept"}
    await expect(card(tab1, nid)).to_have_count(0)
    await expect(card(tab2, nid)).to_have_count(0)
    await expect(tab1.locator(".activity-item").first).to_contain_text("Accepted")
    assert tab1.errors == [] and tab2.errors == []
    await ctx.close()


async def test_untrusted_parameters_render_as_text(browser: Any, server: DeskpushServer,
                                                   integrator: Integrator) -> None:
    # CSP is bypassed here so that only the page's own rendering stands between
    # the payload and execution: the text must never become markup.
    ctx = await browser.new_context(bypass_csp=True)
    page = await open_desktop(ctx, server)
    payload = '<img src=x onerror="window.__xss=1">'
    rid = await integrator.notify("agent-7", template="msdyn_chat_incoming_authenticated",
                                  params={"customerName": payload, "comment": "<b>bold</b>"})
    nid = await integrator.displayed(rid)
    c = card(page, nid)
    await expect(c.locator(".card-title")).to_have_text(f"New chat request from {payload}")
    await expect(c.locator(".field-value").first).to_have_text(payload)
    await expect(c.locator(".field-value").last).to_have_text("<b>bold</b>")
    await expect(page.locator("#offers img, #offers b")).to_have_count(0)
    await expect(c.get_by_role("button", name=f"Accept: New chat request from {payload}")).to_be_visible()
    await c.get_by_role("button", name=f"Reject: New chat request from {payload}").click()
    assert (await integrator.result(rid))["responseReason"] == "DeclinedByAgent"
    await expect(page.locator(".activity-title").first).to_have_text(f"New chat request from {payload}")
    await expect(page.locator(".toast").first).to_contain_text(payload)
    assert await page.evaluate("typeof window.__xss") == "undefined"
    assert await page.locator("img").count() == 1  # the logo only
    await ctx.close()


def restart_config(port: int = 0, state_file: Path | None = None) -> Config:
    server = ServerSection(host="127.0.0.1", port=port, state_file=str(state_file) if state_file else None)
    return Config(server=server)


@pytest.mark.parametrize("keep_state", [True, False], ids=["stateFile", "memory-only"])
async def test_reconnects_after_server_restart(browser: Any, tmp_path: Path, keep_state: bool) -> None:
    state_file = tmp_path / "state.json" if keep_state else None
    srv = DeskpushServer(restart_config(0, state_file), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    port = srv.port
    try:
        page = await open_desktop(browser, srv)
        ig = Integrator(await open_integrator(srv))
        rid = await ig.notify("agent-7", params={"customerName": "Before restart"}, token="ct-restart")
        old = await ig.displayed(rid)
        await expect(card(page, old)).to_be_visible()
        before = await card(page, old).locator(".countdown").text_content()
    finally:
        await srv.close()
    await expect(page.locator("#status")).not_to_have_attribute("data-state", "connected")
    await expect(card(page, old).get_by_role("button", name="Accept: New chat request")).to_be_disabled()

    srv2 = DeskpushServer(restart_config(port, state_file), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv2.start()
    try:
        # The backoff is capped and jittered; the first retries come within seconds.
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=15000 * UNIT)
        ig2 = Integrator(await open_integrator(srv2))
        if keep_state:
            # The new server took the offer back and replayed it: still one card,
            # same expiry, answerable; the integrator learns the outcome by token.
            await expect(page.locator(".card")).to_have_count(1)
            await expect(card(page, old).get_by_role("button", name="Accept: New chat request")).to_be_enabled()
            after = await card(page, old).locator(".countdown").text_content()
            assert before is not None and after is not None and after <= before
            await card(page, old).get_by_role("button", name="Accept: New chat request").click()
            await expect(card(page, old)).to_have_count(0)
            await expect(page.locator(".activity-item").first).to_contain_text("Accepted")
            crid = await ig2.cancel("ct-restart")
            assert await ig2.result(crid) == {
                "cancellationToken": "ct-restart", "actionName": "Accept", "responseReason": "Accept"}
        else:
            # This server does not know the old offer, so the desktop drops its
            # card once the replay is over.
            await expect(card(page, old)).to_have_count(0)
            await expect(page.locator(".activity-item").first).to_contain_text("Ended while offline")
        rid2 = await ig2.notify("agent-7", params={"customerName": "After restart"})
        new = await ig2.displayed(rid2)
        await expect(card(page, new).locator(".field-value")).to_have_text("After restart")
        await card(page, new).get_by_role("button", name="Accept: New chat request").click()
        assert await ig2.result(rid2) == {"actionName": "Accept", "responseReason": "Accept"}
        await ig2.ws.close()
    finally:
        await srv2.close()


async def test_replay_after_reconnect_keeps_one_card(browser: Any, server: DeskpushServer,
                                                     integrator: Integrator) -> None:
    """A dropped socket: the replayed offer keeps its card (no duplicate) and its expiry."""
    page = await open_desktop(browser, server)
    rid = await integrator.notify("agent-7", params={"customerName": "Replayed"})
    nid = await integrator.displayed(rid)
    await expect(card(page, nid)).to_be_visible()
    before = await card(page, nid).locator(".countdown").text_content()
    # Drop every agent session from the server side (as a proxy would).
    for conn in server.connections:
        if conn.request is not None and conn.request.path == "/agent":
            conn.abort()
    await expect(page.locator("#status")).not_to_have_attribute("data-state", "connected")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=10000 * UNIT)
    await expect(card(page, nid)).to_have_count(1)
    await expect(card(page, nid).get_by_role("button", name="Accept: New chat request")).to_be_enabled()
    after = await card(page, nid).locator(".countdown").text_content()
    assert before is not None and after is not None and after <= before
    await card(page, nid).get_by_role("button", name="Accept: New chat request").click()
    assert await integrator.result(rid) == {"actionName": "Accept", "responseReason": "Accept"}
    await expect(page.locator(".card")).to_have_count(0)


async def test_bad_token_shows_form_then_paste(browser: Any, server: DeskpushServer) -> None:
    page = await browser.new_page()
    watch(page)
    await page.goto(f"http://127.0.0.1:{server.port}/#token=not-a-token")
    await expect(page.locator("#status")).to_have_attribute("data-state", "rejected")
    await expect(page.locator("#token-panel")).to_be_visible()
    await expect(page.locator("#token-message")).to_contain_text("rejected")
    assert "token=" not in page.url  # scrubbed from the address bar
    await page.get_by_label("Agent token").fill(server.tokens.issue("agent-9"))
    await page.get_by_role("button", name="Connect").click()
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#agent-id")).to_have_text("agent-9")
    # A reload keeps the session (the token is in sessionStorage).
    await page.reload()
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#agent-id")).to_have_text("agent-9")
    # Opening another printed link in the same tab only changes the fragment.
    await page.goto(f"http://127.0.0.1:{server.port}/#token={server.tokens.issue('agent-10')}")
    await expect(page.locator("#agent-id")).to_have_text("agent-10")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    assert "token=" not in page.url


async def test_a_tab_replaced_by_a_newer_one_says_so_and_waits(browser: Any) -> None:
    """Close 4409 (limits.sessionsPerAgent): no reconnect loop between tabs; the agent picks the tab."""
    async with DeskpushServer(config_with(sessions_per_agent=1), jwt_secret=SECRET,
                              api_keys={"crm": API_KEY}) as srv:
        ig = Integrator(await open_integrator(srv))
        ctx = await browser.new_context()
        old = await open_desktop(ctx, srv)
        await expect(old.locator("#replaced")).to_be_hidden()
        rid = await ig.notify("agent-7")
        nid = await ig.displayed(rid)
        await expect(card(old, nid)).to_be_visible()

        new = await open_desktop(ctx, srv)
        await expect(card(new, nid)).to_be_visible()
        await expect(old.locator("#status")).to_have_attribute("data-state", "replaced")
        await expect(old.locator("#replaced")).to_be_visible()
        await expect(old.locator("#replaced")).to_contain_text("more tabs or devices than the server allows")
        await expect(old.locator(".card")).to_have_count(0)
        # Longer than the desktop's longest first retry (1 s): the old tab did not
        # reconnect on its own, so the new one is still the agent's session.
        await asyncio.sleep(1.5 * UNIT)
        await expect(old.locator("#status")).to_have_attribute("data-state", "replaced")
        await expect(new.locator("#status")).to_have_attribute("data-state", "connected")
        assert srv.engine.statistics()["agentSessions"] == 1

        # Choosing the old tab again takes over, with the offer replayed; the new one is told.
        await old.get_by_role("button", name="Use this tab").click()
        await expect(old.locator("#status")).to_have_attribute("data-state", "connected")
        await expect(old.locator("#replaced")).to_be_hidden()
        await expect(card(old, nid)).to_be_visible()
        await expect(new.locator("#status")).to_have_attribute("data-state", "replaced")
        await card(old, nid).get_by_role("button", name="Accept: New chat request").click()
        assert await ig.result(rid) == {"actionName": "Accept", "responseReason": "Accept"}
        assert old.errors == [] and new.errors == []
        await ctx.close()


async def test_desktop_alert_once_across_hidden_tabs(browser: Any, server: DeskpushServer,
                                                    integrator: Integrator) -> None:
    ctx = await browser.new_context()
    await ctx.grant_permissions(["notifications"], origin=f"http://127.0.0.1:{server.port}")
    # Pretend both tabs are in the background and record desktop notifications.
    await ctx.add_init_script("""
        Object.defineProperty(document, "visibilityState", {get: () => "hidden"});
        window.__alerts = [];
        window.Notification = class extends EventTarget {
            static permission = "granted";
            static requestPermission() { return Promise.resolve("granted"); }
            constructor(title, options) { super(); window.__alerts.push(title); }
            close() {}
        };
    """)
    tabs = []
    for _ in range(3):
        tab = await ctx.new_page()
        await tab.goto(f"http://127.0.0.1:{server.port}/#token={server.tokens.issue('agent-7')}")
        await expect(tab.locator("#status")).to_have_attribute("data-state", "connected")
        tabs.append(tab)
    await expect(tabs[0].locator("#alerts-state")).to_have_text("Desktop alerts on")
    rid = await integrator.notify("agent-7", params={"customerName": "Alert"})
    nid = await integrator.displayed(rid)
    for tab in tabs:
        await expect(card(tab, nid)).to_be_visible()

    async def total() -> int:
        return sum([await t.evaluate("window.__alerts.length") for t in tabs])

    await eventually(total, 1)
    await asyncio.sleep(0.5)  # past every tab's claim window: still exactly one
    assert await total() == 1
    await ctx.close()


# ---------------------------------------------------------------------------
# cif.js and the integrator page


@pytest.mark.parametrize("serve", ["embedded", "cluster"], indirect=True)  # cluster: 3 nodes, pages on different ones
async def test_cif_example_runs_unchanged(browser: Any, server: DeskpushServer) -> None:
    desktop = await open_desktop(browser, server, "agent-1")
    page = await browser.new_page()
    watch(page)
    logged: list[Any] = []

    async def on_console(msg: Any) -> None:
        if msg.type == "log":
            logged.append(await msg.args[0].json_value() if msg.args else msg.text)

    page.on("console", on_console)
    await page.goto(f"http://127.0.0.1:{server.port}/integrator.html")
    await page.wait_for_function("window.Microsoft && window.Microsoft.CIFramework")
    await page.evaluate(f"Microsoft.CIFramework.configure({{apiKey: {API_KEY!r}, agentId: 'agent-1'}})")
    # The example from the CIF 2.0 reference, character for character. Its
    # value is the promise of .then(), which settles once the agent answers.
    example = asyncio.create_task(page.evaluate(CIF_EXAMPLE))
    c = desktop.locator(".card")
    await expect(c).to_have_count(1)
    await expect(c.locator(".card-title")).to_have_text("New chat request")
    await expect(c.locator(".card-fields")).to_have_count(0)  # empty parameters: no fields
    await c.get_by_role("button", name="Accept: New chat request").click()
    await asyncio.wait_for(example, 5 * UNIT)
    await eventually(lambda: logged, [{"value": {"actionName": "Accept", "responseReason": "Accept"}}])
    assert page.errors == []


CIF_EXAMPLE = """\
var input = {
	templateName: "msdyn_chat_incoming_unauthenticated",
	// unique name of the configured template
	templateParameters: {
	}
}
Microsoft.CIFramework.notifyEvent(input).then(
	function success(result) {
		console.log(result);
		// Perform operations
	},
	function (error) {
		console.log(error.message);
		// Handle error conditions
	}
);
"""


def test_cif_example_matches_reference() -> None:
    """The example above is the one in the reference, when the reference is at hand."""
    # CI clones the repo with shared/ beside it.
    for candidate in (ROOT.parent / "shared" / "cif-2.0-cancelEvent-reference.md",):
        if candidate.exists():
            text = candidate.read_text()
            block = text.split("```javascript\n", 1)[1].split("```", 1)[0]
            assert block == CIF_EXAMPLE
            return
    pytest.skip("shared/cif-2.0-cancelEvent-reference.md not found")


async def test_cif_errors_and_cancel(browser: Any, server: DeskpushServer) -> None:
    desktop = await open_desktop(browser, server, "agent-1")
    page = await browser.new_page()
    watch(page)
    await page.goto(f"http://127.0.0.1:{server.port}/integrator.html")
    await page.wait_for_function("window.Microsoft && window.Microsoft.CIFramework")
    # Module state is per page: nothing configured yet.
    before = await page.evaluate("Microsoft.CIFramework.notifyEvent({templateName: 'x'}).catch(e => e)")
    assert before["message"] == "RejectAfterClientError" and "configure()" in before["details"]
    assert before["msdyn_name"] == "NotifyEvent"

    await page.evaluate(f"Microsoft.CIFramework.configure({{apiKey: {API_KEY!r}, agentId: 'agent-1'}})")
    missing = await page.evaluate("Microsoft.CIFramework.notifyEvent({templateName: 'nope'}).catch(e => e)")
    assert missing["message"] == "NotificationTemplateNotFoundError" and missing["msdyn_name"] == "NotifyEvent"
    nobody = await page.evaluate(
        "Microsoft.CIFramework.notifyEvent({templateName: 'msdyn_chat_transfer', agentId: 'nobody'}).catch(e => e)")
    assert nobody["message"] == "AgentNotConnectedError"
    unknown = await page.evaluate("Microsoft.CIFramework.cancelEvent('no-such-token').catch(e => e)")
    assert unknown["message"] == "CancellationTokenNotFoundError" and unknown["msdyn_name"] == "CancelEvent"

    # notifyEvent's third argument is the cancellation token; cancelEvent withdraws it.
    await page.evaluate("""() => {
        window.__notify = Microsoft.CIFramework.notifyEvent(
            {templateName: 'msdyn_chat_transfer', templateParameters: {customerName: 'Kim'}}, 'corr-1', 'tok-1');
    }""")
    await expect(desktop.locator(".card .card-title")).to_have_text("Chat transferred to you")
    cancelled = await page.evaluate("Microsoft.CIFramework.cancelEvent('tok-1', 'corr-1')")
    assert cancelled == {"value": {"cancellationToken": "tok-1", "actionName": "Cancel",
                                   "responseReason": "CancelledByIntegrator"}}
    assert await page.evaluate("window.__notify") == {
        "value": {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"}}
    await expect(desktop.locator(".card")).to_have_count(0)

    # A bad key: the server closes with 4401 and the call rejects.
    await page.evaluate("Microsoft.CIFramework.configure({apiKey: 'wrong'})")
    bad = await page.evaluate("Microsoft.CIFramework.notifyEvent({templateName: 'x'}).catch(e => e)")
    assert bad["message"] == "UnauthorizedError" and bad["msdyn_name"] == "NotifyEvent"
    assert page.errors == []


async def test_integrator_page_send_and_cancel(browser: Any, server: DeskpushServer) -> None:
    desktop = await open_desktop(browser, server, "agent-1")
    page = await browser.new_page()
    watch(page)
    await page.goto(f"http://127.0.0.1:{server.port}/integrator.html#apiKey={API_KEY}&agentId=agent-1")
    assert "apiKey" not in page.url
    await expect(page.get_by_label("Agent id")).to_have_value("agent-1")
    await page.get_by_label("Template", exact=True).select_option("msdyn_voicecall_incoming_unauthenticated")
    await expect(page.get_by_label("callerId", exact=True)).to_have_value("+44 20 7946 0321")
    send = page.get_by_role("button", name="Send offer")

    await send.click()
    row = page.locator(".log-item").first
    await expect(row.locator(".state-chip")).to_have_text("displayed")
    c = desktop.locator(".card")
    await expect(c.locator(".card-title")).to_have_text("Incoming call")
    await expect(c.locator(".field-value").first).to_have_text("+44 20 7946 0321")
    await row.get_by_role("button", name="Cancel offer msdyn_voicecall_incoming_unauthenticated to agent-1").click()
    await expect(row.locator(".state-chip")).to_have_text("Cancel / CancelledByIntegrator")
    await expect(row).to_have_attribute("data-cancel-result", "Cancel/CancelledByIntegrator")
    await expect(c).to_have_count(0)

    await send.click()
    row = page.locator(".log-item").first
    await expect(row.locator(".state-chip")).to_have_text("displayed")
    await desktop.get_by_role("button", name="Answer: Incoming call").click()
    await expect(row.locator(".state-chip")).to_have_text("Accept / Accept")
    await expect(row.get_by_role("button")).to_have_count(0)
    assert page.errors == [] and desktop.errors == []


async def test_integrator_page_offers_the_servers_templates(browser: Any) -> None:
    case = Template(name="crm_case_escalated", title="Case {caseNumber} escalated", icon="case",
                    fields=(FieldTemplate(header="Customer", value="{customerName}"),
                            FieldTemplate(header="Subject", value="{subject}")))
    async with DeskpushServer(config_with(case), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        desktop = await open_desktop(browser, srv, "agent-1")
        page = await browser.new_page()
        watch(page)
        await page.goto(f"http://127.0.0.1:{srv.port}/integrator.html")
        picker = page.get_by_label("Template", exact=True)
        await expect(picker).to_be_disabled()  # no key, no list
        await page.get_by_label("API key").fill("wrong")
        await page.get_by_label("API key").dispatch_event("change")
        await expect(picker.locator("option")).to_have_text(["API key rejected: no templates"])
        await page.get_by_label("API key").fill(API_KEY)
        await page.get_by_label("API key").dispatch_event("change")
        # The server's list, the configured template included; no free text.
        names = [t.name for t in srv.config.template_map().values()]
        await expect(picker.locator("option")).to_have_text(names)
        await picker.select_option("crm_case_escalated")
        await expect(page.locator("#template-hint")).to_contain_text("Case {caseNumber} escalated")
        # One input per parameter the template fills, in order.
        await expect(page.locator(".param-key")).to_have_text(["caseNumber", "customerName", "subject"])
        await expect(page.get_by_label("customerName", exact=True)).to_have_value("Jane Doe")
        await page.get_by_label("caseNumber", exact=True).fill("42")
        await page.get_by_label("subject", exact=True).fill("Refund")
        await page.get_by_role("button", name="Send offer").click()
        c = desktop.locator(".card")
        await expect(c.locator(".card-title")).to_have_text("Case 42 escalated")
        await expect(c.locator(".field-value")).to_have_text(["Jane Doe", "Refund"])
        # cif.js's own call, beside CIF's API.
        listed = await page.evaluate("Microsoft.CIFramework.deskpush.listTemplates()")
        assert [t["name"] for t in listed] == names and listed[-1]["parameters"] == ["caseNumber", "customerName", "subject"]
        assert set(await page.evaluate("Object.keys(Microsoft.CIFramework)")) == {
            "configure", "notifyEvent", "cancelEvent", "addHandler", "removeHandler", "disconnect", "deskpush"}
        assert page.errors == [] and desktop.errors == []


# ---------------------------------------------------------------------------
# A CRM page on another origin (docs/integrating.md)


CRM_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CRM</title><link rel="icon" href="data:,"></head>
<body><h1>CRM widget</h1>
<script type="module">
  import "DESKPUSH/cif.js";
  Microsoft.CIFramework.configure({CONFIG});
  window.crmReady = true;
</script>
</body></html>
"""


class CrmSite:
    """A second HTTP server on 127.0.0.1: another port, so another origin, serving one page at /."""

    def __init__(self, page: str) -> None:
        body = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                status = 200 if self.path == "/" else 404
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body) if status == 200 else 0))
                self.end_headers()
                if status == 200:
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> CrmSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("case", ["allowed", "default url", "origin refused"])
async def test_cif_example_from_a_crm_page_on_another_origin(browser: Any, case: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="deskpush")
    port = free_port()
    deskpush = f"http://127.0.0.1:{port}"
    config = {"apiKey": API_KEY, "agentId": "agent-1"}
    if case != "default url":
        config = {"url": f"ws://127.0.0.1:{port}", **config}
    with CrmSite(CRM_PAGE.replace("DESKPUSH", deskpush).replace("{CONFIG}", json.dumps(config))) as crm:
        allowed = (crm.origin if case != "origin refused" else "https://crm.example", deskpush)
        cfg = Config(server=ServerSection(host="127.0.0.1", port=port, allowed_origins=allowed))
        async with DeskpushServer(cfg, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
            desktop = await open_desktop(browser, srv, "agent-1")  # the desktop's own origin is listed
            page = await browser.new_page()
            watch(page)
            logged: list[Any] = []

            async def on_console(msg: Any) -> None:
                if msg.type == "log":
                    logged.append(await msg.args[0].json_value() if msg.args else msg.text)

            page.on("console", on_console)
            await page.goto(crm.origin + "/")
            assert crm.origin != deskpush
            # The module came from deskpush, across origins (a missing CORS header stops it here).
            await page.wait_for_function("window.crmReady === true", timeout=TIMEOUT_MS)
            await page.evaluate(CIF_HARNESS)
            example = asyncio.create_task(page.evaluate(CIF_EXAMPLE))
            if case == "origin refused":
                # The browser tells the page nothing but a failed connection; cif.js retries, the log says why.
                await eventually(lambda: page.evaluate("window.__states.some((s) => s.state === 'reconnecting')"), True)
                assert await page.evaluate("window.__states.find((s) => s.state === 'reconnecting').code") == 1006
                refusals = [r.getMessage() for r in caplog.records if "allowedOrigins" in r.getMessage()]
                assert refusals and f"'{crm.origin}'" in refusals[0] and "/integrator" in refusals[0]
                await expect(desktop.locator(".card")).to_have_count(0)
                assert not example.done()
                example.cancel()
                page.remove_listener("console", on_console)
                await page.close()
                return
            c = desktop.locator(".card")
            await expect(c.locator(".card-title")).to_have_text("New chat request")
            await c.get_by_role("button", name="Accept: New chat request").click()
            await asyncio.wait_for(example, 5 * UNIT)
            await eventually(lambda: logged, [{"value": {"actionName": "Accept", "responseReason": "Accept"}}])
            assert page.errors == [] and desktop.errors == []
            assert not [r for r in caplog.records if "allowedOrigins" in r.getMessage()]


def free_port() -> int:
    """A port free now, for a server whose address a page must know before it starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# cif.js on the wire: v1.1 resume, with the test playing the server
#
# Playwright's WebSocket routing answers cif.js's /integrator connections
# here, frame by frame, so each rule of the client (what it sends, when, and
# how it settles its promises) is checked exactly, whatever the server does.
# The tests further down run the same client against a real server.


def oid(n: int) -> str:
    """An outcomeId: 13 digits, "-", 6 digits."""
    return f"1764460800123-{n:06d}"


class WireConn:
    """One cif.js connection, answered by the test."""

    def __init__(self, route: Any) -> None:
        self.route = route
        self.frames: list[dict[str, Any]] = []
        route.on_message(lambda message: self.frames.append(json.loads(message)))

    def send(self, frame: dict[str, Any]) -> None:
        self.route.send(json.dumps(frame))

    def resumed(self, last: str, complete: bool = True, count: int = 0, details: str = "") -> None:
        frame: dict[str, Any] = {"type": "resumed", "count": count, "complete": complete, "lastOutcomeId": last}
        if details:
            frame["details"] = details
        self.send(frame)

    async def frame(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame of type ``kind`` (frames before it of other types are an error)."""
        deadline = time.monotonic() + timeout * UNIT
        while not self.frames:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind} frame")
            await asyncio.sleep(0.01)
        frame = self.frames.pop(0)
        assert frame["type"] == kind, frame
        return frame

    async def nothing(self, seconds: float = 0.3) -> None:
        await asyncio.sleep(seconds)
        assert self.frames == [], self.frames

    async def close(self, code: int, reason: str = "") -> None:
        await self.route.close(code=code, reason=reason)


class Wire:
    """Every /integrator connection of a page, in the order cif.js opened them."""

    def __init__(self) -> None:
        self.conns: list[WireConn] = []

    async def install(self, page: Any) -> None:
        await page.route_web_socket("**/integrator", lambda route: self.conns.append(WireConn(route)))

    async def conn(self, n: int, timeout: float = 5.0) -> WireConn:
        """The n-th connection (1-based), once cif.js has opened it."""
        await eventually(lambda: len(self.conns) >= n, True, timeout)
        return self.conns[n - 1]


CIF_HARNESS = """() => {
    window.__settled = {};
    window.__states = [];
    window.__call = (name, promise) => promise.then(
        (value) => { window.__settled[name] = {value}; },
        (error) => { window.__settled[name] = {error}; });
    Microsoft.CIFramework.addHandler("onConnectionStateChange", (s) => window.__states.push(s));
}"""


async def cif_page(browser: Any, srv: DeskpushServer, wire: Wire | None = None) -> Any:
    """The integrator page with cif.js configured, calls tracked (``call``, ``settled``)."""
    page = await browser.new_page()
    watch(page)
    if wire is not None:
        await wire.install(page)
    await page.goto(f"http://127.0.0.1:{srv.port}/integrator.html")
    await page.wait_for_function("window.Microsoft && window.Microsoft.CIFramework")
    await page.evaluate(CIF_HARNESS)
    await page.evaluate(f"Microsoft.CIFramework.configure({{apiKey: {API_KEY!r}, agentId: 'agent-1'}})")
    return page


async def call(page: Any, name: str, expr: str) -> None:
    """Start a cif.js call; its outcome lands in ``settled(page, name)``."""
    await page.evaluate(f"() => {{ window.__call({name!r}, {expr}); }}")


async def settled(page: Any, name: str, timeout: float = 5.0) -> dict[str, Any]:
    """{"value": ...} or {"error": ...}, once the call has settled."""
    await eventually(lambda: page.evaluate(f"{name!r} in window.__settled"), True, timeout)
    return await page.evaluate(f"window.__settled[{name!r}]")


async def unsettled(page: Any, *names: str) -> bool:
    return not await page.evaluate(f"{list(names)!r}.some((n) => n in window.__settled)")


async def states(page: Any) -> list[str]:
    return await page.evaluate("window.__states.map((s) => s.state)")


NOTIFY = "Microsoft.CIFramework.notifyEvent({templateName: 'msdyn_chat_transfer', templateParameters: {}})"
ACCEPTED = {"actionName": "Accept", "responseReason": "Accept"}


async def test_cif_waits_for_resumed_then_resends_after_a_drop(browser: Any, server: DeskpushServer) -> None:
    wire = Wire()
    page = await cif_page(browser, server, wire)
    await call(page, "n1", NOTIFY)
    c1 = await wire.conn(1)
    assert await c1.frame("hello") == {"type": "hello", "apiKey": API_KEY, "resumeAfter": "$"}
    await c1.nothing()  # nothing goes out before `resumed`
    c1.resumed(oid(0))
    r1 = (await c1.frame("notifyEvent"))["requestId"]
    c1.send({"type": "status", "requestId": r1, "notificationId": "n-1", "cancellationToken": "t-1",
             "state": "displayed"})
    # Ready: a new call goes out at once; its result's outcomeId is remembered.
    await call(page, "n2", NOTIFY)
    r2 = (await c1.frame("notifyEvent"))["requestId"]
    assert r2 != r1
    c1.send({"type": "result", "requestId": r2, "value": ACCEPTED, "outcomeId": oid(2)})
    assert await settled(page, "n2") == {"value": {"value": ACCEPTED}}

    # 1012 (service restart): an ordinary drop. n1 stays pending; cif.js
    # comes back by itself and resumes after the last outcome it saw.
    await c1.close(1012, "restart")
    c2 = await wire.conn(2)
    assert await c2.frame("hello") == {"type": "hello", "apiKey": API_KEY, "resumeAfter": oid(2)}
    assert await unsettled(page, "n1")
    await call(page, "n3", NOTIFY)  # made while resuming: waits for `resumed`
    await c2.nothing()
    # The replay: n1 ended while the page was away; an outcome of another
    # page of the same key (its requestId is not ours) only moves the position.
    c2.send({"type": "result", "requestId": r1, "value": ACCEPTED, "outcomeId": oid(3)})
    c2.send({"type": "result", "requestId": "someone-else", "value": ACCEPTED, "outcomeId": oid(4)})
    assert await settled(page, "n1") == {"value": {"value": ACCEPTED}}
    c2.resumed(oid(4), count=2)
    # n1 is answered, so only n3 goes out.
    r3 = (await c2.frame("notifyEvent"))["requestId"]
    await c2.nothing()
    c2.send({"type": "result", "requestId": r3, "value": ACCEPTED, "outcomeId": oid(5)})
    assert await settled(page, "n3") == {"value": {"value": ACCEPTED}}
    # A requestId settles once, and an older outcomeId (the answer to a
    # request sent again after it ended) does not move the position back.
    c2.send({"type": "result", "requestId": r1, "value": {"actionName": "Reject", "responseReason": "x"},
             "outcomeId": oid(3)})
    assert await settled(page, "n1") == {"value": {"value": ACCEPTED}}

    # A request sent and unanswered when the connection drops (1001, going
    # away) is sent again after a complete resume, with the same requestId.
    await call(page, "n4", NOTIFY)
    n4 = await c2.frame("notifyEvent")
    await c2.close(1001)
    c3 = await wire.conn(3)
    assert (await c3.frame("hello"))["resumeAfter"] == oid(5)
    c3.resumed(oid(5))
    assert await c3.frame("notifyEvent") == n4
    c3.send({"type": "result", "requestId": n4["requestId"], "value": ACCEPTED, "outcomeId": oid(6)})
    assert await settled(page, "n4") == {"value": {"value": ACCEPTED}}

    assert await states(page) == ["connecting", "connected", "reconnecting", "connected", "reconnecting",
                                  "connected"]
    reconnecting = (await page.evaluate("window.__states"))[2]
    assert reconnecting["code"] == 1012 and reconnecting["pending"] == 1
    assert 125 <= reconnecting["delayMs"] <= 250  # the first step, 250 ms, with equal jitter
    assert page.errors == []


async def test_cif_incomplete_history_makes_sent_notify_events_unknown(browser: Any,
                                                                       server: DeskpushServer) -> None:
    wire = Wire()
    page = await cif_page(browser, server, wire)
    await call(page, "n1", NOTIFY)
    c1 = await wire.conn(1)
    await c1.frame("hello")
    c1.resumed(oid(0))
    n1 = await c1.frame("notifyEvent")
    await call(page, "c1", "Microsoft.CIFramework.cancelEvent('tok-9')")
    cancel = await c1.frame("cancelEvent")
    await c1.close(1001)
    c2 = await wire.conn(2)
    await c2.frame("hello")
    await call(page, "n2", NOTIFY)  # never sent before: nothing about it is unknown
    details = "outcomes after 1764460800123-000000 were forgotten (server restarted without stateFile)"
    c2.resumed(oid(1), complete=False, details=details)
    assert await settled(page, "n1") == {"error": {
        "message": "OutcomeUnknownError", "msdyn_name": "NotifyEvent", "details": details}}
    # The cancelEvent is sent again (always safe), then the new notifyEvent.
    assert await c2.frame("cancelEvent") == cancel
    n2 = await c2.frame("notifyEvent")
    assert n2["requestId"] != n1["requestId"]
    await c2.nothing()
    assert await unsettled(page, "c1", "n2")
    connected = (await page.evaluate("window.__states"))[-1]
    assert connected == {"state": "connected", "pending": 2, "complete": False, "details": details, "replayed": 0}
    # The next resume starts from where the server said the page stands.
    await c2.close(1011)
    c3 = await wire.conn(3)
    assert (await c3.frame("hello"))["resumeAfter"] == oid(1)
    assert page.errors == []


async def test_cif_idle_drop_reconnects_on_the_next_call(browser: Any, server: DeskpushServer) -> None:
    wire = Wire()
    page = await cif_page(browser, server, wire)
    await call(page, "n1", NOTIFY)
    c1 = await wire.conn(1)
    await c1.frame("hello")
    c1.resumed(oid(0))
    r1 = (await c1.frame("notifyEvent"))["requestId"]
    c1.send({"type": "result", "requestId": r1, "value": ACCEPTED, "outcomeId": oid(1)})
    await settled(page, "n1")
    await c1.close(1001)
    await eventually(lambda: states(page), ["connecting", "connected", "disconnected"])
    await asyncio.sleep(0.6)
    assert len(wire.conns) == 1  # nothing pending: no reconnect until needed
    await call(page, "n2", NOTIFY)
    c2 = await wire.conn(2)
    assert (await c2.frame("hello"))["resumeAfter"] == oid(1)
    c2.resumed(oid(1))
    await c2.frame("notifyEvent")
    # disconnect(): the page gives up the call; no reconnect follows.
    await page.evaluate("Microsoft.CIFramework.disconnect()")
    gone = await settled(page, "n2")
    assert gone["error"]["message"] == "RejectAfterClientError" and gone["error"]["msdyn_name"] == "NotifyEvent"
    assert "disconnected" in gone["error"]["details"]
    await asyncio.sleep(0.6)
    assert len(wire.conns) == 2
    assert (await states(page))[-1] == "disconnected"
    assert page.errors == []


async def test_cif_too_large_then_unauthorized(browser: Any, server: DeskpushServer) -> None:
    """1009 rejects the request that caused it, the others are resumed; 4401 rejects everything."""
    wire = Wire()
    page = await cif_page(browser, server, wire)
    await call(page, "small", NOTIFY)
    c1 = await wire.conn(1)
    await c1.frame("hello")
    c1.resumed(oid(0))
    small = await c1.frame("notifyEvent")
    await call(page, "big", "Microsoft.CIFramework.notifyEvent({templateName: 'msdyn_chat_transfer', "
                            "templateParameters: {comment: 'x'.repeat(70000)}})")
    await c1.frame("notifyEvent")
    await c1.close(1009, "frame with 70130 bytes exceeds limit of 65536 bytes")
    big = await settled(page, "big")
    assert big["error"]["message"] == "RejectAfterClientError" and "too large" in big["error"]["details"]
    c2 = await wire.conn(2)
    await c2.frame("hello")
    c2.resumed(oid(0))
    assert await c2.frame("notifyEvent") == small
    await c2.nothing()
    # The key was revoked meanwhile.
    await c2.close(1001)
    c3 = await wire.conn(3)
    await c3.frame("hello")
    await c3.close(4401, "unauthorized")
    assert await settled(page, "small") == {"error": {
        "message": "UnauthorizedError", "msdyn_name": "NotifyEvent", "details": "the server rejected the API key"}}
    await asyncio.sleep(0.6)
    assert len(wire.conns) == 3
    last = (await page.evaluate("window.__states"))[-1]
    assert last["state"] == "disconnected" and last["unauthorized"] is True
    assert page.errors == []


async def test_cif_gives_up_on_a_connection_that_never_resumes(browser: Any, server: DeskpushServer) -> None:
    """Opened, hello sent, no `resumed`: after 10 s it counts as a drop, and the call waits for the next one."""
    wire = Wire()
    page = await browser.new_page()
    watch(page)
    await page.clock.install()
    await wire.install(page)
    await page.goto(f"http://127.0.0.1:{server.port}/integrator.html")
    await page.wait_for_function("window.Microsoft && window.Microsoft.CIFramework")
    await page.evaluate(CIF_HARNESS)
    await page.evaluate(f"Microsoft.CIFramework.configure({{apiKey: {API_KEY!r}, agentId: 'agent-1'}})")
    # The installed clock still runs with real time; stop it so that only run_for moves it.
    await page.clock.pause_at(await page.evaluate("Date.now()") + 1000)
    await call(page, "n1", NOTIFY)
    c1 = await wire.conn(1)
    await c1.frame("hello")
    await page.clock.run_for(9900)
    assert await states(page) == ["connecting"]
    await page.clock.run_for(200)
    dropped = (await page.evaluate("window.__states"))[-1]
    assert dropped["state"] == "reconnecting" and "no resumed" in dropped["reason"], dropped
    await page.clock.run_for(dropped["delayMs"] + 10)
    c2 = await wire.conn(2)
    assert (await c2.frame("hello"))["resumeAfter"] == "$"
    c2.resumed(oid(0))
    r1 = (await c2.frame("notifyEvent"))["requestId"]
    c2.send({"type": "result", "requestId": r1, "value": ACCEPTED, "outcomeId": oid(1)})
    assert await settled(page, "n1") == {"value": {"value": ACCEPTED}}
    assert page.errors == []


# ---------------------------------------------------------------------------
# cif.js against a real server that restarts


def socket_noise(errors: list[str]) -> list[str]:
    """The page's errors but Chromium's own lines for a WebSocket that could not connect."""
    return [e for e in errors if "WebSocket connection to" not in e]


@pytest.mark.parametrize("order", ["resend", "replay"])
async def test_cif_example_settles_across_a_server_restart(browser: Any, tmp_path: Path, order: str) -> None:
    """CIF's own example, pending while the server restarts with its stateFile, gets its real outcome.

    ``resend``: cif.js is back before the agent answers; it sends the
    notifyEvent again with its requestId, which claims the restored offer (no
    second card) and gets its result. ``replay``: the agent answers while
    cif.js is still away; the outcome waits in the key's history and comes
    back in the replay before ``resumed``.
    """
    state_file = tmp_path / "state.json"
    srv = DeskpushServer(restart_config(0, state_file), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    port = srv.port
    blocked = False

    async def gate(route: Any) -> None:
        # While blocked, cif.js's connections are refused as by a restarting server.
        if blocked:
            await route.close(code=1012, reason="blocked by the test")
        else:
            route.connect_to_server()

    try:
        desktop = await open_desktop(browser, srv, "agent-1")
        page = await browser.new_page()
        watch(page)
        logged: list[Any] = []

        async def on_console(msg: Any) -> None:
            if msg.type == "log":
                logged.append(await msg.args[0].json_value() if msg.args else msg.text)

        page.on("console", on_console)
        await page.route_web_socket("**/integrator", gate)
        await page.goto(f"http://127.0.0.1:{srv.port}/integrator.html")
        await page.wait_for_function("window.Microsoft && window.Microsoft.CIFramework")
        await page.evaluate(CIF_HARNESS)
        await page.evaluate(f"Microsoft.CIFramework.configure({{apiKey: {API_KEY!r}, agentId: 'agent-1'}})")
        example = asyncio.create_task(page.evaluate(CIF_EXAMPLE))
        await expect(desktop.locator(".card")).to_have_count(1)
        nid = await desktop.locator(".card").get_attribute("data-notification-id")
        pill = page.locator("#connection")
        await expect(pill).to_have_attribute("data-state", "connected")
        blocked = order == "replay"
    finally:
        await srv.close()  # 1001 to every connection; the pending offer goes to the state file
    await expect(pill).to_have_attribute("data-state", "reconnecting")
    await expect(pill).to_contain_text("1 pending")
    assert not example.done() and logged == []

    srv2 = DeskpushServer(restart_config(port, state_file), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv2.start()
    try:
        await expect(desktop.locator("#status")).to_have_attribute("data-state", "connected", timeout=15000 * UNIT)
        accept = card(desktop, nid).get_by_role("button", name="Accept: New chat request")
        if order == "resend":
            await expect(pill).to_have_attribute("data-state", "connected", timeout=15000 * UNIT)
            # The same offer, once: the resent notifyEvent made no second one.
            await expect(desktop.locator(".card")).to_have_count(1)
            await expect(accept).to_be_enabled()
            await accept.click()
        else:
            await accept.click()
            await expect(card(desktop, nid)).to_have_count(0)
            await asyncio.sleep(0.3)
            assert not example.done()
            blocked = False
            await expect(pill).to_have_attribute("data-state", "connected", timeout=15000 * UNIT)
        await asyncio.wait_for(example, 10 * UNIT)
        await eventually(lambda: logged, [{"value": {"actionName": "Accept", "responseReason": "Accept"}}])
        await expect(desktop.locator(".card")).to_have_count(0)
        await asyncio.sleep(0.3)
        await expect(desktop.locator(".card")).to_have_count(0)  # and no second offer after it
        resumed = await page.evaluate("window.__states.filter((s) => s.state === 'connected')")
        assert [s["complete"] for s in resumed] == [True, True], resumed
        if order == "replay":
            assert resumed[-1]["replayed"] == 1
        assert socket_noise(page.errors) == []
    finally:
        await srv2.close()


async def test_cif_outcome_unknown_after_a_restart_without_state(browser: Any) -> None:
    """Restarted without stateFile, the server cannot vouch for the pending offer: OutcomeUnknownError."""
    srv = DeskpushServer(restart_config(0), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    port = srv.port
    try:
        desktop = await open_desktop(browser, srv, "agent-1")
        page = await cif_page(browser, srv)
        await call(page, "n1", "Microsoft.CIFramework.notifyEvent("
                               "{templateName: 'msdyn_chat_incoming_unauthenticated', templateParameters: {}})")
        await expect(desktop.locator(".card")).to_have_count(1)
    finally:
        await srv.close()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    assert await unsettled(page, "n1")

    srv2 = DeskpushServer(restart_config(port), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv2.start()
    try:
        error = (await settled(page, "n1", timeout=15))["error"]
        assert error["message"] == "OutcomeUnknownError" and error["msdyn_name"] == "NotifyEvent"
        connected = (await page.evaluate("window.__states"))[-1]
        assert connected["state"] == "connected" and connected["complete"] is False
        assert error["details"] == connected["details"] and error["details"], error  # the server's words
        await expect(page.locator("#form-message")).to_contain_text("could not be recovered")
        # The offer was not sent again: the desktop, back too, shows nothing.
        await expect(desktop.locator("#status")).to_have_attribute("data-state", "connected", timeout=15000 * UNIT)
        await expect(desktop.locator(".card")).to_have_count(0)
        # The next call goes through on the resumed connection.
        await call(page, "n2", "Microsoft.CIFramework.notifyEvent("
                               "{templateName: 'msdyn_chat_incoming_unauthenticated', templateParameters: {}})")
        await desktop.locator(".card").get_by_role("button", name="Accept: New chat request").click()
        assert await settled(page, "n2") == {"value": {"value": {"actionName": "Accept", "responseReason": "Accept"}}}
        assert socket_noise(page.errors) == []
    finally:
        await srv2.close()


# ---------------------------------------------------------------------------
# The screenshot for the README


async def test_screenshot(browser: Any, tmp_path: Path) -> None:
    async with DeskpushServer(config_with(display_limit=2), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        ctx = await browser.new_context(viewport={"width": 1100, "height": 700}, device_scale_factor=1)
        page = await open_desktop(ctx, srv, "maria.lopez")
        ig = Integrator(await open_integrator(srv))
        agent = "maria.lopez"

        async def answer(template: str, params: dict[str, str], button: str) -> None:
            token = f"t{next(_ids)}"
            rid = await ig.notify(agent, template=template, params=params, token=token)
            nid = await ig.displayed(rid)
            if button == "cancel":
                await ig.result(await ig.cancel(token))
            else:
                await card(page, nid).locator(f".btn-{button}").click()
            await ig.result(rid)
            await expect(card(page, nid)).to_have_count(0)

        await answer("msdyn_chat_incoming_unauthenticated", {"customerName": "Tom Becker"}, "accept")
        await answer("msdyn_voicecall_incoming_unauthenticated", {"callerId": "+1 415 555 0142"}, "reject")
        await answer("msdyn_chat_transfer", {"customerName": "Omar Haddad"}, "cancel")
        await answer("msdyn_chat_incoming_unauthenticated", {"customerName": "Lena Fischer"}, "accept")
        await ig.notify(agent, template="msdyn_chat_incoming_authenticated", params={
            "customerName": "Jane Doe", "accountName": "Contoso Ltd", "queueName": "Premium support",
            "comment": "My order #4417 arrived damaged, I'd like a replacement."}, correlation_id="CAS-01842")
        await ig.notify(agent, template="msdyn_voicecall_incoming_authenticated", params={
            "callerId": "+44 20 7946 0321", "customerName": "Arjun Mehta", "queueName": "Billing"})
        await ig.notify(agent, params={"customerName": "Queued One"})
        await ig.notify(agent, params={"customerName": "Queued Two"})
        await expect(page.locator(".card")).to_have_count(2)
        await expect(page.locator("#queue")).to_have_text("2 more waiting")
        # The outcome toasts of the answers above would cover the corner.
        await page.evaluate("document.querySelectorAll('.toast').forEach((t) => t.remove())")
        # Let the countdowns run a moment so the progress bars show it.
        await page.wait_for_timeout(1000)
        await page.mouse.move(0, 0)
        out = tmp_path / "screenshot-desktop.png"
        await page.screenshot(path=str(out))
        assert out.stat().st_size > 10_000
        if os.environ.get("DESKPUSH_UPDATE_SCREENSHOT"):
            target = ROOT / "docs" / "screenshot-desktop.png"
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(out, target)
        await ig.ws.close()
        await ctx.close()
