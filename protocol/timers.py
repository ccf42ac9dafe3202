"""Timers grouped by deadline: what the engine keeps of the times it must act.

``Timers`` holds entries under the time they fall due and hands them back,
earliest deadline first and in the order they were added within one deadline.
Nothing here knows what an entry means: the owner says, through the
``valid(when, entry)`` function it passes in, whether an entry still stands.

Its shape follows from how the engine uses it:

* Deadlines are rounded up to a grid (``timer_resolution``), so thousands of
  entries share one deadline. There is one FIFO per distinct deadline and a
  heap of the distinct deadlines only: adding an entry is an append (plus one
  heap push for a deadline not yet held), taking one out is a ``popleft``.
* Entries are not removed when they stop mattering (a notification that ended
  early leaves its timer behind): removing one from the middle of a FIFO would
  cost a scan. Stale entries are skipped when they surface, and ``sweep()``
  drops them in bulk when the owner finds too many of them held.
* The owner acts on each due entry while ``pop_due`` runs, and acting can add
  entries (the next queued notification is displayed as one times out). An
  entry added for the very deadline being run joins its group and runs in the
  same call; a sweep meanwhile would replace the groups being run, so it waits.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Timers"]

T = TypeVar("T")


class Timers(Generic[T]):
    """Entries of type ``T`` grouped by deadline (a float, in the owner's time unit).

    Args:
        valid: ``valid(when, entry)`` says whether ``entry``, added for
            ``when``, still stands. It is asked before an entry is handed out
            by ``pop_due``, by ``next_deadline`` and by ``sweep``: the one
            place the owner's rule lives.
    """

    __slots__ = ("_groups", "_times", "_valid", "_running", "size")

    def __init__(self, valid: Callable[[float, T], bool]) -> None:
        self._groups: dict[float, deque[T]] = {}
        self._times: list[float] = []  # heap of the keys of _groups
        self._valid = valid
        self._running = False  # pop_due holds groups of _groups: no sweep
        self.size = 0
        """Entries held, stale ones included; while ``pop_due`` runs, also those it took out."""

    def add(self, when: float, entry: T) -> None:
        """Hold ``entry`` until ``when``, after every entry already held for ``when``."""
        group = self._groups.get(when)
        if group is None:
            group = self._groups[when] = deque()
            heapq.heappush(self._times, when)
        group.append(entry)
        self.size += 1

    def earliest(self) -> float | None:
        """The earliest deadline held, in O(1); None when nothing is held.

        It may belong to stale entries only, so it is no later than
        ``next_deadline()``: enough for a caller that only needs to know
        whether its own timer is still early enough.
        """
        times = self._times
        return times[0] if times else None

    def next_deadline(self) -> float | None:
        """The earliest deadline of an entry that still stands, or None.

        Stale entries in front of it are dropped on the way.
        """
        times = self._times
        groups = self._groups
        valid = self._valid
        while times:
            when = times[0]
            group = groups[when]
            while group:
                if valid(when, group[0]):
                    return when
                group.popleft()
                self.size -= 1
            heapq.heappop(times)
            del groups[when]
        return None

    def pop_due(self, now: float, limit: int | None = None) -> Iterator[T]:
        """Take out the entries due at or before ``now`` and yield those that still stand.

        Each entry is checked as it comes up, after the owner has acted on
        the ones before it, since acting on one entry can make a later one
        stale. The owner may add entries meanwhile (see the module
        docstring), but must consume the iterator to the end before
        anything else uses this object.

        Args:
            now: Entries whose deadline is at or before it are due.
            limit: At most this many entries are taken out, stale ones
                included, so a caller can let I/O through between batches;
                ``next_deadline()`` then is still at or before ``now``.
                None: all that are due.
        """
        times = self._times
        groups = self._groups
        valid = self._valid
        budget = -1 if limit is None else limit
        taken = 0
        self._running = True
        try:
            while times and times[0] <= now and budget != 0:
                when = times[0]
                group = groups[when]
                popleft = group.popleft
                # An entry added meanwhile for ``when`` itself (only a
                # zero-length timer can be) joins this group and runs here too.
                while group and budget != 0:
                    budget -= 1
                    entry = popleft()
                    taken += 1
                    if valid(when, entry):
                        yield entry
                if not group:
                    heapq.heappop(times)
                    del groups[when]
        finally:
            self._running = False
            self.size -= taken

    def sweep(self) -> None:
        """Drop every entry that no longer stands, in one pass.

        Does nothing while ``pop_due`` runs, which holds groups that a sweep
        would replace: the owner asks again later (the engine does on the
        next timer it adds).
        """
        if self._running:
            return
        valid = self._valid
        kept: dict[float, deque[T]] = {}
        for when, group in self._groups.items():
            alive = deque(entry for entry in group if valid(when, entry))
            if alive:
                kept[when] = alive
        self._groups = kept
        self._times = list(kept)
        heapq.heapify(self._times)
        self.size = sum(len(group) for group in kept.values())
