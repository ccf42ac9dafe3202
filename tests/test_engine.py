"""The notification engine, driven directly with a fake clock.

Every lifecycle rule of issue 2 ("Lifecycle rules (the engine)"), the races
between agents, integrators and timers, and the exact JSON of the frames that
carry outcomes and errors (the wire contract).
"""

from __future__ import annotations

import pytest

from deskpush.protocol import frames as f
from deskpush.protocol.engine import (
    ACCEPTED,
    AGENT_DISCONNECTED,
    AUTO_ACCEPTED,
    CANCELLED,
    DECLINED,
    DISPLAY_TIMEOUT,
    QUEUE_LIMIT,
    QUEUE_TIME_LIMIT,
    Close,
    Ended,
    Limits,
    Send,
    State,
)
from deskpush.protocol.templates import FieldTemplate, Template
from deskpush.protocol.vocabulary import CLOSE_SESSION_REPLACED

from .engine_helpers import (
    AUTO,
    OUTCOME_ID,
    CHAT,
    CHAT_AUTH,
    T0,
    VOICE,
    Harness,
    ended,
    sent_to,
    sends,
    targets,
    wire,
)


def results(effects, conn):
    return sent_to(effects, conn, f.Result)


def outcome_of_result(frame: f.Result) -> tuple[str, str]:
    return (frame.value.action_name, frame.value.response_reason)


def setup(limits: Limits = Limits(), **kw) -> Harness:
    """Agent a1 on session s1, connection i1 of integrator k1."""
    h = Harness(limits, **kw)
    h.connect("s1", "a1")
    h.integrator("i1", "k1")
    return h


def offer(h: Harness, rid: str, agent: str = "a1", conn: str = "i1", **kw) -> str:
    """notifyEvent that must be accepted; returns the notification id (from its status)."""
    out = h.notify(conn, rid, agent, correlation_id=kw.pop("correlation_id", f"c-{rid}"), **kw)
    errors = sent_to(out, conn, f.IntegratorError)
    assert not errors, errors
    st = [s for s in sent_to(out, conn, f.Status) if s.request_id == rid]
    assert st and st[0].state == "queued"
    return st[0].notification_id


# ---------------------------------------------------------------------------
# The happy path and the wire shape of what it sends


def test_welcome_and_first_notification_wire_shape():
    h = Harness()
    out = h.connect("s1", "a1", "session-1")
    assert [wire(x) for x in sent_to(out, "s1")] == [
        {"type": "welcome", "agentId": "a1", "sessionId": "session-1", "serverTime": int(T0), "displayed": []},
    ]
    assert h.integrator("i1", "k1") == []
    out = h.notify("i1", "r1", "a1", CHAT_AUTH, params={"customerName": "Ada", "queueName": "Billing"},
                   token="tok-1", correlation_id="corr-1")
    # The integrator: status queued, then displayed; no result yet.
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "status", "requestId": "r1", "notificationId": "id1", "cancellationToken": "tok-1",
         "state": "queued"},
        {"type": "status", "requestId": "r1", "notificationId": "id1", "cancellationToken": "tok-1",
         "state": "displayed"},
    ]
    # The agent: the rendered card; empty fields left out.
    assert [wire(x) for x in sent_to(out, "s1")] == [
        {"type": "notification", "notificationId": "id1", "templateName": CHAT_AUTH,
         "title": "New chat request from Ada", "icon": "chat",
         "fields": [{"header": "Customer", "value": "Ada"}, {"header": "Queue", "value": "Billing"}],
         "acceptText": "Accept", "rejectText": "Reject", "showTimeout": True, "autoAccept": False,
         "timeoutSeconds": 120.0, "expiresAt": int(T0) + 120_000, "correlationId": "corr-1"},
    ]
    assert ended(out) == []
    assert targets(out) == {"i1", "s1"}
    assert h.engine.state_of("id1") is State.DISPLAYED
    assert h.engine.displayed("a1") == ["id1"]


def test_cif_example_empty_parameters_accept():
    h = setup()
    out = h.notify("i1", "r1", "a1", CHAT, params={}, token="t1")
    note = sent_to(out, "s1", f.Notification)[0]
    assert note.title == "New chat request" and note.fields == ()
    out = h.respond("s1", note.notification_id, "Accept")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "result", "requestId": "r1", "value": {"actionName": "Accept", "responseReason": "Accept"}, "outcomeId": OUTCOME_ID},
    ]
    assert [wire(x) for x in sent_to(out, "s1")] == [
        {"type": "resolved", "notificationId": note.notification_id, "actionName": "Accept",
         "responseReason": "Accept"},
    ]
    assert ended(out) == [Ended(note.notification_id, "a1", "k1", None, ACCEPTED, True, 0.0)]
    assert h.engine.outcome_of(note.notification_id) == ACCEPTED
    assert h.engine.state_of(note.notification_id) is State.ENDED
    assert h.engine.displayed("a1") == []
    assert h.engine.outcomes == 1
    assert h.engine.offers == 1


def test_reject_is_declined_by_agent():
    h = setup()
    nid = offer(h, "r1")
    out = h.respond("s1", nid, "Reject")
    assert [wire(x) for x in results(out, "i1")] == [
        {"type": "result", "requestId": "r1", "value": {"actionName": "Reject", "responseReason": "DeclinedByAgent"}, "outcomeId": OUTCOME_ID},
    ]
    assert [(r.action_name, r.response_reason) for r in sent_to(out, "s1", f.Resolved)] == [DECLINED]
    assert [e.outcome for e in ended(out)] == [DECLINED]


def test_ended_effect_carries_correlation_id():
    h = setup()
    nid = offer(h, "r1", correlation_id="ticket-42")
    h.now += 2500.0
    out = h.respond("s1", nid, "Accept")
    # duration: milliseconds from the notifyEvent to the outcome (for the metrics).
    assert ended(out) == [Ended(nid, "a1", "k1", "ticket-42", ACCEPTED, True, 2500.0)]


def test_ping_pong_carries_server_time():
    h = setup()
    h.now = T0 + 1234.7
    out = h.agent_frame("s1", f.Ping())
    assert [wire(x) for x in sent_to(out, "s1")] == [
        {"type": "pong", "serverTime": int(T0) + 1234},
    ]
    assert out == [Send(("s1",), f.Pong(server_time=int(T0) + 1234))]


def test_hello_after_authentication_is_refused_without_closing_anything():
    h = setup()
    out = h.agent_frame("s1", f.AgentHello(token="x"))
    assert [wire(x) for x in sent_to(out, "s1")] == [
        {"type": "error", "code": "AlreadyAuthenticated", "message": "hello was already accepted",
         "notificationId": None},
    ]
    out = h.integrator_frame("i1", f.IntegratorHello(api_key="x"))
    assert [wire(x)["error"]["message"] for x in sent_to(out, "i1")] == ["RejectAfterClientError"]


# ---------------------------------------------------------------------------
# Display limit, queue, FIFO


