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

``--log-format json`` (``setup(..., fmt="json")``) puts a ``JsonFormatter``
on the handler instead: one JSON object per line, with ``time`` (UTC, ISO
8601), ``level``, ``logger`` and ``message``, and for the outcome line its
fields as keys of their own (``notificationId``, ``agentId``,
``correlationId``, ``integrator``, ``actionName``, ``responseReason``,
``delivered``), so a log pipeline can search by correlationId without parsing
text. The outcome line takes the same direct path in JSON.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import msgspec

if TYPE_CHECKING:
    from ..protocol import Ended, Outcome

__all__ = ["FORMAT", "FORMATS", "LineFormatter", "JsonFormatter", "TickHandler", "direct_writer",
           "direct_json_writer", "outcome_logger", "setup"]

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


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, then its ``fields``.

    A record logged with ``extra={"fields": {...}}`` has those as keys of
    their own (and ``extra={"event": ...}`` as its ``message``, the text line's
    fields being keys already). ``time`` is UTC, to the millisecond, rendered
    once per second like ``LineFormatter``'s.
    """

    _second = -1
    _stamp = ""
    _encode = msgspec.json.Encoder().encode

    def stamp(self, created: float) -> str:
        """``created`` as ``2026-11-24T05:54:16.716Z``."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = dt.datetime.fromtimestamp(second, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def line(self, created: float, level: str, logger: str, message: str,
             fields: dict[str, Any] | None = None) -> str:
        obj: dict[str, Any] = {"time": self.stamp(created), "level": level, "logger": logger, "message": message}
        if fields:
            obj.update(fields)
        return self._encode(obj).decode()

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__.get("fields")
        message = record.__dict__.get("event") if fields else None
        line_fields = dict(fields) if fields else {}
        if record.exc_info:
            line_fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line_fields["exception"] = record.exc_text
        return self.line(record.created, record.levelname, record.name,
                         message if message is not None else record.getMessage(), line_fields)


#: The values of ``--log-format``: the formatter each stands for.
FORMATS = {"text": lambda: LineFormatter(FORMAT), "json": JsonFormatter}


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


def _sole_handler(logger: logging.Logger, level: int) -> TickHandler | None:
    """The one ``TickHandler`` every record of ``logger`` at ``level`` reaches, with no filter on the way, or None."""
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
    if type(handler) is not TickHandler or handler.filters or level < handler.level:
        return None
    return handler


def direct_writer(logger: logging.Logger, level: int) -> Callable[[str], None] | None:
    """A function writing ``message`` as ``logger.log(level, message)`` would, or None.

    None when ``logger`` is not enabled for ``level`` (the caller writes
    nothing) or when its records would not go to exactly one ``TickHandler``
    with deskpush's format and no filter (the caller logs the usual way).
    Decided once: call it again after changing the logging configuration.
    """
    handler = _sole_handler(logger, level)
    if handler is None:
        return None
    formatter = handler.formatter
    if type(formatter) is not LineFormatter or formatter.format_string != FORMAT:
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


def direct_json_writer(logger: logging.Logger, level: int) -> Callable[[str, dict[str, Any]], None] | None:
    """Like ``direct_writer`` for a handler with a ``JsonFormatter``: writes ``(message, fields)``, or None."""
    handler = _sole_handler(logger, level)
    if handler is None or type(handler.formatter) is not JsonFormatter:
        return None
    line = handler.formatter.line
    append = handler.append_line
    level_name = logging.getLevelName(level)
    name = logger.name
    clock = time.time

    def write(message: str, fields: dict[str, Any]) -> None:
        append(line(clock(), level_name, name, message, fields))

    return write


def outcome_logger(logger: logging.Logger) -> Callable[[Ended], None] | None:
    """What writes the INFO line of each outcome to ``logger``, or None when INFO is off.

    Decided once, like ``direct_writer``: call it again after changing the
    logging configuration.
    """
    write_json = direct_json_writer(logger, logging.INFO)
    if write_json is not None:
        return lambda e: write_json("outcome", _fields(e))
    write = direct_writer(logger, logging.INFO)
    if write is None and not logger.isEnabledFor(logging.INFO):
        return None
    # The end of the line depends only on the outcome and whether it was delivered.
    tails: dict[tuple[Outcome, bool], str] = {}

    def line(e: Ended) -> str:
        key = (e.outcome, e.delivered)
        tail = tails.get(key)
        if tail is None:
            o = e.outcome
            tail = tails[key] = (f" actionName={o.action_name} responseReason={o.response_reason} "
                                 f"delivered={e.delivered}")
        return (f"outcome notificationId={e.notification_id} agentId={e.agent_id} "
                f"correlationId={e.correlation_id} integrator={e.integrator}{tail}")

    if write is None:
        def log_outcome(e: Ended) -> None:
            # Through logging (a library user's handlers, a filter): a
            # JsonFormatter among them gets the fields as keys too.
            logger.info(line(e), extra={"fields": _fields(e), "event": "outcome"})

        return log_outcome

    def write_outcome(e: Ended) -> None:  # the hot path: one call, as line() inlined
        key = (e.outcome, e.delivered)
        tail = tails.get(key)
        if tail is None:
            return write(line(e))
        write(f"outcome notificationId={e.notification_id} agentId={e.agent_id} "
              f"correlationId={e.correlation_id} integrator={e.integrator}{tail}")

    return write_outcome


def _fields(e: Ended) -> dict[str, Any]:
    """The outcome line's fields, as JSON keys (correlationId null when the integrator gave none)."""
    o = e.outcome
    return {"notificationId": e.notification_id, "agentId": e.agent_id, "correlationId": e.correlation_id,
            "integrator": e.integrator, "actionName": o.action_name, "responseReason": o.response_reason,
            "delivered": e.delivered}


def setup(level: str, stream: TextIO | None = None, fmt: str = "text") -> TickHandler:
    """Route every logger through one ``TickHandler`` at ``level``, as text lines or JSON (``FORMATS``)."""
    # What the logging HOWTO's "Optimization" section lists: no caller lookup,
    # thread or process names per record; the lines do not show them.
    # (_srcfile is the switch that section documents.)
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TickHandler(stream)
    handler.setFormatter(FORMATS[fmt]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at INFO; keep those for DEBUG.
    if root.level > logging.DEBUG:
        logging.getLogger("websockets").setLevel(logging.WARNING)
    return handler
