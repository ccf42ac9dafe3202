"""Memory follows what is pending, not how many offers went through."""

from deskpush.protocol import BUILTIN_TEMPLATES, Engine, Limits
from deskpush.protocol import frames as f


def test_timer_heap_and_recent_outcomes_stay_bounded():
    engine = Engine({t.name: t for t in BUILTIN_TEMPLATES}, Limits(recent_outcomes=500))
    engine.agent_connected("a", "agent", "s", 0.0)
    engine.integrator_connected("i", "crm", 0.0)
    inp = f.NotifyInput(template_name="msdyn_chat_incoming_unauthenticated")
    for i in range(20_000):
        now = float(i)
        effects = engine.integrator_frame("i", f.NotifyEvent(request_id=str(i), agent_id="agent", input=inp), now)
        nid = next(e.frame.notification_id for e in effects if isinstance(e.frame, f.Notification))
        engine.agent_frame("a", f.Respond(notification_id=nid, action="Accept"), now)
    assert engine.outcomes == 20_000
    # Each accepted offer left a display timer behind; they are swept.
    assert engine.statistics()["timers"] <= 4097
    assert engine.statistics()["remembered"] == 500
    assert engine.next_deadline() is None


def test_timer_work_can_be_taken_in_batches():
    from deskpush.protocol import Template

    fast = Template(name="fast", title="t", timeout=1.0)
    engine = Engine({"fast": fast}, Limits(display_limit=1000, queue_limit=0))
    engine.agent_connected("a", "agent", "s", 0.0)
    engine.integrator_connected("i", "crm", 0.0)
    inp = f.NotifyInput(template_name="fast")
    for i in range(1000):
        engine.integrator_frame("i", f.NotifyEvent(request_id=str(i), agent_id="agent", input=inp, progress=False), 0.0)
    first = engine.handle_timer(5000.0, limit=300)
    assert sum(1 for e in first if type(e).__name__ == "Ended") == 300
    assert engine.next_deadline() <= 5000.0  # the rest are still due
    rest = engine.handle_timer(5000.0)
    assert sum(1 for e in rest if type(e).__name__ == "Ended") == 700
    assert engine.outcomes == 1000 and engine.next_deadline() is None


def test_remembered_outcomes_keep_no_connection_or_card_alive():
    """100,000 remembered outcomes by default: each keeps ids and outcome, not the card or a socket."""
    import gc
    import weakref

    class Conn:  # stands in for a websocket connection
        pass

    engine = Engine({t.name: t for t in BUILTIN_TEMPLATES}, Limits())
    agent, integrator = Conn(), Conn()
    engine.agent_connected(agent, "agent", "s", 0.0)
    engine.integrator_connected(integrator, "crm", 0.0)
    inp = f.NotifyInput(template_name="msdyn_chat_incoming_unauthenticated", template_parameters={"customerName": "Jane"})
    for i in range(50):
        effects = engine.integrator_frame(integrator, f.NotifyEvent(request_id=str(i), agent_id="agent", input=inp), 0.0)
        card = next(e.frame for e in effects if isinstance(e.frame, f.Notification))
        engine.agent_frame(agent, f.Respond(notification_id=card.notification_id, action="Accept"), 0.0)
        del effects
    gone = weakref.ref(integrator)
    engine.integrator_disconnected(integrator, 0.0)
    del integrator
    gc.collect()
    assert gone() is None
    # ...and still answers late questions about them (what they cost: the next test).
    assert engine.statistics()["remembered"] == 50
    assert engine.outcome_of(card.notification_id) is not None
    assert engine.state_of(card.notification_id).value == "ended"


