"""Plain HTTP on the WebSocket port, as a raw client sees it: methods, HEAD, pipelining, headers.

Raw sockets, so that the bytes are exactly those sent (two requests in one
write, a body behind a POST) and every byte of the answer is seen, up to the
server closing the connection.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from deskpush.server.web import CSP, SECURITY_HEADERS

from .conftest import UNIT

UPGRADE = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n")


def request(method: str, path: str, headers: str = "", body: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode() + body


async def exchange(port: int, data: bytes) -> bytes:
    """Write ``data`` in one write, read until the server closes; a reset fails the test."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(5 * UNIT):
            return await reader.read()  # EOF: the server closed, cleanly
    finally:
        writer.close()


def parse(answer: bytes, *, head_only: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
    """Every response in ``answer``: (status, headers, body); the bodies by their Content-Length."""
    responses = []
    while answer:
        head, sep, rest = answer.partition(b"\r\n\r\n")
        assert sep, answer
        status_line, *lines = head.decode().split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name not in headers, f"{name} twice"
            headers[name] = value.strip()
        length = 0 if head_only else int(headers["Content-Length"])
        responses.append((int(status_line.split()[1]), headers, rest[:length]))
        answer = rest[length:]
    return responses


def has_security_headers(headers: dict[str, str]) -> None:
    for name, value in SECURITY_HEADERS:
        if name != "Content-Security-Policy":
            assert headers[name] == value, name
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


# ---------------------------------------------------------------------------
# Pipelined requests: the first is answered, then the connection closes


PIPELINES = {
    "healthz twice": request("GET", "/healthz") * 2,
    "page then script": request("GET", "/") + request("GET", "/agent.js"),
    "five": request("GET", "/healthz") * 5,
    "404 then 200": request("GET", "/nope") + request("GET", "/healthz"),
    "426 then 200": request("GET", "/agent") + request("GET", "/healthz"),
    "405 with a body then 200": request("POST", "/", "Content-Length: 3\r\n", b"a=1") + request("GET", "/"),
    "HEAD then GET": request("HEAD", "/healthz") + request("GET", "/healthz"),
    "then an upgrade": request("GET", "/healthz") + request("GET", "/agent", UPGRADE),
}
FIRST_STATUS = {"404 then 200": 404, "426 then 200": 426, "405 with a body then 200": 405}


@pytest.mark.parametrize("name", list(PIPELINES))
async def test_pipelined_requests_get_the_first_answered_then_a_clean_close(server, caplog, name):
    """RFC 9112 section 9.6: after "Connection: close" the server "MUST NOT process any further requests"."""
    answer = await exchange(server.port, PIPELINES[name])
    (response,) = parse(answer, head_only=name.startswith("HEAD"))
    status, headers, _ = response
    assert status == FIRST_STATUS.get(name, 200)
    assert headers["Connection"] == "close"
    async with asyncio.timeout(5 * UNIT):
        while server.connections:
            await asyncio.sleep(0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_pipelined_requests_byte_by_byte(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    data = request("GET", "/healthz") * 2
    for i in range(len(data)):
        writer.write(data[i:i + 1])
        await writer.drain()
    async with asyncio.timeout(5 * UNIT):
        answer = await reader.read()
    writer.close()
    assert [status for status, _, _ in parse(answer)] == [200]


# ---------------------------------------------------------------------------
# Methods


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "BREW", "get"])
@pytest.mark.parametrize("path", ["/", "/healthz", "/agent", "/integrator", "/nope"])
async def test_methods_other_than_get_and_head_get_405(server, method, path):
    answer = await exchange(server.port, request(method, path, UPGRADE if path == "/agent" else ""))
    ((status, headers, body),) = parse(answer)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"  # RFC 9110 section 15.5.6
    assert body == b"Method Not Allowed\n"
    has_security_headers(headers)


@pytest.mark.parametrize("line", [b"G\x00T /healthz HTTP/1.1", b"GET /healthz", b"GET  /healthz HTTP/1.1",
                                  b"GET /healthz HTTP/one"])
async def test_an_invalid_request_line_gets_400(server, line):
    """RFC 9112 section 3 (found by the reliability fuzz: G\x00T was served as a GET)."""
    answer = await exchange(server.port, line + b"\r\nHost: 127.0.0.1\r\n\r\n" + request("GET", "/healthz"))
    ((status, headers, body),) = parse(answer)
    assert status == 400 and body == b"Bad Request: invalid request line\n"
    has_security_headers(headers)


async def test_a_post_with_a_body_gets_405_and_its_body_is_not_a_request(server):
    body = request("GET", "/healthz")  # a body that looks like a request is still a body
    answer = await exchange(server.port, request("POST", "/healthz", f"Content-Length: {len(body)}\r\n", body))
    assert [status for status, _, _ in parse(answer)] == [405]


@pytest.mark.parametrize("path", ["/", "/agent.js", "/desktop.css", "/healthz", "/nope", "/../x.js", "/agent",
                                  "/integrator?resumeAfter=bad"])
async def test_head_answers_as_get_without_the_body(server, path):
    """RFC 9110 section 9.3.2: the same status and headers as GET, Content-Length included, no content."""
    ((get_status, get_headers, get_body),) = parse(await exchange(server.port, request("GET", path)))
    answer = await exchange(server.port, request("HEAD", path))
    ((status, headers, body),) = parse(answer, head_only=True)
    assert answer.endswith(b"\r\n\r\n") and body == b""
    assert status == get_status
    get_headers.pop("Date", None)
    headers.pop("Date", None)
    assert headers == get_headers
    assert int(headers["Content-Length"]) == len(get_body) > 0


async def test_head_never_opens_a_websocket(server):
    """The opening handshake is a GET (RFC 6455 section 4.1): a HEAD asking to upgrade gets the 426."""
    answer = await exchange(server.port, request("HEAD", "/agent", UPGRADE))
    ((status, headers, _),) = parse(answer, head_only=True)
    assert status == 426 and headers["Upgrade"] == "websocket"
    assert answer.endswith(b"\r\n\r\n")


# ---------------------------------------------------------------------------
# Every answer carries the security headers


ANSWERS = {
    "page": (request("GET", "/"), 200),
    "script": (request("GET", "/cif.js"), 200),
    "health": (request("GET", "/healthz"), 200),
    "not found": (request("GET", "/nope.html"), 404),
    "bad bearer": (request("GET", "/integrator", UPGRADE + "Authorization: Bearer wrong\r\n"), 401),
    "bad resume point": (request("GET", "/integrator?resumeAfter=x", UPGRADE), 400),
    "no upgrade": (request("GET", "/agent"), 426),
    "bad handshake": (request("GET", "/agent", UPGRADE.replace("Version: 13", "Version: 8")), 400),
    "method": (request("DELETE", "/"), 405),
    "head too large": (b"GET / HTTP/1.1\r\nX-Pad: " + b"x" * 70_000, 431),
}


@pytest.mark.parametrize("name", list(ANSWERS))
async def test_every_answer_carries_the_security_headers(server, name):
    data, expected = ANSWERS[name]
    ((status, headers, _),) = parse(await exchange(server.port, data))
    assert status == expected
    has_security_headers(headers)
    assert headers["Server"] == "deskpush"
    if name in ("page", "script"):
        assert headers["Content-Security-Policy"] == CSP
    else:  # not a page: it may load nothing at all
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_pages_may_connect_to_this_server_only():
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["connect-src"] == "'self'"  # CSP Level 3: ws: and wss: on the same host and port
    assert directives["default-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
