"""Cluster mode's replica decides exactly what the embedded engine decides (protocol/replica.py).

The differential check of docs/cluster.md: random programs of events (sessions opening and
closing on two nodes, notifyEvents and cancelEvents, Accept and Reject, time passing, ticks,
a node declared down) run through

* the reference: ``Engine`` called directly, as embedded mode does;
* a ``Replica`` fed the same events as log entries, as a cluster node does;
* a second replica that is snapshotted (``dump``/``load``) at a random entry and goes on from the copy,
  as a node that joins late does;

and every frame, target, close and outcome must be the same (notification ids and
cancellation tokens aside: the replica derives them from entry ids). A last test runs one long
log in two processes with different ``PYTHONHASHSEED``\\ s: replicas on different nodes must agree
even though sets of strings iterate in a different order in each.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deskpush.protocol import frames as f
from deskpush.protocol.engine import Close, Effect, Ended, Engine, Limits, Send
from deskpush.protocol.replica import (
    AgentMsg,
    AgentOff,
    AgentOn,
    IntegratorMsg,
    IntegratorOff,
    IntegratorOn,
    NodeDown,
    Replica,
    Rules,
    SnapshotError,
    Tick,
    decode_event,
    encode_event,
)

from .engine_helpers import AUTO, BUILTINS, CHAT, T0, VOICE

KEY = b"k" * 32
LIMITS = Limits(display_limit=2, queue_limit=2, queue_timeout=3.0, presence_grace=2.0, recent_outcomes=50,
                sessions_per_agent=2, outcome_history=30, timer_resolution=0.0)
NODES = ("n1", "n2")
AGENTS = ("a1", "a2", "a3")


def program(seed: int, length: int) -> list[tuple[float, Any]]:
    """A random log: (ms, event) pairs, ms never going back. Events name things by handle and index."""
    rnd = random.Random(seed)
    now = T0
    out: list[tuple[float, Any]] = []
    open_conns: dict[tuple[str, int], str] = {}  # handle -> its agent id, or "integrator"
    counter = 0
    requests = 0
    for _ in range(length):
        now += rnd.choice((0, 0, 1, 5, 50, 400, 1500, 4000))
        node = rnd.choice(NODES)
        agents = [h for h, kind in open_conns.items() if kind != "integrator"]
        integrators = [h for h, kind in open_conns.items() if kind == "integrator"]
        roll = rnd.random()
        if roll < 0.12 or not open_conns:
            counter += 1
            if rnd.random() < 0.6:
                agent = rnd.choice(AGENTS)
                open_conns[(node, counter)] = agent
                out.append((now, AgentOn(node, counter, agent, f"s{counter}")))
            else:
                open_conns[(node, counter)] = "integrator"
                out.append((now, IntegratorOn(node, counter, "crm", rnd.choice(("$", None)))))
        elif roll < 0.18:
            handle = rnd.choice(list(open_conns))
            kind = open_conns.pop(handle)
            out.append((now, (IntegratorOff if kind == "integrator" else AgentOff)(handle[0], handle[1])))
        elif roll < 0.45 and integrators:
            h = rnd.choice(integrators)
            requests += 1
            frame = {"type": "notifyEvent", "requestId": f"r{rnd.randrange(requests + 1)}",
                     "agentId": rnd.choice(AGENTS),
                     "input": {"templateName": rnd.choice((CHAT, CHAT, VOICE, AUTO, "missing")),
                               "templateParameters": {"customerName": "Jane"}}}
            if rnd.random() < 0.3:
                frame["cancellationToken"] = f"tok{rnd.randrange(6)}"
            out.append((now, IntegratorMsg(h[0], h[1], json.dumps(frame).encode())))
        elif roll < 0.55 and integrators:
            h = rnd.choice(integrators)
            # The token: one the integrator chose, or the n-th the server made (filled in per side).
            token: Any = f"tok{rnd.randrange(6)}" if rnd.random() < 0.5 else ("made", rnd.randrange(8))
            out.append((now, ("cancel", h, f"c{len(out)}", token)))
        elif roll < 0.62 and integrators:
            h = rnd.choice(integrators)
            out.append((now, ("ack", h, rnd.randrange(10))))
        elif roll < 0.85 and agents:
            h = rnd.choice(agents)
            out.append((now, ("respond", h, open_conns[h], rnd.randrange(3),
                              rnd.choice(("Accept", "Accept", "Reject")))))
        elif roll < 0.95:
            out.append((now, Tick(node)))
        else:
            down = rnd.choice(NODES)
            for handle in [h for h in open_conns if h[0] == down]:
                del open_conns[handle]
            out.append((now, NodeDown(node, down)))
    return out


class Side:
    """One way of running a program: the engine directly, or a replica of it."""

    def __init__(self, replica: bool) -> None:
        self.replica = Replica(BUILTINS, LIMITS) if replica else None
        counter = iter(range(1, 10**9))
        self.engine = self.replica.engine if self.replica else Engine(BUILTINS, LIMITS,
                                                                         new_id=lambda: f"id{next(counter)}")
        self.open: dict[tuple[str, int], bool] = {}  # the reference's own view, as a replica keeps it
        self.ids: dict[str, int] = {}  # server-made id -> order of first appearance
        self.made_tokens: list[str] = []
        self.seq = 0
        self.last_ms = 0.0

    def norm(self, value: Any) -> Any:
        """A frame or outcome with server-made ids replaced by their order of appearance."""
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k in ("notificationId", "notification_id") or (k == "cancellationToken" and v in self.ids):
                    out[k] = f"#{self.ids.setdefault(v, len(self.ids))}"
                elif k == "displayed" and all(isinstance(x, str) for x in v):
                    out[k] = [f"#{self.ids.setdefault(x, len(self.ids))}" for x in v]
                else:
                    out[k] = self.norm(v)
            return out
        if isinstance(value, (list, tuple)):
            return [self.norm(v) for v in value]
        return value

    def effects(self, effects: list[Effect]) -> list[Any]:
        out = []
        for e in effects:
            if type(e) is Send:
                frame = msgspec.to_builtins(e.frame)
                if type(e.frame) is f.Status and e.frame.cancellation_token not in self.made_tokens \
                        and not e.frame.cancellation_token.startswith("tok"):
                    self.made_tokens.append(e.frame.cancellation_token)
                    self.ids.setdefault(e.frame.cancellation_token, len(self.ids))
                out.append(("send", sorted(e.targets), type(e.frame).__name__, self.norm(frame)))
            elif type(e) is Close:
                out.append(("close", sorted(e.targets), tuple(e.closing)))
            else:
                assert type(e) is Ended
                out.append(("ended", self.norm(msgspec.to_builtins(e))))
        return out

    def run(self, ms: float, event: Any) -> list[Any]:
        if isinstance(event, tuple):
            event = self.concrete(event)
            if event is None:
                return []
        if self.replica is not None:
            self.seq = self.seq + 1 if ms == self.last_ms else 0
            self.last_ms = ms
            return self.effects(self.replica.apply(f"{int(ms)}-{self.seq}", decode_event(encode_event(event))))
        return self.effects(self.reference(ms, event))

    def concrete(self, op: tuple) -> Any:
        """An event that names a displayed notification or a made token, with this side's ids."""
        if op[0] == "respond":
            _, h, agent, index, action = op
            shown = self.engine.displayed(agent)
            nid = shown[index] if index < len(shown) else "nope"
            return AgentMsg(h[0], h[1], json.dumps({"type": "respond", "notificationId": nid,
                                                    "action": action}).encode())
        if op[0] == "cancel":
            _, h, rid, token = op
            if isinstance(token, tuple):
                token = self.made_tokens[token[1]] if token[1] < len(self.made_tokens) else "never-made"
            return IntegratorMsg(h[0], h[1], json.dumps({"type": "cancelEvent", "requestId": rid,
                                                         "cancellationToken": token}).encode())
        if op[0] == "ack":
            _, h, back = op
            history = self.engine.history("crm")
            if not history:
                return None
            oid = history[max(0, len(history) - 1 - back)].outcome_id
            return IntegratorMsg(h[0], h[1], json.dumps({"type": "ack", "outcomeId": oid}).encode())
        raise AssertionError(op)

    def reference(self, ms: float, event: Any) -> list[Effect]:
        """What embedded mode does with the event: the engine's own methods, nothing else."""
        e, t = self.engine, type(event)
        handle = (event.node, getattr(event, "conn", 0))
        if t is AgentOn:
            self.open[handle] = True
            return e.agent_connected(handle, event.agent, event.session, ms)
        if t is IntegratorOn:
            self.open[handle] = False
            return e.integrator_connected(handle, event.integrator, ms, event.resume)
        if t in (AgentOff, IntegratorOff):
            if self.open.pop(handle, None) is None:
                return []
            return (e.agent_disconnected if t is AgentOff else e.integrator_disconnected)(handle, ms)
        if t is AgentMsg:
            if handle not in self.open:
                return []
            return e.agent_frame(handle, f.AGENT_DECODER.decode(event.frame), ms)
        if t is IntegratorMsg:
            if handle not in self.open:
                return []
            return e.integrator_frame(handle, f.INTEGRATOR_DECODER.decode(event.frame), ms)
        if t is Tick:
            return e.handle_timer(ms)
        if t is NodeDown:
            out: list[Effect] = []
            for h, agent in [(h, a) for h, a in self.open.items() if h[0] == event.down]:
                del self.open[h]
                out.extend((e.agent_disconnected if agent else e.integrator_disconnected)(h, ms))
            return out
        raise AssertionError(event)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), cut=st.floats(0, 1))