def test_display_limit_default_one_and_fifo_queue():
    h = setup()
    a = offer(h, "r1")
    out = h.notify("i1", "r2", "a1", token="t2")
    b = h.status_id(out, "i1")
    # Queued: status queued only, no displayed status, agent told the queue length.
    assert [s.state for s in sent_to(out, "i1", f.Status)] == ["queued"]
    assert [wire(x) for x in sent_to(out, "s1")] == [{"type": "queue", "queued": 1}]
    c = offer(h, "r3")
    assert h.engine.displayed("a1") == [a]
    assert h.engine.queued("a1") == [b, c]
    assert h.engine.state_of(b) is State.QUEUED

    # a ends -> b (the head) is displayed, its integrator told, queue shrinks.
    out = h.respond("s1", a, "Accept")
    assert [type(x).__name__ for x in sent_to(out, "s1")] == ["Resolved", "Notification", "QueueLength"]
    assert sent_to(out, "s1", f.Notification)[0].notification_id == b
    assert sent_to(out, "s1", f.QueueLength) == [f.QueueLength(queued=1)]
    assert [(type(x).__name__, x.request_id) for x in sent_to(out, "i1")] == [("Result", "r1"), ("Status", "r2")]
    assert sent_to(out, "i1", f.Status)[0].state == "displayed"
    assert h.engine.displayed("a1") == [b] and h.engine.queued("a1") == [c]

    out = h.respond("s1", b, "Reject")
    assert sent_to(out, "s1", f.Notification)[0].notification_id == c
    assert sent_to(out, "s1", f.QueueLength) == [f.QueueLength(queued=0)]
    out = h.respond("s1", c, "Accept")
    assert sent_to(out, "s1", f.QueueLength) == []
    assert h.engine.displayed("a1") == [] and h.engine.queued("a1") == []


def test_display_limit_two_shows_two_at_once():
    h = setup(Limits(display_limit=2))
    a = offer(h, "r1")
    b = offer(h, "r2")
    c = offer(h, "r3")
    assert h.engine.displayed("a1") == [a, b]
    assert h.engine.queued("a1") == [c]
    out = h.respond("s1", b, "Accept")
    assert h.engine.displayed("a1") == [a, c]
    assert [x.notification_id for x in sent_to(out, "s1", f.Notification)] == [c]


def test_queue_full_rejects_at_once_default_limit_ten():
    h = setup()
    offer(h, "r0")
    for i in range(10):
        offer(h, f"r{i + 1}")
    assert len(h.engine.queued("a1")) == 10
    out = h.notify("i1", "r11", "a1", token="t11")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "result", "requestId": "r11",
         "value": {"actionName": "Reject", "responseReason": "NotificationQueueLimitExceeded"}, "outcomeId": OUTCOME_ID},
    ]
    assert sent_to(out, "s1") == []  # the queue did not change
    [e] = ended(out)
    assert e.outcome == QUEUE_LIMIT and e.delivered
    assert len(h.engine.queued("a1")) == 10
    # Its token is not held: it can be used again, and a late cancel learns the outcome.
    out = h.cancel("i1", "c1", "t11")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "result", "requestId": "c1",
         "value": {"cancellationToken": "t11", "actionName": "Reject",
                   "responseReason": "NotificationQueueLimitExceeded"}},
    ]
    assert ended(out) == []


def test_queue_limit_zero_rejects_anything_not_displayable():
    h = setup(Limits(queue_limit=0))
    offer(h, "r1")
    out = h.notify("i1", "r2", "a1", progress=False)
    assert [outcome_of_result(r) for r in results(out, "i1")] == [QUEUE_LIMIT]
    assert sent_to(out, "i1", f.Status) == []


def test_queue_full_counts_displayed_and_queued_small_limits():
    h = setup(Limits(display_limit=2, queue_limit=1))
    offer(h, "r1")
    offer(h, "r2")
    offer(h, "r3")
    out = h.notify("i1", "r4", "a1")
    assert [outcome_of_result(r) for r in results(out, "i1")] == [QUEUE_LIMIT]
    assert [s.state for s in sent_to(out, "i1", f.Status)] == []


# ---------------------------------------------------------------------------
# Timers


def test_display_timeout_at_expires_at_not_before():
    h = setup()
    nid = offer(h, "r1", template=VOICE)  # 30 s
    note = [x for x in sent_to(h.log, "s1", f.Notification)][0]
    assert note.timeout_seconds == 30.0
    assert note.expires_at == int(T0) + 30_000
    assert h.engine.next_deadline() == note.expires_at
    assert h.at(note.expires_at - 1) == []
    assert h.engine.state_of(nid) is State.DISPLAYED
    out = h.at(note.expires_at)
    assert [wire(x) for x in results(out, "i1")] == [
        {"type": "result", "requestId": "r1", "value": {"actionName": "Timeout", "responseReason": "DisplayTimeout"}, "outcomeId": OUTCOME_ID},
    ]
    assert [wire(x) for x in sent_to(out, "s1")] == [
        {"type": "resolved", "notificationId": nid, "actionName": "Timeout", "responseReason": "DisplayTimeout"},
    ]
    assert [e.outcome for e in ended(out)] == [DISPLAY_TIMEOUT]
    assert h.engine.next_deadline() is None


def test_deadlines_round_up_to_the_timer_resolution():
    """Offers arriving within one step time out together; none gets less than its timeout."""
    h = setup(now=T0 + 1)  # timer_resolution 0.05 s by default
    first = offer(h, "r1", template=VOICE)
    h.connect("s2", "a2")
    h.now = T0 + 49.5
    second = offer(h, "r2", agent="a2", template=VOICE)
    notes = sent_to(h.log, "s1", f.Notification) + sent_to(h.log, "s2", f.Notification)
    assert [n.expires_at for n in notes] == [T0 + 30_050, T0 + 30_050]
    assert h.engine.next_deadline() == T0 + 30_050
    assert h.at(T0 + 30_049) == []
    out = h.at(T0 + 30_050)
    assert sorted(e.notification_id for e in ended(out)) == sorted([first, second])


def test_display_timeout_with_fractional_clock_never_fires_before_expires_at():
    h = setup(Limits(timer_resolution=0), now=T0 + 0.75)
    offer(h, "r1", template=VOICE)
    note = sent_to(h.log, "s1", f.Notification)[0]
    deadline = h.engine.next_deadline()
    assert deadline == T0 + 0.75 + 30_000
    assert note.expires_at <= deadline < note.expires_at + 1
    assert h.at(note.expires_at - 0.5) == []
    assert [e.outcome for e in ended(h.at(deadline))] == [DISPLAY_TIMEOUT]


def test_display_timeout_comes_from_the_template():
    h = setup(templates={"quick": Template(name="quick", title="Q", timeout=2.5)})
    offer(h, "r1", template="quick")
    assert h.engine.next_deadline() == T0 + 2500
    assert sent_to(h.log, "s1", f.Notification)[0].timeout_seconds == 2.5


def test_display_timer_starts_when_displayed_not_when_queued():
    h = setup(Limits(queue_timeout=1000))
    a = offer(h, "r1", template=VOICE)
    b = offer(h, "r2", template=VOICE)
    out = h.advance(10)
    h.respond("s1", a, "Accept")
    note = sent_to(h.log, "s1", f.Notification)[-1]
    assert note.notification_id == b
    assert note.expires_at == int(T0) + 10_000 + 30_000
    assert out == []
    assert h.engine.next_deadline() == note.expires_at


