"""Listing the templates an integrator may name: the ``templates`` frame and ``GET /templates``."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

import msgspec
import pytest

from deskpush.protocol import BUILTIN_TEMPLATES, Limits
from deskpush.protocol.templates import FieldTemplate, Template, parameters
from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection

from .conftest import API_KEY, SECRET, open_integrator, recv_json, send_json

CUSTOM = Template(
    name="crm_case_escalated", title="Case {caseNumber} escalated", icon="case",
    fields=(FieldTemplate(header="Customer", value="{customerName}"),
            FieldTemplate(header="Case", value="{caseNumber}: {subject}")),
    timeout=45.0, auto_accept=True,
)
CUSTOM_INFO = {"name": "crm_case_escalated", "title": "Case {caseNumber} escalated", "icon": "case",
               "timeout": 45.0, "autoAccept": True, "parameters": ["caseNumber", "customerName", "subject"]}
CHAT_INFO = {"name": "msdyn_chat_incoming_unauthenticated", "title": "New chat request", "icon": "chat",
             "timeout": 120.0, "autoAccept": False, "parameters": ["customerName", "queueName", "comment"]}


def test_parameters_are_the_slugs_in_order_each_once() -> None:
    assert parameters(CUSTOM) == ("caseNumber", "customerName", "subject")
    assert parameters(Template(name="plain", title="No placeholders")) == ()


def server_with_custom() -> DeskpushServer:
    config = Config(server=ServerSection(host="127.0.0.1", port=0), limits=Limits(), templates=(CUSTOM,))
    return DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY})


async def test_templates_frame_lists_every_template() -> None:
    async with server_with_custom() as srv:
        ig = await open_integrator(srv)
        await send_json(ig, {"type": "templates", "requestId": "t1"})
        answer = await recv_json(ig)
        assert answer["type"] == "templates" and answer["requestId"] == "t1"
        listed = answer["templates"]
        assert [t["name"] for t in listed] == [t.name for t in BUILTIN_TEMPLATES] + ["crm_case_escalated"]
        assert listed[0] == CHAT_INFO and listed[-1] == CUSTOM_INFO
        await ig.close()


async def test_templates_frame_on_a_hello_connection_and_a_bad_one(server: DeskpushServer) -> None:
    from websockets.asyncio.client import connect

    ig = await connect(f"ws://127.0.0.1:{server.port}/integrator")
    await send_json(ig, {"type": "hello", "apiKey": API_KEY, "resumeAfter": "$"})
    assert (await recv_json(ig))["type"] == "resumed"
    await send_json(ig, {"type": "templates"})  # no requestId
    error = await recv_json(ig)
    assert error["type"] == "error" and "requestId" not in error
    assert error["error"]["message"] == "RejectAfterClientError" and error["error"]["msdyn_name"] == "ListTemplates"
    assert "requestId" in error["error"]["details"]
    # The connection stays, and the next request is answered.
    await send_json(ig, {"type": "templates", "requestId": "t2"})
    answer = await recv_json(ig)
    assert answer["requestId"] == "t2" and answer["templates"][0] == CHAT_INFO
    await ig.close()


def http_get(port: int, path: str, authorization: str | None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}"])
async def test_http_templates_need_an_integrator_key(server: DeskpushServer, authorization: Any) -> None:
    status, headers, body = await asyncio.to_thread(http_get, server.port, "/templates", authorization)
    assert status == 401 and body == b"UnauthorizedError\n"
    assert headers["WWW-Authenticate"] == 'Bearer realm="deskpush"'


async def test_http_templates_with_a_key() -> None:
    async with server_with_custom() as srv:
        status, headers, body = await asyncio.to_thread(http_get, srv.port, "/templates", f"Bearer {API_KEY}")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert headers["Cache-Control"] == "no-store" and "Access-Control-Allow-Origin" not in headers
        listed = msgspec.json.decode(body)["templates"]
        assert listed[0] == CHAT_INFO and listed[-1] == CUSTOM_INFO and len(listed) == len(BUILTIN_TEMPLATES) + 1


async def test_the_list_follows_a_reload(server: DeskpushServer) -> None:
    ig = await open_integrator(server)
    server.engine.replace_templates({CUSTOM.name: CUSTOM})  # what a reload (SIGHUP) does
    await send_json(ig, {"type": "templates", "requestId": "t3"})
    assert (await recv_json(ig))["templates"] == [CUSTOM_INFO]
    await ig.close()
