"""Outcome lines are batched per event-loop tick and never lost."""

import asyncio
import io
import logging

from server.logs import TickHandler


class CountingStream(io.StringIO):
    writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


async def test_lines_logged_in_one_tick_are_written_together():
    stream = CountingStream()
    handler = TickHandler(stream)
    log = logging.getLogger("deskpush.test.tick")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for i in range(100):
            log.info("outcome n=%d", i)
        assert stream.getvalue() == ""  # nothing written on the hot path
        await asyncio.sleep(0)
        lines = stream.getvalue().splitlines()
        assert lines == [f"outcome n={i}" for i in range(100)]
        assert stream.writes == 1
    finally:
        log.removeHandler(handler)


def test_outside_a_loop_lines_are_written_at_once():
    stream = CountingStream()
    handler = TickHandler(stream)
    handler.emit(logging.makeLogRecord({"msg": "starting", "levelno": logging.INFO}))
    assert stream.getvalue() == "starting\n"
