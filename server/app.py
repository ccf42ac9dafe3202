"""One deskpush node: its listening socket, its parts, and their lifecycle.

``DeskpushServer`` puts the pieces together and owns nothing else:

* ``connection.Connection``: the bytes of each client (handshake, frames);
* ``endpoints``: what ``/agent`` and ``/integrator`` sessions do with messages;
* ``web.Site``: ``/healthz`` and the demo's static files;
* ``dispatch.Dispatcher``: engine effects to writes, and the one timer;
* ``state.StateFile``: pending notifications across a restart;
* the engine (``deskpush.protocol.Engine``), which holds every notification.

It routes each handshake: an upgrade to ``/agent`` or ``/integrator`` opens a
session there, anything else is plain HTTP for the site.

It also bounds what a connection that has not proved who it is can hold:
``server.helloTimeout`` from the TCP accept to authentication (the handshake
and the hello together), and at most ``server.maxPendingHandshakes`` such
connections; an upgrade past that is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from http import HTTPStatus

from websockets.http11 import Request, Response

from ..protocol import Engine
from ..protocol.vocabulary import CloseCode
from . import logs
from .auth import ApiKeys
from .clock import LoopClock
from .config import Config
from .connection import Connection, ConnectionOptions
from .dispatch import Dispatcher
from .endpoints import (
    Endpoint,
    Session,
    agent_endpoint,
    integrator_endpoint,
    refuse_bad_bearer,
    refuse_bad_resume_point,
)
from .state import StateFile
from .web import Site, plain

__all__ = ["DeskpushServer"]

log = logging.getLogger("deskpush")
outcome_log = logging.getLogger("deskpush.outcome")


class DeskpushServer:
    """One deskpush node.

    Use ``await start()`` then ``await close()``, or ``async with``.
    ``port`` is the bound port (useful with port 0).
    """

    def __init__(self, config: Config, *, jwt_secret: str | None = None, api_keys: dict[str, str] | None = None) -> None:
        self.config = config
        self.tokens = config.agent_tokens(jwt_secret or config.jwt_secret() or secrets.token_urlsafe(32))
        self.api_keys = ApiKeys(api_keys if api_keys is not None else config.api_keys())
        self.engine = Engine(config.template_map(), config.limits)
        self.site = Site(demo=config.server.demo, health=self.engine.statistics)
        self.state_file = StateFile(config.server.state_file) if config.server.state_file else None
        self.port = 0
        self._listener: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        # Connections accepted and neither authenticated nor answered with plain
        # HTTP yet, with when each was accepted (epoch ms): where helloTimeout starts.
        self._pending: dict[Connection, float] = {}
        self._busy = 0  # upgrades answered 503 since the last log line about them
        self._busy_logged = float("-inf")
        self._endpoints: dict[str, Endpoint] = {}
        self._dispatcher: Dispatcher | None = None
        self._clock: LoopClock | None = None
        self._stopped: asyncio.Event | None = None
        self._all_closed: asyncio.Event | None = None  # set while closing, once no connection is left

    # ------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.config.server
        self._clock = clock = LoopClock(loop)
        self._dispatcher = Dispatcher(self.engine, clock, log_outcome=logs.outcome_logger(outcome_log))
        self._endpoints = {
            "/agent": agent_endpoint(self.engine, self.tokens, rate=s.agent_rate, burst=s.agent_burst,
                                     hello_timeout=s.hello_timeout),
            "/integrator": integrator_endpoint(self.engine, self.api_keys, rate=s.integrator_rate,
                                               burst=s.integrator_burst, hello_timeout=s.hello_timeout),
        }
        options = ConnectionOptions(
            max_size=s.max_size,
            open_timeout=s.hello_timeout,
            close_timeout=5.0,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            outbound_limit=s.outbound_limit,
        )
        self._stopped = asyncio.Event()
        self._listener = await loop.create_server(
            lambda: self._connection(options, loop), s.host, s.port, backlog=s.backlog)
        self.port = self._listener.sockets[0].getsockname()[1]
        if self.state_file is not None:
            self._dispatcher.apply(self.state_file.restore(self.engine, clock.now()))

    async def close(self) -> None:
        """Stop listening, close every connection with 1001 (going away), save the pending offers."""
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        listener.close()
        for conn in list(self._connections):
            if conn.open:
                conn.close(CloseCode.GOING_AWAY)
            else:
                conn.abort()  # still in its handshake
        if self._connections:
            # Each closes within its close timeout at most.
            self._all_closed = asyncio.Event()
            await self._all_closed.wait()
        await listener.wait_closed()
        assert self._dispatcher is not None and self._clock is not None and self._stopped is not None
        self._dispatcher.close()
        if self.state_file is not None:
            self.state_file.save(self.engine, self._clock.now())
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Wait until ``close()`` has run."""
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()

    async def __aenter__(self) -> DeskpushServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def now(self) -> float:
        """Server time in epoch milliseconds, advancing with the monotonic clock."""
        assert self._clock is not None, "start() first"
        return self._clock.now()

    @property
    def connections(self) -> frozenset[Connection]:
        """Every client connection now open, in its handshake or closing."""
        return frozenset(self._connections)

    @property
    def pending_handshakes(self) -> int:
        """Connections accepted and not authenticated yet (``server.maxPendingHandshakes`` bounds them)."""
        return len(self._pending)

    @property
    def dispatcher(self) -> Dispatcher:
        """What applies the engine's effects and runs its timer (once started)."""
        assert self._dispatcher is not None, "start() first"
        return self._dispatcher

    # ------------------------------------------------------------------
    # connection.Handler

    def _connection(self, options: ConnectionOptions, loop: asyncio.AbstractEventLoop) -> Connection:
        assert self._clock is not None
        conn = Connection(self, options, loop)
        self._connections.add(conn)
        self._pending[conn] = self._clock.now()
        return conn

    def respond(self, conn: Connection, request: Request) -> Response | None:
        """A plain HTTP answer, or None to open the WebSocket on an endpoint."""
        response = self._answer(request)
        if response is not None:
            # Plain HTTP needs no authentication: answered, the connection closes.
            self._pending.pop(conn, None)
        return response

    def _answer(self, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/agent" or path == "/integrator":
            if len(self._pending) > self.config.server.max_pending_handshakes:
                return self._too_busy()
            if path == "/agent":
                return None
            return refuse_bad_bearer(self.api_keys, request) or refuse_bad_resume_point(request)
        return self.site.respond(path)

    def _too_busy(self) -> Response:
        """503 for an upgrade while ``server.maxPendingHandshakes`` connections wait to authenticate.

        RFC 9110 section 15.6.4: 503 "indicates that the server is currently
        unable to handle the request due to a temporary overload [...]. The
        server MAY send a Retry-After header field".
        """
        assert self._clock is not None
        self._busy += 1
        now = self._clock.now()
        if now - self._busy_logged >= 1000.0:  # one line a second at most
            log.warning("answered %d WebSocket upgrade(s) with 503: %d connections are waiting to authenticate "
                        "(server.maxPendingHandshakes = %d)", self._busy, len(self._pending),
                        self.config.server.max_pending_handshakes)
            self._busy = 0
            self._busy_logged = now
        return plain(HTTPStatus.SERVICE_UNAVAILABLE,
                     "too many connections are waiting to authenticate; retry later\n", [("Retry-After", "1")])

    def open(self, conn: Connection) -> Session:
        assert conn.request is not None and self._dispatcher is not None and self._clock is not None
        endpoint = self._endpoints[conn.request.path.partition("?")[0]]
        return Session(conn, endpoint, self._dispatcher, self._clock, accepted_at=self._pending.get(conn),
                       on_authenticated=self._authenticated)

    def _authenticated(self, conn: Connection) -> None:
        self._pending.pop(conn, None)

    def closed(self, conn: Connection) -> None:
        self._pending.pop(conn, None)
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

