"""The command line as a new user meets it: `deskpush serve`, `deskpush token`, config errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect

from deskpush.server import config as cfg
from deskpush.server.auth import AgentTokens
from deskpush.server.cli import main

from .conftest import UNIT, recv_json, send_json


async def start_cli(*args: str, env: dict | None = None) -> tuple[asyncio.subprocess.Process, dict]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deskpush.server", "serve", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    printed = {}
    async with asyncio.timeout(20 * UNIT):
        while "key" not in printed:
            line = (await proc.stdout.readline()).decode()
            assert line, (await proc.stderr.read()).decode()
            if m := re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line):
                printed["port"] = int(m.group(1))
            if m := re.search(r"agent desktop:\s+(http://\S+)#token=(\S+)", line):
                printed["page"], printed["token"] = m.groups()
            if m := re.search(r"integrator (?:key|keys):\s+(\S+)", line):
                printed["key"] = m.group(1)
    return proc, printed


async def test_serve_with_no_arguments_prints_what_to_connect_with_and_stops_cleanly():
    proc, printed = await start_cli(env={"DESKPUSH_JWT_SECRET": "", "DESKPUSH_API_KEY": ""})
    try:
        port = printed["port"]
        agent = await connect(f"ws://127.0.0.1:{port}/agent")
        await send_json(agent, {"type": "hello", "token": printed["token"]})
        assert (await recv_json(agent))["agentId"] == "agent-1"
        ig = await connect(f"ws://127.0.0.1:{port}/integrator",
                           additional_headers={"Authorization": f"Bearer {printed['key']}"})
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-1", "progress": False,
                             "input": {"templateName": "msdyn_chat_incoming_unauthenticated",
                                       "templateParameters": {}}})
        card = await recv_json(agent)
        await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        assert (await recv_json(ig))["value"] == {"actionName": "Accept", "responseReason": "Accept"}

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10 * UNIT):
            code = await proc.wait()
            while True:
                try:
                    await agent.recv()
                except Exception:
                    break
        assert code == 0
        assert agent.close_code == 1012  # SIGTERM drains: service restart
        log = (await proc.stderr.read()).decode()
        # One INFO line per outcome, carrying the ids.
        line = next(ln for ln in log.splitlines() if "outcome" in ln)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO deskpush\.outcome outcome .*", line), line
        assert f"notificationId={card['notificationId']}" in line
        assert "agentId=agent-1" in line and "actionName=Accept responseReason=Accept" in line
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_log_format_json_writes_one_object_per_line_with_the_outcome_fields():
    proc, printed = await start_cli("--log-format", "json", env={"DESKPUSH_JWT_SECRET": "", "DESKPUSH_API_KEY": ""})
    try:
        port = printed["port"]
        agent = await connect(f"ws://127.0.0.1:{port}/agent")
        await send_json(agent, {"type": "hello", "token": printed["token"]})
        await recv_json(agent)
        ig = await connect(f"ws://127.0.0.1:{port}/integrator",
                           additional_headers={"Authorization": f"Bearer {printed['key']}"})
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-1", "progress": False,
                             "correlationId": "case-42",
                             "input": {"templateName": "msdyn_chat_incoming_unauthenticated"}})
        card = await recv_json(agent)
        await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        await recv_json(ig)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10 * UNIT):
            assert await proc.wait() == 0
        lines = [json.loads(line) for line in (await proc.stderr.read()).decode().splitlines()]
        # Every line is JSON, the start and the shutdown too.
        messages = [line["message"] for line in lines]
        assert any(m.startswith("open files limit ") for m in messages)
        assert any(m.startswith("received SIGTERM") for m in messages) and messages[-1] == "stopped"
        (outcome,) = [line for line in lines if line["logger"] == "deskpush.outcome"]
        assert outcome["level"] == "INFO" and outcome["message"] == "outcome"
        assert {k: outcome[k] for k in ("notificationId", "agentId", "correlationId", "actionName",
                                         "responseReason", "delivered")} == {
            "notificationId": card["notificationId"], "agentId": "agent-1", "correlationId": "case-42",
            "actionName": "Accept", "responseReason": "Accept", "delivered": True}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_refuses_a_port_in_use():
    proc, printed = await start_cli()
    try:
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "deskpush.server", "serve", "--port", str(printed["port"]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(20 * UNIT):
            out, err = await second.communicate()
        assert second.returncode == 1
        assert b"cannot listen" in err
    finally:
        proc.terminate()
        await proc.wait()


def test_token_command_uses_the_configured_secret(capsys, monkeypatch):
    monkeypatch.setenv("DESKPUSH_JWT_SECRET", "cli-secret-" + "z" * 32)
    assert main(["token", "agent-9", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert AgentTokens("cli-secret-" + "z" * 32).verify(token) == "agent-9"


def test_token_command_without_a_secret_says_what_to_set(capsys, monkeypatch):
    monkeypatch.delenv("DESKPUSH_JWT_SECRET", raising=False)
    monkeypatch.delenv("DESKPUSH_CONFIG", raising=False)
    assert main(["token", "agent-9"]) == 2
    assert "DESKPUSH_JWT_SECRET" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[limits]\nqueueLimit = 'ten'\n", "Expected `int`, got `str` - at `$.limits.queueLimit`"),
        ("[server]\nprot = 1\n", "unknown field `prot` - at `$.server`"),
        ("[[templates]]\ntitle = 'x'\n", "missing required field `name` - at `$.templates[0]`"),
        ("[limits\n", "not valid TOML"),
        ("[[templates]]\nname='a'\ntitle='x'\n[[templates]]\nname='a'\ntitle='y'\n", "template defined twice: a"),
    ],
)
def test_config_errors_name_the_bad_key(tmp_path, toml, needle):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(path)
    assert needle in str(exc.value)


def test_config_templates_extend_the_builtins(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(
        "[limits]\ndisplayLimit = 2\n"
        "[[templates]]\nname = 'msdyn_chat_incoming_unauthenticated'\ntitle = 'Chat!'\ntimeout = 30\n"
        "[[templates]]\nname = 'callback'\ntitle = 'Call back {customerName}'\nautoAccept = true\n"
        "fields = [{header = 'Phone', value = '{phone}'}]\n"
    )
    config = cfg.load(path)
    templates = config.template_map()
    assert config.limits.display_limit == 2
    assert templates["msdyn_chat_incoming_unauthenticated"].title == "Chat!"
    assert templates["callback"].auto_accept and templates["callback"].fields[0].value == "{phone}"
    assert "msdyn_chat_transfer" in templates


def test_bad_config_file_exits_2_with_the_message(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = 'x'\n")
    proc = subprocess.run([sys.executable, "-m", "deskpush.server", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "$.server.port" in proc.stderr


def test_integrator_key_names_must_be_unique(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(f"[[auth.integratorKeys]]\nname='crm'\nkey='{'a' * 32}'\n"
                    f"[[auth.integratorKeys]]\nname='crm'\nkey='{'b' * 32}'\n")
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(path)
    assert "integrator key name used twice: crm" in str(exc.value) and str(path) in str(exc.value)


# ---------------------------------------------------------------------------
# Secrets and keys of at least 32 bytes


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DESKPUSH_")}
    return subprocess.run([sys.executable, "-m", "deskpush.server", *args], capture_output=True, text=True,
                          timeout=30, env={**clean, **(env or {})})


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[auth]\njwtSecret = 'secret'\n", {}, "auth.jwtSecret is 6 bytes; use at least 32"),
        ("", {"DESKPUSH_JWT_SECRET": "x" * 31}, "DESKPUSH_JWT_SECRET is 31 bytes; use at least 32"),
        ("[auth]\njwtSecretEnv = 'MY_SECRET'\n", {"MY_SECRET": "short"}, "MY_SECRET is 5 bytes; use at least 32"),
        ("[[auth.integratorKeys]]\nname = 'crm'\nkey = 'crm-key-123'\n", {},
         "integrator key 'crm' is 11 bytes; use at least 32"),
        ("[[auth.integratorKeys]]\nname = 'crm'\nkeyEnv = 'CRM_KEY'\n", {"CRM_KEY": "k"},
         "integrator key 'crm' is 1 bytes; use at least 32"),
        ("", {"DESKPUSH_API_KEY": "é" * 15}, "DESKPUSH_API_KEY is 30 bytes; use at least 32"),  # bytes, not characters
    ],
)
def test_short_secrets_and_keys_stop_serve_and_token_with_one_line(tmp_path, toml, env, message):
    path = tmp_path / "deskpush.toml"
    path.write_text(toml)
    for command in (["serve", "--port", "0"], ["token", "agent-1"]):
        proc = run_cli(*command, "--config", str(path), env=env)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        [line] = proc.stderr.splitlines()
        assert line.startswith("deskpush: ") and message in line, line
        assert "Traceback" not in proc.stderr


def test_a_short_secret_from_the_environment_stops_serve_without_a_config_file():
    proc = run_cli("serve", "--port", "0", env={"DESKPUSH_JWT_SECRET": "secret"})
    assert proc.returncode == 2
    assert proc.stderr == ("deskpush: DESKPUSH_JWT_SECRET is 6 bytes; use at least 32 "
                           "(e.g. from: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\n")


def test_the_server_class_refuses_short_secrets_and_keys_too():
    from deskpush.server import Config, DeskpushServer

    with pytest.raises(ValueError, match="the agent token secret is 5 bytes"):
        DeskpushServer(Config(), jwt_secret="short", api_keys={"crm": "k" * 32})
    with pytest.raises(ValueError, match="integrator key 'crm' is 3 bytes"):
        DeskpushServer(Config(), jwt_secret="s" * 32, api_keys={"crm": "key"})


# ---------------------------------------------------------------------------
# The banner prints a working agent token only for a demo


async def banner_of(*args: str, env: dict) -> str:
    """What ``deskpush serve`` prints on stdout at start (the banner is one write)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DESKPUSH_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deskpush.server", "serve", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**clean, **env},
    )
    try:
        lines = []
        async with asyncio.timeout(60 * UNIT):  # a bound for a shared, busy machine, not a speed check
            while not lines or not lines[-1].startswith("  try:"):
                line = (await proc.stdout.readline()).decode()
                assert line, (await proc.stderr.read()).decode()
                lines.append(line)
            proc.kill()
            rest, _ = await proc.communicate()
        return "".join(lines) + rest.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(("demo", "secret"), [(True, True), (False, True), (False, False)])
async def test_banner_prints_no_token_unless_demo_with_a_run_only_secret(tmp_path, demo, secret):
    path = tmp_path / "deskpush.toml"
    path.write_text(f"[server]\ndemo = {'true' if demo else 'false'}\n")
    env = {"DESKPUSH_JWT_SECRET": "configured-secret-" + "s" * 32} if secret else {}
    out = await banner_of("--config", str(path), env=env)
    assert not re.search(r"eyJ[\w-]*\.[\w-]+\.[\w-]+", out) and "token=" not in out, out  # no JWT anywhere
    assert "listening on ws://127.0.0.1:" in out
    if secret:
        assert "-m deskpush.server token AGENT_ID" in out  # as it was started: it runs as pasted
    else:
        assert "none can be issued" in out and "set DESKPUSH_JWT_SECRET" in out
    assert ("agent desktop:" in out) == demo


async def test_banner_prints_a_working_token_for_the_demo_with_a_run_only_secret():
    out = await banner_of(env={})
    token = re.search(r"agent token:\s+(eyJ\S+)\s+\(agent-1, valid 12 h\)", out).group(1)
    assert f"/#token={token}" in out
    assert "tokens are signed with a secret that lasts for this run only" in out
