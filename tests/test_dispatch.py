"""server.dispatch with a fake clock: effects to writes, the one timer, and how they take turns.

No socket and no waiting: the engine is real, the connections record what
is written to them and when, and the clock moves only when a test (or a
connection that stands in for a slow write) moves it.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Callable

from deskpush.protocol import Engine, Limits, Send
from deskpush.protocol import frames as f
from deskpush.protocol.templates import Template
from deskpush.server.dispatch import Dispatcher

START = 1_700_000_000_000.0
FAST = Template(name="fast", title="Fast", timeout=0.3)


class Handle:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A ``server.clock.Clock`` whose time moves only in ``advance`` (or when a write takes time)."""

    def __init__(self) -> None:
        self.t = START
        self._timers: list[tuple[float, int, Callable[[], None], Handle]] = []
        self._soon: list[tuple[Callable[[], None], Handle]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def spent(self) -> float:
        return self.t / 1000.0

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle()
        heapq.heappush(self._timers, (when, next(self._seq), callback, handle))
        return handle

    def call_soon(self, callback: Callable[[], None]) -> Handle:
        handle = Handle()
        self._soon.append((callback, handle))
        return handle

    def run_soon(self) -> None:
        """One loop turn's worth: what was scheduled with call_soon, and what that schedules."""
        while self._soon:
            batch, self._soon = self._soon, []
            for callback, handle in batch:
                if not handle.cancelled:
                    callback()

    def advance(self, ms: float) -> None:
        """Move time forward by ``ms``, running each timer at its time, like an event loop."""
        end = self.t + ms
        self.run_soon()
        while self._timers and self._timers[0][0] <= end:
            when, _, callback, handle = heapq.heappop(self._timers)
            if handle.cancelled:
                continue
            self.t = max(self.t, when)
            callback()
            self.run_soon()
        self.t = max(self.t, end)


class FakeConn:
    """A connection that records each write (time, frames); a write may take ``write_ms``."""

    def __init__(self, clock: FakeClock, name: str, write_ms: float = 0.0) -> None:
        self.clock = clock
        self.name = name
        self.write_ms = write_ms
        self.queued: list[bytes] = []
        self.writes: list[tuple[float, list[dict]]] = []
        self.closed: tuple[int, str] | None = None

    def queue_frame(self, frame: bytes) -> int:
        self.queued.append(frame)
        return len(self.queued)

    def flush(self) -> None:
        if not self.queued:
            return
        assert self.closed is None, f"{self} written after its close"
        frames = [json.loads(unframe(raw)) for raw in self.queued]
        self.queued.clear()
        self.clock.t += self.write_ms  # a write that takes long, on a slow machine
        self.writes.append((self.clock.t, frames))

    def close(self, code: int, reason: str = "") -> None:
        """Like the real one: what was queued goes first, nothing after."""
        if self.closed is None:
            self.flush()
            self.closed = (code, reason)

    def frames(self, type_: str | None = None) -> list[dict]:
        return [fr for _, frames in self.writes for fr in frames if type_ is None or fr["type"] == type_]

    def __repr__(self) -> str:
        return f"FakeConn({self.name})"


def unframe(raw: bytes) -> bytes:
    """The payload of an unmasked server text frame."""
    n = raw[1] & 0x7F
    if n == 126:
        return raw[4:]
    if n == 127:
        return raw[10:]
    return raw[2:]


def setup(clock: FakeClock, agents: int, **kwargs) -> tuple[Engine, Dispatcher, FakeConn, list[FakeConn]]:
    engine = Engine({"fast": FAST}, Limits(display_limit=10, queue_limit=0))
    dispatcher = Dispatcher(engine, clock, **kwargs)
    ig = FakeConn(clock, "integrator")
    engine.integrator_connected(ig, "crm", clock.now())
    desks = []
    for i in range(agents):
        desk = FakeConn(clock, f"agent-{i}")
        dispatcher.apply(engine.agent_connected(desk, f"agent-{i}", f"s{i}", clock.now()))
        desks.append(desk)
    return engine, dispatcher, ig, desks


def notify(dispatcher: Dispatcher, engine: Engine, ig: FakeConn, request_id: str, agent_id: str) -> None:
    frame = f.NotifyEvent(request_id=request_id, agent_id=agent_id, progress=False,
                          input=f.NotifyInput(template_name="fast"))
    dispatcher.apply(engine.integrator_frame(ig, frame, dispatcher.clock.now()))


def test_each_connection_is_written_once_per_turn_with_all_it_got():
    clock = FakeClock()
    engine, dispatcher, ig, (desk,) = setup(clock, 1)
    clock.run_soon()
    desk.writes.clear()
    for i in range(5):
        notify(dispatcher, engine, ig, f"r{i}", "agent-0")
    assert desk.writes == []  # queued, not written, until the turn ends
    clock.run_soon()
    assert len(desk.writes) == 1 and len(desk.frames("notification")) == 5


def test_a_full_batch_is_written_at_once():
    clock = FakeClock()
    engine, dispatcher, ig, _ = setup(clock, 0, write_at=4)
    dispatcher.apply([Send((ig,), f.Pong(server_time=i)) for i in range(5)])
    assert [len(frames) for _, frames in ig.writes] == [4]  # at the 4th, not at the end of the turn
    clock.run_soon()
    assert [len(frames) for _, frames in ig.writes] == [4, 1]


def test_the_timer_ends_each_offer_at_its_deadline():
    clock = FakeClock()
    engine, dispatcher, ig, (desk,) = setup(clock, 1)
    notify(dispatcher, engine, ig, "r1", "agent-0")
    clock.run_soon()
    (card,) = desk.frames("notification")
    clock.advance(card["expiresAt"] - clock.now() - 1)
    assert ig.frames("result") == []
    clock.advance(1)
    (result,) = ig.frames("result")
    assert result["value"] == {"actionName": "Timeout", "responseReason": "DisplayTimeout"}
    assert ig.writes[-1][0] == card["expiresAt"]  # on time, to the millisecond


def test_a_burst_of_timeouts_ends_each_offer_once():
    """Many deadlines due at once are ended chunk by chunk, none twice, none lost."""
    clock = FakeClock()
    # 7 per chunk and no time budget: a chunk per timer run, many timer runs.
    engine, dispatcher, ig, desks = setup(clock, 6, timer_chunk=7, timer_budget=0.0)
    for i in range(60):
        notify(dispatcher, engine, ig, f"r{i}", f"agent-{i % 6}")
    clock.advance(1000)
    results = ig.frames("result")
    assert sorted(r["requestId"] for r in results) == sorted(f"r{i}" for i in range(60))
    assert {(r["value"]["actionName"], r["value"]["responseReason"]) for r in results} == {("Timeout", "DisplayTimeout")}
    assert len(ig.writes) >= 60 // 7  # they did not all go out in one run
    for desk in desks:
        assert len(desk.frames("resolved")) == 10


def test_a_deadline_due_during_a_long_flush_is_not_kept_waiting():
    """Ending what falls due takes turns with writing to thousands of connections.

    Two connections whose writes take 400 ms each stand in for a flush of
    thousands on a slow machine; the offer's display deadline falls due
    during the first, and its result is written right after it, not after both.
    """
    clock = FakeClock()
    engine, dispatcher, ig, (desk,) = setup(clock, 1, flush_slice=1)
    notify(dispatcher, engine, ig, "r1", "agent-0")
    clock.run_soon()
    (card,) = desk.frames("notification")
    clock.advance(card["expiresAt"] - clock.now() - 100)  # 100 ms before the deadline
    slow = [FakeConn(clock, f"slow-{i}", write_ms=400) for i in range(2)]
    dispatcher.apply([Send(tuple(slow), f.Pong(server_time=0))])
    clock.run_soon()  # the flush: slow-0, then what fell due, then slow-1
    (written_at, frames), = [(t, fr) for t, fr in ig.writes if any(x["type"] == "result" for x in fr)]
    assert written_at == slow[0].writes[0][0] < slow[1].writes[0][0]
    assert written_at - card["expiresAt"] == 300  # after the first slow write only
    assert desk.frames("resolved")


def test_a_session_over_the_agents_limit_closes_the_oldest_after_what_it_had_queued():
    clock = FakeClock()
    engine = Engine({"fast": FAST}, Limits(sessions_per_agent=2))
    dispatcher = Dispatcher(engine, clock)
    ig = FakeConn(clock, "integrator")
    engine.integrator_connected(ig, "crm", clock.now())
    tabs = [FakeConn(clock, f"tab-{i}") for i in range(3)]
    for i, tab in enumerate(tabs[:2]):
        dispatcher.apply(engine.agent_connected(tab, "agent-0", f"s{i}", clock.now()))
    notify(dispatcher, engine, ig, "r1", "agent-0")
    dispatcher.apply(engine.agent_connected(tabs[2], "agent-0", "s2", clock.now()))
    clock.run_soon()
    # The oldest got its welcome and the card, then the close; the others carry on.
    assert [fr["type"] for fr in tabs[0].frames()] == ["welcome", "notification"]
    assert tabs[0].closed == (4409, "replaced by a newer session of this agent")
    assert tabs[1].closed is None and tabs[2].closed is None
    assert [fr["type"] for fr in tabs[2].frames()] == ["welcome", "notification"]
    card = tabs[2].frames("notification")[0]
    respond = f.Respond(notification_id=card["notificationId"], action="Accept")
    dispatcher.apply(engine.agent_frame(tabs[2], respond, clock.now()))
    clock.run_soon()
    assert tabs[1].frames("resolved") and tabs[2].frames("resolved")
