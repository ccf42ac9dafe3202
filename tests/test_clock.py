"""server.clock.LoopClock: the engine's time on a real event loop.

Everything that depends on time is tested with a fake clock
(tests/test_dispatch.py). What only the real loop can show is tested here:
that the clock's epoch milliseconds follow the loop, and that a deadline
after a long callback is not late on uvloop, the loop the CLI runs.
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from deskpush.server.clock import LoopClock


async def test_now_is_epoch_milliseconds_that_follow_the_loop():
    clock = LoopClock(asyncio.get_running_loop())
    first = clock.now()
    assert abs(first - time.time() * 1000) < 1000
    await asyncio.sleep(0.05)
    assert clock.now() - first >= 45


def test_a_long_callback_does_not_make_the_next_deadline_late():
    """uvloop (libuv) works out how long to sleep from a clock it read at the
    start of the loop iteration; unless LoopClock refreshes it after its
    callbacks, a 0.3 s callback (thousands of writes on a slow machine) makes
    the next deadline 0.3 s late. Without the refresh this measured 300 ms.
    """

    async def main() -> float:
        clock = LoopClock(asyncio.get_running_loop())
        fired = asyncio.get_running_loop().create_future()
        deadline = clock.now() + 100
        clock.call_soon(lambda: time.sleep(0.3))  # stands in for a long flush
        clock.call_at(deadline + 300, lambda: fired.set_result(clock.now()))
        return await fired - (deadline + 300)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        late = runner.run(main())
    assert late < 150, f"the deadline fired {late:.0f} ms late"