def test_a_replica_decides_what_the_engine_decides(seed, cut):
    log = program(seed, 160)
    reference, replica = Side(replica=False), Side(replica=True)
    restored = Side(replica=True)
    cut_at = int(cut * len(log))
    for i, (ms, event) in enumerate(log):
        if i == cut_at:
            # A node joining now: the snapshot of the replica so far, then the log from here.
            blob = restored.replica.dump(KEY)
            copy = Replica.load(blob, KEY)
            assert copy.position == restored.replica.position
            restored.replica, restored.engine = copy, copy.engine
        expected = reference.run(ms, event)
        assert replica.run(ms, event) == expected, (i, event)
        assert restored.run(ms, event) == expected, (i, event, "after the snapshot")
    assert replica.engine.statistics() == reference.engine.statistics()


def test_events_round_trip_and_rules_apply():
    replica = Replica(BUILTINS, Limits())
    fast = msgspec.structs.replace(BUILTINS[CHAT], timeout=1.0)
    rules = Rules("n1", (fast,), LIMITS)
    assert decode_event(encode_event(rules)) == rules
    replica.apply(f"{int(T0)}-0", rules)
    assert list(replica.engine.templates) == [CHAT] and replica.engine.limits == LIMITS
    assert replica.rules() == ((fast,), LIMITS)


