"""Cluster mode: this node's side of the shared log in Redis.

``protocol.replica`` explains the model: every node keeps a replica of one
engine and applies the entries of one Redis Stream in order. This module does
the I/O around it:

* **Appending.** The engine's event methods (``agent_connected`` and the
  rest, with the engine's signatures, so ``endpoints`` takes a node where it
  takes an engine) give each local connection a ``Handle`` and append an
  ``Event`` for it; they return no effects. Events collect during a turn of
  the loop and go to Redis in one call (``FCALL deskpush_append``), one call
  in flight at a time, so their order is the order they came in.
* **Reading.** One task reads the log (``XREAD BLOCK``) from where the replica
  is, applies each entry, and hands the effects that target this node's
  connections to the dispatcher, all at once per batch. The outcomes an entry
  decides are logged and counted by the node that appended it, so each once.
* **Time.** ``now`` is the entry's id, from Redis's clock. The node's clock
  (``RedisClock``) is its own clock plus an offset to Redis's, measured with
  ``TIME``; the dispatcher's one timer arms at the engine's next deadline on
  it, and when it fires the node appends a ``Tick`` (at most one in flight); a
  tick of its own that comes back with an id before the deadline it was for
  means its clock is ahead, and moves it back by the difference.
  Any node may tick; a tick finds nothing due if another got there first.
* **Nodes.** Each node refreshes its heartbeat key (``PX nodeTimeout``) every
  ``heartbeat`` seconds and checks the others: one whose key has expired is
  declared down by ``FCALL deskpush_node_down``, which appends ``NodeDown``
  once however many nodes notice. A node that finds itself declared down (it
  was paused too long) closes its sessions with 1012 and starts over under a
  new id.
* **Snapshots.** Every ``snapshotInterval`` one node (a lease key decides
  which) writes its replica, signed, with its position
  (``FCALL deskpush_snapshot``); the log is trimmed to the previous snapshot.
  A starting node loads the newest snapshot and reads the log from there; a
  node that finds it has fallen behind the trim loads it too, and closes its
  sessions with 1012 so their clients resynchronise.
* **Redis unreachable.** Events wait in the node (up to ``maxBuffered``;
  past that the connection that brought one is closed with 1013) and go out
  in order once Redis is back; reading resumes where it stopped. After
  ``redisTimeout`` the node reports not ready (``/readyz``) and refuses new
  sessions with 503; at start it gives up with ``ClusterError``.

docs/cluster.md has the keys, the functions and what clients see when
something fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from ..protocol import Ended, Limits
from ..protocol import frames as f
from ..protocol.engine import Effect, Snapshot
from ..protocol.replica import (
    BUILD,
    AgentMsg,
    AgentOff,
    AgentOn,
    Event,
    Handle,
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
    local_effects,
    parse_entry_id,
)
from ..protocol.templates import Template
from ..protocol.vocabulary import CLOSE_NODE_RESYNC, CLOSE_REDIS_UNREACHABLE
from .clock import Cancellable, LoopClock
from .dispatch import Dispatcher

__all__ = ["ClusterError", "ClusterNode", "RedisClock", "ClusterDispatcher", "LIBRARY"]

log = logging.getLogger("deskpush")

#: Bump with every change to the library: FUNCTION LOAD REPLACE makes the last node started win.
LIBRARY_VERSION = 3

LIBRARY = """#!lua name=deskpush

-- deskpush cluster mode (docs/cluster.md). Version %d.

