"""server.cluster.RedisClock: a node's estimate of Redis's clock, which arms its one timer.

What a user would notice if it drifts: behind Redis, every display timeout,
queue timeout and presence grace ends late by as much; ahead, the node ticks
early and again until Redis's clock gets there. Its inputs are the times in
log entries, so these drive it with entry times as a node sees them, on a
real event loop.
"""

from __future__ import annotations

import asyncio

from deskpush.server.cluster import RedisClock


async def test_entries_read_late_do_not_pull_the_clock_back():
    """An entry was stamped by Redis before the node read it: in a burst, 150 ms before. Taking
    its time for Redis's present made the node's clock lag by that much, and every deadline fire
    that late (timeout storm p99 lateness 213 ms on one node, bench/RESULTS.md)."""
    clock = RedisClock(asyncio.get_running_loop())
    before = clock.now()
    clock.behind(before - 150)
    assert clock.now() >= before


async def test_an_entry_from_further_on_moves_the_clock_forward():
    clock = RedisClock(asyncio.get_running_loop())
    stamped = clock.now() + 40  # Redis had read 40 ms more than this clock says
    clock.behind(stamped)
    assert clock.now() >= stamped


async def test_a_tick_stamped_before_it_was_due_moves_the_clock_back():
    """The node appended a Tick when its clock said ``ours``; Redis stamped it 30 ms earlier
    than that, so the node's clock is at least 30 ms ahead of Redis's."""
    clock = RedisClock(asyncio.get_running_loop())
    ours = clock.now()
    clock.ahead(ours - 30, ours)
    assert clock.offset <= -30
    clock.ahead(ours + 5, ours)  # stamped after: says nothing
    assert clock.offset <= -30
