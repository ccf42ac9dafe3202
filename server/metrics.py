"""Prometheus metrics: counted in plain ints on the way, exported at scrape time.

What a Prometheus client library would do on every event (a ``Counter.inc()``
takes a lock and goes through a child lookup per label set) costs more than
the whole of some events here, and the hot path is one thread on the event
loop. So nothing on the hot path touches prometheus-client:

* ``Counts`` holds plain ints, dicts of ints and ``Histogram`` s (a list of
  ints per bucket). The session adds each frame it receives, the dispatcher
  each frame it sends, each error frame, each outcome (and how long its offer
  took) and how late its timer ran; the server each closed connection.
* ``Collector`` is a prometheus-client custom collector: at each scrape it
  reads ``Counts`` and ``DeskpushServer.statistics()`` (the engine's gauges,
  the accept counts) and builds the metric families. Only bounded label values
  are used: endpoints, frame types, error codes, outcomes, close codes from a
  fixed list, HTTP statuses; never an agent or integrator name.
* ``MetricsPort``: the optional listener of ``server.metricsPort``, which
  answers ``GET /metrics`` without a key (it is meant for a private address).

Names follow Prometheus' conventions: ``deskpush_`` prefix, ``_total`` on
counters, base units (``_seconds``). docs/protocol.md (HTTP) lists them all.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
import logging
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from websockets.http11 import Request, Response

from ..protocol import Ended
from ..protocol import frames as f
from ..protocol.vocabulary import OUTCOMES, CloseCode
from . import __version__
from .web import plain, response

if TYPE_CHECKING:
    from .connection import Connection, ConnectionOptions

__all__ = ["Counts", "EndpointCounts", "Histogram", "Collector", "MetricsPort", "registry", "render",
           "OFFER_BUCKETS", "LATENESS_BUCKETS"]

log = logging.getLogger("deskpush")

#: Offer to outcome, in seconds: from an auto-accept or a full queue (at
#: once) to a queue timeout and a display timeout one after the other.
OFFER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
                 180.0, 300.0, 600.0)
#: How late the one timer ran, in seconds: a healthy server stays in the first few.
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: Close codes that get their own label value; any other a client sends is "other".
KNOWN_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                               *(int(c) for c in CloseCode)})

ENDPOINTS = ("agent", "integrator")

# Each frame the server sends, as (endpoint, type) labels.
_FRAME_LABELS: dict[type, tuple[str, str]] = {
    **{cls: ("agent", cls.__struct_config__.tag) for cls in typing.get_args(f.AgentOutbound)},
    **{cls: ("integrator", cls.__struct_config__.tag) for cls in typing.get_args(f.IntegratorOutbound)},
}


#: The error frames: not keys of ``Counts.sent``, so the dispatcher's one
#: dictionary update per frame raises for them, and ``Counts.error`` counts
#: them by code (and as sent).
ERROR_FRAMES = frozenset({f.AgentError, f.IntegratorError})


class Histogram:
    """Observations into fixed buckets: one ``bisect`` and two additions each."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus' "le" buckets count.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, ``+Inf`` last, as the exposition format has them."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class EndpointCounts:
    """What one endpoint's sessions count: frames received, sessions authenticated."""

    __slots__ = ("frames_in", "sessions")

    def __init__(self) -> None:
        self.frames_in = 0
        self.sessions = 0


