"""One deskpush node: its listening socket, its parts, and their lifecycle.

``DeskpushServer`` puts the pieces together and owns nothing else:

* ``connection.Connection``: the bytes of each client (handshake, frames);
* ``endpoints``: what ``/agent`` and ``/integrator`` sessions do with messages;
* ``listener.Listener``: the listening sockets, and accepting when file
  descriptors run out;
* ``web.Site``: ``/healthz``, ``/stats`` and the demo's static files;
* ``dispatch.Dispatcher``: engine effects to writes, and the one timer;
* ``state.StateFile``: pending notifications across a restart;
* the engine (``deskpush.protocol.Engine``), which holds every notification.

It routes each handshake: an upgrade to ``/agent`` or ``/integrator`` opens a
session there, anything else is plain HTTP for the site.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from websockets.http11 import Request, Response

from ..protocol import Engine
from ..protocol.vocabulary import CloseCode
from . import logs
from .auth import AgentTokens, ApiKeys
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
from .listener import AcceptCounts, Listener, bind, open_files_limit, raise_open_files_limit
from .state import StateFile, StateFileError
from .web import SECURITY_HEADERS, Site, unauthorized

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
        self.tokens = AgentTokens(jwt_secret or config.jwt_secret() or secrets.token_urlsafe(32))
        self.api_keys = ApiKeys(api_keys if api_keys is not None else config.api_keys())
        self.engine = Engine(config.template_map(), config.limits)
        self.site = Site(demo=config.server.demo)
        self.state_file = StateFile(config.server.state_file) if config.server.state_file else None
        self.port = 0
        self._listener: Listener | None = None
        self._accepts = AcceptCounts()
        self._connections: set[Connection] = set()
        self._endpoints: dict[str, Endpoint] = {}
        self._dispatcher: Dispatcher | None = None
        self._clock: LoopClock | None = None
        self._stopped: asyncio.Event | None = None
        self._all_closed: asyncio.Event | None = None  # set while closing, once no connection is left

    # ------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        """Check the state file, listen, take back what the state file held.

        Raises:
            StateFileError: ``server.stateFile`` cannot be used (nothing listens).
            OSError: the address cannot be listened on.
        """
        loop = asyncio.get_running_loop()
        s = self.config.server
        snapshot = None
        if self.state_file is not None:
            # Before listening: a path the server cannot save to is refused
            # now, not found out at SIGTERM with every pending offer in hand.
            self.state_file.check()
            snapshot = self.state_file.load()
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
            http_headers=SECURITY_HEADERS,
        )
        self._stopped = asyncio.Event()
        before, limit = raise_open_files_limit()  # every connection takes one
        sockets = await bind(s.host, s.port, s.backlog)
        self._listener = Listener(sockets, lambda: self._connection(options, loop), backlog=s.backlog,
                                  counts=self._accepts)
        self.port = self._listener.port
        if snapshot is not None:
            assert self.state_file is not None
            self._dispatcher.apply(self.engine.restore(snapshot, clock.now()))
            try:
                self.state_file.remove()
            except StateFileError:
                listener, self._listener = self._listener, None
                listener.close()
                self._dispatcher.close()
                raise
            log.info("restored %d pending notifications and %d kept outcomes from %s",
                     len(snapshot.notifications), sum(len(h.outcomes) for h in snapshot.histories),
                     self.state_file.path)
        self._listener.start()
        log.info("open files limit %d%s: one per connection", limit,
                 f" (soft limit raised from {before})" if limit != before else "")

    async def close(self) -> None:
        """Stop listening, close every connection with 1001 (going away), save the pending offers.

        Raises:
            StateFileError: the save failed (the server is closed all the same).
        """
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        listener.close()
        await listener.wait_closed()  # the connections accepted until now are in _connections
        for conn in list(self._connections):
            if conn.open:
                conn.close(CloseCode.GOING_AWAY)
            else:
                conn.abort()  # still in its handshake
        if self._connections:
            # Each closes within its close timeout at most.
            self._all_closed = asyncio.Event()
            await self._all_closed.wait()
        assert self._dispatcher is not None and self._clock is not None and self._stopped is not None
        self._dispatcher.close()
        try:
            if self.state_file is not None:
                self.state_file.save(self.engine, self._clock.now())
        finally:
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

    def statistics(self) -> dict[str, int]:
        """The engine's counts and the server's own: what ``GET /stats`` shows (docs/protocol.md, HTTP)."""
        return {
            **self.engine.statistics(),
            "connections": len(self._connections),
            "refusedOutOfFds": self._accepts.refused_out_of_fds,
            "acceptPauses": self._accepts.accept_pauses,
            "openFilesLimit": open_files_limit(),
        }

    @property
    def connections(self) -> frozenset[Connection]:
        """Every client connection now open, in its handshake or closing."""
        return frozenset(self._connections)

    @property
    def dispatcher(self) -> Dispatcher:
        """What applies the engine's effects and runs its timer (once started)."""
        assert self._dispatcher is not None, "start() first"
        return self._dispatcher

    # ------------------------------------------------------------------
    # connection.Handler

    def _connection(self, options: ConnectionOptions, loop: asyncio.AbstractEventLoop) -> Connection:
        conn = Connection(self, options, loop)
        self._connections.add(conn)
        return conn

    def respond(self, conn: Connection, request: Request) -> Response | None:
        """A plain HTTP answer, or None to open the WebSocket on an endpoint."""
        path = request.path.partition("?")[0]
        if path == "/agent":
            return None
        if path == "/integrator":
            return refuse_bad_bearer(self.api_keys, request) or refuse_bad_resume_point(request)
        if path == "/stats":
            # Counts say how busy the server is and how many agents are on:
            # an integrator's business, not a passer-by's (/healthz shows none).
            if self.api_keys.check_bearer(request.headers.get("Authorization")) is None:
                return unauthorized()
            return self.site.stats(self.statistics())
        return self.site.respond(path)

    def open(self, conn: Connection) -> Session:
        assert conn.request is not None and self._dispatcher is not None and self._clock is not None
        endpoint = self._endpoints[conn.request.path.partition("?")[0]]
        return Session(conn, endpoint, self._dispatcher, self._clock)

    def closed(self, conn: Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

