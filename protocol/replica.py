"""The engine as a replicated state machine: cluster mode's core, without I/O.

Theory of operation
-------------------
In cluster mode every node keeps a full copy of one ``Engine`` and feeds it the
same events in the same order: the entries of one Redis Stream, the *log*.
A node never calls its engine directly. What its sockets bring in (a session
authenticated, a frame, a close), what its timer finds due, and what its
monitor sees (another node's heartbeat expired) it appends to the log as an
``Event``; every node, itself included, reads the log in order and applies
each entry here, to its ``Replica``. The engine is deterministic (no clock,
no randomness: ``now`` is the entry id's milliseconds, which Redis takes from
its own clock, and new ids are derived from the entry id), so every replica
makes the same decisions: one outcome per offer, decided once, in log order,
whichever node's socket the deciding event came from. Each node then writes
the effects that target its own connections and drops the rest.

So the rules stay written once, in ``engine.py``; Redis holds the order of
events (and, in ``Snapshot``\\ s, their sum), and a node holds sockets and a
cache of the sum. A node that dies leaves nothing that only it knew: every
other node has the whole state, a new node loads the newest snapshot and
reads the log from there.

Connections are named by ``Handle``\\ s, ``(node id, number)``: unique across
the cluster and the same in every replica. A node's handles die with it:
``NodeDown`` disconnects them all, after which presence grace runs as it does
for any dropped session.

What a replica must never do is let anything but the log decide: no set
iterated where the order could reach a decision (sets of strings iterate in
an order that differs between processes), no local clock, no local
configuration. The templates and limits are themselves events (``Rules``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
from collections.abc import Mapping
from typing import Union

import msgspec

from . import frames as f
from .engine import Close, Effect, Engine, Ended, Limits, Send
from .templates import Template

__all__ = [
    "Handle",
    "Event",
    "AgentOn",
    "AgentMsg",
    "AgentOff",
    "IntegratorOn",
    "IntegratorMsg",
    "IntegratorOff",
    "Tick",
    "NodeDown",
    "Rules",
    "Replica",
    "encode_event",
    "decode_event",
    "parse_entry_id",
    "SnapshotError",
    "BUILD",
]

#: A connection anywhere in the cluster: (node id, number on that node).
Handle = tuple[str, int]


class _Event(msgspec.Struct, tag_field="t", array_like=True, frozen=True, gc=False):
    #: The node that appended the event (it logs and counts the outcomes the event decides).
    node: str


class AgentOn(_Event, tag="a+"):
    conn: int
    agent: str
    session: str


class AgentMsg(_Event, tag="a"):
    conn: int
    frame: bytes  # the frame's JSON, as the engine's decoder reads it


class AgentOff(_Event, tag="a-"):
    conn: int


class IntegratorOn(_Event, tag="i+"):
    conn: int
    integrator: str
    resume: str | None


class IntegratorMsg(_Event, tag="i"):
    conn: int
    frame: bytes


class IntegratorOff(_Event, tag="i-"):
    conn: int


class Tick(_Event, tag="t"):
    """Run the deadlines due at the entry's time (any node may append one; a second is a no-op)."""


class NodeDown(_Event, tag="n-"):
    """``down``'s heartbeat expired (or it stopped): its connections are gone."""

    down: str


class Rules(_Event, tag="r"):
    """The templates and limits every replica uses from this entry on."""

    templates: tuple[Template, ...]
    limits: Limits


Event = Union[AgentOn, AgentMsg, AgentOff, IntegratorOn, IntegratorMsg, IntegratorOff, Tick, NodeDown, Rules]

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Event)


def encode_event(event: Event) -> bytes:
    return _ENCODER.encode(event)


def decode_event(data: bytes) -> Event:
    return _DECODER.decode(data)


def parse_entry_id(entry_id: str | bytes) -> tuple[int, int]:
    """A stream entry id (``"<ms>-<seq>"``) as numbers."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


class _EntryIds:
    """Notification ids and cancellation tokens derived from the log entry that makes them.

    Unique (an entry id is unique in the log, and a counter runs within an
    entry) and the same in every replica. They need not be secret (see
    ``engine.id_factory``).
    """

    def __init__(self) -> None:
        self.prefix = ""
        self.n = 0

    def at(self, ms: int, seq: int) -> None:
        self.prefix = f"{ms:x}{seq:x}-"
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.prefix}{self.n:x}"


def _fingerprint() -> str:
    """What identifies the rules this process runs: a hash of the protocol package's sources.

    Replicas agree only if they run the same rules, so a cluster runs one
    build at a time (docs/cluster.md, "Upgrading"), and a pickled replica
    is only loaded by the build that wrote it.
    """
    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as source:
                digest.update(name.encode() + b"\0" + source.read())
    return digest.hexdigest()[:16]


#: This build's rules (``_fingerprint``).
BUILD = _fingerprint()


class SnapshotError(Exception):
    """A snapshot that cannot be used: not signed with this cluster's key, or not readable."""


