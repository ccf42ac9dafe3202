"""The first hour, as a new user meets it: what the commands take, what they print, what errors say.

Each test here is something a user tried and found wrong: a port out of range
silently taken modulo 65536, a ``try:`` line that did not run as pasted, a
secret that changed on every restart, errors that named the wrong cause.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from deskpush.server import DeskpushServer
from deskpush.server import config as cfg
from deskpush.server.auth import AgentTokens
from deskpush.server.cli import main

from .conftest import UNIT, make_config, recv_json, send_json

ROOT = Path(__file__).resolve().parent.parent
SECRET = "first-hour-secret-" + "s" * 32
KEY = "first-hour-key-" + "k" * 32


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKPUSH_")}
    env.update(extra)
    return env


# --------------------------------------------------------------------------
# What the commands take


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_serve_refuses_a_port_the_config_would_refuse(capsys, port):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", port])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --port:" in err and ("0 to 65535" in err or "not a port number" in err), err


@pytest.mark.parametrize("ttl", ["0", "-60", "nan", "inf"])
def test_token_refuses_a_ttl_that_is_not_positive(capsys, monkeypatch, ttl):
    monkeypatch.setenv("DESKPUSH_JWT_SECRET", SECRET)
    with pytest.raises(SystemExit) as exc:
        main(["token", "agent-1", "--ttl", ttl])
    assert exc.value.code == 2
    assert "--ttl: must be more than 0 seconds" in capsys.readouterr().err


@pytest.mark.parametrize(("agent", "length"), [("", 0), ("a" * 129, 129)])
def test_token_refuses_an_agent_id_the_server_refuses(capsys, monkeypatch, agent, length):
    monkeypatch.setenv("DESKPUSH_JWT_SECRET", SECRET)
    with pytest.raises(SystemExit) as exc:
        main(["token", agent])
    assert exc.value.code == 2
    assert f"not an agent id the server accepts: it takes 1 to 128 characters, this has {length}" in \
        capsys.readouterr().err


async def test_the_longest_agent_id_token_takes_is_one_the_server_takes(capsys, monkeypatch):
    agent = "é" * 128  # characters, not bytes, as the frames count them
    monkeypatch.setenv("DESKPUSH_JWT_SECRET", SECRET)
    assert main(["token", agent]) == 0
    token = capsys.readouterr().out.strip()
    async with DeskpushServer(make_config(), jwt_secret=SECRET, api_keys={"crm": KEY}) as srv:
        async with connect(f"ws://127.0.0.1:{srv.port}/agent") as ws:
            await send_json(ws, {"type": "hello", "token": token})
            assert (await recv_json(ws))["agentId"] == agent


def test_serve_and_notify_refuse_an_agent_id_the_server_refuses(capsys):
    for argv in (["serve", "--agent", "x" * 200], ["notify", "--agent", "", "--api-key", KEY]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "not an agent id the server accepts" in capsys.readouterr().err


def help_options(capsys: pytest.CaptureFixture[str], command: str) -> dict[str, str]:
    """``deskpush COMMAND --help``'s options section as {option: its help text}."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    section = capsys.readouterr().out.partition("\noptions:\n")[2]
    options: dict[str, str] = {}
    for line in section.splitlines():
        if m := re.match(r"  (-[-\w]+)(.*)", line):
            current = m.group(1)
            options[current] = m.group(2)
        elif line.strip():
            options[current] += " " + line.strip()
    return options


@pytest.mark.parametrize("command", ["serve", "token", "notify"])
def test_help_describes_every_option_with_its_default(capsys, command):
    options = help_options(capsys, command)
    del options["-h"]
    assert options
    for option, text in options.items():
        assert "default" in text or "(required)" in text, (command, option, text)


def test_help_shows_which_variable_gives_a_default_and_never_its_value(capsys, monkeypatch):
    monkeypatch.setenv("DESKPUSH_API_KEY", KEY)
    with pytest.raises(SystemExit):
        main(["notify", "--help"])
    out = capsys.readouterr().out
    assert "$DESKPUSH_API_KEY" in out and "$DESKPUSH_URL" in out
    assert KEY not in out


# --------------------------------------------------------------------------
# Errors that say the real cause


def test_an_unset_key_env_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("CRM_KEY", raising=False)
    path = tmp_path / "keys.toml"
    path.write_text("[[auth.integratorKeys]]\nname = 'crm'\nkeyEnv = 'CRM_KEY'\n")
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(path)
    assert "integrator key 'crm': keyEnv names CRM_KEY, which is not set (or empty) in the environment" in \
        str(exc.value)


