"""One deskpush node: its listening socket, its parts, and their lifecycle.

``DeskpushServer`` puts the pieces together and owns nothing else:

* ``connection.Connection``: the bytes of each client (handshake, frames);
* ``endpoints``: what ``/agent`` and ``/integrator`` sessions do with messages;
* ``listener.Listener``: the listening sockets, and accepting when file
  descriptors run out;
* ``web.Site``: ``/healthz``, ``/stats`` and the demo's static files;
* ``dispatch.Dispatcher``: engine effects to writes, and the one timer;
* ``state.StateFile``: pending notifications across a restart;
* ``metrics``: what is counted for Prometheus, ``/metrics``, and its own port;
* the engine (``deskpush.protocol.Engine``), which holds every notification.

It routes each handshake: an upgrade to ``/agent`` or ``/integrator`` opens a
session there, anything else is plain HTTP for the site.

It also bounds what a connection that has not proved who it is can hold:
``server.helloTimeout`` from the TCP accept to authentication (the handshake
and the hello together), and at most ``server.maxPendingHandshakes`` such
connections; an upgrade past that is answered 503 and closed.

And it throttles guessing of integrator keys: an address (``auth.source_address``)
with ``auth.failedAuthLimit`` failures in ``auth.failedAuthWindow`` seconds is
refused that long, with 429 on the upgrade (Bearer) or 4429 at the hello,
before its key is looked at. Agent tokens are not throttled: a JWT signed
with a secret of 32 bytes or more cannot be guessed online, and desktops
behind one contact centre's NAT share an address, so a few with expired
tokens would lock out every agent there.

Stopping comes in two speeds. ``close()`` closes every connection at once
with 1001 (going away). ``drain()`` first, as SIGTERM does: ``/readyz``
answers 503 from that moment, new sessions are refused (503), and the open
ones are closed with 1012 (service restart) a batch at a time over
``server.drainTimeout``, agents in random order and integrators last, so the
desktops come back (elsewhere, or to the next process) spread out instead of
all in the same second; then ``close()`` saves the state file.

``reload()`` swaps the templates and integrator keys of a running server
(SIGHUP) without touching a connection or a pending notification.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
from collections.abc import Sequence
from typing import Any
from http import HTTPStatus

import msgspec
from websockets.http11 import Request, Response

from ..protocol import Engine
from ..protocol.vocabulary import CLOSE_SERVICE_RESTART, CloseCode
from . import logs, metrics
from .auth import ApiKeys, FailureThrottle, Network, source_address
from .clock import Clock, LoopClock
from .cluster import ClusterDispatcher, ClusterNode
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
from .web import SECURITY_HEADERS, Site, draining, plain, unauthorized

__all__ = ["DeskpushServer"]

log = logging.getLogger("deskpush")
outcome_log = logging.getLogger("deskpush.outcome")

#: A drain closes at least this many agent sessions together: a few desktops
#: reconnecting in the same instant is no herd, and a drain of a handful of
#: sessions (a development server, a test) is over at once.
DRAIN_BATCH_MIN = 10
#: ... and leaves at least this long (seconds) between two batches.
DRAIN_STEP_MIN = 0.05


def drain_schedule(sessions: int, window: float) -> list[tuple[float, int]]:
    """When each batch of a drain closes, and how many: ``(seconds from the start, count)``.

    ``sessions`` are cut into equal batches (at least ``DRAIN_BATCH_MIN`` each,
    at least ``DRAIN_STEP_MIN`` apart) evenly spaced over ``window``: the first
    at once, the last one step before the window ends.
    """
    if sessions <= 0:
        return []
    batches = max(1, min(math.ceil(sessions / DRAIN_BATCH_MIN), int(window / DRAIN_STEP_MIN)))
    step = window / batches
    size, extra = divmod(sessions, batches)
    return [(i * step, size + (1 if i < extra else 0)) for i in range(batches)]


class DeskpushServer:
    """One deskpush node.

    Use ``await start()`` then ``await close()``, or ``async with``.
    ``port`` is the bound port (useful with port 0).
    """

    def __init__(self, config: Config, *, jwt_secret: str | None = None, api_keys: dict[str, str] | None = None) -> None:
        self.config = config
        secret = jwt_secret or config.jwt_secret() or secrets.token_urlsafe(32)
        self.tokens = config.agent_tokens(secret)
        self.api_keys = ApiKeys(api_keys if api_keys is not None else config.api_keys())
        config.check_cluster()
        c = config.cluster
        #: Cluster mode's node (docs/cluster.md), or None: embedded mode.
        self.cluster: ClusterNode | None = None
        if c.redis is not None:
            self.cluster = ClusterNode(
                c.redis, secret, config.template_map(), config.limits, prefix=c.prefix,
                heartbeat=c.heartbeat, node_timeout=c.node_timeout, redis_timeout=c.redis_timeout,
                snapshot_interval=c.snapshot_interval, max_buffered=c.max_buffered)
            self._engine = None
        else:
            self._engine = Engine(config.template_map(), config.limits)
        self.site = Site(demo=config.server.demo)
        self.auth_failures = FailureThrottle(config.auth.failed_auth_limit, config.auth.failed_auth_window)
        self._trusted = config.trusted_networks()
        self.state_file = StateFile(config.server.state_file) if config.server.state_file else None
        self.port = 0
        self._listener: Listener | None = None
        self._accepts = AcceptCounts()
        self._connections: set[Connection] = set()
        # Connections accepted and neither authenticated nor answered with plain
        # HTTP yet, with when each was accepted (epoch ms): where helloTimeout starts.
        self._pending: dict[Connection, float] = {}
        self._guard: _Guard | None = None
        self._busy: _EverySecond | None = None
        self._busy_refusals = 0  # upgrades answered 503 since start
        self._endpoints: dict[str, Endpoint] = {}
        self._dispatcher: Dispatcher | None = None
        self._clock: LoopClock | None = None
        self._stopped: asyncio.Event | None = None
        self._all_closed: asyncio.Event | None = None  # set while closing, once no connection is left
        self._draining = False
        self._closing: set[Connection] = set()  # closed by the drain, not gone yet
        self._closing_done: asyncio.Event | None = None  # set when _closing empties
        origins = config.server.allowed_origins
        # Browsers send Origin in lower case (RFC 6454 section 6.1: the host is
        # ASCII-lowercased; schemes are case-insensitive): compare that way.
        self._allowed_origins = None if origins is None else frozenset(o.lower() for o in origins)
        #: What the hot paths count for the metrics; None with ``server.metrics`` false.
        self.counts = metrics.Counts() if config.server.metrics else None
        self._metrics_registry = (metrics.registry(metrics.Collector(self.counts, self.statistics))
                                  if self.counts is not None else None)
        self._metrics_port: metrics.MetricsPort | None = None

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
        events: Any = self._engine  # what the endpoints hand their sessions' events to
        if self.cluster is not None:
            self._clock = clock = await self.cluster.start(loop)  # ClusterError: nothing listens
            self._dispatcher = ClusterDispatcher(self.engine, clock, log_outcome=logs.outcome_logger(outcome_log),
                                                 counts=self.counts)
            self.cluster.attach(self._dispatcher)
            events = self.cluster
        else:
            self._clock = clock = LoopClock(loop)
            self._dispatcher = Dispatcher(self.engine, clock, log_outcome=logs.outcome_logger(outcome_log),
                                          counts=self.counts)
        self._guard = guard = _Guard(self.auth_failures, self._trusted, clock, self.config.auth.failed_auth_limit)
        self._busy = _EverySecond(clock)
        self._endpoints = {
            "/agent": agent_endpoint(events, self.tokens, rate=s.agent_rate, burst=s.agent_burst,
                                     hello_timeout=s.hello_timeout),
            "/integrator": integrator_endpoint(events, self.api_keys, rate=s.integrator_rate,
                                               burst=s.integrator_burst, hello_timeout=s.hello_timeout,
                                               guard=guard),
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
        try:
            sockets = await bind(s.host, s.port, s.backlog)
        except OSError:
            if self.cluster is not None:
                await self.cluster.close()
            raise
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
        if self._metrics_registry is not None and s.metrics_port is not None:
            self._metrics_port = metrics.MetricsPort(self._metrics_registry, options)
            try:
                await self._metrics_port.start(s.metrics_host, s.metrics_port)
            except OSError:
                listener, self._listener = self._listener, None
                listener.close()
                self._dispatcher.close()
                raise
        self._listener.start()
        log.info("open files limit %d%s: one per connection", limit,
                 f" (soft limit raised from {before})" if limit != before else "")

    async def drain(self, window: float | None = None) -> None:
        """Close every session with 1012 (service restart), spread over ``window`` seconds.

        From the first moment ``not_ready()`` says ``"draining"`` (``/readyz``
        answers 503) and a new session is refused with 503, while plain HTTP is still answered,
        so a load balancer's probe sees the node going. The agent sessions
        open now are closed in random order in the batches of
        ``drain_schedule`` (default window: ``server.drainTimeout``); the
        integrator connections, and anything else still open, with the last
        batch: so the integrators can offer to, and hear from, the agents
        still here until then. It returns once the closing handshakes are
        over (``close_timeout`` each at most). Cancelling it (a second signal)
        stops the spreading; ``close()`` then closes the rest at once.

        Call ``close()`` after it (it is not called here: its save must run
        even if the drain was cancelled).
        """
        if self._listener is None or self._draining:
            return
        self._draining = True
        window = self.config.server.drain_timeout if window is None else window
        self._closing_done = asyncio.Event()
        agents = [c for c in self._connections if c.open and self._endpoint_path(c) == "/agent"]
        random.shuffle(agents)
        schedule = drain_schedule(len(agents), window)
        log.info("draining: closing %d agent session(s) with %d (service restart) in %d batch(es) over %g s, "
                 "then %d other connection(s)", len(agents), CLOSE_SERVICE_RESTART.code, len(schedule), window,
                 len(self._connections) - len(agents))
        loop = asyncio.get_running_loop()
        start = loop.time()
        done = 0
        for at, count in schedule:
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._close_for_restart(agents[done:done + count])
            done += count
        # The integrators, and sessions that opened meanwhile (answered 101 just before the drain).
        self._close_for_restart([c for c in self._connections if c.open])
        while self._closing:
            self._closing_done.clear()
            await self._closing_done.wait()
        log.info("drained: every session closed")

    @staticmethod
    def _endpoint_path(conn: Connection) -> str | None:
        return conn.request.path.partition("?")[0] if conn.request is not None else None

    def _close_for_restart(self, conns: list[Connection]) -> None:
        for conn in conns:
            if conn.open and conn in self._connections:
                self._closing.add(conn)
                conn.close(*CLOSE_SERVICE_RESTART)

    @property
    def draining(self) -> bool:
        """Whether ``drain()`` has started."""
        return self._draining

    def not_ready(self) -> str | None:
        """Why this node should be sent no new sessions now (``/readyz`` answers 503), or None: it is ready.

        Ready means listening and not draining.
        """
        if self._listener is None:
            return "not listening"
        if self._draining:
            return "draining"
        if self.cluster is not None:
            return self.cluster.not_ready()
        return None

    @property
    def engine(self) -> Engine:
        """The engine: this server's own, or in cluster mode this node's replica of the cluster's."""
        if self.cluster is not None:
            return self.cluster.replica.engine
        assert self._engine is not None
        return self._engine

    def reload(self, config: Config, api_keys: dict[str, str]) -> None:
        """Use the templates of ``config`` and ``api_keys`` from now on, keeping every connection.

        What was already made stays as it was: a notification keeps the
        template it was created with, a connection the key it authenticated
        with. The rest of ``config`` is not taken (``config.needs_restart`` names what differs).
        """
        if self.cluster is not None:
            self.cluster.replace_rules(config.template_map())  # every node's, from the log
        else:
            self.engine.replace_templates(config.template_map())
        self.api_keys.replace(api_keys)
        self.config = msgspec.structs.replace(self.config, builtin_templates=config.builtin_templates,
                                              templates=config.templates)

    async def close(self) -> None:
        """Stop listening, close every connection with 1001 (going away), save the pending offers.

        After ``drain()`` (even a cancelled one) what is left is closed with 1012 instead.

        Raises:
            StateFileError: the save failed (the server is closed all the same).
        """
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        listener.close()
        if self._metrics_port is not None:
            await self._metrics_port.close()
        await listener.wait_closed()  # the connections accepted until now are in _connections
        code = CLOSE_SERVICE_RESTART.code if self._draining else CloseCode.GOING_AWAY
        for conn in list(self._connections):
            if conn.open:
                conn.close(code)
            else:
                conn.abort()  # still in its handshake
        if self._connections:
            # Each closes within its close timeout at most.
            self._all_closed = asyncio.Event()
            await self._all_closed.wait()
        assert self._dispatcher is not None and self._clock is not None and self._stopped is not None
        if self.cluster is not None:
            await self.cluster.close()  # the connections' last events go first
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
            "pendingHandshakes": len(self._pending),
            "refusedPendingHandshakes": self._busy_refusals,
            "refusedAuthThrottled": self._guard.refusals if self._guard is not None else 0,
            **(self.cluster.statistics() if self.cluster is not None else
               {"clusterRedisUp": 0, "clusterBuffered": 0, "clusterApplied": 0}),
        }

    @property
    def connections(self) -> frozenset[Connection]:
        """Every client connection now open, in its handshake or closing."""
        return frozenset(self._connections)

    @property
    def pending_handshakes(self) -> int:
        """Connections accepted and not authenticated yet (``server.maxPendingHandshakes`` bounds them)."""
        return len(self._pending)

    @property
    def metrics_port(self) -> int | None:
        """The bound port of ``server.metricsPort`` (useful with 0), or None when there is none."""
        return self._metrics_port.port if self._metrics_port is not None else None

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
        path = request.path.partition("?")[0]
        endpoint = path == "/agent" or path == "/integrator"
        if not endpoint:
            # Plain HTTP needs no authentication: it is answered and closes.
            self._pending.pop(conn, None)
        response = self._answer(conn, path, endpoint, request)
        if response is not None:
            self._pending.pop(conn, None)  # refused: it closes
        return response

    def _answer(self, conn: Connection, path: str, endpoint: bool, request: Request) -> Response | None:
        if endpoint:
            if self._draining:
                return draining()
            unready = self.cluster.not_ready() if self.cluster is not None else None
            if unready is not None:
                return draining(unready)  # Redis away: the client should try another node, or later
            if len(self._pending) > self.config.server.max_pending_handshakes:
                return self._too_busy()
            refused = self._refuse_origin(conn, request, path)
            if refused is not None or path == "/agent":
                return refused
            return self._check_bearer(conn, request) or refuse_bad_resume_point(request)
        if path == "/stats":
            # Counts say how busy the server is and how many agents are on:
            # an integrator's business, not a passer-by's (/healthz shows none).
            if request.headers.get("Authorization") is None:
                return unauthorized()
            return self._check_bearer(conn, request) or self.site.stats(self.statistics())
        if path == "/readyz":
            return self.site.readiness(self.not_ready())
        if path == "/templates":
            # For scripts; a page asks with the `templates` frame on its WebSocket.
            if request.headers.get("Authorization") is None:
                return unauthorized()
            return self._check_bearer(conn, request) or self.site.json({"templates": self.engine.template_infos()})
        if path == "/metrics" and self._metrics_registry is not None:
            # The same figures as /stats and the same rule (server.metricsPort
            # serves them without a key, on an address of their own).
            if request.headers.get("Authorization") is None:
                return unauthorized()
            return self._check_bearer(conn, request) or metrics.render(self._metrics_registry, request)
        return self.site.respond(path)

    def _refuse_origin(self, conn: Connection, request: Request, path: str) -> Response | None:
        """403 for a handshake from a page whose origin ``server.allowedOrigins`` does not list.

        A browser always sends ``Origin`` on a WebSocket handshake (RFC 6455
        section 4.1: "The request MUST include a header field with the name
        |Origin| if the request is coming from a browser client"), and a page
        cannot change it: so a key or token that leaked to a hostile page is
        of no use from that page. A request without ``Origin`` is no browser's
        and passes: a server-side integrator or the Python SDK, which could
        send any Origin it liked anyway (section 10.2: "The intent is not to
        prevent non-browsers from establishing connections but rather to
        ensure that trusted browsers under the control of potentially
        malicious JavaScript cannot fake a WebSocket handshake"). Section
        4.2.2: "If the server does not wish to accept this connection, it
        MUST return an appropriate HTTP error code (e.g., 403 Forbidden)".
        """
        allowed = self._allowed_origins
        if allowed is None:
            return None
        origins = request.headers.get_all("Origin")
        if not origins or (len(origins) == 1 and origins[0].lower() in allowed):
            return None
        shown = ", ".join(origins)
        if len(shown) > 100:
            shown = shown[:100] + "..."
        # One line per refusal; the origin is the client's text: repr, and cut short.
        log.warning("refused a handshake to %s from %s: Origin %r is not in server.allowedOrigins",
                    path, conn.remote_address, shown)
        return plain(HTTPStatus.FORBIDDEN, "Origin not allowed\n")

    def _check_bearer(self, conn: Connection, request: Request) -> Response | None:
        """None for a request with a right ``Authorization`` header, or none; else the refusal.

        429 while the connection's address is refused (the key is not looked
        at), 401 for a wrong key, which counts as a failure of the address.
        """
        if request.headers.get("Authorization") is None:
            return None
        assert self._guard is not None
        wait = self._guard.refused_for(conn)
        if wait > 0:
            return _too_many_failures(wait)
        refusal = refuse_bad_bearer(self.api_keys, request)
        if refusal is not None:
            self._guard.failed(conn)
        return refusal

    def _too_busy(self) -> Response:
        """503 for an upgrade while ``server.maxPendingHandshakes`` connections wait to authenticate.

        RFC 9110 section 15.6.4: 503 "indicates that the server is currently
        unable to handle the request due to a temporary overload [...]. The
        server MAY send a Retry-After header field".
        """
        assert self._busy is not None
        self._busy_refusals += 1
        self._busy.add("answered %d WebSocket upgrade(s) with 503: %d connections are waiting to authenticate "
                       "(server.maxPendingHandshakes = %d)", len(self._pending),
                       self.config.server.max_pending_handshakes)
        return plain(HTTPStatus.SERVICE_UNAVAILABLE,
                     "too many connections are waiting to authenticate; retry later\n", [("Retry-After", "1")])

    def open(self, conn: Connection) -> Session:
        assert conn.request is not None and self._dispatcher is not None and self._clock is not None
        endpoint = self._endpoints[conn.request.path.partition("?")[0]]
        return Session(conn, endpoint, self._dispatcher, self._clock, accepted_at=self._pending.get(conn),
                       on_authenticated=self._authenticated,
                       counts=self.counts.endpoints[endpoint.name] if self.counts is not None else None)

    def _authenticated(self, conn: Connection) -> None:
        self._pending.pop(conn, None)

    def closed(self, conn: Connection) -> None:
        self._pending.pop(conn, None)
        if self.counts is not None:
            self.counts.closed(conn)
        self._connections.discard(conn)
        if self._closing:
            self._closing.discard(conn)
            if not self._closing and self._closing_done is not None:
                self._closing_done.set()
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()


