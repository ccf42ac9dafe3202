"""Auth hygiene: agent token checks (issuer, audience, lifetime) and ``deskpush token``; the
throttle of failed integrator authentications per source address.

The rules are unit-tested on ``AgentTokens`` and ``FailureThrottle``; then
a real server refuses what it should (4401, 429, 4429), a token printed by
the real CLI with the same config is welcomed, and clients on other
loopback addresses (127.0.0.2, ...) stand for other hosts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import time

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from deskpush.server import Config, DeskpushServer
from deskpush.server.auth import AgentTokens, FailureThrottle, source_address
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
        async with asyncio.timeout(60 * UNIT):  # a bound for a shared, busy machine, not a speed check
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


# ---------------------------------------------------------------------------
# Failed integrator authentications, per source address


def test_throttle_refuses_an_address_after_limit_failures_in_the_window_then_forgets():
    t = FailureThrottle(3, 60.0)
    for at in (0.0, 10.0):
        assert not t.failed("192.0.2.7", at)
    assert t.refused_for("192.0.2.7", 20.0) == 0
    assert t.failed("192.0.2.7", 20.0)  # the third within 60 s
    assert t.refused_for("192.0.2.7", 20.0) == 60.0
    assert t.refused_for("192.0.2.7", 79.0) == pytest.approx(1.0)
    assert t.refused_for("192.0.2.8", 21.0) == 0  # other addresses are not affected
    assert t.refused_for("192.0.2.7", 80.0) == 0  # refused for the window, then it starts afresh
    assert not t.failed("192.0.2.7", 81.0) and not t.failed("192.0.2.7", 82.0)
    assert t.failed("192.0.2.7", 83.0)


def test_throttle_window_counts_from_the_first_failure():
    t = FailureThrottle(3, 60.0)
    t.failed("a", 0.0)
    t.failed("a", 50.0)
    assert not t.failed("a", 61.0)  # the window of the first two is over: this one starts a new one
    assert t.refused_for("a", 61.0) == 0


def test_throttle_table_is_bounded_and_forgets_what_expired():
    t = FailureThrottle(5, 10.0, capacity=100)
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(t) == 100  # the least recently failed were forgotten
    t.failed("one-more", 11.0)  # the others' windows are over: they go
    assert len(t) == 1
    off = FailureThrottle(0, 10.0)
    assert not any(off.failed("a", 0.0) for _ in range(100)) and len(off) == 0


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "source"),
    [
        ("192.0.2.7", None, (), "192.0.2.7"),
        ("192.0.2.7", "203.0.113.9", (), "192.0.2.7"),  # not from a trusted proxy: ignored
        ("10.0.0.5", "203.0.113.9", ("10.0.0.0/8",), "203.0.113.9"),
        ("10.0.0.5", "198.51.100.1, 203.0.113.9, 10.0.0.4", ("10.0.0.0/8",), "203.0.113.9"),  # rightmost untrusted
        ("10.0.0.5", "spoofed, 203.0.113.9", ("10.0.0.0/8",), "203.0.113.9"),
        ("10.0.0.5", "203.0.113.9, garbage", ("10.0.0.0/8",), "10.0.0.5"),  # our proxy wrote junk: the proxy
        ("::ffff:192.0.2.7", None, (), "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", None, (), "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", None, (), "2001:db8:1:2::/64"),
    ],
)
def test_source_address(peer, forwarded, trusted, source):
    nets = tuple(ipaddress.ip_network(n) for n in trusted)
    assert source_address(peer, forwarded, nets) == source


def throttled_server(**server) -> DeskpushServer:
    config = Config(server=ServerSection(host="127.0.0.1", port=0, **server),
                    auth=AuthSection(failed_auth_limit=3, failed_auth_window=60.0))
    return DeskpushServer(config, jwt_secret=SECRET, api_keys={"crm": API_KEY})


async def bearer(srv: DeskpushServer, key: str, *, source: str = "127.0.0.1", headers: dict | None = None):
    """Open an integrator with ``key`` in the upgrade request: the connection, or the refusal's response."""
    try:
        return await connect(f"ws://127.0.0.1:{srv.port}/integrator", local_addr=(source, 0),
                             additional_headers={"Authorization": f"Bearer {key}", **(headers or {})})
    except InvalidStatus as exc:
        return exc.response


async def browser_hello(srv: DeskpushServer, key: str, *, source: str = "127.0.0.1") -> int | None:
    """A hello with ``key``: the close code, or None if it was accepted."""
    ws = await connect(f"ws://127.0.0.1:{srv.port}/integrator", local_addr=(source, 0))
    await send_json(ws, {"type": "hello", "apiKey": key})
    await send_json(ws, {"type": "cancelEvent", "requestId": "c1", "cancellationToken": "nope"})
    try:
        frame = await recv_json(ws)
    except ConnectionClosed:
        return ws.close_code
    assert frame["error"]["message"] == "CancellationTokenNotFoundError"
    await ws.close()
    return None


async def test_bearer_guesses_from_one_address_get_429_then_even_the_right_key_waits(caplog):
    caplog.set_level("WARNING", logger="deskpush")
    async with throttled_server() as srv:
        for _ in range(3):
            assert (await bearer(srv, "wrong-" + "x" * 32)).status_code == 401
        refused = await bearer(srv, API_KEY)
        assert refused.status_code == 429
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        assert refused.body == b"too many failed authentications from this address; retry later\n"
        # The browser path from the same address is refused too, unchecked.
        assert await browser_hello(srv, API_KEY) == 4429
        # Another address is not affected; nor are connections already open, nor agents.
        ok = await bearer(srv, API_KEY, source="127.0.0.2")
        await send_json(ok, {"type": "cancelEvent", "requestId": "c1", "cancellationToken": "nope"})
        assert (await recv_json(ok))["type"] == "error"
        agent = await connect(f"ws://127.0.0.1:{srv.port}/agent")
        await send_json(agent, {"type": "hello", "token": srv.tokens.issue("agent-7")})
        assert (await recv_json(agent))["type"] == "welcome"
    [line] = [r.getMessage() for r in caplog.records if "failed integrator authentications" in r.getMessage()]
    assert line == ("1 address(es) refused for 60 s after 3 failed integrator authentications "
                    "(auth.failedAuthLimit), the latest 127.0.0.1")


