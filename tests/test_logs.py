"""Outcome lines are batched per event-loop tick and never lost."""

import asyncio
import io
import logging
import time

from deskpush.server import DeskpushServer, logs
from deskpush.server.logs import FORMAT, LineFormatter, TickHandler, direct_writer

from .conftest import API_KEY, SECRET, make_config, open_agent, open_integrator, recv_json, send_json


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


def _tick_logger(name: str, stream: io.StringIO) -> tuple[logging.Logger, TickHandler]:
    handler = TickHandler(stream)
    handler.setFormatter(LineFormatter(FORMAT))
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log, handler


def test_direct_writer_writes_what_logging_would(monkeypatch):
    stream = io.StringIO()
    log, handler = _tick_logger("deskpush.test.direct", stream)
    created = 1_790_000_000.0421
    monkeypatch.setattr(logs.time, "time", lambda: created)
    write = direct_writer(log, logging.INFO)
    assert write is not None
    write("outcome notificationId=n1 actionName=Accept")
    record = logging.makeLogRecord({
        "name": log.name, "levelno": logging.INFO, "levelname": "INFO",
        "msg": "outcome notificationId=n1 actionName=Accept", "created": created, "msecs": 42.0,
    })
    assert stream.getvalue() == handler.format(record) + "\n"
    assert stream.getvalue().startswith(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + ",042 INFO ")


def test_direct_writer_steps_aside_when_it_would_change_the_output():
    stream = io.StringIO()
    log, handler = _tick_logger("deskpush.test.aside", stream)
    assert direct_writer(log, logging.DEBUG) is None  # not enabled: nothing to write
    log.addFilter(lambda record: True)
    assert direct_writer(log, logging.INFO) is None  # a filter must see every record
    log.filters.clear()
    log.addHandler(logging.StreamHandler(io.StringIO()))
    assert direct_writer(log, logging.INFO) is None  # another handler must get it too
    log.handlers[:] = [handler]
    handler.setFormatter(logging.Formatter("%(message)s"))
    assert direct_writer(log, logging.INFO) is None  # a different format
    handler.setFormatter(LineFormatter(FORMAT))
    assert direct_writer(log, logging.INFO) is not None


async def test_outcome_lines_reach_ordinary_logging_handlers(caplog):
    """Embedded in another program (here pytest's capture), outcomes go through logging."""
    caplog.set_level(logging.INFO, logger="deskpush.outcome")  # before the start, which decides how to log
    async with DeskpushServer(make_config(), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as server:
        agent, _ = await open_agent(server)
        ig = await open_integrator(server)
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "correlationId": "c-9",
                             "input": {"templateName": "msdyn_chat_incoming_unauthenticated"}})
        card = (await recv_json(agent))
        await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Reject"})
        while (await recv_json(ig))["type"] != "result":
            pass
    (record,) = [r for r in caplog.records if r.name == "deskpush.outcome"]
    assert record.levelno == logging.INFO
    assert f"notificationId={card['notificationId']} agentId=agent-7 correlationId=c-9 integrator=crm" in record.message
    assert "actionName=Reject responseReason=DeclinedByAgent delivered=True" in record.message


async def test_direct_lines_carry_their_own_millisecond(monkeypatch):
    """Within one loop turn too (a timer run can last 100 ms): the stamp is per millisecond."""
    stream = io.StringIO()
    log, _ = _tick_logger("deskpush.test.turn", stream)
    clock = iter([1_790_000_000.0015, 1_790_000_000.0018, 1_790_000_000.0025, 1_790_000_000.0905])
    monkeypatch.setattr(logs.time, "time", lambda: next(clock))
    write = direct_writer(log, logging.INFO)
    for message in "abcd":
        write(message)
    await asyncio.sleep(0)  # the turn ends: lines written
    stamps = [line.split(" INFO ")[0][-3:] for line in stream.getvalue().splitlines()]
    assert stamps == ["001", "001", "002", "090"]
