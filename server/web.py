"""Plain HTTP on the WebSocket port: health, statistics, the demo's static files, and the headers they carry.

Every request that is not a WebSocket upgrade to an endpoint ends here, as
one response and a closed connection (no keep-alive: browsers open these
rarely, load balancers once per probe). The static files are the files
directly in ``deskpush.client`` (the browser desktop, ``cif.js``, the
integrator page) with a known extension; nothing else on disk is reachable.
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

__all__ = ["Site", "response", "plain", "unauthorized"]

STATIC_DIR = Path(str(importlib.resources.files("deskpush.client")))
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# The demo pages load nothing from elsewhere and run no inline script.
CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def response(status: HTTPStatus, body: bytes, content_type: str,
             extra: Iterable[tuple[str, str]] = ()) -> Response:
    """A complete response that closes the connection."""
    headers = Headers([
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("X-Content-Type-Options", "nosniff"),
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