def test_queue_timeout_rejects_the_waiting_one():
    h = setup(Limits(queue_timeout=60))
    a = offer(h, "r1")  # displayed, 120 s
    b = offer(h, "r2")  # queued, 60 s
    assert h.engine.next_deadline() == T0 + 60_000
    assert h.at(T0 + 60_000 - 0.001) == []
    out = h.at(T0 + 60_000)
    assert [wire(x) for x in results(out, "i1")] == [
        {"type": "result", "requestId": "r2",
         "value": {"actionName": "Reject", "responseReason": "NotificationQueueTimeLimitExceeded"}, "outcomeId": OUTCOME_ID},
    ]
    assert [e.outcome for e in ended(out)] == [QUEUE_TIME_LIMIT]
    assert [e.notification_id for e in ended(out)] == [b]
    # The agent never saw it: only the queue length changed.
    assert sent_to(out, "s1") == [f.QueueLength(queued=0)]
    assert h.engine.displayed("a1") == [a] and h.engine.queued("a1") == []
    assert h.engine.next_deadline() == T0 + 120_000


def test_queue_and_display_timers_together_end_in_deadline_order():
    h = setup(Limits(queue_timeout=200))
    a = offer(h, "r1")  # display deadline T0+120 s
    b = offer(h, "r2")  # queue deadline T0+200 s
    # Late timer call: a times out first, b is displayed (so its queue deadline no longer applies).
    out = h.at(T0 + 250_000)
    assert [(e.notification_id, e.outcome) for e in ended(out)] == [(a, DISPLAY_TIMEOUT)]
    assert h.engine.displayed("a1") == [b]
    assert h.engine.next_deadline() == T0 + 250_000 + 120_000
    assert h.engine.next_deadline() > h.now


def test_timers_of_one_deadline_end_in_the_order_they_were_set():
    """A notification displayed from the queue gets a display deadline that can
    fall on its old queue deadline. It then ends where its display timer was
    set, after the queue timers set before that, not where its queue timer was.
    """
    h = setup(Limits(queue_timeout=60))
    h.connect("s2", "a2")
    a = offer(h, "r1")  # a1 displays a (120 s); b waits, queue deadline T0+60 s
    b = offer(h, "r2", template=VOICE)  # a 30 s display timeout
    offer(h, "r3", agent="a2")  # a2 displays one (120 s); c waits, queue deadline T0+60 s
    c = offer(h, "r4", agent="a2", template=VOICE)
    h.advance(30)
    h.respond("s1", a, "Accept")  # b displayed: display deadline T0+60 s, its old queue deadline
    assert h.engine.displayed("a1") == [b]
    assert sent_to(h.log, "s1", f.Notification)[-1].expires_at == T0 + 60_000
    out = h.at(T0 + 60_000)
    assert [(e.notification_id, e.outcome) for e in ended(out)] == [(c, QUEUE_TIME_LIMIT), (b, DISPLAY_TIMEOUT)]


def test_next_deadline_skips_ended_notifications():
    h = setup()
    a = offer(h, "r1")
    assert h.engine.next_deadline() == T0 + 120_000
    h.respond("s1", a, "Accept")
    assert h.engine.next_deadline() is None
    assert h.at(T0 + 500_000) == []


# ---------------------------------------------------------------------------
# Auto-accept


def test_auto_accept_agent_sees_it_then_resolved_integrator_gets_displayed_then_accept():
    h = setup()
    out = h.notify("i1", "r1", "a1", AUTO, params={"customerName": "Bo"}, token="t")
    assert [type(x).__name__ for x in sent_to(out, "s1")] == ["Notification", "Resolved"]
    note, res = sent_to(out, "s1")
    assert note.auto_accept is True and note.show_timeout is False
    assert note.fields == (f.Field("Customer", "Bo"),)
    assert wire(res) == {"type": "resolved", "notificationId": note.notification_id,
                         "actionName": "Accept", "responseReason": "AutoAccept"}
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "status", "requestId": "r1", "notificationId": note.notification_id, "cancellationToken": "t",
         "state": "queued"},
        {"type": "status", "requestId": "r1", "notificationId": note.notification_id, "cancellationToken": "t",
         "state": "displayed"},
        {"type": "result", "requestId": "r1", "value": {"actionName": "Accept", "responseReason": "AutoAccept"}, "outcomeId": OUTCOME_ID},
    ]
    assert [e.outcome for e in ended(out)] == [AUTO_ACCEPTED]
    assert h.engine.displayed("a1") == [] and h.engine.next_deadline() is None


def test_auto_accept_from_the_queue_then_the_next_is_displayed():
    h = setup()
    a = offer(h, "r1")
    b = offer(h, "r2", template=AUTO)
    c = offer(h, "r3")
    d = offer(h, "r4", template=AUTO)
    out = h.respond("s1", a, "Reject")
    assert [(type(x).__name__, x.notification_id if hasattr(x, "notification_id") else x.queued)
            for x in sent_to(out, "s1")] == [
        ("Resolved", a), ("Notification", b), ("Resolved", b), ("Notification", c), ("QueueLength", 1),
    ]
    assert [(e.notification_id, e.outcome) for e in ended(out)] == [(a, DECLINED), (b, AUTO_ACCEPTED)]
    assert h.engine.displayed("a1") == [c] and h.engine.queued("a1") == [d]
    out = h.respond("s1", c, "Accept")
    assert [(e.notification_id, e.outcome) for e in ended(out)] == [(c, ACCEPTED), (d, AUTO_ACCEPTED)]
    assert sent_to(out, "s1", f.QueueLength) == [f.QueueLength(queued=0)]


def test_many_auto_accepts_queued_drain_without_recursion():
    h = setup(Limits(queue_limit=5000, display_limit=1))
    a = offer(h, "r0")
    for i in range(3000):
        h.notify("i1", f"r{i + 1}", "a1", AUTO, progress=False)
    out = h.respond("s1", a, "Accept")
    assert len(ended(out)) == 3001
    assert h.engine.queued("a1") == [] and h.engine.displayed("a1") == []


# ---------------------------------------------------------------------------
# Status frames


def test_progress_false_gets_no_status_only_the_result():
    h = setup()
    out = h.notify("i1", "r1", "a1", token="t1", progress=False)
    assert sent_to(out, "i1") == []
    nid = sent_to(out, "s1", f.Notification)[0].notification_id
    out = h.notify("i1", "r2", "a1", token="t2", progress=False)  # queued
    assert sent_to(out, "i1") == []
    out = h.respond("s1", nid, "Accept")
    assert [x.request_id for x in sent_to(out, "i1")] == ["r1"]  # r2 displayed, no status
    assert isinstance(sent_to(out, "i1")[0], f.Result)


def test_status_queued_then_displayed_when_it_reaches_the_front():
    h = setup()
    a = offer(h, "r1")
    out = h.notify("i1", "r2", "a1", token="t2")
    assert [(s.request_id, s.state) for s in sent_to(out, "i1", f.Status)] == [("r2", "queued")]
    out = h.respond("s1", a, "Accept")
    assert [(s.request_id, s.state) for s in sent_to(out, "i1", f.Status)] == [("r2", "displayed")]


# ---------------------------------------------------------------------------
# Cancellation tokens


def test_token_in_input_only():
    h = setup()
    out = h.notify("i1", "r1", "a1", token="in-input")
    assert sent_to(out, "i1", f.Status)[0].cancellation_token == "in-input"


