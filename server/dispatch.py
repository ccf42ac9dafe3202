"""From engine effects to writes, and the one timer.

The ``Dispatcher`` owns what happens between the engine and the sockets:

* ``apply(effects)``: each ``Send`` is encoded and framed once, whatever the
  number of its targets, and queued on each target connection; each
  ``Ended`` goes to the outcome log; each ``Close`` closes its connections
  (after what was queued on them). Connections are written at the end of
  the loop iteration (``flush``), once each, with everything they got in it;
  one that collects ``write_at`` frames first is written at once.
* The one timer: a single callback armed at the engine's ``next_deadline()``;
  there is no timer per notification. It ends what is due in chunks of
  ``timer_chunk`` for up to ``timer_budget`` seconds, then lets I/O in and
  carries on at the next turn. Ending many deadlines per turn is what makes a
  burst cheap: each desktop gets all its frames of the turn in one write.
* Writes and deadlines take turns: a flush to thousands of connections stops
  every ``flush_slice`` writes to end what fell due meanwhile, and writes the
  connections that got frames from it (an integrator's results) first.

Everything runs on the event loop thread and never awaits in between, so the
engine needs no lock. The clock is injected (``server.clock``): tests drive
all of this with a fake one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from ..protocol import Close, Ended, Engine, Send
from ..protocol import frames as f
from .clock import Cancellable, Clock
from .connection import text_frame
from .metrics import Counts

__all__ = ["Dispatcher", "Target"]

log = logging.getLogger("deskpush")


class Target(Protocol):
    """A connection, as the dispatcher writes to it (``server.connection.Connection``)."""

    def queue_frame(self, frame: bytes) -> int: ...

    def flush(self) -> None: ...

    def close(self, code: int, reason: str = "") -> None: ...


class Dispatcher:
    """Applies engine effects and runs the engine's deadlines. See the module docstring."""

    def __init__(
        self,
        engine: Engine,
        clock: Clock,
        *,
        log_outcome: Callable[[Ended], None] | None = None,
        timer_chunk: int = 500,
        timer_budget: float = 0.1,
        write_at: int = 64,
        flush_slice: int = 256,
        counts: Counts | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.log_outcome = log_outcome
        self.timer_chunk = timer_chunk
        #: Seconds of ending deadlines per timer callback, or per flush, before
        #: I/O gets a turn. Only a burst of thousands due at once reaches it;
        #: the longer a run, the more of each connection's frames share one
        #: write (bench/RESULTS.md has how it was chosen).
        self.timer_budget = timer_budget
        self.write_at = write_at
        self.flush_slice = flush_slice
        self._dirty: dict[Target, None] = {}
        self._flush_handle: Cancellable | None = None
        self._timer: Cancellable | None = None
        self._armed: float | None = None
        self._debug = log.isEnabledFor(logging.DEBUG)
        #: Where frames sent, errors, outcomes and timer lateness are counted
        #: for the metrics (``server.metrics``); None: not counted.
        self.counts = counts

    def close(self) -> None:
        """Cancel the timer; nothing is ended or written any more."""
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._flush_handle = None
        self._armed = None
        self._dirty.clear()

    # ------------------------------------------------------------------
    # Effects

    def apply(self, effects: Iterable[Send | Ended | Close]) -> None:
        """Queue every frame of ``effects`` on its targets, log every outcome, close what is to close."""
        encode = f.ENCODER.encode
        dirty = self._dirty
        write_at = self.write_at
        log_outcome = self.log_outcome
        counts = self.counts
        sent = counts.sent if counts is not None else None
        for effect in effects:
            if type(effect) is Send:
                frame = text_frame(encode(effect.frame))
                if sent is not None:
                    try:
                        sent[type(effect.frame)] += len(effect.targets)
                    except KeyError:  # an error frame: by code too (a try costs nothing until it raises)
                        counts.error(effect.frame, len(effect.targets))
                for conn in effect.targets:
                    if conn.queue_frame(frame) >= write_at:
                        # A full batch (an integrator's results during a burst
                        # of outcomes): written now, not at the end of a long turn.
                        conn.flush()
                    dirty[conn] = None
                if self._debug:
                    log.debug("send %s to %d", encode(effect.frame)[:200].decode(errors="replace"),
                              len(effect.targets))
            elif type(effect) is Ended:
                if counts is not None:
                    counts.ended(effect)
                if log_outcome is not None:
                    log_outcome(effect)
            else:  # Close: what was queued on them goes first
                code, reason = effect.closing
                for conn in effect.targets:
                    conn.close(code, reason)
                    dirty.pop(conn, None)
                log.debug("closed %d connection(s) with %d (%s)", len(effect.targets), code, reason)
        if dirty and self._flush_handle is None:
            self._flush_handle = self.clock.call_soon(self._flush)
        self._rearm()

    def _flush(self) -> None:
        """Write every connection that has frames queued, ending due deadlines between slices."""
        pending = list(self._dirty)
        self._dirty = {}
        budget = self.timer_budget
        clock = self.clock
        i = 0
        try:
            while i < len(pending):
                pending[i].flush()
                i += 1
                if i % self.flush_slice or budget <= 0:
                    continue
                floor = self.engine.deadline_floor()
                now = clock.now()
                if floor is None or floor > now:
                    continue
                started = clock.spent()
                self._end_due(now, budget)
                budget -= clock.spent() - started
                fresh = self._dirty
                if fresh:
                    # What the deadlines gave frames to goes first.
                    self._dirty = {}
                    pending = [*fresh, *(c for c in pending[i:] if c not in fresh)]
                    i = 0
        finally:
            # apply() queues frames meanwhile but schedules no flush until
            # here. (Whatever is left after a bug in a write goes next turn.)
            self._dirty.update(dict.fromkeys(pending[i:]))
            self._flush_handle = None
            if self._dirty:
                self._flush_handle = clock.call_soon(self._flush)

    # ------------------------------------------------------------------
    # The one timer

    def _rearm(self) -> None:
        armed = self._armed
        if armed is not None:
            # The usual case, in O(1): nothing earlier than the armed timer
            # was added (deadlines mostly grow), so the timer can stay.
            floor = self.engine.deadline_floor()
            if floor is None or floor >= armed:
                return
        deadline = self.engine.next_deadline()
        # A timer armed no later than the next deadline can stay: if it
        # fires first, it finds nothing due and re-arms. Most outcomes move
        # the next deadline later, so this saves a cancel and a re-arm each.
        if armed is not None and (deadline is None or armed <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = deadline
        if deadline is not None:
            self._timer = self.clock.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._armed
        self._armed = None
        # A timer may fire a hair early; the deadline it was armed for is due.
        now = self.clock.now()
        if deadline is not None:
            if deadline > now:
                now = deadline
            elif self.counts is not None:
                self.counts.lateness.observe((now - deadline) / 1000.0)
        self._end_due(now, self.timer_budget)

    def _end_due(self, now: float, budget: float) -> None:
        """End what is due at ``now``, chunk by chunk, for up to ``budget`` seconds.

        What is left stays due; the timer, re-armed in the past, carries on
        at the next turn of the loop, after I/O.
        """
        engine = self.engine
        spent = self.clock.spent
        stop = spent() + budget
        while True:
            self.apply(engine.handle_timer(now, limit=self.timer_chunk))
            due = engine.next_deadline()
            if due is None or due > now or spent() >= stop:
                break
