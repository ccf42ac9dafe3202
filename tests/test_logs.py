"""Outcome lines are batched per event-loop tick and never lost."""

import asyncio
import io
import json
import logging
import re
import time

from deskpush.server import DeskpushServer, logs
from deskpush.server.logs import FORMAT, JsonFormatter, LineFormatter, TickHandler, direct_writer

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


# ---------------------------------------------------------------------------
# --log-format json


def _json_logger(name: str, stream: io.StringIO) -> logging.Logger:
    handler = TickHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


def test_json_lines_are_one_object_each_with_time_level_logger_and_message():
    stream = io.StringIO()
    log = _json_logger("deskpush.test.json", stream)
    log.warning("refused %d connections", 3)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("error handling a message from %s", ("10.0.0.1", 5000))
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first == {"time": first["time"], "level": "WARNING", "logger": "deskpush.test.json",
                     "message": "refused 3 connections"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


async def test_json_outcome_lines_carry_the_outcome_fields_as_keys():
    stream = io.StringIO()
    _json_logger("deskpush.outcome", stream)  # before the start, which decides how to log
    try:
        async with DeskpushServer(make_config(), jwt_secret=SECRET, api_keys={"crm": API_KEY}) as server:
            agent, _ = await open_agent(server)
            ig = await open_integrator(server)
            for rid, correlation in (("r1", "case-42"), ("r2", None)):
                frame = {"type": "notifyEvent", "requestId": rid, "agentId": "agent-7", "progress": False,
                         "input": {"templateName": "msdyn_chat_incoming_unauthenticated"}}
                if correlation:
                    frame["correlationId"] = correlation
                await send_json(ig, frame)
                card = await recv_json(agent)
                while card["type"] != "notification":  # the first one's resolved
                    card = await recv_json(agent)
                await send_json(agent, {"type": "respond", "notificationId": card["notificationId"],
                                        "action": "Accept" if correlation else "Reject"})
                while (await recv_json(ig))["type"] != "result":
                    pass
            await asyncio.sleep(0)
    finally:
        logging.getLogger("deskpush.outcome").handlers.clear()
        logging.getLogger("deskpush.outcome").propagate = True
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [{k: v for k, v in line.items() if k not in ("time", "notificationId")} for line in lines] == [
        {"level": "INFO", "logger": "deskpush.outcome", "message": "outcome", "agentId": "agent-7",
         "correlationId": "case-42", "integrator": "crm", "actionName": "Accept", "responseReason": "Accept",
         "delivered": True},
        {"level": "INFO", "logger": "deskpush.outcome", "message": "outcome", "agentId": "agent-7",
         "correlationId": None, "integrator": "crm", "actionName": "Reject", "responseReason": "DeclinedByAgent",
         "delivered": True},
    ]


async def test_json_outcome_fields_reach_a_json_formatter_through_ordinary_logging():
    """A filter on the way (so no direct path): the record carries the fields all the same."""
    stream = io.StringIO()
    log = _json_logger("deskpush.test.json-filtered", stream)
    log.addFilter(lambda record: True)
    write = logs.outcome_logger(log)
    from deskpush.protocol import Ended
    from deskpush.protocol.vocabulary import ACCEPTED

    write(Ended("n1", "agent-1", "crm", "case-7", ACCEPTED, False, 10.0))
    log.handlers[0].flush()  # the lines of this loop turn
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["message"] == "outcome" and line["correlationId"] == "case-7" and line["delivered"] is False