def test_token_beside_input_only():
    h = setup()
    out = h.notify("i1", "r1", "a1", outer_token="beside")
    assert sent_to(out, "i1", f.Status)[0].cancellation_token == "beside"
    out = h.cancel("i1", "c1", "beside")
    assert [outcome_of_result(r) for r in results(out, "i1")] == [CANCELLED, CANCELLED]


def test_token_in_both_places_same_is_fine():
    h = setup()
    out = h.notify("i1", "r1", "a1", token="same", outer_token="same")
    assert sent_to(out, "i1", f.Status)[0].cancellation_token == "same"


def test_token_in_both_places_different_is_refused():
    h = setup()
    out = h.notify("i1", "r1", "a1", token="one", outer_token="two")
    [err] = sent_to(out, "i1")
    w = wire(err)
    assert w["type"] == "error" and w["requestId"] == "r1"
    assert w["error"]["message"] == "RejectAfterClientError"
    assert w["error"]["msdyn_name"] == "NotifyEvent"
    assert "cancellationToken" in w["error"]["details"]
    assert ended(out) == [] and sent_to(out, "s1") == []
    assert h.engine.displayed("a1") == []
    # Neither token was taken.
    assert sent_to(h.notify("i1", "r2", "a1", token="one"), "i1", f.Status)


def test_no_token_server_makes_one_shown_in_status_and_usable_to_cancel():
    h = setup()
    out = h.notify("i1", "r1", "a1")
    st = sent_to(out, "i1", f.Status)
    assert [s.state for s in st] == ["queued", "displayed"]
    token = st[0].cancellation_token
    assert token and st[1].cancellation_token == token
    assert token != st[0].notification_id
    out = h.cancel("i1", "c1", token)
    assert [wire(x) for x in sent_to(out, "i1")][-1] == {
        "type": "result", "requestId": "c1",
        "value": {"cancellationToken": token, "actionName": "Cancel", "responseReason": "CancelledByIntegrator"},
    }


def test_server_made_tokens_are_distinct():
    h = setup(Limits(display_limit=3))
    tokens = {sent_to(h.notify("i1", f"r{i}", "a1"), "i1", f.Status)[0].cancellation_token for i in range(3)}
    assert len(tokens) == 3


def test_token_in_use_is_refused_while_pending():
    h = setup()
    offer(h, "r1", token="T")
    out = h.notify("i1", "r2", "a1", outer_token="T")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "error", "requestId": "r2",
         "error": {"message": "CancellationTokenInUseError", "msdyn_name": "NotifyEvent",
                   "details": "cancellationToken 'T' belongs to a pending notification"}},
    ]
    assert ended(out) == [] and h.engine.queued("a1") == []


def test_token_in_use_also_while_queued_and_across_connections_of_one_integrator():
    h = setup()
    h.integrator("i2", "k1")
    offer(h, "r1")
    offer(h, "r2", token="T")  # queued
    out = h.notify("i2", "r3", "a1", token="T")
    assert wire(sent_to(out, "i2")[0])["error"]["message"] == "CancellationTokenInUseError"


def test_token_reusable_after_the_notification_ended():
    h = setup()
    a = offer(h, "r1", token="T")
    h.respond("s1", a, "Accept")
    b = offer(h, "r2", token="T")
    assert b != a
    # Cancel now finds the live one, not the ended one.
    out = h.cancel("i1", "c1", "T")
    assert [(r.request_id, outcome_of_result(r)) for r in results(out, "i1")] == [
        ("r2", CANCELLED), ("c1", CANCELLED),
    ]
    assert [e.notification_id for e in ended(out)] == [b]
    assert h.engine.outcome_of(a) == ACCEPTED


def test_token_scoped_per_integrator():
    h = setup(Limits(display_limit=2))
    h.integrator("i2", "k2")
    a = offer(h, "r1", conn="i1", token="T")
    b = offer(h, "r1", conn="i2", token="T")
    assert a != b
    # k2 cancels its own; k1's is untouched.
    out = h.cancel("i2", "c1", "T")
    assert [e.notification_id for e in ended(out)] == [b]
    assert sent_to(out, "i1") == []
    assert h.engine.state_of(a) is State.DISPLAYED
    # A third integrator does not know the token at all.
    h.integrator("i3", "k3")
    out = h.cancel("i3", "c2", "T")
    assert wire(sent_to(out, "i3")[0])["error"]["message"] == "CancellationTokenNotFoundError"
    assert h.engine.state_of(a) is State.DISPLAYED


def test_cancel_from_another_connection_of_the_same_integrator():
    h = setup()
    h.integrator("i2", "k1")
    offer(h, "r1", token="T")
    out = h.cancel("i2", "c1", "T")
    assert [x.request_id for x in results(out, "i1")] == ["r1"]
    assert [x.request_id for x in results(out, "i2")] == ["c1"]


# ---------------------------------------------------------------------------
# cancelEvent


def test_cancel_displayed_notification():
    h = setup()
    nid = offer(h, "r1", token="T")
    out = h.cancel("i1", "c1", "T")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "result", "requestId": "r1",
         "value": {"actionName": "Cancel", "responseReason": "CancelledByIntegrator"}, "outcomeId": OUTCOME_ID},
        {"type": "result", "requestId": "c1",
         "value": {"cancellationToken": "T", "actionName": "Cancel", "responseReason": "CancelledByIntegrator"}},
    ]
    assert [wire(x) for x in sent_to(out, "s1")] == [
        {"type": "resolved", "notificationId": nid, "actionName": "Cancel", "responseReason": "CancelledByIntegrator"},
    ]
    assert [e.outcome for e in ended(out)] == [CANCELLED]
    assert h.engine.next_deadline() is None


def test_cancel_queued_notification_agent_only_sees_queue_shrink():
    h = setup()
    a = offer(h, "r1")
    b = offer(h, "r2", token="T")
    out = h.cancel("i1", "c1", "T")
    assert [(r.request_id, outcome_of_result(r)) for r in results(out, "i1")] == [
        ("r2", CANCELLED), ("c1", CANCELLED),
    ]
    assert sent_to(out, "s1") == [f.QueueLength(queued=0)]
    assert [e.notification_id for e in ended(out)] == [b]
    # Never displayed later.
    out = h.respond("s1", a, "Accept")
    assert sent_to(out, "s1", f.Notification) == []


def test_cancel_after_agent_accepted_reports_accept_and_no_second_result():
    h = setup()
    nid = offer(h, "r1", token="T")
    h.respond("s1", nid, "Accept")
    out = h.cancel("i1", "c1", "T")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "result", "requestId": "c1",
         "value": {"cancellationToken": "T", "actionName": "Accept", "responseReason": "Accept"}},
    ]
    assert ended(out) == [] and sent_to(out, "s1") == []
    assert h.engine.outcome_of(nid) == ACCEPTED
    assert len(results(h.log, "i1")) == 2  # r1 once, c1 once


def test_cancel_twice_second_gets_cancel_outcome_again_and_nothing_else():
    h = setup()
    offer(h, "r1", token="T")
    h.cancel("i1", "c1", "T")
    out = h.cancel("i1", "c2", "T")
    assert [(r.request_id, outcome_of_result(r)) for r in results(out, "i1")] == [("c2", CANCELLED)]
    assert ended(out) == []


