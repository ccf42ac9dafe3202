"""The agent desktop in Chromium through a drain: 1012 means "Server restarting", and it reconnects at once.

Kept apart from test_browser.py (whose fixtures and helpers it uses) so that
the drain's tests are found together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection

from .conftest import API_KEY, SECRET, UNIT, open_integrator
from .test_browser import Integrator, browser, card, expect, open_desktop  # noqa: F401 (browser: a fixture)


def drain_config(port: int, state_file: Path) -> Config:
    return Config(server=ServerSection(host="127.0.0.1", port=port, state_file=str(state_file), drain_timeout=30.0))


async def test_desktop_says_server_restarting_after_1012_and_comes_back(browser: Any, tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    srv = DeskpushServer(drain_config(0, state_file), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    port = srv.port
    try:
        page = await open_desktop(browser, srv)
        ig = Integrator(await open_integrator(srv))
        rid = await ig.notify("agent-7", params={"customerName": "Across the drain"})
        nid = await ig.displayed(rid)
        await expect(card(page, nid)).to_be_visible()
        # One agent: closed with 1012 at once. The server then keeps refusing
        # new sessions (503) until it is closed, so the desktop keeps saying why.
        await srv.drain()
        await expect(page.locator("#status-text")).to_have_text("Server restarting, reconnecting…")
        await expect(page.locator("#status")).not_to_have_attribute("data-state", "connected")
        await expect(card(page, nid)).to_be_visible()  # kept until the server says otherwise
    finally:
        await srv.close()

    srv2 = DeskpushServer(drain_config(port, state_file), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv2.start()
    try:
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=15000 * UNIT)
        await expect(page.locator("#status-text")).to_have_text("Connected")
        await expect(page.locator(".card")).to_have_count(1)
        await expect(card(page, nid).get_by_role("button", name="Accept: New chat request")).to_be_enabled()
        # While the server drains (503) and is down (refused), Chromium logs each
        # failed handshake of the desktop's retries: expected, and nothing else is.
        assert [e for e in page.errors if "WebSocket connection to" not in e] == [], page.errors
    finally:
        await srv2.close()