def test_a_snapshot_signed_with_another_key_is_refused():
    replica = Replica(BUILTINS, Limits())
    blob = replica.dump(KEY)
    with pytest.raises(SnapshotError, match="not signed with this cluster's key"):
        Replica.load(blob, b"x" * 32)
    with pytest.raises(SnapshotError, match="not signed"):
        Replica.load(blob[:-1] + bytes([blob[-1] ^ 1]), KEY)


_RUN_LOG = """
import hashlib, json, sys
from tests.test_replica import Side, program
side = Side(replica=True)
digest = hashlib.sha256()
for ms, event in program(int(sys.argv[1]), 3000):
    digest.update(json.dumps(side.run(ms, event), sort_keys=True, default=str).encode())
print(digest.hexdigest(), json.dumps(side.engine.statistics(), sort_keys=True))
"""


def test_replicas_in_processes_with_different_hash_seeds_agree():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", _RUN_LOG, "424242"], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300, check=True)
        outputs.add(done.stdout)
    assert len(outputs) == 1, outputs
    digest = hashlib.sha256(next(iter(outputs)).encode()).hexdigest()
    assert digest


def test_the_program_exercises_what_it_should():
    """The random programs reach outcomes of every kind, so the comparison above means something."""
    kinds = set()
    for seed in range(30):
        side = Side(replica=True)
        for ms, event in program(seed, 200):
            for effect in side.run(ms, event):
                if effect[0] == "ended":
                    kinds.add(tuple(effect[1]["outcome"]))
                if effect[0] == "close":
                    kinds.add("close")
    assert {("Accept", "Accept"), ("Accept", "AutoAccept"), ("Reject", "DeclinedByAgent"),
            ("Timeout", "DisplayTimeout"), ("Cancel", "CancelledByIntegrator"),
            ("Reject", "AgentDisconnected"), ("Reject", "NotificationQueueLimitExceeded")} <= kinds, kinds