def test_cancel_unknown_token():
    h = setup()
    out = h.cancel("i1", "c1", "nope")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "error", "requestId": "c1",
         "error": {"message": "CancellationTokenNotFoundError", "msdyn_name": "CancelEvent",
                   "details": "no notification with cancellationToken 'nope'"}},
    ]
    assert ended(out) == []


def test_cancel_of_an_ended_token_forgotten_beyond_recent_outcomes():
    h = setup(Limits(recent_outcomes=1))
    a = offer(h, "r1", token="A")
    h.respond("s1", a, "Accept")
    b = offer(h, "r2", token="B")
    h.respond("s1", b, "Accept")
    assert h.engine.outcome_of(a) is None and h.engine.outcome_of(b) == ACCEPTED
    assert wire(sent_to(h.cancel("i1", "c1", "A"), "i1")[0])["error"]["message"] == \
        "CancellationTokenNotFoundError"
    assert outcome_of_result(results(h.cancel("i1", "c2", "B"), "i1")[0]) == ACCEPTED
    # The agent gets a definite (if less specific) answer for the forgotten one.
    assert sent_to(h.respond("s1", a), "s1")[0].code == "UnknownNotification"


# ---------------------------------------------------------------------------
# Refused notifyEvents


def test_template_not_found():
    h = setup()
    out = h.notify("i1", "r1", "a1", "no_such_template", token="T")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "error", "requestId": "r1",
         "error": {"message": "NotificationTemplateNotFoundError", "msdyn_name": "NotifyEvent",
                   "details": "no template named 'no_such_template'"}},
    ]
    assert ended(out) == [] and sent_to(out, "s1") == []
    # The token was not taken.
    offer(h, "r2", token="T")


def test_agent_never_seen_is_not_connected():
    h = setup()
    out = h.notify("i1", "r1", "ghost", token="T")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "error", "requestId": "r1",
         "error": {"message": "AgentNotConnectedError", "msdyn_name": "NotifyEvent",
                   "details": "agent 'ghost' is not connected"}},
    ]
    assert ended(out) == [] and h.engine.outcomes == 0
    assert not h.engine.is_agent_present("ghost")
    offer(h, "r2", token="T")  # token not taken


def test_error_body_omits_empty_details_on_the_wire():
    frame = f.IntegratorError(error=f.ErrorBody(message="RejectAfterClientError", msdyn_name="NotifyEvent"))
    assert wire(frame) == {"type": "error", "error": {"message": "RejectAfterClientError",
                                                      "msdyn_name": "NotifyEvent"}}


# ---------------------------------------------------------------------------
# Agent responses and their races


def test_respond_to_a_queued_notification_is_not_displayed():
    h = setup()
    offer(h, "r1")
    b = offer(h, "r2")
    out = h.respond("s1", b, "Accept")
    assert [wire(x) for x in sent_to(out, "s1")] == [
        {"type": "error", "code": "NotificationNotDisplayed", "message": "notification is not displayed",
         "notificationId": b},
    ]
    assert ended(out) == [] and h.engine.state_of(b) is State.QUEUED


def test_respond_to_another_agents_notification_is_unknown():
    h = setup()
    h.connect("s2", "a2")
    a = offer(h, "r1", agent="a1")
    out = h.respond("s2", a, "Accept")
    assert [(x.code, x.notification_id) for x in sent_to(out, "s2")] == [("UnknownNotification", a)]
    assert ended(out) == [] and h.engine.state_of(a) is State.DISPLAYED
    # ... also once it has ended: a2 learns nothing about a1's notification.
    h.respond("s1", a, "Accept")
    out = h.respond("s2", a, "Accept")
    assert [x.code for x in sent_to(out, "s2")] == ["UnknownNotification"]


def test_respond_to_an_id_never_issued_is_unknown():
    h = setup()
    out = h.respond("s1", "made-up", "Reject")
    assert [(x.code, x.notification_id) for x in sent_to(out, "s1")] == [("UnknownNotification", "made-up")]
    assert targets(out) == {"s1"}


def test_race_cancel_then_respond():
    h = setup()
    nid = offer(h, "r1", token="T")
    h.cancel("i1", "c1", "T")
    out = h.respond("s1", nid, "Accept")
    [err] = sent_to(out, "s1")
    assert wire(err) == {"type": "error", "code": "NotificationNotPending",
                         "message": "notification already ended: Cancel/CancelledByIntegrator",
                         "notificationId": nid}
    assert targets(out) == {"s1"} and ended(out) == []
    assert h.engine.outcome_of(nid) == CANCELLED


def test_race_respond_then_cancel():
    h = setup()
    nid = offer(h, "r1", token="T")
    h.respond("s1", nid, "Reject")
    out = h.cancel("i1", "c1", "T")
    assert [wire(x) for x in sent_to(out, "i1")] == [
        {"type": "result", "requestId": "c1",
         "value": {"cancellationToken": "T", "actionName": "Reject", "responseReason": "DeclinedByAgent"}},
    ]
    assert targets(out) == {"i1"} and ended(out) == []
    assert h.engine.outcome_of(nid) == DECLINED


def test_respond_after_display_expiry_is_not_pending_and_outcome_stays():
    h = setup()
    nid = offer(h, "r1", template=VOICE)
    h.at(T0 + 30_000)
    out = h.respond("s1", nid, "Accept")
    assert [(x.code, x.notification_id) for x in sent_to(out, "s1")] == [("NotificationNotPending", nid)]
    assert "Timeout/DisplayTimeout" in sent_to(out, "s1")[0].message
    assert targets(out) == {"s1"} and ended(out) == []
    assert h.engine.outcome_of(nid) == DISPLAY_TIMEOUT
    assert [outcome_of_result(r) for r in results(h.log, "i1")] == [DISPLAY_TIMEOUT]


def test_respond_just_before_expiry_wins():
    h = setup()
    nid = offer(h, "r1", template=VOICE)
    h.at(T0 + 30_000 - 1)
    out = h.respond("s1", nid, "Accept")
    assert [e.outcome for e in ended(out)] == [ACCEPTED]
    assert h.at(T0 + 30_000) == []


def test_two_sessions_both_shown_first_answer_wins():
    h = setup()
    h.connect("s2", "a1")
    out = h.notify("i1", "r1", "a1", token="T")
    [send] = [e for e in sends(out) if isinstance(e.frame, f.Notification)]
    assert set(send.targets) == {"s1", "s2"}
    nid = send.frame.notification_id
    first = h.respond("s2", nid, "Accept")
    second = h.respond("s1", nid, "Reject")
    # One outcome: s2's.
    assert [e.outcome for e in ended(first)] == [ACCEPTED] and ended(second) == []
    assert [outcome_of_result(r) for r in results(first + second, "i1")] == [ACCEPTED]
    # Both sessions got exactly one resolved; the loser also an error.
    for s in ("s1", "s2"):
        assert [(r.notification_id, r.action_name) for r in sent_to(h.log, s, f.Resolved)] == [(nid, "Accept")]
    assert [x.code for x in sent_to(second, "s1", f.AgentError)] == ["NotificationNotPending"]
    assert targets(second) == {"s1"}


