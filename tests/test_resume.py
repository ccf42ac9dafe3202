"""Protocol v1.1 in the engine: outcome ids, the history, resume, ack, idempotent requests.

Driven directly with a fake clock (``engine_helpers.Harness``). The last test
is a property over random cut points: a client written the way the SDKs are
(remember the last outcomeId, resume, resend what is unanswered) gets exactly
one outcome per request, whatever is lost in flight.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deskpush.protocol import frames as f
from deskpush.protocol.engine import (
    ACCEPTED,
    CANCELLED,
    DECLINED,
    DISPLAY_TIMEOUT,
    Ended,
    Engine,
    Limits,
    Send,
    Snapshot,
)
from deskpush.protocol.templates import Template

from .engine_helpers import OUTCOME_ID, T0, Harness, ended, notify_frame, sent_to, wire


def setup(limits: Limits = Limits(display_limit=5), resume: str | None = "$") -> Harness:
    """Agent a1 on session s1; connection i1 of integrator k1, resuming from now."""
    h = Harness(limits)
    h.connect("s1", "a1")
    h.integrator("i1", "k1", resume)
    return h


def offer(h: Harness, rid: str, conn: str = "i1", agent: str = "a1", **kw) -> str:
    out = h.notify(conn, rid, agent, **kw)
    [status] = [s for s in sent_to(out, conn, f.Status) if s.state == "queued"]
    return status.notification_id


def resumed(effects) -> f.Resumed:
    [frame] = [e.frame for e in effects if isinstance(e, Send) and isinstance(e.frame, f.Resumed)]
    return frame


def replayed(effects, conn: str) -> list[tuple[str, str, str]]:
    return [(r.request_id, r.value.response_reason, r.outcome_id) for r in sent_to(effects, conn, f.Result)]


# ---------------------------------------------------------------------------
# outcomeId


def test_outcome_ids_sort_in_the_order_outcomes_happened():
    h = setup()
    ids = [offer(h, f"r{i}") for i in range(5)]
    got = []
    for nid in ids[:3]:
        got += sent_to(h.respond("s1", nid, "Accept"), "i1", f.Result)
    h.now += 1.5
    got += sent_to(h.respond("s1", ids[3], "Reject"), "i1", f.Result)
    got += sent_to(h.respond("s1", ids[4], "Reject"), "i1", f.Result)
    outcome_ids = [r.outcome_id for r in got]
    assert outcome_ids == [OUTCOME_ID] * 5
    assert outcome_ids == sorted(outcome_ids) and len(set(outcome_ids)) == 5
    assert outcome_ids[0] == f"{int(T0)}-000001"  # the history started at T0-000000
    assert outcome_ids[3] == f"{int(T0 + 1.5)}-000000"
    assert h.engine.last_outcome_id() == outcome_ids[-1]


def test_outcome_ids_keep_growing_when_the_clock_steps_back_or_a_millisecond_is_full():
    from deskpush.protocol.engine import OutcomeClock

    ids = OutcomeClock(1000, 999_998)
    assert [ids.next(1000.0), ids.next(1000.0), ids.next(900.0)] == [
        "0000000001000-999999", "0000000001001-000000", "0000000001001-000001"]


def test_a_cancel_answer_carries_no_outcome_id():
    h = setup()
    offer(h, "r1", token="T")
    out = h.cancel("i1", "c1", "T")
    assert [wire(r) for r in sent_to(out, "i1", f.Result)] == [
        {"type": "result", "requestId": "r1", "value": {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"},
         "outcomeId": OUTCOME_ID},
        {"type": "result", "requestId": "c1",
         "value": {"cancellationToken": "T", "actionName": "Cancel", "responseReason": "CancelledByIntegrator"}},
    ]


# ---------------------------------------------------------------------------
# Resume


def test_resume_now_replays_nothing_and_gives_a_position():
    h = Harness()
    out = h.integrator("i1", "k1", "$")
    assert [wire(e.frame) for e in out] == [
        {"type": "resumed", "count": 0, "complete": True, "lastOutcomeId": f"{int(T0)}-000000"}]


def test_a_v1_connection_gets_no_resumed_frame():
    h = Harness()
    assert h.integrator("i1", "k1") == []


def test_outcomes_that_ended_while_away_are_replayed_in_order_then_resumed():
    h = setup()
    a, b, c = offer(h, "r1"), offer(h, "r2"), offer(h, "r3")
    first = sent_to(h.respond("s1", a, "Accept"), "i1", f.Result)[0]
    h.integrator_gone("i1")  # cut
    h.now += 10
    h.respond("s1", c, "Reject")
    h.respond("s1", b, "Accept")
    out = h.integrator("i2", "k1", first.outcome_id)
    assert replayed(out, "i2") == [("r3", "DeclinedByAgent", OUTCOME_ID), ("r2", "Accept", OUTCOME_ID)]
    last = replayed(out, "i2")[-1][2]
    assert wire(out[-1].frame) == {"type": "resumed", "count": 2, "complete": True, "lastOutcomeId": last}
    # Nothing after it: resuming again from there replays nothing.
    out = h.integrator("i3", "k1", last)
    assert replayed(out, "i3") == [] and resumed(out).complete


def test_resume_runs_due_deadlines_first_so_they_are_replayed_once():
    h = setup(Limits(display_limit=5))
    offer(h, "r1")
    h.integrator_gone("i1")
    h.now += 121_000  # past the display timeout; the caller's timer has not run yet
    out = h.integrator("i2", "k1", f"{int(T0)}-000000")
    assert replayed(out, "i2") == [("r1", "DisplayTimeout", OUTCOME_ID)]
    assert [type(e.frame) for e in out if isinstance(e, Send) and "i2" in e.targets] == [f.Result, f.Resumed]


def test_resume_older_than_what_is_kept_says_incomplete():
    h = setup(Limits(display_limit=5, outcome_history=2))
    ids = [offer(h, f"r{i}") for i in range(4)]
    h.integrator_gone("i1")
    for nid in ids:
        h.respond("s1", nid, "Reject")
    out = h.integrator("i2", "k1", f"{int(T0)}-000000")
    assert [r[0] for r in replayed(out, "i2")] == ["r2", "r3"]  # what is kept is still sent
    r = resumed(out)
    assert (r.count, r.complete) == (2, False)
    assert "were forgotten" in r.details and "limits.outcomeHistory" in r.details


def test_retention_by_age():
    h = setup(Limits(display_limit=5, outcome_retention=60))
    nid = offer(h, "r1")
    h.respond("s1", nid, "Accept")
    h.integrator_gone("i1")
    h.now += 61_000
    out = h.integrator("i2", "k1", f"{int(T0)}-000000")
    assert replayed(out, "i2") == [] and not resumed(out).complete
    assert h.engine.history("k1") == []


def test_resume_point_before_the_history_began_or_after_the_last_id():
    h = setup()
    out = h.integrator("i2", "k1", f"{int(T0) - 5000}-000000")  # e.g. from a process before a restart
    r = resumed(out)
    assert not r.complete and "history starts at" in r.details and "stateFile" in r.details
    out = h.integrator("i3", "k1", f"{int(T0) + 5000}-000000")
    r = resumed(out)
    assert not r.complete and "newer than any outcome" in r.details


def test_ack_forgets_early_and_a_resume_before_it_is_incomplete():
    h = setup()
    a, b = offer(h, "r1"), offer(h, "r2")
    ra = sent_to(h.respond("s1", a, "Accept"), "i1", f.Result)[0]
    rb = sent_to(h.respond("s1", b, "Accept"), "i1", f.Result)[0]
    assert h.ack("i1", ra.outcome_id) == []
    assert [r.request_id for r in h.engine.history("k1")] == ["r2"]
    out = h.integrator("i2", "k1", ra.outcome_id)
    assert replayed(out, "i2") == [("r2", "Accept", rb.outcome_id)] and resumed(out).complete
    out = h.integrator("i3", "k1", f"{int(T0)}-000000")
    assert not resumed(out).complete


def test_a_malformed_resume_point_or_ack_does_not_decode():
    import msgspec

    for bad in ('{"type":"hello","apiKey":"k","resumeAfter":"12"}',
                '{"type":"ack","outcomeId":"$"}', '{"type":"ack"}'):
        with pytest.raises(msgspec.ValidationError):
            f.INTEGRATOR_DECODER.decode(bad)


# ---------------------------------------------------------------------------
# Who gets a result


def test_result_goes_to_the_asker_if_open_else_to_every_resuming_connection():
    h = setup()
    h.integrator("i2", "k1", "$")  # another resuming connection of the key
    h.integrator("v1", "k1")  # a v1 connection of the key
    a, b = offer(h, "r1"), offer(h, "r2")
    out = h.respond("s1", a, "Accept")
    assert [e.targets for e in out if isinstance(e, Send) and isinstance(e.frame, f.Result)] == [("i1",)]
    h.integrator_gone("i1")
    out = h.respond("s1", b, "Accept")
    assert [e.targets for e in out if isinstance(e, Send) and isinstance(e.frame, f.Result)] == [("i2",)]
    assert [e.delivered for e in ended(out)] == [True]


# ---------------------------------------------------------------------------
# Idempotent requests


def test_notify_retried_while_pending_answers_status_and_moves_the_result():
    h = setup()
    nid = offer(h, "r1", token="T")
    h.integrator_gone("i1")
    h.integrator("i2", "k1", "$")
    out = h.notify("i2", "r1", "a1", token="T")
    assert [wire(x) for x in sent_to(out, "i2")] == [
        {"type": "status", "requestId": "r1", "notificationId": nid, "cancellationToken": "T", "state": "displayed"}]
    assert sent_to(out, "s1") == [] and h.engine.displayed("a1") == [nid]  # no second offer
    out = h.respond("s1", nid, "Accept")
    assert [(r.request_id, e.targets) for e in out if isinstance(e, Send)
            for r in [e.frame] if isinstance(r, f.Result)] == [("r1", ("i2",))]


def test_notify_retried_after_it_ended_gets_the_same_result():
    h = setup()
    nid = offer(h, "r1")
    [first] = sent_to(h.respond("s1", nid, "Reject"), "i1", f.Result)
    out = h.notify("i1", "r1", "a1")
    assert sent_to(out, "i1") == [first] and sent_to(out, "s1") == [] and ended(out) == []


def test_notify_retried_for_another_agent_is_refused():
    h = setup()
    offer(h, "r1")
    out = h.notify("i1", "r1", "a2")
    [err] = sent_to(out, "i1", f.IntegratorError)
    assert err.error.message == "RejectAfterClientError" and "already used for agent 'a1'" in err.error.details


def test_a_v1_connection_keeps_v1_behaviour_for_a_repeated_request_id():
    h = setup(resume=None)
    a = offer(h, "r1")
    b = offer(h, "r1")
    assert a != b and h.engine.displayed("a1") == [a, b]


def test_cancel_retried_gets_the_same_answer():
    h = setup()
    offer(h, "r1", token="T")
    first = sent_to(h.cancel("i1", "c1", "T"), "i1", f.Result)[-1]
    again = sent_to(h.cancel("i1", "c1", "T"), "i1", f.Result)
    assert again == [first]


def test_request_ids_are_forgotten_with_their_outcome():
    h = setup(Limits(display_limit=5, outcome_history=1))
    a = offer(h, "r1")
    h.respond("s1", a, "Accept")
    b = offer(h, "r2")
    h.respond("s1", b, "Accept")  # r1's outcome is forgotten, and so is r1
    c = offer(h, "r1")
    assert c not in (a, b)


# ---------------------------------------------------------------------------
# Across a restart (stateFile)


def test_history_and_pending_requests_survive_a_snapshot():
    h = setup()
    a, b = offer(h, "r1"), offer(h, "r2", token="T")
    [ra] = sent_to(h.respond("s1", a, "Accept"), "i1", f.Result)
    h.integrator_gone("i1")
    h.now += 5
    import msgspec

    data = msgspec.json.encode(h.engine.snapshot(h.now))
    later = Harness(Limits(display_limit=5), now=h.now + 1000)
    later.engine.restore(msgspec.json.decode(data, type=Snapshot), later.now)
    later.connect("s1", "a1")
    # The history came back: resuming from before r1 replays it with the same id.
    out = later.integrator("i9", "k1", f"{int(T0)}-000000")
    assert replayed(out, "i9") == [("r1", "Accept", ra.outcome_id)] and resumed(out).complete
    # r2 is still pending and known by its requestId: a retry claims it.
    out = later.notify("i9", "r2", "a1", token="T")
    assert [s.state for s in sent_to(out, "i9", f.Status)] == ["displayed"]
    [rb] = sent_to(later.respond("s1", b, "Accept"), "i9", f.Result)
    assert rb.outcome_id > ra.outcome_id


def test_a_version_1_snapshot_starts_a_new_history():
    h = Harness(now=T0 + 1000)
    h.engine.restore(Snapshot(version=1), h.now)
    out = h.integrator("i1", "k1", f"{int(T0)}-000000")
    assert not resumed(out).complete


# ---------------------------------------------------------------------------
# The property: cut anywhere, lose what was in flight, resume: one outcome per request


class Client:
    """An integrator written as the SDKs are, over a lossy link to the engine."""

    def __init__(self, engine: Engine, record) -> None:
        self.engine = engine
        self.record = record  # what the test does with every effect (it then calls deliver)
        self.conn: str | None = None
        self.conns = itertools.count(1)
        self.inbox: list[f.Outbound] = []  # sent by the server, not yet read
        self.last = "$"
        self.pending: dict[str, str] = {}  # requestId -> agent
        self.settled: dict[str, tuple[tuple[str, str], str]] = {}  # requestId -> (outcome, outcomeId)
        self.unknown: set[str] = set()
        self.ready = False

    def deliver(self, effects) -> None:
        for e in effects:
            if isinstance(e, Send) and self.conn in e.targets:
                self.inbox.append(e.frame)

    def read(self, count: int, now: float) -> None:
        for frame in self.inbox[:count]:
            self._handle(frame, now)
        del self.inbox[:count]

    def _handle(self, frame, now: float) -> None:
        if isinstance(frame, f.Result) and frame.outcome_id is not None:
            assert frame.outcome_id > self.last or self.last == "$" or frame.request_id in self.settled
            if frame.request_id in self.settled:
                # A duplicate on the wire: only ever the same outcome, with the same id.
                assert self.settled[frame.request_id] == (
                    (frame.value.action_name, frame.value.response_reason), frame.outcome_id)
            elif frame.request_id in self.pending:
                del self.pending[frame.request_id]
                self.settled[frame.request_id] = (
                    (frame.value.action_name, frame.value.response_reason), frame.outcome_id)
            if self.last == "$" or frame.outcome_id > self.last:
                self.last = frame.outcome_id
        elif isinstance(frame, f.Resumed):
            self.last = max(self.last, frame.last_outcome_id) if self.last != "$" else frame.last_outcome_id
            self.ready = True
            if frame.complete:
                for rid, agent in list(self.pending.items()):
                    self.send(notify_frame(rid, agent, "t", correlation_id=rid), now)
            else:
                self.unknown |= set(self.pending)
                self.pending.clear()

    def connect(self, now: float) -> None:
        self.conn = f"i{next(self.conns)}"
        self.ready = False
        self.inbox.clear()
        self.record(self.engine.integrator_connected(self.conn, "k1", now, self.last))

    def cut(self, now: float) -> None:
        """The TCP connection dies: whatever the server sent and the client did not read is lost."""
        if self.conn is not None:
            self.engine.integrator_disconnected(self.conn, now)
        self.conn = None
        self.inbox.clear()

    def send(self, frame, now: float) -> None:
        if self.conn is not None:
            self.record(self.engine.integrator_frame(self.conn, frame, now))


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("notify"), st.sampled_from(["a1", "a2"]), st.booleans()),
        st.tuples(st.just("notify"), st.sampled_from(["a1", "a2"]), st.just(False)),
        st.tuples(st.just("answer"), st.integers(0, 9), st.sampled_from(["Accept", "Reject"])),
        st.tuples(st.just("read"), st.integers(0, 6)),
        st.tuples(st.just("cut"),),
        st.tuples(st.just("reconnect"),),
        st.tuples(st.just("sleep"), st.sampled_from([10.0, 400.0, 1500.0])),
    ),
    min_size=5,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(steps=_STEPS, seed=st.integers(0, 2**16))
def test_every_request_gets_exactly_one_outcome_whatever_is_cut(steps, seed):
    """Cuts at any point, frames lost in flight either way, agents answering and
    timers firing meanwhile: at the end every request has settled exactly once,
    with the outcome the engine decided, and the agents were offered each once."""
    rng = random.Random(seed)
    engine = Engine({"t": Template(name="t", title="T", timeout=1.0)},
                    Limits(display_limit=3, queue_limit=50, queue_timeout=3.0, presence_grace=60))
    now = T0
    decided: dict[str, tuple[str, str]] = {}  # requestId -> outcome, from Ended
    offers: dict[str, int] = {}  # requestId -> notifications created for it
    notes: dict[str, str] = {}  # notificationId -> requestId
    requests = itertools.count(1)

    def record(effects):
        for e in effects:
            if isinstance(e, Ended):
                assert e.correlation_id not in decided
                decided[e.correlation_id] = e.outcome
            elif isinstance(e.frame, f.Notification) and e.frame.notification_id not in notes:
                notes[e.frame.notification_id] = e.frame.correlation_id
                offers[e.frame.correlation_id] = offers.get(e.frame.correlation_id, 0) + 1
        client.deliver(effects)

    client = Client(engine, record)
    stats["runs"] += 1

    def tick():
        record(engine.handle_timer(now))

    for agent in ("a1", "a2"):  # the session's handle is the agent's id
        record(engine.agent_connected(agent, agent, agent, now))
    client.connect(now)
    client.read(len(client.inbox), now)

    for step in steps:
        tick()
        match step:
            case ("notify", agent, lost):
                rid = f"r{next(requests)}"
                client.pending[rid] = agent  # sent now if it can be, else resent after resuming
                if client.conn is not None and client.ready:
                    if lost:  # the frame dies with its connection, unseen by the server
                        client.cut(now)
                    else:
                        frame = notify_frame(rid, agent, "t", correlation_id=rid)
                        record(engine.integrator_frame(client.conn, frame, now))
            case ("answer", i, action):
                shown = engine.displayed("a1") + engine.displayed("a2")
                if shown:
                    nid = shown[i % len(shown)]
                    agent = "a1" if nid in engine.displayed("a1") else "a2"
                    record(engine.agent_frame(agent, f.Respond(notification_id=nid, action=action), now))
            case ("read", count):
                client.read(count, now)
            case ("cut",):
                client.cut(now)
            case ("reconnect",):
                if client.conn is None:
                    client.connect(now)
                    client.read(rng.randint(0, len(client.inbox)), now)
            case ("sleep", ms):
                now += ms
    # The end: the link heals for good and everything runs out.
    for _ in range(3):
        if client.conn is None or not client.ready:
            client.cut(now)
            client.connect(now)
        client.read(len(client.inbox), now)
        now += 120_000
        tick()
        client.read(len(client.inbox), now)
    assert client.pending == {}
    assert client.unknown == set()  # the history was never short here
    assert {rid: o for rid, (o, _) in client.settled.items()} == decided
    assert all(n == 1 for n in offers.values()), offers
    ids = [oid for _, oid in client.settled.values()]
    assert len(set(ids)) == len(ids)
    stats["requests"] += len(decided)
    stats["resumed"] += next(client.conns) - 2


stats = {"runs": 0, "requests": 0, "resumed": 0}


def test_the_property_exercised_cuts():
    """The property above ran with requests and resumes, not only empty runs."""
    if stats["runs"] == 0:  # run alone
        test_every_request_gets_exactly_one_outcome_whatever_is_cut()
    assert stats["requests"] > 100 and stats["resumed"] > 50, stats


def test_an_offers_duration_counts_from_its_notify_event_across_a_snapshot():
    """The offer-to-outcome time (``Ended.duration``, for the metrics) includes the restart."""
    import msgspec

    h = setup()
    nid = offer(h, "r1")
    h.now += 5000
    data = msgspec.json.encode(h.engine.snapshot(h.now))
    later = Harness(Limits(), now=h.now + 1000)
    later.engine.restore(msgspec.json.decode(data, type=Snapshot), later.now)
    later.connect("s1", "a1")
    later.now += 500
    [e] = [x for x in later.respond("s1", nid, "Accept") if isinstance(x, Ended)]
    assert e.duration == 6500.0
    # A snapshot of an earlier version kept no time: the outcome is not timed.
    old = msgspec.json.decode(data)
    for n in old["notifications"]:
        del n["createdAt"]
    again = Harness(Limits(), now=later.now)
    again.engine.restore(msgspec.convert(old, Snapshot), again.now)
    again.connect("s1", "a1")
    [e] = [x for x in again.respond("s1", nid, "Accept") if isinstance(x, Ended)]
    assert e.duration is None
