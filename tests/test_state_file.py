"""``server.stateFile`` when things go wrong: bad paths, files that cannot be restored, killed saves.

Real servers on 127.0.0.1 (``DeskpushServer``, and ``deskpush serve`` for what
an operator reads on the terminal), real files in a temporary directory.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import stat
import sys
from pathlib import Path

import msgspec
import pytest

from deskpush.protocol import Engine, Snapshot
from deskpush.server import Config, DeskpushServer
from deskpush.server.config import ServerSection
from deskpush.server.state import StateFile, StateFileError

from .conftest import API_KEY, SECRET, UNIT, open_agent, open_integrator, recv_json, send_json
from .test_server import expect_closed, offer
from .test_server_resume import resuming

UNREADABLE = re.compile(r"state\.json\.unreadable-\d{8}T\d{6}Z(-\d+)?")


def server(path: Path | str, port: int = 0) -> DeskpushServer:
    config = Config(server=ServerSection(host="127.0.0.1", port=port, state_file=str(path)))
    return DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY})


async def saved_with_one_offer(path: Path) -> tuple[dict, dict]:
    """Run a server that saves one displayed offer (and one kept outcome) to ``path``: (the file's JSON, the card)."""
    srv = server(path)
    await srv.start()
    agent, _ = await open_agent(srv)
    ig = await open_integrator(srv)
    first = await offer(srv, ig, agent, "r0", progress=False)
    await send_json(agent, {"type": "respond", "notificationId": first["notificationId"], "action": "Accept"})
    assert (await recv_json(ig))["type"] == "result"
    assert (await recv_json(agent))["type"] == "resolved"
    card = await offer(srv, ig, agent, progress=False, cancellationToken="keep-me")
    await srv.close()
    await expect_closed(agent, 1001)
    return json.loads(path.read_bytes()), card


def unreadable_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if UNREADABLE.fullmatch(p.name))


# ---------------------------------------------------------------------------
# Paths the server could not save to: refused at start, before listening


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d, "is a directory: name a file in it, as "),
        (lambda d: d / "missing" / "state.json", "does not exist"),
        (lambda d: (d / "a-file").write_text("x") and d / "a-file" / "state.json", "is not a directory"),
    ],
    ids=["a directory", "missing directory", "parent is a file"],
)
async def test_a_path_the_server_cannot_save_to_is_refused_at_start(tmp_path, make, needle):
    path = make(tmp_path)
    srv = server(path)
    with pytest.raises(StateFileError) as exc:
        await srv.start()
    message = str(exc.value)
    assert needle in message and str(path) in message and "\n" not in message
    # Nothing listens, and closing the server that never started is harmless.
    assert srv.port == 0 and not srv.connections
    await srv.close()


# ---------------------------------------------------------------------------
# Files that cannot be restored: moved aside, logged, never overwritten, never blocking start