def test_every_session_gets_notification_and_resolved_whatever_ends_it():
    h = setup()
    h.connect("s2", "a1")
    h.connect("s3", "a1")
    nid = offer(h, "r1", template=VOICE)
    out = h.at(T0 + 30_000)
    [res] = [e for e in sends(out) if isinstance(e.frame, f.Resolved)]
    assert set(res.targets) == {"s1", "s2", "s3"}
    assert res.frame.notification_id == nid


def test_limits_count_per_agent_not_per_session():
    h = setup()
    h.connect("s2", "a1")
    a = offer(h, "r1")
    b = offer(h, "r2")
    assert h.engine.displayed("a1") == [a] and h.engine.queued("a1") == [b]
    # Both sessions were told about the queue.
    assert [e for e in sends(h.log) if isinstance(e.frame, f.QueueLength)] == [
        Send(("s1", "s2"), f.QueueLength(queued=1)),
    ]


def test_limits_are_per_agent_other_agents_unaffected():
    h = setup()
    h.connect("s2", "a2")
    a = offer(h, "r1", agent="a1")
    b = offer(h, "r2", agent="a2")
    assert h.engine.displayed("a1") == [a] and h.engine.displayed("a2") == [b]
    assert sent_to(h.log, "s2", f.Notification)[0].notification_id == b
    assert all(x.notification_id != a for x in sent_to(h.log, "s2", f.Notification))


def test_session_joining_later_gets_replay_and_then_resolved():
    h = setup()
    nid = offer(h, "r1")
    offer(h, "r2")
    out = h.connect("s2", "a1")
    assert [type(x).__name__ for x in sent_to(out, "s2")] == ["Welcome", "Notification", "QueueLength"]
    assert sent_to(out, "s2", f.QueueLength) == [f.QueueLength(queued=1)]
    assert targets(out) == {"s2"}
    out = h.respond("s2", nid, "Accept")
    [res] = [e for e in sends(out) if isinstance(e.frame, f.Resolved)]
    assert set(res.targets) == {"s1", "s2"}


def test_respond_from_a_closed_session_is_not_an_answer():
    h = setup()
    h.connect("s2", "a1")
    nid = offer(h, "r1")
    h.disconnect("s2")
    out = h.respond("s2", nid, "Accept")
    assert ended(out) == []
    assert h.engine.state_of(nid) is State.DISPLAYED


# ---------------------------------------------------------------------------
# Sessions per agent: the newest works, the oldest is closed


def closes(effects) -> list[Close]:
    return [e for e in effects if isinstance(e, Close)]


def test_sessions_per_agent_default_ten_the_eleventh_closes_the_oldest():
    h = setup()  # s1 is the first
    for i in range(2, 11):
        assert closes(h.connect(f"s{i}", "a1")) == []
    out = h.connect("s11", "a1")
    assert closes(out) == [Close(("s1",), CLOSE_SESSION_REPLACED)]
    assert CLOSE_SESSION_REPLACED.code == 4409
    # The newest is welcomed as usual; the closed one is no session any more.
    assert [type(x).__name__ for x in sent_to(out, "s11")] == ["Welcome"]
    assert h.engine.statistics()["agentSessions"] == 10
    # Then the next oldest, one at a time.
    assert closes(h.connect("s12", "a1")) == [Close(("s2",), CLOSE_SESSION_REPLACED)]


def test_replaced_session_gets_nothing_more_and_its_disconnect_changes_nothing():
    h = setup(Limits(sessions_per_agent=2))
    h.connect("s2", "a1")
    out = h.connect("s3", "a1")
    assert closes(out) == [Close(("s1",), CLOSE_SESSION_REPLACED)]
    since = len(h.log)
    nid = offer(h, "r1")
    h.respond("s3", nid, "Accept")
    assert "s1" not in targets(h.log[since:]) and {"s2", "s3"} <= targets(h.log[since:])
    # The closed session's disconnect comes later (when its socket closes): a no-op,
    # no presence grace starts, the agent keeps its two sessions.
    assert h.disconnect("s1") == []
    assert h.engine.statistics()["agentSessions"] == 2
    # A respond it sent before its socket closed is not an answer.
    nid2 = offer(h, "r2")
    assert ended(h.respond("s1", nid2, "Reject")) == []
    assert h.engine.state_of(nid2) is State.DISPLAYED


def test_replaced_session_order_follows_connects_not_ids():
    h = setup(Limits(sessions_per_agent=2))
    h.connect("a-second", "a1")
    h.disconnect("s1")  # the oldest leaves on its own
    h.connect("0-third", "a1")
    assert closes(h.connect("z-fourth", "a1")) == [Close(("a-second",), CLOSE_SESSION_REPLACED)]


def test_sessions_per_agent_counts_per_agent_and_one_replays_displayed():
    h = setup(Limits(sessions_per_agent=1))
    h.connect("t1", "a2")  # another agent: its own count
    nid = offer(h, "r1")
    out = h.connect("s2", "a1")
    assert closes(out) == [Close(("s1",), CLOSE_SESSION_REPLACED)]
    # The new session gets the replay, and the notification stays displayed.
    assert [x.notification_id for x in sent_to(out, "s2", f.Notification)] == [nid]
    assert ended(out) == []
    assert h.engine.statistics()["agentSessions"] == 2


# ---------------------------------------------------------------------------
# Agent presence: disconnect, replay, grace


def test_last_session_drops_timers_keep_running_nothing_sent_to_it():
    h = setup()
    nid = offer(h, "r1", template=VOICE)
    assert h.disconnect("s1") == []
    assert h.engine.is_agent_present("a1")
    out = h.at(T0 + 30_000)
    assert [(e.notification_id, e.outcome) for e in ended(out)] == [(nid, DISPLAY_TIMEOUT)]
    assert targets(out) == {"i1"}


def test_reconnect_within_grace_replays_displayed_in_order_with_original_expiry_and_queue():
    h = setup(Limits(display_limit=2, presence_grace=30))
    a = offer(h, "r1")
    h.advance(1)
    b = offer(h, "r2", template=VOICE)
    offer(h, "r3")
    originals = {x.notification_id: x for x in sent_to(h.log, "s1", f.Notification)}
    h.disconnect("s1")
    h.advance(29.999)
    out = h.connect("s9", "a1", "sess-new")
    assert [type(x).__name__ for x in sent_to(out, "s9")] == ["Welcome", "Notification", "Notification",
                                                               "QueueLength"]
    notes = sent_to(out, "s9", f.Notification)
    assert [n.notification_id for n in notes] == [a, b]
    assert notes == [originals[a], originals[b]]  # same frame: same expiresAt
    assert notes[0].expires_at == int(T0) + 120_000
    assert notes[1].expires_at == int(T0) + 1_000 + 30_000
    assert sent_to(out, "s9", f.QueueLength) == [f.QueueLength(queued=1)]
    assert targets(out) == {"s9"}
    # The old grace deadline no longer applies.
    out = h.advance(10)
    assert [e.outcome for e in ended(out)] == [DISPLAY_TIMEOUT]  # b, at its own expiry
    assert h.engine.is_agent_present("a1")
    # And the new session can answer the replayed one.
    out = h.respond("s9", a, "Accept")
    assert [e.outcome for e in ended(out)] == [ACCEPTED]


