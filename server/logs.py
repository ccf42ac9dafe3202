"""Logging that stays off the hot path.

One outcome is one INFO line, and at thousands of outcomes per second a line
must cost little. ``TickHandler`` formats each record where it is logged but
writes nothing there: lines collect in a list and are written with one
``write`` when the event loop next gets round to it, so a burst of outcomes
costs one system call, and no second thread competes with the event loop for
the interpreter lock (which is what a QueueHandler/QueueListener pair does).
Outside a running loop (start-up, shutdown) it writes at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TextIO

__all__ = ["TickHandler", "setup"]

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _Formatter(logging.Formatter):
    """The stock format, with the date and time rendered once per second."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = super().formatTime(record, datefmt).rpartition(",")[0]
        return f"{self._stamp},{int(record.msecs):03d}"


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


def setup(level: str, stream: TextIO | None = None) -> TickHandler:
    """Route every logger through one ``TickHandler`` at ``level``."""
    # What the logging HOWTO's "Optimization" section lists: no caller lookup,
    # thread or process names per record; the lines do not show them.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TickHandler(stream)
    handler.setFormatter(_Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at INFO; keep those for DEBUG.
    if root.level > logging.DEBUG:
        logging.getLogger("websockets").setLevel(logging.WARNING)
    return handler