def truncated(doc: dict) -> bytes:
    data = json.dumps(doc).encode()
    return data[: len(data) // 2]


def with_state(doc: dict, value: str) -> bytes:
    doc["notifications"][0]["state"] = value
    return json.dumps(doc).encode()


def with_outcome_id(doc: dict, value: str) -> bytes:
    doc["lastOutcomeId"] = value
    return json.dumps(doc).encode()


BAD_FILES = {
    "empty": (lambda doc: b"", "the file is empty"),
    "truncated": (truncated, "not JSON: Input data was truncated"),
    "garbage": (lambda doc: b"\x00\xffnot json at all", "not JSON: JSON is malformed"),
    "unknown version": (lambda doc: json.dumps({**doc, "version": 3}).encode(),
                        "version 3 (written by a newer deskpush?); this server reads versions 1, 2"),
    "version 0": (lambda doc: json.dumps({**doc, "version": 0}).encode(), "version 0; this server reads versions 1, 2"),
    "no version": (lambda doc: json.dumps({k: v for k, v in doc.items() if k != "version"}).encode(),
                   "not a deskpush state file: Object missing required field `version`"),
    "unknown state": (lambda doc: with_state(doc, "ended"), "at `$.notifications[0].state`"),
    "bad outcome id": (lambda doc: with_outcome_id(doc, "yesterday"), "at `$.lastOutcomeId`"),
    "a list": (lambda doc: b"[]", "not a deskpush state file: Expected `object`, got `array`"),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
async def test_a_file_that_cannot_be_restored_is_moved_aside_and_the_server_starts(tmp_path, caplog, case):
    state = tmp_path / "state.json"
    doc, _ = await saved_with_one_offer(state)
    make, reason = BAD_FILES[case]
    bad = make(doc)
    state.write_bytes(bad)

    caplog.set_level(logging.INFO, "deskpush")
    async with server(state) as srv:
        # It started, without the file's offers, and the file is kept under a new name.
        assert not state.exists()
        [aside] = unreadable_files(tmp_path)
        assert aside.read_bytes() == bad
        [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert line.startswith(f"state file {state} cannot be restored (") and reason in line, line
        assert f"moved it to {aside}" in line
        agent, welcome = await open_agent(srv)
        assert welcome["displayed"] == []
        ig = await open_integrator(srv)
        await offer(srv, ig, agent, "r9")
    # The next clean stop writes a new file and leaves the unreadable one as it was.
    assert msgspec.json.decode(state.read_bytes(), type=Snapshot).notifications[0].request_id == "r9"
    assert unreadable_files(tmp_path) == [aside] and aside.read_bytes() == bad


async def test_two_unreadable_files_in_the_same_second_keep_both(tmp_path):
    state = tmp_path / "state.json"
    for content in (b"first", b"second"):
        state.write_bytes(content)
        async with server(state):
            pass
        state.unlink()
    assert sorted(p.read_bytes() for p in unreadable_files(tmp_path)) == [b"first", b"second"]


async def test_an_unreadable_file_that_cannot_be_moved_aside_refuses_start(tmp_path, monkeypatch):
    # Started anyway, the server's next save would overwrite the file: it is kept, and the operator told.
    state = tmp_path / "state.json"
    state.write_bytes(b"garbage")

    def rename(src, dst) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", rename)
    srv = server(state)
    with pytest.raises(StateFileError) as exc:
        await srv.start()
    assert str(exc.value) == (f"server.stateFile {state} cannot be restored (not JSON: JSON is malformed: "
                              "invalid character (byte 0)) and cannot be moved aside: Permission denied")
    assert state.read_bytes() == b"garbage" and srv.port == 0


# ---------------------------------------------------------------------------
# Versions: 1 (notifications only) and 2 (and the outcome histories) are both restored


async def test_a_version_1_file_is_restored(tmp_path):
    state = tmp_path / "state.json"
    doc, card = await saved_with_one_offer(state)
    # What a version 1 server wrote: the same notifications, no histories.
    v1 = {"version": 1, "savedAt": doc["savedAt"], "notifications": doc["notifications"]}
    state.write_text(json.dumps(v1))
    async with server(state) as srv:
        assert not state.exists() and not unreadable_files(tmp_path)
        agent, welcome = await open_agent(srv)
        assert welcome["displayed"] == [card["notificationId"]]
        assert await recv_json(agent) == card
        # No history came back: a resume from before the restart cannot be vouched for.
        ws, replayed, resumed = await resuming(srv, "0000000000001-000000")
        assert replayed == [] and resumed["complete"] is False
        await ws.close()


async def test_a_version_2_file_is_restored_with_its_history(tmp_path):
    state = tmp_path / "state.json"
    doc, card = await saved_with_one_offer(state)
    assert doc["version"] == 2 and doc["histories"][0]["outcomes"][0]["requestId"] == "r0"
    async with server(state) as srv:
        assert not state.exists() and not unreadable_files(tmp_path)
        assert [r.request_id for r in srv.engine.history("crm")] == ["r0"]
        agent, _ = await open_agent(srv)
        assert await recv_json(agent) == card
        ws, replayed, resumed = await resuming(srv, doc["historyStart"])
        assert [r["requestId"] for r in replayed] == ["r0"] and resumed["complete"] is True
        await ws.close()


def test_the_engine_refuses_an_unknown_snapshot_version_before_taking_anything():
    from deskpush.protocol import BUILTIN_TEMPLATES

    engine = Engine({t.name: t for t in BUILTIN_TEMPLATES})
    with pytest.raises(ValueError, match="snapshot version 7 is not one this server reads"):
        engine.restore(Snapshot(version=7, history_start="0000000000001-000000"), 1000.0)
    assert engine.last_outcome_id() == "0000000000000-000000"


# ---------------------------------------------------------------------------
# The save: synced to disk, a stray temporary file cleaned at start


async def test_a_save_syncs_the_file_and_the_directory_around_the_rename(tmp_path, monkeypatch):
    state = tmp_path / "state.json"
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("rename", f"{src} -> {dst}"))
        real_replace(src, dst)

    async with server(state):
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
    d = str(tmp_path)
    assert events == [
        ("fsync", f"{state}.tmp"),  # the bytes, before the name points at them
        ("fsync", d),  # the temporary file's entry
        ("rename", f"{state}.tmp -> {state}"),
        ("fsync", d),  # the rename itself
    ]
    assert stat.S_IMODE(state.stat().st_mode) == 0o600  # tokens and customer data: the owner's only


async def test_a_stray_temporary_file_is_removed_at_start(tmp_path, caplog):
    state = tmp_path / "state.json"
    doc, card = await saved_with_one_offer(state)
    # A save killed half-way (SIGKILL after a stop timeout) leaves FILE.tmp; FILE is the last whole save.
    (tmp_path / "state.json.tmp").write_bytes(json.dumps(doc).encode()[:100])
    caplog.set_level(logging.INFO, "deskpush")
    async with server(state) as srv:
        assert not (tmp_path / "state.json.tmp").exists()
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith(f"removed {state}.tmp (100 bytes), left by a save that did not finish")
        agent, _ = await open_agent(srv)
        assert await recv_json(agent) == card


async def test_a_save_never_overwrites_a_file_written_meanwhile(tmp_path, caplog):
    state = tmp_path / "state.json"
    async with server(state):
        state.write_bytes(b"another server's save")
    assert msgspec.json.decode(state.read_bytes(), type=Snapshot).version == 2
    [aside] = unreadable_files(tmp_path)
    assert aside.read_bytes() == b"another server's save"


async def test_a_failed_save_says_why_in_one_line_and_the_server_still_stops(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    srv = server(directory / "state.json")
    await srv.start()
    agent, _ = await open_agent(srv)
    ig = await open_integrator(srv)
    await offer(srv, ig, agent)
    shutil.rmtree(directory)
    with pytest.raises(StateFileError) as exc:
        await srv.close()
    message = str(exc.value)
    assert message.startswith("cannot save 1 pending notifications and 0 kept outcomes to ")
    assert message.endswith(": No such file or directory") and "\n" not in message
    await expect_closed(agent, 1001)
    await asyncio.wait_for(srv.serve_forever(), 1)


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from deskpush.protocol import BUILTIN_TEMPLATES

    state = StateFile(tmp_path / "state.json")
    state.check()

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StateFileError, match="No space left on device"):
        state.save(Engine({t.name: t for t in BUILTIN_TEMPLATES}), 1000.0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# deskpush serve: what the operator reads


def _without_dac_override() -> None:
    """In the child, before exec: root loses its power to write where permissions say no.

    prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE): a root process exec'd after this
    is refused like anyone else by a directory's permission bits.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


async def serve(config: Path, *, as_unprivileged: bool = False) -> tuple[int, str]:
    """Run ``deskpush serve --config CONFIG`` expecting it to stop on its own: (exit status, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deskpush.server", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=_without_dac_override if as_unprivileged and os.geteuid() == 0 else None,
    )
    async with asyncio.timeout(20 * UNIT):
        out, err = await proc.communicate()
    assert b"listening on" not in out
    return proc.returncode, err.decode()


def config_file(tmp_path: Path, state: Path | str) -> Path:
    path = tmp_path / "deskpush.toml"
    path.write_text(f'[server]\nport = 0\nstateFile = "{state}"\n')
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d, "deskpush: server.stateFile {d} is a directory: name a file in it, as {d}/state.json"),
        (lambda d: d / "missing" / "state.json",
         "deskpush: server.stateFile {d}/missing/state.json: directory {d}/missing does not exist"),
        (lambda d: (d / "ro").mkdir(mode=0o500) or d / "ro" / "state.json",
         "deskpush: server.stateFile {d}/ro/state.json: cannot write in {d}/ro: Permission denied"),
    ],
    ids=["a directory", "missing directory", "unwritable directory"],
)
async def test_serve_refuses_a_bad_state_path_in_one_line(tmp_path, make, expected):
    state_dir = tmp_path / "dir"
    state_dir.mkdir()
    code, err = await serve(config_file(tmp_path, make(state_dir)), as_unprivileged=True)
    assert code == 2
    assert err == expected.format(d=state_dir) + "\n"


async def test_serve_starts_past_an_unreadable_state_file_and_says_so(tmp_path):
    state = tmp_path / "state.json"
    doc, _ = await saved_with_one_offer(state)
    state.write_bytes(with_state(doc, "archived"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deskpush.server", "serve", "--config", str(config_file(tmp_path, state)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20 * UNIT):
            assert b"listening on" in await proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
        err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0 and "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert "cannot be restored (version 2 but not as this server writes it: Invalid enum value 'archived'" in line
    assert len(unreadable_files(tmp_path)) == 1 and state.exists()


async def test_serve_says_in_one_line_when_the_save_at_sigterm_fails(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deskpush.server", "serve",
        "--config", str(config_file(tmp_path, directory / "state.json")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20 * UNIT):
            assert b"listening on" in await proc.stdout.readline()
            shutil.rmtree(directory)
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
        err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 1 and "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert line.endswith(f"ERROR deskpush cannot save 0 pending notifications and 0 kept outcomes to "
                         f"{directory}/state.json: No such file or directory")