def test_replay_after_reconnect_omits_what_ended_while_away():
    h = setup(Limits(display_limit=2))
    a = offer(h, "r1", token="A")
    b = offer(h, "r2", token="B")
    h.disconnect("s1")
    out = h.cancel("i1", "c1", "A")
    assert targets(out) == {"i1"}
    out = h.connect("s2", "a1")
    assert [n.notification_id for n in sent_to(out, "s2", f.Notification)] == [b]
    assert a not in [n.notification_id for n in sent_to(out, "s2", f.Notification)]


def test_notify_during_grace_is_accepted_and_replayed_on_return():
    h = setup(Limits(presence_grace=30))
    h.disconnect("s1")
    h.advance(10)
    out = h.notify("i1", "r1", "a1", token="T")
    assert sent_to(out, "i1", f.IntegratorError) == []
    nid = sent_to(out, "i1", f.Status)[0].notification_id
    assert targets(out) == {"i1"}
    assert h.engine.displayed("a1") == [nid]
    out = h.connect("s2", "a1")
    assert [n.notification_id for n in sent_to(out, "s2", f.Notification)] == [nid]


def test_grace_expiry_ends_every_pending_with_agent_disconnected():
    h = setup(Limits(display_limit=2, presence_grace=30))
    a = offer(h, "r1")
    b = offer(h, "r2")
    c = offer(h, "r3")
    d = offer(h, "r4")
    h.advance(5)
    h.disconnect("s1")
    assert h.engine.next_deadline() == T0 + 5_000 + 30_000
    assert h.at(T0 + 35_000 - 1) == []
    out = h.at(T0 + 35_000)
    assert sorted(e.notification_id for e in ended(out)) == sorted([a, b, c, d])
    assert {e.outcome for e in ended(out)} == {AGENT_DISCONNECTED}
    assert all(e.delivered for e in ended(out))
    assert sorted(r.request_id for r in results(out, "i1")) == ["r1", "r2", "r3", "r4"]
    assert {outcome_of_result(r) for r in results(out, "i1")} == {AGENT_DISCONNECTED}
    assert wire(results(out, "i1")[0])["value"] == {"actionName": "Reject", "responseReason": "AgentDisconnected"}
    assert targets(out) == {"i1"}  # nobody else to tell
    # Queued ones were not displayed on the way out.
    assert [e.frame for e in sends(out) if isinstance(e.frame, (f.Notification, f.Status))] == []
    assert not h.engine.is_agent_present("a1")
    assert h.engine.next_deadline() is None
    out = h.notify("i1", "r5", "a1")
    assert wire(sent_to(out, "i1")[0])["error"]["message"] == "AgentNotConnectedError"


def test_grace_zero_forgets_the_agent_at_once():
    h = setup(Limits(presence_grace=0))
    offer(h, "r1")
    h.disconnect("s1")
    assert h.engine.next_deadline() == h.now
    out = h.at(h.now)
    assert [e.outcome for e in ended(out)] == [AGENT_DISCONNECTED]
    assert not h.engine.is_agent_present("a1")


def test_grace_only_when_the_last_session_drops():
    h = setup(Limits(presence_grace=1))
    h.connect("s2", "a1")
    nid = offer(h, "r1")
    h.disconnect("s1")
    assert h.engine.next_deadline() == T0 + 120_000  # no grace timer, s2 still there
    assert ended(h.advance(60)) == []
    assert h.engine.state_of(nid) is State.DISPLAYED
    out = h.respond("s2", nid, "Accept")
    [res] = [e for e in sends(out) if isinstance(e.frame, f.Resolved)]
    assert res.targets == ("s2",)


def test_reconnect_then_disconnect_again_restarts_grace():
    h = setup(Limits(presence_grace=10))
    offer(h, "r1")
    h.disconnect("s1")
    h.advance(8)
    h.connect("s2", "a1")
    h.disconnect("s2")
    assert ended(h.advance(2)) == []  # the first grace deadline is stale
    assert ended(h.advance(7.999)) == []
    assert [e.outcome for e in ended(h.advance(0.001))] == [AGENT_DISCONNECTED]


def test_agent_seen_again_after_being_forgotten_starts_fresh():
    h = setup(Limits(presence_grace=1))
    a = offer(h, "r1")
    h.disconnect("s1")
    h.advance(1)
    out = h.connect("s2", "a1")
    assert [type(x).__name__ for x in sent_to(out, "s2")] == ["Welcome"]
    # The ended one is still answered definitely.
    assert [x.code for x in sent_to(h.respond("s2", a), "s2")] == ["NotificationNotPending"]
    offer(h, "r2")


def test_disconnect_of_unknown_connection_is_harmless():
    h = setup()
    assert h.disconnect("never") == []
    assert h.integrator_gone("never") == []


# ---------------------------------------------------------------------------
# Integrator disconnect


def history(h: Harness, integrator: str = "k1") -> list[tuple[str, tuple[str, str]]]:
    return [(r.request_id, outcome_of_result(r)) for r in h.engine.history(integrator)]


def test_integrator_disconnect_does_not_cancel_outcome_goes_to_history():
    h = setup()
    nid = offer(h, "r1", token="T")
    assert h.integrator_gone("i1") == []
    assert h.engine.state_of(nid) is State.DISPLAYED
    out = h.respond("s1", nid, "Accept")
    assert targets(out) == {"s1"}  # nothing to the gone connection
    assert ended(out) == [Ended(nid, "a1", "k1", "c-r1", ACCEPTED, False, 0.0)]
    assert history(h) == [("r1", ACCEPTED)]
    assert history(h, "k2") == []
    # Another connection of the same integrator can still cancel-by-token to learn the outcome.
    h.integrator("i2", "k1")
    out = h.cancel("i2", "c1", "T")
    assert [outcome_of_result(r) for r in results(out, "i2")] == [ACCEPTED]


def test_integrator_disconnect_queued_one_displayed_later_gets_no_status_to_gone_conn():
    h = setup()
    h.integrator("i2", "k2")
    a = offer(h, "r1", conn="i2")
    b = offer(h, "r2", conn="i1")
    h.integrator_gone("i1")
    out = h.respond("s1", a, "Accept")
    assert "i1" not in targets(out)
    assert h.engine.displayed("a1") == [b]
    out = h.at(T0 + 120_000)
    assert "i1" not in targets(out)
    assert [(e.notification_id, e.delivered) for e in ended(out)] == [(b, False)]
    assert history(h) == [("r2", DISPLAY_TIMEOUT)]


def test_integrator_disconnect_then_cancel_by_another_connection_of_the_integrator():
    h = setup()
    nid = offer(h, "r1", token="T")
    h.integrator_gone("i1")
    h.integrator("i2", "k1")
    out = h.cancel("i2", "c1", "T")
    assert targets(out) == {"i2", "s1"}  # i2 did not resume: it gets its cancel's answer only
    assert [(r.request_id, outcome_of_result(r)) for r in results(out, "i2")] == [("c1", CANCELLED)]
    assert ended(out) == [Ended(nid, "a1", "k1", "c-r1", CANCELLED, False, 0.0)]
    assert history(h) == [("r1", CANCELLED)]