local function before(a, b)  -- stream id a sorts before b
  local ams, aseq = string.match(a, '^(%%d+)-(%%d+)$')
  local bms, bseq = string.match(b, '^(%%d+)-(%%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams < bms or (ams == bms and tonumber(aseq) < tonumber(bseq))
end

-- Every entry is numbered (field n) from one counter, so a reader sees a gap
-- (entries trimmed before it read them) or the log going back (Redis lost writes).

-- KEYS: the log, the counter; ARGV the events, in order. Returns the last entry id.
redis.register_function('deskpush_append', function(keys, args)
  local n = redis.call('INCRBY', keys[2], #args) - #args
  local id
  for i = 1, #args do
    id = redis.call('XADD', keys[1], '*', 'e', args[i], 'n', n + i)
  end
  return id
end)

-- Declare a node down, once, and only while its heartbeat key is gone.
-- KEYS: the node set, the node's heartbeat key, the log, the counter. ARGV: node id, the NodeDown event.
redis.register_function('deskpush_node_down', function(keys, args)
  if redis.call('EXISTS', keys[2]) == 1 then return 0 end
  if redis.call('SREM', keys[1], args[1]) == 0 then return 0 end
  redis.call('XADD', keys[3], '*', 'e', args[2], 'n', redis.call('INCR', keys[4]))
  return 1
end)

-- Keep a snapshot if it is newer than the one kept (or of the same entry, by
-- another build: a cluster's first node of a new build converting it), and
-- trim the log to the one it replaces (a node a little behind still finds
-- its next entry).
-- KEYS: the snapshot hash, the log.
-- ARGV: position, the replica (pickled, signed), the portable state (JSON), build, entry number.
redis.register_function('deskpush_snapshot', function(keys, args)
  local current = redis.call('HGET', keys[1], 'position')
  if current and not before(current, args[1]) then
    if current ~= args[1] or redis.call('HGET', keys[1], 'build') == args[4] then return 0 end
  end
  redis.call('HSET', keys[1], 'position', args[1], 'blob', args[2], 'portable', args[3], 'build', args[4],
             'number', args[5])
  if current and current ~= args[1] then
    redis.call('XTRIM', keys[2], 'MINID', current)
    redis.call('HSET', keys[1], 'trimmed', current)
  end
  return 1
end)
""" % LIBRARY_VERSION


class ClusterError(Exception):
    """Cluster mode cannot start (Redis unreachable, a snapshot that does not load)."""


def _before(a: str, b: str) -> bool:
    return parse_entry_id(a) < parse_entry_id(b)


class RedisClock(LoopClock):
    """The loop's clock, moved onto Redis's: ``now()`` estimates Redis's ``TIME``.

    The engine never reads it (its ``now`` is an entry id); it arms the timer
    and says when to tick. The offset is measured with ``TIME`` at start and
    afterwards moved only by what proves it wrong, each way:

    * ``at_least``: an entry id is Redis's clock when the entry was appended,
      so Redis's clock reads at least that now: a clock behind it moves on.
      (Not more: the entry may have waited, in the stream or in a stalled
      loop, and taking its id for "now" would set the clock back by the
      wait, for good, and make every later timeout that much late.)
    * ``at_most``: this node's own ``Tick``, appended when this clock read
      ``ours``, got an id Redis stamped later: a clock ahead of it by more
      than that moves back, so a tick sent early is not followed by more.
    """

    offset = 0.0

    def now(self) -> float:
        return super().now() + self.offset

    def call_at(self, when: float, callback: Callable[[], None]) -> Cancellable:
        return super().call_at(when - self.offset, callback)

    def at_least(self, redis_ms: float) -> None:
        """Redis's clock has read ``redis_ms`` (an entry id it made): never let ours be behind it."""
        behind = redis_ms - self.now()
        if behind > 0:
            self.offset += behind

    def at_most(self, redis_ms: float, ours: float) -> None:
        """When ours read ``ours``, Redis's had not reached ``redis_ms`` + 1 ms yet (it stamped an entry
        sent after with ``redis_ms``): never let ours be ahead by more than that."""
        ahead = ours - (redis_ms + 1)
        if ahead > 0:
            self.offset -= ahead


class ClusterDispatcher(Dispatcher):
    """The dispatcher with deadlines run through the log: due means "append a Tick"."""

    node: ClusterNode

    def _end_due(self, now: float, budget: float) -> None:
        self.node.tick(now)


class ClusterNode:
    """One node of a cluster: the engine's event methods, backed by the log. See the module docstring."""

    def __init__(self, url: str, secret: str, templates: Mapping[str, Template], limits: Limits, *,
                 prefix: str = "deskpush", heartbeat: float = 1.0, node_timeout: float = 3.0,
                 redis_timeout: float = 10.0, snapshot_interval: float = 10.0, max_buffered: int = 100_000,
                 read_count: int = 2000) -> None:
        self.url = url
        self.templates = tuple(templates.values())
        self.limits = limits
        self.heartbeat = heartbeat
        self.node_timeout = node_timeout
        self.redis_timeout = redis_timeout
        self.snapshot_interval = snapshot_interval
        self.max_buffered = max_buffered
        self.read_count = read_count
        self._key = hashlib.sha256(b"deskpush cluster snapshot\0" + secret.encode()).digest()
        # One hash tag for every key: one slot, so the functions' keys stay
        # together should this run on Redis Cluster.
        tag = "{" + prefix + "}"
        self.log_key = f"{tag}:log"
        self.counter_key = f"{tag}:counter"
        self.snapshot_key = f"{tag}:snapshot"
        self.nodes_key = f"{tag}:nodes"
        self.lease_key = f"{tag}:snapshot-lease"
        self._heartbeat_prefix = f"{tag}:node:"
        self.node_id = self._new_id()
        self.replica = Replica(templates, limits)
        self.dispatcher: ClusterDispatcher | None = None
        self.clock: RedisClock | None = None
        self._redis: Any = None  # commands
        self._reader_redis: Any = None  # the blocking XREAD
        self._handles: dict[Handle, Any] = {}  # this node's handles -> connections
        self._conns: dict[Any, Handle] = {}
        self._next = 0
        self._outbox: list[bytes] = []
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ticking = False
        self._tick_for = 0.0
        self._rewrite = False  # the log went back: write this replica as the snapshot
        self._rejoin_from: str | None = None  # the id this node went by before its last resync, until it rejoined
        self._closed = False
        #: ``time.monotonic()`` since when Redis has not answered, or None.
        self.unreachable_since: float | None = None
        # No node is declared down before this (monotonic): after a start or a
        # Redis outage every node needs a heartbeat's time to refresh its key,
        # which may have expired meanwhile.
        self._quiet_until = 0.0
        self.last_error = ""
        self.started = False
        #: Why this node cannot go on (one of its tasks failed: a bug), or "".
        self.failed = ""

    @staticmethod
    def _new_id() -> str:
        return secrets.token_hex(6)

    def _heartbeat_key(self, node: str) -> str:
        return self._heartbeat_prefix + node

    # ------------------------------------------------------------------
    # Start and stop

    async def start(self, loop: asyncio.AbstractEventLoop) -> RedisClock:
        """Connect, load the functions and the newest snapshot, catch up with the log, join.

        Raises:
            ClusterError: Redis did not answer within ``redis_timeout``, or the snapshot is not ours.
        """
        import redis.asyncio as aioredis

        options = dict(socket_connect_timeout=2.0, socket_timeout=None, socket_keepalive=True,
                       health_check_interval=0, retry_on_timeout=False)
        self._redis = aioredis.Redis.from_url(self.url, **options)
        self._reader_redis = aioredis.Redis.from_url(self.url, **options)
        deadline = loop.time() + self.redis_timeout
        while True:
            try:
                await self._redis.function_load(LIBRARY, replace=True)
                break
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                if loop.time() >= deadline:
                    await self._close_clients()
                    raise ClusterError(f"cannot reach Redis at {_shown(self.url)} for {self.redis_timeout:g} s "
                                       f"(cluster.redisTimeout): {exc}") from None
                await asyncio.sleep(0.2)
            except aioredis.ResponseError as exc:
                await self._close_clients()
                raise ClusterError(f"Redis at {_shown(self.url)} refused deskpush's functions (Redis 7 or "
                                   f"newer is needed): {exc}") from None
        self.clock = clock = RedisClock(loop)
        await self._measure_clock()
        await self._check_builds()
        if await self._load_snapshot():
            # Another build's snapshot, converted: write it as this build's, then load whichever
            # conversion was written first (two new nodes starting together must agree).
            blob, portable = await self._dump()
            await self._fcall("deskpush_snapshot", 2, self.snapshot_key, self.log_key, self.replica.position, blob,
                              portable, BUILD, self.replica.number)
            await self._load_snapshot()
        await self._catch_up()
        await self._join()
        if self.replica.rules() != (self.templates, self.limits):
            self._append(Rules(self.node_id, self.templates, self.limits))
        self._wake = asyncio.Event()
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._reader()),
                       loop.create_task(self._monitor())]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        self.started = True
        log.info("cluster: node %s joined through %s at %s (%d entries applied)", self.node_id,
                 _shown(self.url), self.replica.position, self.replica.applied)
        return clock

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug: without its tasks the node cannot go on. Say so loudly.
            name = task.get_coro().__name__.strip("_")
            self.failed = f"cluster {name} failed: {task.exception()!r}"
            log.critical("cluster: node %s's %s task failed; /readyz answers 503 from now on", self.node_id, name,
                         exc_info=task.exception())

    def attach(self, dispatcher: ClusterDispatcher) -> None:
        """Hand the effects for this node's connections to ``dispatcher`` from now on."""
        dispatcher.node = self
        self.dispatcher = dispatcher

    async def close(self) -> None:
        """Send what is waiting (a few seconds at most), leave the cluster, disconnect."""
        if self._closed:
            return
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        try:
            async with asyncio.timeout(max(2.0, self.heartbeat * 3)):
                while self._outbox and self.unreachable_since is None:
                    await asyncio.sleep(0.01)
                # Leave now, not at the heartbeat's expiry: what this node's
                # connections held goes to presence grace at once.
                await self._redis.delete(self._heartbeat_key(self.node_id))
                await self._node_down(self.node_id)
        except (Exception, asyncio.TimeoutError) as exc:
            log.warning("cluster: node %s left without saying so (%s); the others will notice in %g s",
                        self.node_id, exc, self.node_timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            async with asyncio.timeout(max(5.0, self.redis_timeout)):
                await self._last_snapshot()
        except (Exception, asyncio.TimeoutError) as exc:
            log.warning("cluster: node %s could not write the last snapshot (%r)", self.node_id, exc)
        await self._close_clients()

    async def _last_snapshot(self) -> None:
        """The last node to leave writes a snapshot of the log's end, so nothing needs the log after it.

        What an upgrade needs (docs/cluster.md): the next build reads only the
        portable part of a snapshot, so the state must be whole in one.
        """
        if not self.started or self.unreachable_since is not None:
            return
        others = [m.decode() for m in await self._redis.smembers(self.nodes_key) if m.decode() != self.node_id]
        if others and await self._redis.exists(*[self._heartbeat_key(n) for n in others]):
            return
        self.dispatcher = None  # nothing to write to any more
        await self._catch_up()
        await self._write_snapshot()
        log.info("cluster: node %s was the last: wrote the snapshot at %s", self.node_id, self.replica.position)

    async def _close_clients(self) -> None:
        for client in (self._redis, self._reader_redis):
            if client is not None:
                try:
                    await client.aclose()
                except Exception:
                    pass

    async def _measure_clock(self) -> None:
        assert self.clock is not None
        best = None
        for _ in range(3):
            before = self.clock.now() - self.clock.offset
            secs, micros = await self._redis.time()
            after = self.clock.now() - self.clock.offset
            rtt = after - before
            offset = secs * 1000.0 + micros / 1000.0 - (before + after) / 2
            if best is None or rtt < best[0]:
                best = (rtt, offset)
        assert best is not None
        self.clock.offset = best[1]

    async def _load_snapshot(self) -> bool:
        """Load the newest snapshot; True if it was another build's (then converted: see ``_convert``)."""
        position, blob, portable, build, number = await self._redis.hmget(
            self.snapshot_key, "position", "blob", "portable", "build", "number")
        if blob is None:
            return False
        if build is not None and build.decode() != BUILD:
            self._convert(position.decode(), portable, build.decode(), int(number or 0))
            return True
        try:
            replica = Replica.load(blob, self._key)
        except SnapshotError as exc:
            await self._close_clients()
            raise ClusterError(f"cluster: {exc}") from None
        self.replica = replica
        log.info("cluster: loaded the snapshot at %s", position.decode())
        return False

    def _convert(self, position: str, portable: bytes | None, build: str, number: int) -> None:
        """Start from the portable state of another build's snapshot (an upgrade, docs/cluster.md).

        The pending offers, their deadlines and ids, and the outcome
        histories come back (as from ``server.stateFile``); sessions do not:
        the agents get a fresh presence grace to reconnect in.
        """
        if portable is None:
            raise ClusterError(f"cluster: the snapshot was written by another deskpush build ({build}) without "
                               "its portable state; this build cannot read it")
        try:
            snapshot = msgspec.json.decode(portable, type=Snapshot)
        except msgspec.MsgspecError as exc:
            raise ClusterError(f"cluster: the portable state of build {build}'s snapshot does not load: {exc}") from None
        replica = Replica({t.name: t for t in self.templates}, self.limits)
        assert self.clock is not None
        replica.engine.restore(snapshot, self.clock.now())
        replica.position, replica.number = position, number
        self.replica = replica
        log.warning("cluster: the snapshot at %s is build %s's; this is build %s: took back %d pending offers and "
                    "%d kept outcomes from its portable state", position, build, BUILD, len(snapshot.notifications),
                    sum(len(h.outcomes) for h in snapshot.histories))

    async def _catch_up(self) -> None:
        """Apply the log up to its end now (effects only for connections already here).

        A gap (the log trimmed past this replica while it read) means a newer
        snapshot exists: load it and go on from there.
        """
        for _ in range(5):
            while True:
                batch = await self._redis.xread({self.log_key: self.replica.position}, count=10_000)
                if not batch:
                    return
                if not self._apply(batch[0][1]):
                    break
            log.warning("cluster: node %s found a gap in the log at %s: loading the newer snapshot",
                        self.node_id, self.replica.position)
            await self._load_snapshot()
        raise ClusterError("cluster: the log keeps moving past this node's snapshot (is the node very slow?)")

    async def _check_builds(self) -> None:
        """Refuse to join nodes running other rules: replicas agree only if every node runs this build."""
        nodes = sorted(m.decode() for m in await self._redis.smembers(self.nodes_key))
        if not nodes:
            return
        builds = await self._redis.mget([self._heartbeat_key(n) for n in nodes])
        other = sorted({b.decode() for b in builds if b is not None and b.decode() != BUILD})
        if other:
            await self._close_clients()
            raise ClusterError(f"cluster: nodes of another deskpush build ({', '.join(other)}; this is {BUILD}) are "
                               "running on this Redis: a cluster runs one build at a time. Stop them first (their "
                               "state is kept), then start this build's nodes (docs/cluster.md, Upgrading)")

    async def _join(self) -> None:
        await self._redis.set(self._heartbeat_key(self.node_id), BUILD, px=int(self.node_timeout * 1000))
        await self._redis.sadd(self.nodes_key, self.node_id)

    async def _rejoin(self) -> None:
        """Join under the new id (``_resync``), and take the old one out of the node set."""
        old = self._rejoin_from
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._heartbeat_key(self.node_id), BUILD, px=int(self.node_timeout * 1000))
            pipe.sadd(self.nodes_key, self.node_id)
            if old is not None:
                pipe.srem(self.nodes_key, old)
                pipe.delete(self._heartbeat_key(old))
            await pipe.execute()
        if self._rejoin_from == old:
            self._rejoin_from = None

    # ------------------------------------------------------------------
    # The engine's event methods (endpoints call these as they would an Engine's)

    def _handle(self, conn: Any) -> Handle:
        self._next += 1
        handle = (self.node_id, self._next)
        self._handles[handle] = conn
        self._conns[conn] = handle
        return handle

    def agent_connected(self, conn: Any, agent_id: str, session_id: str, now: float) -> list[Effect]:
        handle = self._handle(conn)
        self._append(AgentOn(self.node_id, handle[1], agent_id, session_id), conn)
        return []

    def agent_frame(self, conn: Any, frame: f.AgentInbound, now: float) -> list[Effect]:
        handle = self._conns.get(conn)
        if handle is not None:
            self._append(AgentMsg(handle[0], handle[1], f.ENCODER.encode(frame)), conn)
        return []

    def agent_disconnected(self, conn: Any, now: float) -> list[Effect]:
        handle = self._conns.pop(conn, None)
        if handle is not None:
            del self._handles[handle]
            self._append(AgentOff(handle[0], handle[1]))
        return []

    def integrator_connected(self, conn: Any, integrator: str, now: float, resume_after: str | None = None
                             ) -> list[Effect]:
        handle = self._handle(conn)
        self._append(IntegratorOn(self.node_id, handle[1], integrator, resume_after), conn)
        return []

    def integrator_frame(self, conn: Any, frame: f.IntegratorInbound, now: float) -> list[Effect]:
        handle = self._conns.get(conn)
        if handle is not None:
            self._append(IntegratorMsg(handle[0], handle[1], f.ENCODER.encode(frame)), conn)
        return []

    def integrator_disconnected(self, conn: Any, now: float) -> list[Effect]:
        handle = self._conns.pop(conn, None)
        if handle is not None:
            del self._handles[handle]
            self._append(IntegratorOff(handle[0], handle[1]))
        return []

    def replace_rules(self, templates: Mapping[str, Template], limits: Limits | None = None) -> None:
        """A reload: every replica takes ``templates`` (and ``limits``) from the entry this appends."""
        self.templates = tuple(templates.values())
        if limits is not None:
            self.limits = limits
        self._append(Rules(self.node_id, self.templates, self.replica.engine.limits if limits is None else limits))

    def tick(self, now: float) -> None:
        """A deadline is due by this node's clock: append a Tick, unless one is on its way."""
        if self._ticking or not self.started:
            return
        self._ticking = True
        # What this clock read when the Tick left (``now`` may be the deadline, a hair later).
        self._tick_for = self.clock.now() if self.clock is not None else now
        self._append(Tick(self.node_id))

    def _append(self, event: Event, conn: Any = None) -> None:
        if len(self._outbox) >= self.max_buffered and conn is not None:
            # Redis has been away long enough to fill the buffer: this
            # connection is told (1013, try again later), nothing is dropped silently.
            log.warning("cluster: %d events wait for Redis; closing a connection with 1013", len(self._outbox))
            conn.close(*CLOSE_REDIS_UNREACHABLE)
            return
        self._outbox.append(encode_event(event))
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------
    # Tasks

    async def _writer(self) -> None:
        """Send the events that came in, in order, one call in flight."""
        import redis.asyncio as aioredis

        assert self._wake is not None
        backoff = 0.05
        while True:
            if not self._outbox:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._outbox[:1000]
            try:
                if self._rejoin_from is not None:
                    await self._rejoin()
                await self._fcall("deskpush_append", 2, self.log_key, self.counter_key, *batch)
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                self._unreachable(exc)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.05
            self._reachable()
            del self._outbox[:len(batch)]

    async def _reader(self) -> None:
        """Apply the log as it grows; never across a gap (entries trimmed before this node read them).

        Entries are numbered without gaps (``deskpush_append``): a batch whose
        number does not follow on from the replica's stops ``_apply`` there,
        and ``_check_behind`` loads the snapshot and resyncs. (A node paused
        past two snapshots, whose own NodeDown may be among the missing, would
        otherwise read on as if nothing had happened.)
        """
        import redis.asyncio as aioredis

        backoff = 0.05
        check = False
        while True:
            position = self.replica.position
            try:
                if check:
                    await self._check_behind()
                    check = False
                    continue
                batch = await self._reader_redis.xread({self.log_key: position}, count=self.read_count,
                                                       block=1000)
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                self._unreachable(exc)
                check = True
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.05
            if batch:
                self._reachable()
                if not self._apply(batch[0][1]):
                    check = True  # a gap: the snapshot, then the log from there

    def _apply(self, entries: Iterable[tuple[bytes, Mapping[bytes, bytes]]]) -> bool:
        """Apply ``entries`` and write their effects; False at a gap (what came before it is applied)."""
        replica = self.replica
        me = self.node_id
        handles = self._handles
        out: list[Effect] = []
        gap = False
        last_id = ""
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            number = int(fields[b"n"])
            if number != replica.number + 1:
                if number > replica.number + 1 and replica.number:
                    gap = True  # trimmed before this node read it
                    break
                if number <= replica.number:
                    log.error("cluster: the log went back from entry %d to %d at %s: Redis lost writes this "
                              "node had read (an AOF without its last second, or a failover to a replica that "
                              "lagged); nodes may now disagree about what those entries decided. Writing "
                              "this node's state as the snapshot", replica.number, number, entry_id)
                    self._rewrite = True
            replica.number = number
            event = decode_event(fields[b"e"])
            effects = replica.apply(entry_id, event)
            mine = event.node == me
            if type(event) is NodeDown and event.down == me:
                if self._closed:
                    break  # its own goodbye
                self._declared_down()
                return True
            if mine and type(event) is Tick:
                self._ticking = False
                if self.clock is not None:
                    self.clock.at_most(parse_entry_id(entry_id)[0], self._tick_for)
            if effects:
                local = local_effects(effects, me, handles)
                if not mine:
                    local = [e for e in local if type(e) is not Ended]
                out.extend(local)
            last_id = entry_id
        if self.clock is not None and last_id:
            self.clock.at_least(parse_entry_id(last_id)[0])  # the batch's newest entry: once, not per entry
        if self.dispatcher is not None:
            self.dispatcher.apply(out)
        if self._rewrite and self.started:
            self._rewrite = False
            # What Redis lost, this replica still holds: make it the base a node starting now reads.
            task = asyncio.get_running_loop().create_task(self._write_snapshot())
            self._tasks.append(task)
        return not gap

    async def _monitor(self) -> None:
        """Heartbeat, declare silent nodes down, write snapshots."""
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        next_snapshot = loop.time() + self.snapshot_interval
        next_clock = loop.time() + 30.0
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                # The nodes with connections in the replica, before the set is read: each joined the
                # set before it appended anything, so each is in the set read below unless it was
                # declared down. (Read after, a node joining meanwhile could be taken for a lost one.)
                seen = self.replica.nodes()
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(self._heartbeat_key(self.node_id), BUILD, px=int(self.node_timeout * 1000))
                    pipe.sadd(self.nodes_key, self.node_id)
                    pipe.smembers(self.nodes_key)
                    _, _, members = await pipe.execute()
                others = sorted(m.decode() for m in members if m.decode() != self.node_id)
                quiet = time.monotonic() < self._quiet_until
                if others and not quiet:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for node in others:
                            pipe.exists(self._heartbeat_key(node))
                        alive = await pipe.execute()
                    for node, up in zip(others, alive):
                        if not up and await self._node_down(node):
                            log.warning("cluster: node %s missed its heartbeats for %g s: declared down",
                                        node, self.node_timeout)
                # Nodes with connections in the replica that are no longer in the set (declared down
                # before the NodeDown could be appended, or a set lost with Redis) go the same way.
                known = set(m.decode() for m in members)
                for node in seen:
                    if node != self.node_id and node not in known and not quiet:
                        self._append(NodeDown(self.node_id, node))
                if loop.time() >= next_clock:
                    next_clock = loop.time() + 30.0
                    await self._measure_clock()  # the two clocks drift apart slowly
                if loop.time() >= next_snapshot:
                    next_snapshot = loop.time() + self.snapshot_interval
                    await self._snapshot()
                self._reachable()
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                self._unreachable(exc)

    async def _fcall(self, name: str, numkeys: int, *args: Any) -> Any:
        """``FCALL``, loading the library again first if Redis lost it (a new, empty Redis)."""
        import redis.asyncio as aioredis

        try:
            return await self._redis.fcall(name, numkeys, *args)
        except aioredis.ResponseError as exc:
            if "Function not found" not in str(exc):
                raise
            log.warning("cluster: Redis at %s has no deskpush functions (a new, empty Redis?): loading them",
                        _shown(self.url))
            await self._redis.function_load(LIBRARY, replace=True)
            return await self._redis.fcall(name, numkeys, *args)

    async def _node_down(self, node: str) -> bool:
        event = encode_event(NodeDown(self.node_id, node))
        done = await self._fcall("deskpush_node_down", 4, self.nodes_key, self._heartbeat_key(node),
                                       self.log_key, self.counter_key, node, event)
        return bool(done)

    async def _snapshot(self) -> None:
        got = await self._redis.set(self.lease_key, self.node_id, nx=True, px=int(self.snapshot_interval * 1000))
        if not got:
            return
        started = time.perf_counter()
        position, number = self.replica.position, self.replica.number
        blob, portable = await self._dump()
        kept = await self._fcall("deskpush_snapshot", 2, self.snapshot_key, self.log_key, position, blob, portable,
                                 BUILD, number)
        log.debug("cluster: snapshot at %s, %d bytes in %.1f ms (%s)", position, len(blob),
                  (time.perf_counter() - started) * 1000, "kept" if kept else "older than the one kept")

    async def _dump(self) -> tuple[bytes, bytes]:
        """The replica as it is now, signed (``Replica.dump``), and its portable state, made in a forked child.

        As Redis makes its saves.

        Pickling the whole state takes long with a big history (about 1.5 s
        for 100,000 kept outcomes): on the event loop it would stall every
        session of the node holding the lease every ``snapshotInterval``. A
        child forked now has the replica as of this instant (copy-on-write)
        and pickles it while the loop goes on; the parent reads the bytes from
        a pipe. Where there is no fork, the loop does it.
        """
        if not hasattr(os, "fork"):
            blob = self.replica.dump(self._key)
            return blob, _portable(Replica.load(blob, self._key))  # a copy: taking it trims histories
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: pickle, write, leave without running any cleanup of the parent's
            status = 1
            try:
                os.close(read_fd)
                blob = self.replica.dump(self._key)
                data = memoryview(len(blob).to_bytes(8, "big") + blob + _portable(self.replica))
                while data:
                    data = data[os.write(write_fd, data):]
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        reader = asyncio.StreamReader(limit=2**31)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                   os.fdopen(read_fd, "rb", buffering=0))
        try:
            blob = await reader.read()
        finally:
            transport.close()
            while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0):  # it exits as soon as it has written
                await asyncio.sleep(0.001)
        if os.waitstatus_to_exitcode(done[1]) != 0:
            raise RuntimeError(f"the snapshot child failed (exit status {os.waitstatus_to_exitcode(done[1])})")
        size = int.from_bytes(blob[:8], "big")
        return blob[8:8 + size], blob[8 + size:]

    async def _write_snapshot(self) -> None:
        """Write this replica as the snapshot now, lease or not (kept if newer than the one in Redis)."""
        import redis.asyncio as aioredis

        try:
            position, number = self.replica.position, self.replica.number
            blob, portable = await self._dump()
            await self._fcall("deskpush_snapshot", 2, self.snapshot_key, self.log_key, position, blob, portable,
                              BUILD, number)
        except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            self._unreachable(exc)
            self._rewrite = True  # the next batch tries again

    async def _check_behind(self) -> None:
        """After a Redis outage: is this node behind the log's trim, or ahead of a Redis that lost entries?"""
        trimmed = await self._redis.hget(self.snapshot_key, "trimmed")
        behind = trimmed is not None and _before(self.replica.position, trimmed.decode())
        batch = await self._redis.xread({self.log_key: self.replica.position}, count=1)
        if batch and int(batch[0][1][0][1][b"n"]) > self.replica.number + 1:
            behind = True  # the next entry there is is not the next number: some were trimmed
        if behind:
            await self._reload(trimmed.decode() if trimmed is not None else "?")
        info = await self._redis.xinfo_stream(self.log_key) if await self._redis.exists(self.log_key) else None
        last = info["last-generated-id"].decode() if info else "0-0"
        if _before(last, self.replica.position):
            log.error("cluster: Redis's log ends at %s but this node applied up to %s: Redis lost entries "
                      "(restarted from an AOF without its last writes, or failed over to a replica that "
                      "lagged). Writing this node's state as the snapshot.", last, self.replica.position)
            await self._write_snapshot()

    async def _reload(self, trimmed: str) -> None:
        """The log was trimmed past this replica: load the snapshot, catch up, and resync the sessions.

        What the missing entries did to this node's sessions is unknown (they
        may have declared it down), so they are closed, like a node declared
        down, and their clients come back.
        """
        log.warning("cluster: node %s is at %s, before the log's trim at %s: loading the snapshot",
                    self.node_id, self.replica.position, trimmed)
        await self._load_snapshot()
        await self._catch_up()
        if self.dispatcher is not None:
            self.dispatcher.engine = self.replica.engine
        self._resync("fell behind the log")

    def _declared_down(self) -> None:
        """Another node declared this one down (a pause longer than nodeTimeout): start over."""
        log.error("cluster: node %s was declared down by another node (no heartbeat for %g s); "
                  "its sessions are closed and it rejoins under a new id", self.node_id, self.node_timeout)
        self._resync("declared down")

    def _resync(self, why: str) -> None:
        """Close this node's sessions (1012) and go on under a new node id.

        A new id, so that nothing of the old one's connections is mistaken
        for the new ones': every replica drops the old id's handles (the
        ``NodeDown`` appended here; a no-op where it was declared down
        already), and the writer joins under the new id before it sends any
        event of it (a node with connections in the log but not in the node
        set would be declared down by the others' monitors).
        """
        old = self.node_id
        self.node_id = self._new_id()
        self._rejoin_from = old
        self._ticking = False  # a Tick in flight under the old id will not be recognised as ours
        conns = list(self._conns)
        self._handles.clear()
        self._conns.clear()
        self._append(NodeDown(self.node_id, old))
        log.info("cluster: node %s goes on as %s", old, self.node_id)
        for conn in conns:
            conn.close(*CLOSE_NODE_RESYNC)

    def _unreachable(self, exc: BaseException) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
            log.error("cluster: Redis at %s is unreachable (%s); events wait in this node (%d now)",
                      _shown(self.url), exc or type(exc).__name__, len(self._outbox))
        self.last_error = str(exc) or type(exc).__name__

    def _reachable(self) -> None:
        if self.unreachable_since is not None:
            self._quiet_until = time.monotonic() + self.node_timeout
            log.warning("cluster: Redis at %s is reachable again after %.1f s", _shown(self.url),
                        time.monotonic() - self.unreachable_since)
            self.unreachable_since = None

    # ------------------------------------------------------------------

    def not_ready(self) -> str | None:
        """Why this node takes no new sessions (Redis away longer than ``redisTimeout``), or None."""
        if self.failed:
            return self.failed
        if not self.started:
            return "joining the cluster"
        since = self.unreachable_since
        if since is not None and time.monotonic() - since >= self.redis_timeout:
            return f"redis unreachable for {time.monotonic() - since:.0f} s: {self.last_error}"
        return None

    def statistics(self) -> dict[str, int]:
        """This node's side of the cluster, for ``/stats`` and ``/metrics``."""
        return {"clusterRedisUp": int(self.started and self.unreachable_since is None),
                "clusterBuffered": len(self._outbox), "clusterApplied": self.replica.applied}


def _portable(replica: Replica) -> bytes:
    """The replica's pending offers and histories in the state file's format, which every build reads.

    Only in a copy of the replica (the forked child's): taking it trims
    the histories, which a live replica must do only when the log says so.
    """
    return msgspec.json.encode(replica.engine.snapshot(replica.now))


def _shown(url: str) -> str:
    """``url`` without a password."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url