class Counts:
    """Every counter and histogram, as plain Python numbers. See the module docstring."""

    def __init__(self) -> None:
        self.endpoints = {name: EndpointCounts() for name in ENDPOINTS}
        # Frames queued to send, by frame type; the error frames are in ``errors``.
        self.sent: dict[type, int] = dict.fromkeys(_FRAME_LABELS.keys() - ERROR_FRAMES, 0)
        self.errors: dict[tuple[str, str], int] = {}  # (endpoint, code)
        # (actionName, responseReason): the engine's outcomes are known, any other gets one when it comes.
        self.durations: dict[tuple[str, str], Histogram] = {o: Histogram(OFFER_BUCKETS) for o in OUTCOMES.values()}
        self.untimed: dict[tuple[str, str], int] = {}  # outcomes of offers whose start is not known
        self.lateness = Histogram(LATENESS_BUCKETS)
        self.closes: dict[tuple[str, str, str], int] = {}  # (endpoint, initiator, code)
        self.handshake_failures: dict[str, int] = {}  # reason

    # The dispatcher's, per frame sent and per outcome ------------------

    def error(self, frame: f.AgentError | f.IntegratorError, targets: int = 1) -> None:
        """An error frame is being sent (to ``targets`` connections, always 1 today)."""
        key = ("agent", str(frame.code)) if type(frame) is f.AgentError else ("integrator", str(frame.error.message))
        self.errors[key] = self.errors.get(key, 0) + targets

    def ended(self, e: Ended) -> None:
        """An outcome: counted, and its offer's duration observed (``Histogram.observe``, inlined)."""
        outcome = e.outcome
        durations = self.durations.get(outcome)
        if durations is None:
            durations = self.durations[outcome] = Histogram(OFFER_BUCKETS)
        duration = e.duration
        if duration is None:  # restored from a snapshot that did not keep the time: counted, not timed
            self.untimed[outcome] = self.untimed.get(outcome, 0) + 1
            return
        seconds = duration / 1000.0
        durations.counts[bisect_left(durations.bounds, seconds)] += 1
        durations.sum += seconds

    # The server's, per connection ----------------------------------------

    def closed(self, conn: Connection) -> None:
        """``conn`` is gone: count how its WebSocket closed, or why its handshake failed.

        A handshake failed when the request asked for ``/agent`` or
        ``/integrator`` and was answered with anything but 101, or when no
        complete request arrived within ``helloTimeout`` (a plain HTTP client
        that slow is counted too: nothing tells them apart). Plain HTTP
        answers are not counted.
        """
        request = conn.request
        status = conn.status
        if request is None:
            if status is None and conn.timed_out:
                self.handshake_failures["timeout"] = self.handshake_failures.get("timeout", 0) + 1
            return
        endpoint = request.path.partition("?")[0].removeprefix("/")
        if endpoint not in self.endpoints:
            return
        if status == 101:
            key = (endpoint, *_close_of(conn))
            self.closes[key] = self.closes.get(key, 0) + 1
        elif status is not None:
            try:
                reason = HTTPStatus(status).name.lower()
            except ValueError:
                reason = "other"
            self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1


def _close_of(conn: Connection) -> tuple[str, str]:
    """(initiator, code) of a closed WebSocket connection."""
    if conn.dropped_slow:
        return "server", "1006"  # aborted by the server over server.outboundLimit
    exc = conn.protocol.close_exc  # websockets' public account of the closing handshake
    sent, rcvd = exc.sent, exc.rcvd
    if sent is not None and (rcvd is None or exc.rcvd_then_sent is False):
        return "server", _code_label(sent.code)
    if rcvd is not None:
        return "client", _code_label(rcvd.code)
    return "client", "1006"  # TCP closed without a close frame


def _code_label(code: int) -> str:
    return str(code) if code in KNOWN_CLOSE_CODES else "other"


# --------------------------------------------------------------------------
# Scrape time


