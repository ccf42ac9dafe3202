"""Time for the server: the engine's ``now`` and the one timer, behind one small interface.

The engine counts time in epoch milliseconds. ``LoopClock`` derives them from
the event loop's monotonic clock, anchored to the wall clock once at start,
so a wall-clock jump never fires or stalls a deadline; it schedules callbacks
on the loop. Tests hand the dispatcher a fake clock with the same methods and
move time themselves, so no test waits for a deadline or measures lateness.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "Cancellable", "LoopClock"]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What the dispatcher needs of time."""

    def now(self) -> float:
        """Epoch milliseconds."""

    def call_at(self, when: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` once ``now()`` reaches ``when`` (epoch ms)."""

    def call_soon(self, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` after what is running now, before waiting for I/O."""

    def spent(self) -> float:
        """Seconds of a monotonic clock, for budgets of work (only differences count)."""


class LoopClock:
    """A ``Clock`` on an asyncio (or uvloop) event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._mono0 = loop.time()
        self._epoch0 = time.time() * 1000.0

    def now(self) -> float:
        return self._epoch0 + (self.loop.time() - self._mono0) * 1000.0

    def call_at(self, when: float, callback: Callable[[], None]) -> Cancellable:
        return self.loop.call_at(self._mono0 + (when - self._epoch0) / 1000.0, self._settled, callback)

    def call_soon(self, callback: Callable[[], None]) -> Cancellable:
        return self.loop.call_soon(self._settled, callback)

    spent = staticmethod(time.perf_counter)

    def _settled(self, callback: Callable[[], None]) -> None:
        callback()
        # uvloop (libuv) works out how long to sleep from a clock it caches at
        # the start of each loop iteration, and reading the loop's time is
        # what refreshes it. Without this, after a long callback (ending a
        # burst of deadlines, a flush to thousands of desktops) the next
        # deadline fires late by that callback's length.
        self.loop.time()