class Replica:
    """One node's copy of the cluster's engine, and what it knows of connections.

    ``apply(entry_id, event)`` is the only way in; it returns the engine's
    effects, with ``Handle``\\ s as targets, for the caller to keep its own.
    """

    def __init__(self, templates: Mapping[str, Template], limits: Limits) -> None:
        self._ids = _EntryIds()
        self.engine = Engine(templates, limits, new_id=self._ids)
        #: Where this replica is in the log: the last entry applied ("0-0": none).
        self.position = "0-0"
        #: The number of that entry (the log numbers its entries 1, 2, ...; the node checks for gaps).
        self.number = 0
        self.now = 0.0
        # Open connections by node, in the order they opened (a dict, never a
        # set: NodeDown disconnects them in this order in every replica).
        self._nodes: dict[str, dict[Handle, bool]] = {}  # node -> handle -> is an agent session
        self.applied = 0

    # ------------------------------------------------------------------

    def apply(self, entry_id: str, event: Event) -> list[Effect]:
        """Apply one log entry; its effects, for every node (each keeps what targets its own handles)."""
        ms, seq = parse_entry_id(entry_id)
        self.position = entry_id
        self.applied += 1
        # Entry ids never go back (Redis makes each greater than the last).
        now = self.now = float(ms)
        self._ids.at(ms, seq)
        engine = self.engine
        t = type(event)
        if t is AgentMsg or t is IntegratorMsg:
            handle = (event.node, event.conn)
            conns = self._nodes.get(event.node)
            if conns is None or handle not in conns:
                return []  # from a connection already gone (its node declared down)
            if t is AgentMsg:
                try:
                    frame = f.AGENT_DECODER.decode(event.frame)
                except msgspec.DecodeError:
                    return []
                return engine.agent_frame(handle, frame, now)
            try:
                frame = f.INTEGRATOR_DECODER.decode(event.frame)
            except msgspec.DecodeError:
                return []
            return engine.integrator_frame(handle, frame, now)
        if t is Tick:
            return engine.handle_timer(now)
        if t is AgentOn:
            handle = (event.node, event.conn)
            self._nodes.setdefault(event.node, {})[handle] = True
            return engine.agent_connected(handle, event.agent, event.session, now)
        if t is IntegratorOn:
            handle = (event.node, event.conn)
            self._nodes.setdefault(event.node, {})[handle] = False
            return engine.integrator_connected(handle, event.integrator, now, event.resume)
        if t is AgentOff or t is IntegratorOff:
            handle = (event.node, event.conn)
            conns = self._nodes.get(event.node)
            if conns is None or conns.pop(handle, None) is None:
                return []
            if t is AgentOff:
                return engine.agent_disconnected(handle, now)
            return engine.integrator_disconnected(handle, now)
        if t is NodeDown:
            out: list[Effect] = []
            for handle, agent in (self._nodes.pop(event.down, None) or {}).items():
                if agent:
                    out.extend(engine.agent_disconnected(handle, now))
                else:
                    out.extend(engine.integrator_disconnected(handle, now))
            return out
        if t is Rules:
            engine.replace_templates({tmpl.name: tmpl for tmpl in event.templates})
            engine.limits = event.limits
            return []
        raise TypeError(f"not an event: {event!r}")

    def rules(self) -> tuple[tuple[Template, ...], Limits]:
        """The templates and limits in force (to tell whether a node's own differ)."""
        return tuple(self.engine.templates.values()), self.engine.limits

    def handles_of(self, node: str) -> list[Handle]:
        return list(self._nodes.get(node, ()))

    def nodes(self) -> list[str]:
        """The nodes with open connections, as this replica knows them."""
        return [node for node, conns in self._nodes.items() if conns]

    # ------------------------------------------------------------------
    # Snapshots: the whole replica at ``position``, signed.

    def dump(self, key: bytes) -> bytes:
        """The replica as bytes, with an HMAC-SHA256 under ``key`` in front.

        It is a pickle, so it is signed: a node loads only what a node
        holding the cluster's secret wrote, and writing to Redis alone does
        not let anyone run code on the nodes.
        """
        body = pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)
        return hmac.new(key, body, hashlib.sha256).digest() + body

    @staticmethod
    def load(data: bytes, key: bytes) -> Replica:
        """Raises:
            SnapshotError: the signature does not match ``key``, or it does not load.
        """
        mac, body = data[:32], data[32:]
        if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
            raise SnapshotError("the snapshot is not signed with this cluster's key (auth.jwtSecret differs?)")
        try:
            replica = pickle.loads(body)  # noqa: S301 - signed above
        except Exception as exc:  # a snapshot from another deskpush version
            raise SnapshotError(f"the snapshot does not load: {exc!r}") from None
        if not isinstance(replica, Replica):
            raise SnapshotError("the snapshot is not a deskpush replica")
        return replica


def local_effects(effects: list[Effect], node: str, lookup: Mapping[Handle, object]) -> list[Effect]:
    """The effects for ``node``'s own connections, their handles replaced by what ``lookup`` maps them to.

    ``Ended`` effects are kept (the caller decides whether it logs them).
    """
    out: list[Effect] = []
    get = lookup.get
    for effect in effects:
        t = type(effect)
        if t is Ended:
            out.append(effect)
            continue
        targets = tuple(c for c in (get(h) for h in effect.targets if h[0] == node) if c is not None)
        if not targets:
            continue
        if t is Send:
            out.append(Send(targets, effect.frame))
        else:
            out.append(Close(targets, effect.closing))
    return out

