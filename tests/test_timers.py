"""protocol.timers.Timers on its own: order, stale entries, limits, and adding while a run is under way."""

from __future__ import annotations

from deskpush.protocol.timers import Timers


class Entry:
    """An entry that stands until ``stale`` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stale = False

    def __repr__(self) -> str:
        return self.name


def stands(when: float, entry: Entry) -> bool:
    return not entry.stale


def names(entries) -> list[str]:
    return [e.name for e in entries]


def test_earliest_deadline_first_then_in_the_order_added():
    timers: Timers[Entry] = Timers(stands)
    for when, name in [(20.0, "b1"), (10.0, "a1"), (20.0, "b2"), (10.0, "a2"), (30.0, "c")]:
        timers.add(when, Entry(name))
    assert timers.size == 5 and timers.earliest() == 10.0 and timers.next_deadline() == 10.0
    assert names(timers.pop_due(20.0)) == ["a1", "a2", "b1", "b2"]
    assert timers.size == 1 and timers.next_deadline() == 30.0
    assert names(timers.pop_due(29.0)) == []
    assert names(timers.pop_due(30.0)) == ["c"]
    assert timers.size == 0 and timers.earliest() is None and timers.next_deadline() is None


def test_stale_entries_are_skipped_and_dropped_by_next_deadline():
    timers: Timers[Entry] = Timers(stands)
    early, late = Entry("early"), Entry("late")
    timers.add(10.0, early)
    timers.add(20.0, late)
    early.stale = True
    assert timers.earliest() == 10.0  # O(1): may be a stale entry's
    assert timers.next_deadline() == 20.0  # drops the stale one in front
    assert timers.earliest() == 20.0 and timers.size == 1


def test_a_limit_counts_stale_entries_and_leaves_the_rest_due():
    timers: Timers[Entry] = Timers(stands)
    entries = [Entry(f"e{i}") for i in range(5)]
    for e in entries:
        timers.add(10.0, e)
    entries[1].stale = True
    assert names(timers.pop_due(10.0, limit=3)) == ["e0", "e2"]
    assert timers.size == 2 and timers.next_deadline() == 10.0
    assert names(timers.pop_due(10.0)) == ["e3", "e4"]


def test_an_entry_is_checked_when_it_comes_up_after_the_ones_before_acted():
    timers: Timers[Entry] = Timers(stands)
    first, second = Entry("first"), Entry("second")
    timers.add(10.0, first)
    timers.add(10.0, second)
    seen = []
    for e in timers.pop_due(10.0):
        seen.append(e.name)
        second.stale = True  # acting on the first makes the second stale
    assert seen == ["first"]


def test_entries_added_during_a_run_join_it_only_for_a_deadline_it_reaches():
    timers: Timers[Entry] = Timers(stands)
    timers.add(10.0, Entry("a"))
    seen = []
    for e in timers.pop_due(10.0):
        seen.append(e.name)
        if e.name == "a":
            timers.add(10.0, Entry("same deadline"))
            timers.add(11.0, Entry("later"))
    assert seen == ["a", "same deadline"]
    assert timers.next_deadline() == 11.0 and timers.size == 1


def test_no_sweep_while_a_run_holds_the_groups():
    timers: Timers[Entry] = Timers(stands)
    entries = [Entry(f"e{i}") for i in range(4)]
    for i, e in enumerate(entries):
        timers.add(10.0 + i, e)
    seen = []
    for e in timers.pop_due(20.0):
        seen.append(e.name)
        entries[3].stale = True
        timers.sweep()  # does nothing: the run holds the groups
    assert seen == ["e0", "e1", "e2"]
    assert timers.size == 0 and timers.next_deadline() is None


def test_sweep_drops_every_stale_entry_and_keeps_the_order():
    timers: Timers[Entry] = Timers(stands)
    entries = [Entry(f"e{i}") for i in range(6)]
    for i, e in enumerate(entries):
        timers.add(float(10 * (i % 3)), e)  # deadlines 0, 10, 20, 0, 10, 20
    for i in (0, 1, 4):
        entries[i].stale = True
    timers.sweep()
    assert timers.size == 3 and timers.earliest() == 0.0
    assert names(timers.pop_due(100.0)) == ["e3", "e2", "e5"]