@pytest.mark.parametrize(
    ("toml", "hint"),
    [
        ("queueLimit = 3\n", "(did you mean queueLimit in [limits]?)"),
        ("[server]\nqueue_limit = 3\n", "(did you mean queueLimit in [limits]?)"),
        ("[limits]\nport = 80\n", "(did you mean port in [server]?)"),
        ("stateFile = 'x.json'\n", "(did you mean stateFile in [server]?)"),
    ],
)
def test_a_misplaced_key_names_the_section_it_belongs_to(tmp_path, toml, hint):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(path)
    assert "unknown field" in str(exc.value) and str(exc.value).endswith(hint), str(exc.value)


def test_an_unknown_key_with_no_home_gets_no_guess(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nprot = 1\n")
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(path)
    assert "did you mean" not in str(exc.value)


def test_a_short_secret_gets_one_deskpush_line_not_a_library_warning():
    """PyJWT warns, with its source line, on each token signed with a short key.

    (Where secrets shorter than 32 bytes are refused outright, the one line is
    the refusal.)
    """
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "deskpush.server", "token", "agent-1"],
                          capture_output=True, text=True, timeout=60, env=_env(DESKPUSH_JWT_SECRET="short"))
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deskpush"), proc.stderr
    assert "32" in lines[0] and "Warning" not in lines[0]


async def test_notify_pointed_at_the_agent_endpoint_says_so():
    async with DeskpushServer(make_config(), jwt_secret=SECRET, api_keys={"crm": KEY}) as srv:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "deskpush.server", "notify", "--url", f"ws://127.0.0.1:{srv.port}/agent",
            "--api-key", KEY, "--agent", "agent-1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env())
        async with asyncio.timeout(30 * UNIT):
            out, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().strip() == (
        f"deskpush notify: ws://127.0.0.1:{srv.port}/agent is the agent endpoint (for desktops), "
        f"not the integrator endpoint: use ws://127.0.0.1:{srv.port}/integrator")


# --------------------------------------------------------------------------
# What deskpush serve prints, and keeps across restarts


async def _start(argv: list[str], env: dict[str, str], cwd: Path,
                 *options: str) -> tuple[asyncio.subprocess.Process, dict]:
    proc = await asyncio.create_subprocess_exec(
        *argv, "serve", "--port", "0", *options, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=cwd)
    printed: dict[str, str] = {}
    async with asyncio.timeout(30 * UNIT):
        while "try" not in printed:
            line = (await proc.stdout.readline()).decode()
            assert line, (await proc.stderr.read()).decode()
            if m := re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line):
                printed["port"] = m.group(1)
            if m := re.search(r"agent desktop:\s+\S+#token=(\S+)", line):
                printed["token"] = m.group(1)
            if m := re.search(r"integrator key:\s+(\S+)\s+\((.*)\)", line):
                printed["key"], printed["key_note"] = m.groups()
            if m := re.search(r"try:\s+(.*)$", line):
                printed["try"] = m.group(1)
            printed["banner"] = printed.get("banner", "") + line
    return proc, printed


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        async with asyncio.timeout(20 * UNIT):
            await proc.wait()


async def _offer_accepted_by_agent(port: str, token: str, run: str, cwd: Path, env: dict[str, str]) -> str:
    """Connect the agent with ``token``, run the shell line ``run`` and accept what it offers; its stdout."""
    async with connect(f"ws://127.0.0.1:{port}/agent") as agent:
        await send_json(agent, {"type": "hello", "token": token})
        assert (await recv_json(agent))["type"] == "welcome"
        proc = await asyncio.create_subprocess_shell(
            run, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd, env=env)
        card = await recv_json(agent, timeout=30)
        await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        async with asyncio.timeout(30 * UNIT):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()


def _bin_dir() -> Path:
    return Path(sys.executable).parent


async def test_the_try_line_runs_as_pasted_from_the_project_folder():
    """``make serve`` runs ``.venv/bin/deskpush``; the shell that ran it has no ``deskpush`` on its PATH."""
    script = _bin_dir() / "deskpush"
    if not script.exists():
        pytest.skip("no deskpush script beside this Python (not installed with pip -e?)")
    env = _env(PATH=os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                    if Path(p).resolve() != _bin_dir().resolve()))
    proc, printed = await _start([str(script)], env, ROOT)
    try:
        assert not printed["try"].startswith("deskpush ")  # not on this PATH
        out = await _offer_accepted_by_agent(printed["port"], printed["token"], printed["try"], ROOT, env)
        assert out.splitlines()[0] == "Accept/Accept"
    finally:
        await _stop(proc)