def test_history_is_bounded_by_count():
    h = setup(Limits(display_limit=5, outcome_history=2))
    ids = [offer(h, f"r{i}") for i in range(4)]
    h.integrator_gone("i1")
    for nid in ids:
        h.respond("s1", nid, "Reject")
    assert history(h) == [("r2", DECLINED), ("r3", DECLINED)]


def test_history_zero_keeps_nothing():
    h = setup(Limits(outcome_history=0))
    nid = offer(h, "r1")
    h.integrator_gone("i1")
    out = h.respond("s1", nid, "Accept")
    assert [e.delivered for e in ended(out)] == [False]
    assert history(h) == []


def test_integrator_disconnect_and_grace_expiry_together():
    h = setup(Limits(presence_grace=1))
    offer(h, "r1")
    offer(h, "r2")
    h.integrator_gone("i1")
    h.disconnect("s1")
    out = h.advance(1)
    assert sends(out) == []
    assert [(e.outcome, e.delivered) for e in ended(out)] == [(AGENT_DISCONNECTED, False)] * 2
    assert sorted(history(h)) == [("r1", AGENT_DISCONNECTED), ("r2", AGENT_DISCONNECTED)]


# ---------------------------------------------------------------------------
# Queue-length frames


def test_queue_frame_sent_only_when_the_length_changes():
    h = setup(Limits(queue_timeout=10))
    a = offer(h, "r1")
    offer(h, "r2")
    offer(h, "r3", token="T")
    offer(h, "r4")
    h.cancel("i1", "c1", "T")   # 3 -> 2
    h.advance(10)               # both queued time out: 2 -> 0 (one frame per change)
    offer(h, "r5")              # 0 -> 1
    h.respond("s1", a, "Accept")  # r5 displayed: 1 -> 0
    assert [x.queued for x in sent_to(h.log, "s1", f.QueueLength)] == [1, 2, 3, 2, 1, 0, 1, 0]
    # Ending a displayed notification with an empty queue does not send one.
    before = len(sent_to(h.log, "s1", f.QueueLength))
    nid = h.engine.displayed("a1")[0]
    h.respond("s1", nid, "Accept")
    assert len(sent_to(h.log, "s1", f.QueueLength)) == before


def test_statistics():
    h = setup()
    h.connect("s2", "a1")
    offer(h, "r1")
    offer(h, "r2")
    assert h.engine.statistics() == {"agents": 1, "agentSessions": 2, "integrators": 1, "live": 2,
                                     "displayed": 1, "outcomes": 0, "offers": 2, "remembered": 0, "history": 0, "timers": 2}


@pytest.mark.parametrize("action, outcome", [("Accept", ACCEPTED), ("Reject", DECLINED)])
def test_outcome_is_final_whatever_comes_later(action, outcome):
    h = setup()
    nid = offer(h, "r1", token="T")
    h.respond("s1", nid, action)
    h.respond("s1", nid, "Accept")
    h.cancel("i1", "c1", "T")
    h.disconnect("s1")
    h.advance(1000)
    assert [e.outcome for e in ended(h.log)] == [outcome]
    assert [r.request_id for r in results(h.log, "i1")] == ["r1", "c1"]
    assert h.engine.outcome_of(nid) == outcome


def test_custom_template_fields_render_and_skip_empty():
    tpl = Template(name="x", title="Hi {who}", icon="star",
                   fields=(FieldTemplate("A", "{a}"), FieldTemplate("B", " {b} "), FieldTemplate("C", "{n}")),
                   accept_text="Yes", reject_text="No", show_timeout=False, timeout=5)
    h = setup(templates={"x": tpl})
    out = h.notify("i1", "r1", "a1", "x", params={"who": "you", "a": "<b>raw</b>", "b": "", "n": 3})
    [note] = sent_to(out, "s1", f.Notification)
    w = wire(note)
    assert w["title"] == "Hi you" and w["icon"] == "star"
    assert w["fields"] == [{"header": "A", "value": "<b>raw</b>"}, {"header": "C", "value": "3"}]
    assert (w["acceptText"], w["rejectText"], w["showTimeout"], w["timeoutSeconds"]) == ("Yes", "No", False, 5)
    assert w["correlationId"] is None


# ---------------------------------------------------------------------------
# Events that arrive after a deadline, before the caller's timer has run.
#
# The server drives handle_timer() from one loop timer; a frame can be handled
# at a ``now`` past a deadline before that timer fires. The answer must be the
# one for ``now``: deadlines already due are run first.


def test_respond_after_expiry_before_the_timer_ran_is_too_late():
    h = setup()
    nid = offer(h, "r1", template=VOICE)
    h.now = T0 + 30_000 + 2  # no handle_timer
    out = h.respond("s1", nid, "Accept")
    assert [(e.notification_id, e.outcome) for e in ended(out)] == [(nid, DISPLAY_TIMEOUT)]
    assert [outcome_of_result(r) for r in results(out, "i1")] == [DISPLAY_TIMEOUT]
    assert [type(x).__name__ for x in sent_to(out, "s1")] == ["Resolved", "AgentError"]
    assert sent_to(out, "s1", f.AgentError)[0].code == "NotificationNotPending"
    assert h.engine.outcome_of(nid) == DISPLAY_TIMEOUT
    assert h.at(h.now) == []


def test_cancel_after_queue_deadline_before_the_timer_ran_reports_the_timeout():
    h = setup(Limits(queue_timeout=10))
    offer(h, "r1")
    offer(h, "r2", token="T")
    h.now = T0 + 10_000
    out = h.cancel("i1", "c1", "T")
    assert [(r.request_id, outcome_of_result(r)) for r in results(out, "i1")] == [
        ("r2", QUEUE_TIME_LIMIT), ("c1", QUEUE_TIME_LIMIT),
    ]
    assert [e.outcome for e in ended(out)] == [QUEUE_TIME_LIMIT]


def test_notify_after_grace_before_the_timer_ran_is_agent_not_connected():
    h = setup(Limits(presence_grace=5))
    nid = offer(h, "r1")
    h.disconnect("s1")
    h.now = T0 + 5_000
    out = h.notify("i1", "r2", "a1")
    assert [(e.notification_id, e.outcome) for e in ended(out)] == [(nid, AGENT_DISCONNECTED)]
    assert wire(sent_to(out, "i1")[-1])["error"]["message"] == "AgentNotConnectedError"
    assert not h.engine.is_agent_present("a1")


def test_reconnect_after_grace_before_the_timer_ran_does_not_revive():
    h = setup(Limits(presence_grace=5))
    nid = offer(h, "r1")
    h.disconnect("s1")
    h.now = T0 + 5_000
    out = h.connect("s2", "a1")
    assert [(e.notification_id, e.outcome) for e in ended(out)] == [(nid, AGENT_DISCONNECTED)]
    assert [type(x).__name__ for x in sent_to(out, "s2")] == ["Welcome"]
    assert h.engine.displayed("a1") == []


def test_replay_omits_what_expired_before_the_timer_ran():
    h = setup(Limits(display_limit=2, presence_grace=60))
    a = offer(h, "r1", template=VOICE)  # 30 s
    b = offer(h, "r2")                  # 120 s
    h.disconnect("s1")
    h.now = T0 + 30_000
    out = h.connect("s2", "a1")
    assert [e.notification_id for e in ended(out)] == [a]
    assert [x.notification_id for x in sent_to(out, "s2", f.Notification)] == [b]