async def test_hello_guesses_close_4401_then_4429():
    async with throttled_server() as srv:
        for _ in range(3):
            assert await browser_hello(srv, "wrong") == 4401
        assert await browser_hello(srv, API_KEY) == 4429
        assert (await bearer(srv, API_KEY)).status_code == 429
        assert await browser_hello(srv, API_KEY, source="127.0.0.2") is None
        # What is not a guess does not count: a first frame that is no hello.
        other = "127.0.0.3"
        for _ in range(5):
            ws = await connect(f"ws://127.0.0.1:{srv.port}/integrator", local_addr=(other, 0))
            await ws.send('{"type":"notifyEvent"}')
            with pytest.raises(ConnectionClosed):
                await recv_json(ws)
            assert ws.close_code == 4401
        assert await browser_hello(srv, API_KEY, source=other) is None


async def test_failed_agent_tokens_are_not_throttled():
    async with throttled_server() as srv:
        for _ in range(10):
            ws = await connect(f"ws://127.0.0.1:{srv.port}/agent")
            await send_json(ws, {"type": "hello", "token": "expired-or-wrong"})
            with pytest.raises(ConnectionClosed):
                await recv_json(ws)
            assert ws.close_code == 4401
        ws = await connect(f"ws://127.0.0.1:{srv.port}/agent")
        await send_json(ws, {"type": "hello", "token": srv.tokens.issue("agent-7")})
        assert (await recv_json(ws))["type"] == "welcome"


async def test_behind_a_trusted_proxy_the_forwarded_client_is_throttled_not_the_proxy():
    async with throttled_server(trusted_proxies=("127.0.0.1",)) as srv:
        attacker = {"X-Forwarded-For": "203.0.113.66"}
        for _ in range(3):
            assert (await bearer(srv, "wrong-" + "x" * 32, headers=attacker)).status_code == 401
        assert (await bearer(srv, API_KEY, headers=attacker)).status_code == 429
        # Another client through the same proxy still gets in.
        ok = await bearer(srv, API_KEY, headers={"X-Forwarded-For": "198.51.100.20"})
        assert not hasattr(ok, "status_code")
        await ok.close()


async def test_without_trusted_proxies_a_forged_forwarded_for_does_not_evade_the_throttle():
    async with throttled_server() as srv:
        for i in range(3):
            response = await bearer(srv, "wrong-" + "x" * 32, headers={"X-Forwarded-For": f"198.51.100.{i}"})
            assert response.status_code == 401
        assert (await bearer(srv, API_KEY, headers={"X-Forwarded-For": "198.51.100.99"})).status_code == 429


def test_config_refuses_a_trusted_proxy_that_is_no_address(tmp_path):
    from deskpush.server.config import ConfigError, load

    path = tmp_path / "bad.toml"
    path.write_text("[server]\ntrustedProxies = ['10.0.0.0/8', 'proxy.local']\n")
    with pytest.raises(ConfigError, match=r"'proxy.local' is not an IP address or network - at \$\.server\.trustedProxies"):
        load(path)


async def test_deskpush_notify_guessing_keys_meets_401_then_429(capsys):
    from deskpush.server.cli import main as cli_main

    async with throttled_server() as srv:
        codes = []
        for key in ["wrong-" + "x" * 32] * 3 + [API_KEY]:
            argv = ["notify", "--url", f"ws://127.0.0.1:{srv.port}/integrator", "--api-key", key, "--agent", "a"]
            codes.append(await asyncio.to_thread(cli_main, argv))
        assert codes == [2, 2, 2, 2]
        err = capsys.readouterr().err.splitlines()
        assert err.count("deskpush notify: unauthorized: "
                         f"ws://127.0.0.1:{srv.port}/integrator refused the API key (HTTP 401); check --api-key") == 3
        assert err[-1] == (f"deskpush notify: cannot connect to ws://127.0.0.1:{srv.port}/integrator: "
                           "HTTP 429 Too Many Requests: too many failed authentications from this address; retry later")


async def http_get(srv: DeskpushServer, path: str, authorization: str, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, local_addr=(source, 0))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n\r\n".encode())
    async with asyncio.timeout(5 * UNIT):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def test_stats_key_guesses_are_throttled_too_and_counted():
    async with throttled_server() as srv:
        for _ in range(3):
            status, _, _ = await http_get(srv, "/stats", "Bearer wrong-" + "x" * 32)
            assert status == 401
        status, headers, _ = await http_get(srv, "/stats", f"Bearer {API_KEY}")
        assert status == 429 and "Retry-After" in headers
        assert (await bearer(srv, API_KEY)).status_code == 429  # the same address, the same count
        assert await browser_hello(srv, API_KEY) == 4429
        status, _, body = await http_get(srv, "/stats", f"Bearer {API_KEY}", source="127.0.0.2")
        assert status == 200
        figures = json.loads(body)
        assert figures["refusedAuthThrottled"] == 3
        assert figures["pendingHandshakes"] == 0  # this request is plain HTTP: it does not count
