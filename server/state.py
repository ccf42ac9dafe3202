"""Pending notifications and outcome histories across a restart: ``server.stateFile``.

On a clean stop the engine's pending notifications and each integrator's
history of outcomes (protocol v1.1) are written to the file;
on start they are taken back, with their deadlines, and the file is removed
(so a crash after that cannot bring them back twice). See
``Engine.snapshot`` and ``Engine.restore`` for what is kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec

from ..protocol import Effect, Engine, Snapshot

__all__ = ["StateFile"]

log = logging.getLogger("deskpush")


class StateFile:
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def restore(self, engine: Engine, now: float) -> list[Effect]:
        """Hand the saved notifications to ``engine``; the effects are the caller's to apply."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            snapshot = msgspec.json.decode(data, type=Snapshot)
        except msgspec.MsgspecError as exc:
            log.error("ignoring state file %s: %s", self.path, exc)
            return []
        effects = engine.restore(snapshot, now)
        self.path.unlink(missing_ok=True)
        log.info("restored %d pending notifications and %d kept outcomes from %s", len(snapshot.notifications),
                 sum(len(h.outcomes) for h in snapshot.histories), self.path)
        return effects

    def save(self, engine: Engine, now: float) -> None:
        snapshot = engine.snapshot(now)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(msgspec.json.encode(snapshot))
        tmp.replace(self.path)
        log.info("saved %d pending notifications and %d kept outcomes to %s", len(snapshot.notifications),
                 sum(len(h.outcomes) for h in snapshot.histories), self.path)
