"""The agent desktop at the widths it is used at: a CIF side panel, a phone, a wide screen.

In Dynamics 365 the desktop lives in a side panel about 360 px wide; agents
also open it on a phone. At 360, 600 and 1280 px, with two offers displayed,
more waiting and recent activity, connected and then offline, the header,
the cards and their buttons must fit: no two boxes overlap, nothing sticks
out of its card or the window, and no word is broken across lines. Offline,
the main area says the connection is lost instead of "No offers right now".

``DESKPUSH_UPDATE_SCREENSHOT=1`` writes the screenshots to
docs/screenshot-desktop-{360,600,1280}.png (otherwise to a temporary directory).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from deskpush.server import DeskpushServer

from .conftest import API_KEY, SECRET, UNIT, open_integrator
from .test_browser import ROOT, Integrator, browser, card, config_with, expect, open_desktop  # noqa: F401

AGENT = "maria.lopez"

# Every problem of the page's layout, as sentences (an empty list: none).
# Boxes are compared with a pixel of tolerance (borders that touch are fine).
LAYOUT_PROBLEMS = """
() => {
  const problems = [];
  const shown = (el) => {
    if (!el) return false;
    const r = el.getBoundingClientRect();
    return r.width > 1 && r.height > 1 && getComputedStyle(el).visibility !== "hidden";
  };
  const name = (el) => (el.id ? "#" + el.id : "." + [...el.classList].join(".")) +
    (el.textContent.trim() ? ` "${el.textContent.trim().slice(0, 30)}"` : "");
  const overlap = (a, b) => {
    const r = a.getBoundingClientRect(), s = b.getBoundingClientRect();
    return r.left < s.right - 1 && s.left < r.right - 1 && r.top < s.bottom - 1 && s.top < r.bottom - 1;
  };
  const inside = (el, box) => {
    const r = el.getBoundingClientRect(), s = box.getBoundingClientRect();
    return r.left >= s.left - 1 && r.right <= s.right + 1 && r.top >= s.top - 1 && r.bottom <= s.bottom + 1;
  };
  const noOverlap = (els, where) => {
    els = els.filter(shown);
    for (let i = 0; i < els.length; i++)
      for (let j = i + 1; j < els.length; j++)
        if (overlap(els[i], els[j])) problems.push(`${where}: ${name(els[i])} overlaps ${name(els[j])}`);
  };
  const allInside = (els, box, where) => {
    for (const el of els.filter(shown))
      if (!inside(el, box)) problems.push(`${where}: ${name(el)} sticks out of ${name(box)}`);
  };

  if (document.documentElement.scrollWidth > window.innerWidth)
    problems.push(`the page scrolls sideways: ${document.documentElement.scrollWidth} px in ${window.innerWidth}`);

  const topbar = document.querySelector(".topbar");
  const head = [".brand-logo", ".brand-name", ".brand-sub", "#alerts-btn", "#alerts-state", "#agent-avatar",
                ".agent-label", "#status", "#retry-btn", "#signout-btn"].map((s) => document.querySelector(s));
  noOverlap(head.filter(Boolean), "header");
  allInside(head.filter(Boolean), topbar, "header");

  for (const c of document.querySelectorAll(".card")) {
    const parts = [".card-icon", ".card-titles", ".card-timer", ".card-fields", ".card-status"]
      .map((s) => c.querySelector(s)).concat([...c.querySelectorAll(".card-actions .btn")]);
    noOverlap(parts.filter(Boolean), "card");
    allInside(parts.filter(Boolean), c, "card");
  }
  noOverlap([...document.querySelectorAll(".section-head > *")], "section head");

  // A word broken across lines: its letters land on more than one line box.
  const texts = document.querySelectorAll(
    ".btn, .pill, .brand, .agent-label, .section-head *, .card-title, .card-kind, .countdown, " +
    ".field-header, .field-value, .card-status, .empty-title, .empty-text, .activity-title, .activity-meta");
  for (const el of texts) {
    if (!shown(el)) continue;
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const m of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const tops = new Set([...range.getClientRects()].filter((r) => r.width > 0).map((r) => Math.round(r.top)));
        if (tops.size > 1) problems.push(`"${m[0]}" in ${name(el)} is broken across lines`);
      }
    }
    if (el.classList.contains("btn") && el.getBoundingClientRect().height > 48)
      problems.push(`${name(el)} wraps onto a second line`);
  }
  return problems;
}
"""


async def shoot(page: Any, tmp_path: Path, name: str) -> None:
    await page.mouse.move(0, 0)
    out = tmp_path / name
    await page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 5_000
    if os.environ.get("DESKPUSH_UPDATE_SCREENSHOT"):
        shutil.copyfile(out, ROOT / "docs" / name)


@pytest.mark.parametrize("width", [360, 600, 1280])
async def test_desktop_fits_a_side_panel_a_phone_and_a_wide_screen(browser: Any, tmp_path: Path, width: int) -> None:
    srv = DeskpushServer(config_with(display_limit=2), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    try:
        ctx = await browser.new_context(viewport={"width": width, "height": 900}, device_scale_factor=1)
        page = await open_desktop(ctx, srv, AGENT)
        ig = Integrator(await open_integrator(srv))
        # Recent activity, then two offers displayed (one with a long comment) and two waiting.
        rid = await ig.notify(AGENT, template="msdyn_chat_transfer", params={"customerName": "Omar Haddad"})
        await card(page, await ig.displayed(rid)).locator(".btn-accept").click()
        await ig.result(rid)
        await ig.notify(AGENT, template="msdyn_chat_incoming_authenticated", params={
            "customerName": "Jane Doe", "accountName": "Contoso Ltd", "queueName": "Premium support",
            "comment": "My order #4417 arrived damaged, I'd like a replacement."}, correlation_id="CAS-01842")
        await ig.notify(AGENT, template="msdyn_voicecall_incoming_authenticated", params={
            "callerId": "+44 20 7946 0321", "customerName": "Arjun Mehta", "queueName": "Billing"})
        await ig.notify(AGENT, params={"customerName": "Queued One"})
        await ig.notify(AGENT, params={"customerName": "Queued Two"})
        await expect(page.locator(".card")).to_have_count(2)
        await expect(page.locator("#queue")).to_have_text("2 more waiting")
        await page.evaluate("document.querySelectorAll('.toast').forEach((t) => t.remove())")
        assert await page.evaluate(LAYOUT_PROBLEMS) == []
        await shoot(page, tmp_path, f"screenshot-desktop-{width}.png")
        await ig.ws.close()
    finally:
        await srv.close()
    # Offline: every card says answers are paused, the top bar offers "Retry now".
    await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting", timeout=5000 * UNIT)
    await expect(page.locator("#retry-btn")).to_be_visible()
    await expect(page.locator(".card.is-offline")).to_have_count(2)
    assert await page.evaluate(LAYOUT_PROBLEMS) == []
    await ctx.close()


async def test_the_main_area_says_the_connection_is_lost(browser: Any) -> None:
    srv = DeskpushServer(config_with(), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    try:
        ctx = await browser.new_context(viewport={"width": 360, "height": 700})
        page = await open_desktop(ctx, srv, AGENT)
        await expect(page.locator("#empty .empty-title")).to_have_text("No offers right now")
    finally:
        await srv.close()
    await expect(page.locator("#empty .empty-title")).to_have_text("Connection lost")
    await expect(page.locator("#empty")).to_contain_text("Offers cannot reach you until the connection is back")
    await expect(page.locator("#empty")).not_to_contain_text("No offers")
    assert await page.evaluate(LAYOUT_PROBLEMS) == []
    # Back: it says what it knows again.
    srv2 = DeskpushServer(config_with(port=srv.port), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv2.start()
    try:
        await page.locator("#retry-btn").click()
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        await expect(page.locator("#empty .empty-title")).to_have_text("No offers right now")
    finally:
        await srv2.close()
    await ctx.close()