def test_a_remembered_outcome_costs_no_more_than_before():
    """Bytes held per remembered outcome, with nothing pending: what ``recent_outcomes`` costs.

    The bound is about what one cost here when the engine remembered its own
    ended notifications with their card dropped (up to 44d6f56); the small
    record it keeps instead must not cost more.
    """
    import gc
    import tracemalloc

    remembered = 20_000
    # Without the integrator's history of outcomes (its cost: the next test).
    engine = Engine({t.name: t for t in BUILTIN_TEMPLATES}, Limits(recent_outcomes=remembered, outcome_history=0))
    engine.agent_connected("a", "agent", "s", 0.0)
    engine.integrator_connected("i", "crm", 0.0)
    inp = f.NotifyInput(template_name="msdyn_chat_incoming_unauthenticated",
                        template_parameters={"customerName": "Jane Doe", "queueName": "Sales"})
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(remembered + 1000):
            effects = engine.integrator_frame(
                "i", f.NotifyEvent(request_id=f"request-{i}", agent_id="agent", input=inp,
                                   correlation_id=f"correlation-{i}"), float(i))
            nid = next(e.frame.notification_id for e in effects if isinstance(e.frame, f.Notification))
            del effects
            engine.agent_frame("a", f.Respond(notification_id=nid, action="Accept"), float(i))
        assert engine.next_deadline() is None  # drops the display timers the accepted offers left
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert engine.statistics()["remembered"] == remembered
    assert held / remembered < 490


def test_stale_timers_swept_while_deadlines_run_lose_nothing():
    """The sweep of stale timers never runs under handle_timer's feet.

    Here the first timer added after 4,099 timers went stale is added while
    deadlines run (the next queued offer displayed as one times out); every
    offer still ends once, on time.
    """
    from deskpush.protocol import Template

    engine = Engine({"t": Template(name="t", title="t", timeout=1.0)},
                    Limits(display_limit=1, queue_limit=5000, timer_resolution=0))
    engine.agent_connected("a", "busy", "s", 0.0)
    engine.agent_connected("b", "idle", "s", 0.0)
    engine.integrator_connected("i", "crm", 0.0)
    results: dict[str, list[tuple[str, float]]] = {}

    def run(effects, now):
        for e in effects:
            if type(e).__name__ == "Send" and isinstance(e.frame, f.Result):
                results.setdefault(e.frame.request_id, []).append((e.frame.value.response_reason, now))

    def notify(rid, agent, now):
        inp = f.NotifyInput(template_name="t", cancellation_token=rid)
        run(engine.integrator_frame("i", f.NotifyEvent(request_id=rid, agent_id=agent, input=inp,
                                                       progress=False), now), now)

    for i in range(3):  # y0 displayed, y1 and y2 queued behind it
        notify(f"y{i}", "idle", 0.0)
    for i in range(4100):  # b0 displayed, 4,099 queued (a queue timer each)
        notify(f"b{i}", "busy", 5.0)
    for i in range(1, 4100):  # cancelled: their timers go stale, nothing is added
        run(engine.integrator_frame("i", f.CancelEvent(request_id=f"c{i}", cancellation_token=f"b{i}"), 6.0), 6.0)
    for now in (1000.0, 1005.0, 2000.0, 3000.0):
        assert engine.next_deadline() == now
        run(engine.handle_timer(now), now)
    assert engine.next_deadline() is None
    assert results["y0"] == [("DisplayTimeout", 1000.0)]
    assert results["b0"] == [("DisplayTimeout", 1005.0)]
    assert results["y1"] == [("DisplayTimeout", 2000.0)]
    assert results["y2"] == [("DisplayTimeout", 3000.0)]
    assert all(len(v) == 1 for v in results.values())


def test_an_outcome_in_the_history_costs_about_300_bytes():
    """What ``outcome_history`` costs per outcome (docs/configuration.md says about 300 bytes),
    with UUID requestIds as the SDKs make them, and nothing else remembered."""
    import gc
    import tracemalloc

    kept = 20_000
    engine = Engine({t.name: t for t in BUILTIN_TEMPLATES}, Limits(recent_outcomes=0, outcome_history=kept))
    engine.agent_connected("a", "agent", "s", 0.0)
    engine.integrator_connected("i", "crm", 0.0)
    inp = f.NotifyInput(template_name="msdyn_chat_incoming_unauthenticated", template_parameters={"customerName": "Jane"})
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(kept + 1000):
            effects = engine.integrator_frame(
                "i", f.NotifyEvent(request_id=f"6f1c2a9e-8b7d-4c3e-9a1f-{i:012d}", agent_id="agent", input=inp),
                float(i))
            nid = next(e.frame.notification_id for e in effects if isinstance(e.frame, f.Notification))
            del effects
            engine.agent_frame("a", f.Respond(notification_id=nid, action="Accept"), float(i))
        assert engine.next_deadline() is None
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert engine.statistics()["history"] == kept
    assert held / kept < 340
