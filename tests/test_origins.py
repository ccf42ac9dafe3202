"""Integrating from another origin: the SDK's CORS headers and the WebSocket Origin allowlist.

A CRM page on its own origin loads ``cif.js`` from deskpush (a module script,
fetched in CORS mode) and opens a WebSocket to it (which carries the page's
``Origin``). Real sockets on 127.0.0.1; the browser side is in test_browser.py.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

import pytest

from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection

from .conftest import API_KEY, SECRET

CRM = "https://crm.example"


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def server_with(**server: Any) -> DeskpushServer:
    config = Config(server=ServerSection(host="127.0.0.1", port=0, **server))
    return DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY})


# ---------------------------------------------------------------------------
# The SDK's files, for a page on any origin


@pytest.mark.parametrize("path", ["/cif.js", "/vocabulary.js"])
@pytest.mark.parametrize("origin", [CRM, None])
async def test_sdk_files_may_be_loaded_from_any_origin(server: DeskpushServer, path: str, origin: str | None) -> None:
    headers = {"Origin": origin} if origin else {}
    status, got, body = await asyncio.to_thread(http_get, server.port, path, headers)
    assert status == 200 and body.startswith(b"//")
    assert got["Content-Type"] == "text/javascript; charset=utf-8"
    # The same answer with an Origin or without: `*`, so nothing varies by Origin.
    assert got["Access-Control-Allow-Origin"] == "*"
    assert "Vary" not in got and "Access-Control-Allow-Credentials" not in got
    assert got["Cross-Origin-Resource-Policy"] == "cross-origin"
    assert got["Cache-Control"] == "no-cache"
    assert got["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", ["/", "/integrator.html", "/desktop.js", "/integrator-page.js", "/healthz"])
async def test_other_answers_allow_no_other_origin(server: DeskpushServer, path: str) -> None:
    status, got, _ = await asyncio.to_thread(http_get, server.port, path, {"Origin": CRM})
    assert status == 200
    assert "Access-Control-Allow-Origin" not in got and "Cross-Origin-Resource-Policy" not in got


async def test_sdk_files_are_served_with_the_demo_off() -> None:
    async with server_with(demo=False) as srv:
        for path in ("/cif.js", "/vocabulary.js"):
            status, got, _ = await asyncio.to_thread(http_get, srv.port, path)
            assert status == 200 and got["Access-Control-Allow-Origin"] == "*", path
        for path in ("/", "/integrator.html", "/desktop.js"):
            status, _, _ = await asyncio.to_thread(http_get, srv.port, path)
            assert status == 404, path