class Collector:
    """A prometheus-client collector reading ``counts`` and ``statistics()`` at each scrape."""

    def __init__(self, counts: Counts, statistics: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts
        self.statistics = statistics

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families are made at collect time

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        s = self.statistics()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        info = GaugeMetricFamily("deskpush_build_info", "deskpush's version (always 1)", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        # Connections and presence (gauges from the engine and the server).
        conns = GaugeMetricFamily("deskpush_connections", "Open authenticated WebSocket connections, by endpoint",
                                  labels=["endpoint"])
        conns.add_metric(["agent"], s["agentSessions"])
        conns.add_metric(["integrator"], s["integrators"])
        yield conns
        opened = CounterMetricFamily("deskpush_connections_opened", "WebSocket connections authenticated since start",
                                     labels=["endpoint"])
        for name, ep in c.endpoints.items():
            opened.add_metric([name], ep.sessions)
        yield opened
        yield gauge("deskpush_tcp_connections",
                    "Open TCP connections: WebSockets, handshakes in progress, plain HTTP requests", s["connections"])
        yield gauge("deskpush_pending_handshakes", "Connections opened and not authenticated yet",
                    s["pendingHandshakes"])
        yield gauge("deskpush_agents", "Agents present: connected, or within their presence grace", s["agents"])

        # Offers.
        notifications = GaugeMetricFamily("deskpush_notifications", "Notifications pending, by state",
                                          labels=["state"])
        notifications.add_metric(["queued"], s["live"] - s["displayed"])
        notifications.add_metric(["displayed"], s["displayed"])
        yield notifications
        yield counter("deskpush_offers", "Notifications made from a notifyEvent since start", s["offers"])
        outcomes = CounterMetricFamily("deskpush_outcomes", "Outcomes since start, by CIF actionName and responseReason",
                                       labels=["action_name", "response_reason"])
        durations = HistogramMetricFamily(
            "deskpush_offer_duration_seconds", "From the notifyEvent to the outcome, by outcome",
            labels=["action_name", "response_reason"])
        for (action, reason), h in sorted(c.durations.items()):
            outcomes.add_metric([action, reason], h.count + c.untimed.get((action, reason), 0))
            durations.add_metric([action, reason], h.buckets(), h.sum)
        yield outcomes
        yield durations
        lateness = HistogramMetricFamily(
            "deskpush_timer_lateness_seconds",
            "How late the server's one timer ran past the deadline it was set for (event loop lag)")
        lateness.add_metric([], c.lateness.buckets(), c.lateness.sum)
        yield lateness
        yield gauge("deskpush_remembered_outcomes",
                    "Ended notifications remembered to answer a late respond or cancelEvent", s["remembered"])
        yield gauge("deskpush_outcome_history", "Outcomes kept in the API keys' histories for a resume (v1.1)",
                    s["history"])
        yield gauge("deskpush_timers", "Deadlines held, including those of notifications that ended early",
                    s["timers"])

        # Frames, errors, closes.
        received = CounterMetricFamily("deskpush_frames_received", "WebSocket messages received, by endpoint",
                                       labels=["endpoint"])
        for name, ep in c.endpoints.items():
            received.add_metric([name], ep.frames_in)
        yield received
        sent = CounterMetricFamily("deskpush_frames_sent", "Frames sent (queued for writing), by endpoint and type",
                                   labels=["endpoint", "type"])
        errors_by_endpoint = dict.fromkeys(ENDPOINTS, 0)
        for (endpoint, _), n in c.errors.items():
            errors_by_endpoint[endpoint] += n
        for cls, labels in _FRAME_LABELS.items():
            n = c.sent[cls] if cls in c.sent else errors_by_endpoint[labels[0]]
            sent.add_metric(list(labels), n)
        yield sent
        errors = CounterMetricFamily(
            "deskpush_errors", "Error frames sent, by endpoint and code (agent: code; integrator: error.message)",
            labels=["endpoint", "code"])
        for (endpoint, code), n in sorted(c.errors.items()):
            errors.add_metric([endpoint, code], n)
        yield errors
        closes = CounterMetricFamily(
            "deskpush_closes", "WebSocket connections closed, by endpoint, who closed first and close code "
            "(1006: no close frame; by the server: over server.outboundLimit)",
            labels=["endpoint", "initiator", "code"])
        for key, n in sorted(c.closes.items()):
            closes.add_metric(list(key), n)
        yield closes
        failures = CounterMetricFamily(
            "deskpush_handshake_failures", "Requests to /agent or /integrator that got no WebSocket, by reason "
            "(the HTTP status's name, or timeout: no complete request within helloTimeout)", labels=["reason"])
        for reason, n in sorted(c.handshake_failures.items()):
            failures.add_metric([reason], n)
        yield failures

        # Accepting and refusing.
        yield counter("deskpush_refused_out_of_fds",
                      "Connections refused (503) because no file descriptor was left", s["refusedOutOfFds"])
        yield counter("deskpush_accept_pauses", "Times accepting paused for a second after an accept failure",
                      s["acceptPauses"])
        yield gauge("deskpush_open_files_limit", "The process's open files limit (soft RLIMIT_NOFILE; -1: none)",
                    s["openFilesLimit"])
        yield counter("deskpush_refused_pending_handshakes",
                      "WebSocket upgrades answered 503 over server.maxPendingHandshakes", s["refusedPendingHandshakes"])
        yield counter("deskpush_refused_auth_throttled",
                      "Authentication attempts refused unchecked (429, 4429) over auth.failedAuthLimit",
                      s["refusedAuthThrottled"])

        # Cluster mode (0 in embedded mode).
        yield gauge("deskpush_cluster_redis_up", "Cluster mode: 1 while this node reaches Redis, else 0 "
                    "(embedded mode: 0)", s["clusterRedisUp"])
        yield gauge("deskpush_cluster_buffered_events", "Cluster mode: events waiting in this node for Redis",
                    s["clusterBuffered"])
        yield counter("deskpush_cluster_applied_entries", "Cluster mode: log entries this node's replica applied",
                      s["clusterApplied"])


#: Every key of ``DeskpushServer.statistics()`` the collector exports (a test holds them equal).
EXPORTED_STATISTICS = frozenset({
    "agents", "agentSessions", "integrators", "live", "displayed", "outcomes", "offers", "remembered", "history",
    "timers", "connections", "refusedOutOfFds", "acceptPauses", "openFilesLimit", "pendingHandshakes",
    "refusedPendingHandshakes", "refusedAuthThrottled", "clusterRedisUp", "clusterBuffered", "clusterApplied",
})


def registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own (not prometheus-client's global one): deskpush's metrics and the process's."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    ProcessCollector(registry=reg)  # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds...
    return reg


def render(reg: CollectorRegistry, request: Request) -> Response:
    """``GET /metrics``: the text exposition format, or OpenMetrics when the scraper asks for it."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return response(HTTPStatus.OK, encoder(reg), content_type, [("Cache-Control", "no-store")])


# --------------------------------------------------------------------------
# server.metricsPort


class MetricsPort:
    """``GET /metrics`` on a port of its own, without a key; 404 for any other path.

    A ``connection.Handler`` for plain-HTTP connections: each is answered
    once and closes, as on the main port.
    """

    def __init__(self, reg: CollectorRegistry, options: ConnectionOptions) -> None:
        self.registry = reg
        self.options = options
        self.port = 0
        self._listener = None
        self._connections: set[Connection] = set()

    async def start(self, host: str, port: int, backlog: int = 128) -> None:
        from .connection import Connection
        from .listener import Listener, bind

        loop = asyncio.get_running_loop()

        def connection() -> Connection:
            conn = Connection(self, self.options, loop)
            self._connections.add(conn)
            return conn

        self._listener = Listener(await bind(host, port, backlog), connection, backlog=backlog)
        self.port = self._listener.port
        self._listener.start()
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, self.port)

    async def close(self) -> None:
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        listener.close()
        await listener.wait_closed()
        for conn in list(self._connections):
            conn.abort()

    def respond(self, conn: Connection, request: Request) -> Response | None:
        if request.path.partition("?")[0] == "/metrics":
            return render(self.registry, request)
        return plain(HTTPStatus.NOT_FOUND, "Not Found\n")

    def open(self, conn: Connection) -> object:  # pragma: no cover - respond() always answers
        raise AssertionError("the metrics port opens no WebSocket")

    def closed(self, conn: Connection) -> None:
        self._connections.discard(conn)
