"""Pending notifications and outcome histories across a restart: ``server.stateFile``.

On a clean stop the engine's pending notifications and each integrator's
history of outcomes (protocol v1.1) are written to the file;
on start they are taken back, with their deadlines, and the file is removed
(so a crash after that cannot bring them back twice). See
``Engine.snapshot`` and ``Engine.restore`` for what is kept.

What can go wrong, and what happens (docs/protocol.md, "Restarts and stateFile"):

* a path the server could not save to (a directory, a missing or unwritable
  directory) is refused at start with one line (``StateFileError``), before
  the server listens: found at SIGTERM, it would lose every pending offer;
* a file that cannot be restored (empty, truncated, not JSON, a version this
  server does not read, a field out of place) is renamed to
  ``FILE.unreadable-<UTC time>`` with one log line, and the server starts
  without it: the file is kept for a person to look at, never overwritten,
  and never keeps the server from starting;
* a save goes to ``FILE.tmp``, synced to disk, then renamed over ``FILE``,
  the directory synced before and after the rename: a kill or a crash
  during a save leaves the last file or the new one, never a mix. A
  ``FILE.tmp`` found at start is what such a kill left: it is removed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgspec

from ..protocol import SNAPSHOT_VERSIONS, Engine, Snapshot

__all__ = ["StateFile", "StateFileError"]

log = logging.getLogger("deskpush")


class StateFileError(Exception):
    """The state file cannot be used: the path (at start) or a save (at stop). The message is one line."""


class _Header(msgspec.Struct):
    """What every state file starts with: the version that says how to read the rest."""

    version: int


class _Unrestorable(Exception):
    """Why a file cannot be restored (its message goes into the log line)."""


class StateFile:
    """The file at ``path``; ``FILE.tmp`` next to it while a save is written."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")

    # ------------------------------------------------------------------
    # At start

    def check(self) -> None:
        """Refuse a path the server could not save to, and remove what a killed save left.

        The directory must exist and let the server create ``FILE.tmp``
        (tried, not guessed from permission bits: a read-only filesystem or
        a root-owned directory say no the same way); ``FILE`` itself must be
        a regular file, or not exist yet.

        Raises:
            StateFileError: one line naming the path and the reason.
        """
        path, parent = self.path, self.path.parent
        where = f"server.stateFile {path}"
        try:
            if path.is_dir():
                raise StateFileError(f"{where} is a directory: name a file in it, as {path / 'state.json'}")
            if path.exists() and not path.is_file():
                raise StateFileError(f"{where} is not a regular file")
            if not parent.exists():
                raise StateFileError(f"{where}: directory {parent} does not exist")
            if not parent.is_dir():
                raise StateFileError(f"{where}: {parent} is not a directory")
        except OSError as exc:  # e.g. a directory on the way that may not be searched
            raise StateFileError(f"{where}: {exc.strerror}") from None
        self._remove_stray_tmp()
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o600)
            os.close(fd)
            os.unlink(self.tmp)
        except OSError as exc:
            raise StateFileError(f"{where}: cannot write in {parent}: {exc.strerror}") from None

    def _remove_stray_tmp(self) -> None:
        try:
            size = self.tmp.stat().st_size
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateFileError(f"server.stateFile {self.path}: {self.tmp}: {exc.strerror}") from None
        try:
            self.tmp.unlink()
        except OSError as exc:
            raise StateFileError(f"server.stateFile {self.path}: cannot remove {self.tmp}, left by a save "
                                 f"that did not finish: {exc.strerror}") from None
        log.warning("removed %s (%d bytes), left by a save that did not finish: the server was killed while "
                    "saving, and what it was saving is lost", self.tmp, size)

    def load(self) -> Snapshot | None:
        """The saved snapshot; None if there is no file, or it cannot be restored.

        A file that cannot be restored is moved aside (``FILE.unreadable-<UTC
        time>``) with one ERROR line saying why and where it went. Call
        ``check()`` first.

        Raises:
            StateFileError: the file cannot be restored and cannot be moved
                aside either (then it would be overwritten by the next save).
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = f"cannot read it: {exc.strerror}"
        else:
            try:
                return _decode(data)
            except _Unrestorable as exc:
                reason = str(exc)
        try:
            aside = self._move_aside()
        except OSError as exc:
            raise StateFileError(f"server.stateFile {self.path} cannot be restored ({reason}) and cannot "
                                 f"be moved aside: {exc.strerror}") from None
        log.error("state file %s cannot be restored (%s); moved it to %s and starting without the offers "
                  "and outcome histories it held", self.path, reason, aside)
        return None

    def remove(self) -> None:
        """Delete the file once the engine holds what it had, so a crash later cannot restore it twice.

        Raises:
            StateFileError: it could not be deleted (the server must not
                start: a crash would bring the same offers back again).
        """
        try:
            self.path.unlink(missing_ok=True)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise StateFileError(f"server.stateFile {self.path}: restored, but cannot remove it: "
                                 f"{exc.strerror}") from None

    def _move_aside(self) -> Path:
        """Rename the file to a name no file has yet; return that name."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.unreadable-{stamp}")
        n = 1
        while os.path.lexists(aside):
            aside = self.path.with_name(f"{self.path.name}.unreadable-{stamp}-{n}")
            n += 1
        os.rename(self.path, aside)
        _fsync_dir(self.path.parent)
        return aside

    # ------------------------------------------------------------------
    # At stop

    def save(self, engine: Engine, now: float) -> None:
        """Write the engine's snapshot to the file, durably (see the module docstring).

        A file already at the path (written since this server started, by
        another server given the same ``stateFile``?) is moved aside first,
        never overwritten.

        Raises:
            StateFileError: the snapshot could not be written; the file, if
                any, is as it was.
        """
        snapshot = engine.snapshot(now)
        data = msgspec.json.encode(snapshot)
        kept = sum(len(h.outcomes) for h in snapshot.histories)
        if os.path.lexists(self.path):
            try:
                aside = self._move_aside()
            except OSError as exc:
                raise StateFileError(f"cannot save to {self.path}: a file is there (written since this server "
                                     f"started) and cannot be moved aside: {exc.strerror}") from None
            log.warning("%s was written while this server ran (another server with the same stateFile?); "
                        "moved it to %s", self.path, aside)
        try:
            self._write(data)
        except OSError as exc:
            try:
                self.tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise StateFileError(f"cannot save {len(snapshot.notifications)} pending notifications and {kept} "
                                 f"kept outcomes to {self.path}: {exc.strerror}") from None
        log.info("saved %d pending notifications and %d kept outcomes to %s", len(snapshot.notifications),
                 kept, self.path)

    def _write(self, data: bytes) -> None:
        # The bytes of FILE.tmp reach the disk before its name does, and its
        # name before the rename, and the rename is synced before the save
        # counts as done: at every moment the disk holds the old file or the
        # new one under FILE (a rename is atomic, POSIX rename(2)).
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.path.parent)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable (where a directory can be opened: not on Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_VERSIONS = ", ".join(map(str, SNAPSHOT_VERSIONS))


def _decode(data: bytes) -> Snapshot:
    """The snapshot in ``data``, checked field by field, or ``_Unrestorable`` saying what is wrong."""
    if not data.strip():
        raise _Unrestorable("the file is empty")
    try:
        header = msgspec.json.decode(data, type=_Header)
    except msgspec.ValidationError as exc:
        raise _Unrestorable(f"not a deskpush state file: {exc}") from None
    except msgspec.DecodeError as exc:
        raise _Unrestorable(f"not JSON: {exc}") from None
    if header.version not in SNAPSHOT_VERSIONS:
        newer = " (written by a newer deskpush?)" if header.version > max(SNAPSHOT_VERSIONS) else ""
        raise _Unrestorable(f"version {header.version}{newer}; this server reads versions {_VERSIONS}")
    try:
        return msgspec.json.decode(data, type=Snapshot)
    except msgspec.ValidationError as exc:
        raise _Unrestorable(f"version {header.version} but not as this server writes it: {exc}") from None
