"""Agent token checks (issuer, audience, lifetime) as a desktop meets them, and ``deskpush token``.

The rules are unit-tested on ``AgentTokens``; then a real server refuses the
tokens it should with 4401, and a token printed by the real CLI, with the
same config, is welcomed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from deskpush.server import Config, DeskpushServer
from deskpush.server.auth import AgentTokens
from deskpush.server.config import AuthSection, ServerSection

from .conftest import API_KEY, SECRET, UNIT, recv_json, send_json

ISSUER = "https://login.example.com"
AUDIENCE = "deskpush"
HOUR = 3600.0


def strict() -> AgentTokens:
    return AgentTokens(SECRET, issuer=ISSUER, audience=AUDIENCE, max_lifetime=HOUR)


def minted(**claims) -> str:
    """A token signed with the server's secret, with exactly ``claims`` (None: left out)."""
    now = int(time.time())
    base = {"sub": "agent-7", "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, SECRET, algorithm="HS256")


def test_issued_tokens_pass_the_checks_they_are_made_for():
    tokens = strict()
    assert tokens.verify(tokens.issue("agent-7", ttl=HOUR)) == "agent-7"
    assert jwt.decode(tokens.issue("agent-7", ttl=60), options={"verify_signature": False})["iss"] == ISSUER
    with pytest.raises(ValueError, match="longer than the longest allowed"):
        tokens.issue("agent-7", ttl=HOUR + 1)


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({}, True),
        ({"aud": [AUDIENCE, "other"]}, True),  # a list naming it
        ({"iss": "https://evil.example.com"}, False),
        ({"iss": None}, False),
        ({"aud": "other"}, False),
        ({"aud": None}, False),
        ({"iat": None}, False),  # no iat: its lifetime is unknown
        ({"exp": None}, False),
        ({"exp": int(time.time()) + 2 * 24 * 3600}, False),  # valid two days: too long
        ({"iat": int(time.time()) + 24 * 3600, "exp": int(time.time()) + 24 * 3600 + 60}, False),  # iat ahead
        ({"iat": int(time.time()) - 2 * 3600, "exp": int(time.time()) + 60}, False),  # 2 h 1 min lifetime
    ],
)
def test_strict_tokens(claims, accepted):
    assert (strict().verify(minted(**claims)) == "agent-7") == accepted


def test_without_the_options_tokens_are_checked_as_before():
    tokens = AgentTokens(SECRET)
    assert tokens.verify(minted(iss=None, aud=None, iat=None)) == "agent-7"
    assert tokens.verify(minted(iss="anyone", aud=None, exp=int(time.time()) + 365 * 86400)) == "agent-7"
    assert tokens.verify(minted(aud=AUDIENCE)) is None  # an aud nobody asked for: PyJWT refuses it


# ---------------------------------------------------------------------------
# Over a real socket, and with the real CLI


def strict_config(tmp_path) -> tuple[Config, str]:
    path = tmp_path / "deskpush.toml"
    path.write_text(f'[auth]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\nmaxTokenLifetime = {HOUR}\n')
    from deskpush.server.config import load

    return load(path), str(path)


async def hello(srv: DeskpushServer, token: str) -> dict | int:
    """The welcome, or the close code."""
    ws = await connect(f"ws://127.0.0.1:{srv.port}/agent")
    await send_json(ws, {"type": "hello", "token": token})
    try:
        return await recv_json(ws)
    except ConnectionClosed:
        return ws.close_code


async def test_a_server_with_the_checks_refuses_tokens_that_fail_them_with_4401(tmp_path):
    config, _ = strict_config(tmp_path)
    config = Config(server=ServerSection(host="127.0.0.1", port=0), auth=config.auth)
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        assert (await hello(srv, minted()))["type"] == "welcome"
        assert (await hello(srv, srv.tokens.issue("agent-7", ttl=60)))["type"] == "welcome"
        for bad in (minted(iss="someone-else"), minted(aud=None), minted(iat=None),
                    minted(exp=int(time.time()) + 30 * 86400)):
            assert await hello(srv, bad) == 4401


def run_token(*args: str, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DESKPUSH_")}
    return subprocess.run([sys.executable, "-m", "deskpush.server", "token", *args], capture_output=True,
                          text=True, timeout=30, env={**clean, **env})


async def test_deskpush_token_issues_tokens_the_same_config_accepts(tmp_path):
    config, path = strict_config(tmp_path)
    env = {"DESKPUSH_JWT_SECRET": SECRET}
    default = run_token("agent-7", "--config", path, env=env)
    assert default.returncode == 0, default.stderr
    token = default.stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER and claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == HOUR  # 12 h by default, but at most maxTokenLifetime
    too_long = run_token("agent-7", "--config", path, "--ttl", str(2 * HOUR), env=env)
    assert too_long.returncode == 2 and too_long.stdout == ""
    assert "longer than auth.maxTokenLifetime" in too_long.stderr

    config = Config(server=ServerSection(host="127.0.0.1", port=0), auth=config.auth)
    async with DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY}) as srv:
        welcome = await hello(srv, token)
        assert welcome["type"] == "welcome" and welcome["agentId"] == "agent-7"


async def test_the_demo_banner_token_passes_the_checks(tmp_path):
    _, path = strict_config(tmp_path)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DESKPUSH_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deskpush.server", "serve", "--port", "0", "--config", path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean,
    )
    try:
        token = port = None
        async with asyncio.timeout(20 * UNIT):
            while token is None:
                line = (await proc.stdout.readline()).decode()
                assert line, (await proc.stderr.read()).decode()
                if "listening on ws://127.0.0.1:" in line:
                    port = int(line.split("ws://127.0.0.1:")[1].split()[0])
                if line.strip().startswith("agent token:"):
                    token = line.split()[2]
                    assert "(agent-1, valid 1 h)" in line
        ws = await connect(f"ws://127.0.0.1:{port}/agent")
        await send_json(ws, {"type": "hello", "token": token})
        assert (await recv_json(ws))["type"] == "welcome"
        await ws.close()
    finally:
        proc.kill()
        await proc.wait()


def test_config_rejects_a_non_positive_lifetime(tmp_path):
    from deskpush.server.config import ConfigError, load

    path = tmp_path / "bad.toml"
    path.write_text("[auth]\nmaxTokenLifetime = 0\n")
    with pytest.raises(ConfigError, match=r"\$\.auth\.maxTokenLifetime"):
        load(path)
    assert AuthSection().max_token_lifetime is None