def _too_many_failures(wait: float) -> Response:
    """429 for an upgrade with an ``Authorization`` header from an address refused for ``wait`` seconds.

    RFC 6585 section 4: 429 "indicates that the user has sent too many
    requests in a given amount of time [...] and MAY include a Retry-After
    header indicating how long to wait before making a new request."
    """
    return plain(HTTPStatus.TOO_MANY_REQUESTS, "too many failed authentications from this address; retry later\n",
                 [("Retry-After", str(math.ceil(wait)))])


class _Guard:
    """``endpoints.Guard`` and the Bearer path's check: the throttle, by each connection's source address."""

    def __init__(self, throttle: FailureThrottle, trusted: Sequence[Network], clock: Clock, limit: int) -> None:
        self.throttle = throttle
        self.trusted = trusted
        self.clock = clock
        self.limit = limit
        self.refusals = 0  # attempts refused unchecked since start (429 and 4429)
        self._refusing = _EverySecond(clock)

    def source(self, conn: Connection) -> str:
        peer = str(conn.remote_address[0]) if conn.remote_address else ""
        forwarded = None
        if self.trusted and conn.request is not None:
            forwarded = ",".join(conn.request.headers.get_all("X-Forwarded-For")) or None
        return source_address(peer, forwarded, self.trusted)

    def refused_for(self, conn: Connection) -> float:
        """Seconds ``conn``'s address must wait: more than 0, and the caller refuses it (counted here)."""
        wait = self.throttle.refused_for(self.source(conn), self.clock.now() / 1000.0)
        if wait > 0:
            self.refusals += 1
        return wait

    def failed(self, conn: Connection) -> None:
        source = self.source(conn)
        if self.throttle.failed(source, self.clock.now() / 1000.0):
            self._refusing.add("%d address(es) refused for %g s after %d failed integrator authentications "
                               "(auth.failedAuthLimit), the latest %s", self.throttle.window, self.limit, source)


class _EverySecond:
    """A warning about something that may come in floods: one line a second at most, saying how many."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.count = 0  # since the last line
        self.logged = float("-inf")

    def add(self, message: str, *args: object) -> None:
        """Count one; log ``message % (count, *args)`` unless a line went out less than a second ago."""
        self.count += 1
        now = self.clock.now()
        if now - self.logged >= 1000.0:
            log.warning(message, self.count, *args)
            self.count = 0
            self.logged = now
