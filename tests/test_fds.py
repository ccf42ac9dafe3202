"""Running out of file descriptors: a real server in a child process with a low RLIMIT_NOFILE.

The child starts with a soft limit of 64 and a hard limit of 128; the server
raises the soft one to 128 and says so. Then agents connect until the server
has no descriptor left: each one past that is refused at once (503 or a closed
connection, never left hanging), counted, and reported in at most one log
line a second, while the agent and the integrator connected before still
exchange offers. Both loops: ``deskpush serve`` runs on uvloop, a
``DeskpushServer`` under ``asyncio.run`` on asyncio's own.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import textwrap
import time
import urllib.request

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from deskpush.server.auth import AgentTokens

from .conftest import SECRET, UNIT, recv_json, send_json

KEY = "fd-test-key-" + "k" * 32
SOFT, HARD = 64, 128

LIMIT = f"import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, ({SOFT}, {HARD}))\n"
CHILDREN = {
    "uvloop (deskpush serve)": LIMIT + textwrap.dedent("""
        import sys
        from deskpush.server.cli import main
        sys.exit(main(["serve", "--config", sys.argv[1]]))
    """),
    "asyncio (DeskpushServer)": LIMIT + textwrap.dedent(f"""
        import asyncio, signal, sys
        from deskpush.server import DeskpushServer, load, logs
        logs.setup("INFO")

        async def main():
            srv = DeskpushServer(load(sys.argv[1]), jwt_secret={SECRET!r}, api_keys={{"default": {KEY!r}}})
            await srv.start()
            print(f"listening on ws://127.0.0.1:{{srv.port}}", flush=True)
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            await srv.close()

        asyncio.run(main())
    """),
}


def http_get(port: int, path: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def agent(port: int, agent_id: str):
    ws = await connect(f"ws://127.0.0.1:{port}/agent", open_timeout=5 * UNIT)
    await send_json(ws, {"type": "hello", "token": AgentTokens(SECRET).issue(agent_id)})
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws


@pytest.mark.parametrize("child", list(CHILDREN), ids=list(CHILDREN))
async def test_out_of_descriptors_refuses_counts_and_says_so_and_keeps_serving(tmp_path, child):
    config = tmp_path / "deskpush.toml"
    # The held connections must outlive the test's steps (no hello timeout, no ping) on their own.
    config.write_text("[server]\nport = 0\nhelloTimeout = 120.0\npingInterval = 0\ndemo = false\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILDREN[child], str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DESKPUSH_JWT_SECRET": SECRET, "DESKPUSH_API_KEY": KEY},
    )
    held = []
    try:
        async with asyncio.timeout(20 * UNIT):
            while not (m := re.search(rb"listening on ws://127\.0\.0\.1:(\d+)", await proc.stdout.readline())):
                pass
        port = int(m.group(1))

        # Connected before the descriptors run out: an agent and an integrator.
        first = await agent(port, "agent-first")
        ig = await connect(f"ws://127.0.0.1:{port}/integrator", additional_headers={"Authorization": f"Bearer {KEY}"})

        # Agents connect until the server has no descriptor left for them.
        refusals: list[str] = []
        started = time.monotonic()
        for i in range(3 * HARD):
            try:
                async with asyncio.timeout(10 * UNIT):
                    held.append(await agent(port, f"agent-{i}"))
            except InvalidStatus as exc:
                assert exc.response.status_code == 503, exc
                refusals.append("503")
            except TimeoutError:
                raise AssertionError(f"connection {i} was left hanging, neither served nor refused") from None
            except (OSError, Exception) as exc:  # closed before an answer could be read
                refusals.append(type(exc).__name__)
            if len(refusals) >= 20:
                break
        elapsed = time.monotonic() - started
        assert len(refusals) == 20 and HARD // 2 < len(held) < HARD, (len(held), refusals)

        # Those connected before are still served: an offer, answered.
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-first", "progress": False,
                             "input": {"templateName": "msdyn_chat_incoming_unauthenticated",
                                       "templateParameters": {}}})
        card = await recv_json(first)
        assert card["type"] == "notification"
        await send_json(first, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
        assert (await recv_json(ig))["value"] == {"actionName": "Accept", "responseReason": "Accept"}

        # Descriptors freed, the server accepts again; the refusals were counted.
        for ws in held[:10]:
            await ws.close()
        del held[:10]
        await asyncio.sleep(0.2)
        status, body = await asyncio.to_thread(http_get, port, "/stats", KEY)
        assert status == 200, body
        figures = msgspec.json.decode(body)
        assert figures["refusedOutOfFds"] == len(refusals)
        assert figures["openFilesLimit"] == HARD
        held.append(await agent(port, "agent-after"))

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20 * UNIT):
            await proc.wait()
        log = (await proc.stderr.read()).decode()
    finally:
        for ws in held:
            await ws.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 0, log
    assert "Traceback" not in log and "socket.accept() out of system resource" not in log, log
    assert re.search(rf"INFO deskpush open files limit {HARD} \(soft limit raised from {SOFT}\)", log), log
    lines = [ln for ln in log.splitlines() if "WARNING deskpush refused" in ln]
    # At most one line a second, and together they account for every refusal.
    assert 1 <= len(lines) <= elapsed + 2, lines
    counts = [int(re.search(r"refused (\d+) connections?: no file descriptor left for them \(Too many open "
                            rf"files; open files limit {HARD}\); (\d+) refused since start", ln).group(1))
              for ln in lines]
    assert sum(counts) == len(refusals), lines
