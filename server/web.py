"""Plain HTTP on the WebSocket port: health, statistics, the demo's static files, and the headers they carry.

Every GET (or HEAD) that is not a WebSocket upgrade to an endpoint ends here,
as one response and a closed connection (no keep-alive: browsers open these
rarely, load balancers once per probe). The static files are the files
directly in ``deskpush.client`` (the browser desktop, ``cif.js``, the
integrator page) with a known extension; nothing else on disk is reachable.

``SECURITY_HEADERS`` go on every answer, these and the connection's own (405,
426, 431): the server sets them as ``ConnectionOptions.http_headers``. A page
replaces the strict default ``Content-Security-Policy`` with ``CSP``.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from pathlib import Path

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Response

from ..protocol.vocabulary import ErrorMessage

__all__ = ["Site", "response", "plain", "unauthorized", "CSP", "SECURITY_HEADERS"]

STATIC_DIR = Path(str(importlib.resources.files("deskpush.client")))
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# The demo pages load nothing from elsewhere, run no inline script and open
# WebSockets to this server only. CSP Level 3, "Does url match expression in
# origin with redirect count?": 'self' matches a URL on the page's own host
# and port when "origin's scheme is "http" and url's scheme is "http" or
# "ws"", or "url's scheme is "https" or "wss"" (Chromium and Firefox; WebKit
# since 2022: the web-platform test connect-src-websocket-self). No host is
# written here: the configured one may be 0.0.0.0 behind a proxy, and the
# Host header is the client's to choose.
CSP = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
# Every answer: never sniffed as another type, never framed, and nothing a
# browser could render from it may load anything; no Referer leaves a page
# (the desktop's address may hold a token in its fragment until the page scrubs it).
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
)


def response(status: HTTPStatus, body: bytes, content_type: str,
             extra: Iterable[tuple[str, str]] = ()) -> Response:
    """A complete response that closes the connection (the connection adds ``SECURITY_HEADERS``)."""
    headers = Headers([
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *extra,
    ])
    return Response(status.value, status.phrase, headers, body)


def plain(status: HTTPStatus, text: str, extra: Iterable[tuple[str, str]] = ()) -> Response:
    return response(status, text.encode(), "text/plain; charset=utf-8", extra)


def unauthorized() -> Response:
    """401 for a request without a valid integrator key (RFC 9110 section 11.6.1: with a challenge)."""
    return plain(HTTPStatus.UNAUTHORIZED, f"{ErrorMessage.UNAUTHORIZED}\n", [("WWW-Authenticate", 'Bearer realm="deskpush"')])


_HEALTHY = msgspec.json.encode({"status": "ok"})


class Site:
    """Answers ``/healthz`` and, when ``demo`` is on, the static files; 404 for the rest."""

    def __init__(self, *, demo: bool, static_dir: Path = STATIC_DIR) -> None:
        self.demo = demo
        self.static_dir = static_dir

    def respond(self, path: str) -> Response:
        if path == "/healthz":
            # Up and listening, nothing more: it answers anyone, so it shows no counts (``stats``).
            return response(HTTPStatus.OK, _HEALTHY, "application/json", [("Cache-Control", "no-store")])
        if self.demo:
            return self._static(path)
        return plain(HTTPStatus.NOT_FOUND, "Not Found\n")

    def stats(self, figures: Mapping[str, int]) -> Response:
        """``GET /stats`` for an authenticated integrator: ``figures`` as JSON."""
        return response(HTTPStatus.OK, msgspec.json.encode(figures), "application/json",
                        [("Cache-Control", "no-store")])

    def _static(self, path: str) -> Response:
        name = "index.html" if path == "/" else path.removeprefix("/")
        suffix = Path(name).suffix
        if "/" in name or "\\" in name or name.startswith(".") or suffix not in CONTENT_TYPES:
            return plain(HTTPStatus.NOT_FOUND, "Not Found\n")
        try:
            body = (self.static_dir / name).read_bytes()
        except OSError:
            return plain(HTTPStatus.NOT_FOUND, "Not Found\n")
        return response(HTTPStatus.OK, body, CONTENT_TYPES[suffix],
                        [("Content-Security-Policy", CSP), ("Cache-Control", "no-cache")])
