"""Plain HTTP on the WebSocket port: health, readiness, statistics, templates, static files, and their headers.

Every GET (or HEAD) that is not a WebSocket upgrade to an endpoint ends here,
as one response and a closed connection (no keep-alive: browsers open these
rarely, load balancers once per probe). The static files are the files
directly in ``deskpush.client`` (the browser desktop, ``cif.js``, the
integrator page) with a known extension; nothing else on disk is reachable.

``SECURITY_HEADERS`` go on every answer, these and the connection's own (405,
426, 431): the server sets them as ``ConnectionOptions.http_headers``. A page
replaces the strict default ``Content-Security-Policy`` with ``CSP``.

The SDK (``SDK_FILES``: ``cif.js`` and the ``vocabulary.js`` it imports) may
be loaded by a page on any origin, a CRM widget's: see ``SDK_HEADERS``.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from pathlib import Path

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Response

from ..protocol.vocabulary import CLOSE_SERVICE_RESTART, ErrorMessage

__all__ = ["Site", "response", "plain", "draining", "unauthorized", "CSP", "SECURITY_HEADERS", "SDK_FILES", "SDK_HEADERS"]

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

#: The files a page on another origin loads to integrate: cif.js, and the
#: module it imports (an import is fetched like the module itself).
SDK_FILES = frozenset({"cif.js", "vocabulary.js"})
# A module script is fetched in CORS mode (HTML, "fetch a single module
# script": mode "cors"), so a page on another origin runs it only if the
# answer allows that origin. These files are public (the repository's own
# bytes; the key and the agent come from the page), so they allow every
# origin with `*`, sent whatever the request's Origin, with one or without:
# the answer never varies by Origin, and a copy cached from a request without
# one serves a CORS request as well. Fetch, "CORS protocol and HTTP caches":
# "If CORS protocol requirements are more complicated than setting
# `Access-Control-Allow-Origin` to * or a static origin, `Vary` is to be
# used": with `*`, no `Vary: Origin`. `*` never carries credentials either:
# the SDK needs none, its key goes in the hello. Cross-Origin-Resource-Policy
# cross-origin lets a page that isolates itself (Cross-Origin-Embedder-Policy:
# require-corp) load them too. `no-cache`, as for every static file: checked
# again on each load, so pages get the SDK of the server they talk to as soon
# as it is deployed.
SDK_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
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


def draining(why: str = CLOSE_SERVICE_RESTART.reason) -> Response:
    """503 for a WebSocket handshake while the server drains (or, in cluster mode, cannot reach Redis):
    the client should connect again (elsewhere)."""
    return plain(HTTPStatus.SERVICE_UNAVAILABLE, f"{why}, connect again\n", [("Retry-After", "1")])


def unauthorized() -> Response:
    """401 for a request without a valid integrator key (RFC 9110 section 11.6.1: with a challenge)."""
    return plain(HTTPStatus.UNAUTHORIZED, f"{ErrorMessage.UNAUTHORIZED}\n", [("WWW-Authenticate", 'Bearer realm="deskpush"')])


_HEALTHY = msgspec.json.encode({"status": "ok"})
_READY = msgspec.json.encode({"status": "ready"})


class Site:
    """Answers ``/healthz``, the SDK's files and, when ``demo`` is on, the other static files; 404 for the rest."""

    def __init__(self, *, demo: bool, static_dir: Path = STATIC_DIR) -> None:
        self.demo = demo
        self.static_dir = static_dir

    def respond(self, path: str) -> Response:
        if path == "/healthz" or path == "/livez":
            # Up and listening, nothing more: it answers anyone, so it shows no counts (``stats``).
            # /livez: the same answer, under the name probes expect (the process serves HTTP).
            return response(HTTPStatus.OK, _HEALTHY, "application/json", [("Cache-Control", "no-store")])
        if self.demo or path.removeprefix("/") in SDK_FILES:
            # The SDK is no demo: CRM pages load it from here with the demo off too.
            return self._static(path)
        return plain(HTTPStatus.NOT_FOUND, "Not Found\n")

    def readiness(self, not_ready: str | None) -> Response:
        """``GET /readyz``: 200 when this node takes new sessions, else 503 saying why (``not_ready``).

        RFC 9110 section 15.6.4: 503 "indicates that the server is currently
        unable to handle the request due to a temporary overload or scheduled
        maintenance": a load balancer stops sending clients here.
        """
        if not_ready is None:
            return response(HTTPStatus.OK, _READY, "application/json", [("Cache-Control", "no-store")])
        return response(HTTPStatus.SERVICE_UNAVAILABLE, msgspec.json.encode({"status": not_ready}),
                        "application/json", [("Cache-Control", "no-store")])

    def stats(self, figures: Mapping[str, int]) -> Response:
        """``GET /stats`` for an authenticated integrator: ``figures`` as JSON."""
        return response(HTTPStatus.OK, msgspec.json.encode(figures), "application/json",
                        [("Cache-Control", "no-store")])

    def json(self, value: object) -> Response:
        """``value`` as JSON, for an authenticated integrator (``GET /templates``), never cached."""
        return response(HTTPStatus.OK, msgspec.json.encode(value), "application/json", [("Cache-Control", "no-store")])

    def _static(self, path: str) -> Response:
        name = "index.html" if path == "/" else path.removeprefix("/")
        suffix = Path(name).suffix
        if "/" in name or "\\" in name or name.startswith(".") or suffix not in CONTENT_TYPES:
            return plain(HTTPStatus.NOT_FOUND, "Not Found\n")
        try:
            body = (self.static_dir / name).read_bytes()
        except OSError:
            return plain(HTTPStatus.NOT_FOUND, "Not Found\n")
        extra = [("Content-Security-Policy", CSP), ("Cache-Control", "no-cache")]
        if name in SDK_FILES:
            extra.extend(SDK_HEADERS)
        return response(HTTPStatus.OK, body, CONTENT_TYPES[suffix], extra)