async def test_the_try_line_names_python_m_when_started_so(tmp_path):
    env = _env()
    proc, printed = await _start([sys.executable, "-m", "deskpush.server"], env, tmp_path)
    try:
        assert printed["try"].startswith(f"{shlex.quote(sys.executable)} -m deskpush.server notify ")
        out = await _offer_accepted_by_agent(printed["port"], printed["token"], printed["try"], tmp_path, env)
        assert out.splitlines()[0] == "Accept/Accept"
    finally:
        await _stop(proc)


async def test_dev_secrets_keep_the_secret_and_key_across_restarts(tmp_path):
    dev = tmp_path / "venv" / "deskpush-dev.env"
    dev.parent.mkdir()
    command, env = [sys.executable, "-m", "deskpush.server"], _env()
    first, printed = await _start(command, env, tmp_path, "--dev-secrets", str(dev))
    await _stop(first)
    assert stat.S_IMODE(dev.stat().st_mode) == 0o600
    assert f"development key kept in {dev}" in printed["key_note"]
    second, again = await _start(command, env, tmp_path, "--dev-secrets", str(dev))
    try:
        assert again["key"] == printed["key"]
        assert len(again["key"].encode()) >= 32
        # The desktop link printed by the first run still signs in.
        async with connect(f"ws://127.0.0.1:{again['port']}/agent") as agent:
            await send_json(agent, {"type": "hello", "token": printed["token"]})
            assert (await recv_json(agent))["agentId"] == "agent-1"
        # The file is a shell's: `set -a; . FILE` gives deskpush token the same secret.
        values = dict(line.split("=", 1) for line in dev.read_text().splitlines() if not line.startswith("#"))
        assert values["DESKPUSH_API_KEY"] == printed["key"]
        assert AgentTokens(values["DESKPUSH_JWT_SECRET"]).verify(printed["token"]) == "agent-1"
    finally:
        await _stop(second)


async def test_dev_secrets_give_way_to_configured_ones(tmp_path):
    dev = tmp_path / "deskpush-dev.env"
    env = _env(DESKPUSH_API_KEY=KEY, DESKPUSH_JWT_SECRET=SECRET)
    proc, printed = await _start([sys.executable, "-m", "deskpush.server"], env, tmp_path, "--dev-secrets", str(dev))
    await _stop(proc)
    assert "development" not in printed["banner"] and "kept in" not in printed["banner"]
    assert not dev.exists()  # nothing to keep: both are configured


def test_dev_secrets_others_may_read_are_refused(tmp_path, capsys):
    dev = tmp_path / "deskpush-dev.env"
    dev.write_text(f"DESKPUSH_JWT_SECRET={SECRET}\nDESKPUSH_API_KEY={KEY}\n")
    dev.chmod(0o644)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "0", "--dev-secrets", str(dev)])
    assert "may be read by others (mode 0644): chmod 600 it" in str(exc.value.code)


# --------------------------------------------------------------------------
# make serve installs the server only


def _make_dry_run(target: str, tmp_path: Path) -> str:
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={tmp_path / 'venv'}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode != 0, reason="no make")
def test_make_serve_installs_the_server_only_and_make_test_everything(tmp_path):
    serve = _make_dry_run("serve", tmp_path)
    installs = [ln for ln in serve.splitlines() if "pip install" in ln]
    assert installs and all("[test]" not in ln for ln in installs), serve
    assert re.search(r"deskpush serve --dev-secrets \S*venv/deskpush-dev\.env", serve), serve
    test = _make_dry_run("test", tmp_path)
    assert any("pip install" in ln and "'.[test]'" in ln for ln in test.splitlines()), test


# --------------------------------------------------------------------------
# The README's Python example


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


async def test_the_readme_python_example_runs_as_pasted(tmp_path):
    script = tmp_path / "offer.py"
    script.write_text(readme_python_example())
    async with DeskpushServer(make_config(), jwt_secret=SECRET, api_keys={"default": KEY}) as srv:
        env = _env(DESKPUSH_URL=f"ws://127.0.0.1:{srv.port}/integrator", DESKPUSH_API_KEY=KEY)
        token = srv.tokens.issue("agent-1")
        out = await _offer_accepted_by_agent(str(srv.port), token, f"{shlex.quote(sys.executable)} offer.py",
                                             tmp_path, env)
    assert out.strip() == "{'actionName': 'Accept', 'responseReason': 'Accept'}"


def test_dev_secrets_shorter_than_the_server_takes_are_refused(tmp_path):
    dev = tmp_path / "deskpush-dev.env"
    dev.write_text(f"DESKPUSH_JWT_SECRET=short\nDESKPUSH_API_KEY={KEY}\n")
    dev.chmod(0o600)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "0", "--dev-secrets", str(dev)])
    assert str(exc.value.code) == (f"deskpush: {dev}: DESKPUSH_JWT_SECRET is 5 bytes; use at least 32, "
                                   "or delete the file for new development secrets")
