"""Integrating from another origin: the SDK's CORS headers and the WebSocket Origin allowlist.

A CRM page on its own origin loads ``cif.js`` from deskpush (a module script,
fetched in CORS mode) and opens a WebSocket to it (which carries the page's
``Origin``). Real sockets on 127.0.0.1; the browser side is in test_browser.py.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from deskpush.server import Config, ConfigError, DeskpushServer, load
from deskpush.server.config import ServerSection

from .conftest import API_KEY, SECRET, UNIT, recv_json, send_json

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


# ---------------------------------------------------------------------------
# server.allowedOrigins: which pages may open the WebSocket endpoints


async def handshake(port: int, path: str, origin: str | None) -> Any:
    """Open a WebSocket with this Origin (None: no Origin header, as a server-side client)."""
    return await connect(f"ws://127.0.0.1:{port}{path}", origin=origin, open_timeout=5 * UNIT)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/agent", "/integrator"])
async def test_allowed_origins_refuse_other_pages_with_403(path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="deskpush")
    async with server_with(allowed_origins=(CRM, "http://127.0.0.1:9999")) as srv:
        hostile = "https://evil.example"
        with pytest.raises(InvalidStatus) as refused:
            await handshake(srv.port, path, hostile)
        assert refused.value.response.status_code == 403
        assert refused.value.response.body == b"Origin not allowed\n"
        lines = [r.getMessage() for r in caplog.records if "allowedOrigins" in r.getMessage()]
        assert len(lines) == 1 and f"'{hostile}'" in lines[0] and path in lines[0]
        # The listed origins, in any case, and no Origin at all (a server-side client), get through.
        for origin in (CRM, "HTTPS://CRM.example", "http://127.0.0.1:9999", None):
            ws = await handshake(srv.port, path, origin)
            await ws.close()
        # A port, a scheme or a trailing part makes another origin.
        for origin in ("https://crm.example:8443", "http://crm.example", "https://crm.example.evil.example", "null"):
            with pytest.raises(InvalidStatus) as refused:
                await handshake(srv.port, path, origin)
            assert refused.value.response.status_code == 403, origin
        assert len([r for r in caplog.records if "allowedOrigins" in r.getMessage()]) == 5


async def test_allowed_origins_let_the_listed_page_work() -> None:
    async with server_with(allowed_origins=(CRM,)) as srv:
        agent = await connect(f"ws://127.0.0.1:{srv.port}/agent", origin=CRM)  # type: ignore[arg-type]
        await send_json(agent, {"type": "hello", "token": srv.tokens.issue("agent-7")})
        assert (await recv_json(agent))["type"] == "welcome"
        ig = await connect(f"ws://127.0.0.1:{srv.port}/integrator", origin=CRM)  # type: ignore[arg-type]
        await send_json(ig, {"type": "hello", "apiKey": API_KEY})
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7",
                             "input": {"templateName": "msdyn_chat_transfer"}, "progress": False})
        offer = await recv_json(agent)
        assert offer["type"] == "notification"
        await send_json(agent, {"type": "respond", "notificationId": offer["notificationId"], "action": "Accept"})
        result = await recv_json(ig)
        assert result["value"] == {"actionName": "Accept", "responseReason": "Accept"}
        await agent.close()
        await ig.close()


def raw_handshake(origins: list[str]) -> bytes:
    return ("GET /agent HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"Origin: {o}\r\n" for o in origins)
            + "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(5 * UNIT):
            return await reader.read()
    finally:
        writer.close()


async def test_origin_refusal_logs_a_bounded_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="deskpush")
    async with server_with(allowed_origins=(CRM,)) as srv:
        answer = await exchange(srv.port, raw_handshake(["https://" + "a" * 5000 + ".example\"'"]))
        assert answer.startswith(b"HTTP/1.1 403 ")
        [line] = [r.getMessage() for r in caplog.records if "allowedOrigins" in r.getMessage()]
        assert len(line) < 300 and "aaa..." in line


async def test_two_origin_headers_are_refused() -> None:
    async with server_with(allowed_origins=(CRM,)) as srv:
        answer = await exchange(srv.port, raw_handshake([CRM, "https://evil.example"]))
        assert answer.startswith(b"HTTP/1.1 403 ")
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(raw_handshake([CRM]))
        async with asyncio.timeout(5 * UNIT):
            assert (await reader.readline()).startswith(b"HTTP/1.1 101 ")
        writer.close()


async def test_without_allowed_origins_any_page_may_connect() -> None:
    async with server_with() as srv:
        for origin in (CRM, "https://evil.example", "null", None):
            ws = await handshake(srv.port, "/agent", origin)
            await ws.close()


@pytest.mark.parametrize("value", ["https://crm.example/", "crm.example", "https://crm.example/path", "*", ""])
def test_allowed_origins_must_be_origins(tmp_path: Path, value: str) -> None:
    path = tmp_path / "deskpush.toml"
    path.write_text(f'[server]\nallowedOrigins = ["{value}"]\n')
    with pytest.raises(ConfigError, match=r"allowedOrigins\[0\]"):
        load(path)
