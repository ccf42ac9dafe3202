"""Logging that stays off the hot path.

One outcome is one INFO line, and at thousands of outcomes per second a line
must cost little. ``TickHandler`` formats each record where it is logged but
writes nothing there: lines collect in a list and are written with one
``write`` when the event loop next gets round to it, so a burst of outcomes
costs one system call, and no second thread competes with the event loop for
the interpreter lock (which is what a QueueHandler/QueueListener pair does).
Outside a running loop (start-up, shutdown) it writes at once.

The outcome line is the one line per event on the hot path, and building a
``LogRecord`` for it (the clock, the record's dozen attributes, the handler
lock, the formatter) cost more than the engine's work for the outcome.
``direct_writer`` gives the server a way to write such a line straight into
the handler's batch, formatted exactly as the handler would, whenever that
changes nothing: the logger is enabled at that level, and its records would
reach exactly one ``TickHandler`` with no filter on the way. Otherwise (a
library user's own handlers, a filter) the server logs the usual way.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ..protocol import Ended, Outcome

__all__ = ["FORMAT", "LineFormatter", "TickHandler", "direct_writer", "outcome_logger", "setup"]

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class LineFormatter(logging.Formatter):
    """The stock format, with the date and time rendered once per second."""

    _second = -1
    _stamp = ""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self.format_string = fmt

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created)

    def stamp(self, created: float) -> str:
        """``asctime`` for a record created at ``created``, as ``logging`` renders it."""
        second = int(created)
        if second != self._second:
            self._second = second
            ct = self.converter(created)
            self._stamp = time.strftime(self.default_time_format, ct)
        # LogRecord's msecs, without its rounding fix for the last microsecond.
        return f"{self._stamp},{int((created - second) * 1000):03d}"


class TickHandler(logging.Handler):
    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self._lines: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # pragma: no cover - logging's own contract
            self.handleError(record)
            return
        self.append_line(line)

    def append_line(self, line: str) -> None:
        """Add a formatted line to the batch written at the end of the loop iteration."""
        self._lines.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        lines = self._lines
        if not lines:
            return
        self._lines = []
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # closed or broken stream: drop, never crash the server
            pass

    def close(self) -> None:
        self.flush()
        super().close()


def direct_writer(logger: logging.Logger, level: int) -> Callable[[str], None] | None:
    """A function writing ``message`` as ``logger.log(level, message)`` would, or None.

    None when ``logger`` is not enabled for ``level`` (the caller writes
    nothing) or when its records would not go to exactly one ``TickHandler``
    with deskpush's format and no filter (the caller logs the usual way).
    Decided once: call it again after changing the logging configuration.
    """
    if not logger.isEnabledFor(level):
        return None
    handlers: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or node.disabled:
            return None
        handlers.extend(node.handlers)
        if not node.propagate:
            break
        node = node.parent  # type: ignore[assignment]
    if len(handlers) != 1:
        return None
    (handler,) = handlers
    formatter = handler.formatter
    if (type(handler) is not TickHandler or handler.filters or level < handler.level
            or type(formatter) is not LineFormatter or formatter.format_string != FORMAT):
        return None
    prefix = f" {logging.getLevelName(level)} {logger.name} "
    stamp = formatter.stamp
    append = handler.append_line
    clock = time.time

    last_ms = -1
    last = ""

    def write(message: str) -> None:
        # The timestamp is formatted once per millisecond: thousands of
        # outcomes a second share a handful of them.
        nonlocal last_ms, last
        now = clock()
        ms = int(now * 1000)
        if ms != last_ms:
            last_ms, last = ms, stamp(now) + prefix
        append(last + message)

    return write


def outcome_logger(logger: logging.Logger) -> Callable[[Ended], None] | None:
    """What writes the INFO line of each outcome to ``logger``, or None when INFO is off.

    Decided once, like ``direct_writer``: call it again after changing the
    logging configuration.
    """
    write = direct_writer(logger, logging.INFO)
    if write is None and not logger.isEnabledFor(logging.INFO):
        return None
    emit = write if write is not None else logger.info
    # The end of the line depends only on the outcome and whether it was delivered.
    tails: dict[tuple[Outcome, bool], str] = {}

    def log_outcome(e: Ended) -> None:
        key = (e.outcome, e.delivered)
        tail = tails.get(key)
        if tail is None:
            o = e.outcome
            tail = tails[key] = (f" actionName={o.action_name} responseReason={o.response_reason} "
                                 f"delivered={e.delivered}")
        emit(f"outcome notificationId={e.notification_id} agentId={e.agent_id} "
             f"correlationId={e.correlation_id} integrator={e.integrator}{tail}")

    return log_outcome


def setup(level: str, stream: TextIO | None = None) -> TickHandler:
    """Route every logger through one ``TickHandler`` at ``level``."""
    # What the logging HOWTO's "Optimization" section lists: no caller lookup,
    # thread or process names per record; the lines do not show them.
    # (_srcfile is the switch that section documents.)
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TickHandler(stream)
    handler.setFormatter(LineFormatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at INFO; keep those for DEBUG.
    if root.level > logging.DEBUG:
        logging.getLogger("websockets").setLevel(logging.WARNING)
    return handler
