"""Taking a node out of service: /livez and /readyz, a drain that spreads 1012 closes, and a reload.

A real server on 127.0.0.1:0 with real clients; the engine's template swap
driven directly. Times are checked coarsely only (spread over the window, not
when exactly): machines are shared and noisy.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from http import HTTPStatus

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from deskpush.protocol import frames as f
from deskpush.protocol.templates import Template
from deskpush.protocol.vocabulary import CloseCode
from deskpush.server import Config, DeskpushServer
from deskpush.server.app import DRAIN_BATCH_MIN, drain_schedule
from deskpush.server.auth import AgentTokens, ApiKeys
from deskpush.server.config import ServerSection, needs_restart
from deskpush.server.state import StateFile

from .conftest import API_KEY, SECRET, UNIT, open_agent, open_integrator, recv_json, send_json
from .engine_helpers import BUILTINS, CHAT, Harness, sent_to

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Integrator keys of the reload tests (32 bytes or more, as the server asks).
K1, K2, K3 = ("first-key-" + "1" * 30), ("second-key-" + "2" * 30), ("third-key-" + "3" * 30)


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` in a thread (urllib): status, headers, body; an HTTP error status is returned too."""

    def get() -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10 * UNIT) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.to_thread(get)


def drain_config(tmp_path, window: float) -> Config:
    return Config(server=ServerSection(host="127.0.0.1", port=0, drain_timeout=window,
                                       state_file=str(tmp_path / "state.json")))


async def closed_at(ws: ClientConnection) -> float:
    """Read until the server closes ``ws``; when (loop time) the close arrived."""
    try:
        while True:
            await ws.recv()
    except ConnectionClosed:
        return asyncio.get_running_loop().time()


# ---------------------------------------------------------------------------
# /livez and /readyz


async def test_livez_and_readyz_answer_200_while_serving(server):
    status, headers, body = await http_get(server.port, "/livez")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, headers, body = await http_get(server.port, "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    assert headers["Content-Type"] == "application/json" and headers["Cache-Control"] == "no-store"
    assert server.not_ready() is None and not server.draining


# ---------------------------------------------------------------------------
# The drain


def test_drain_schedule_spreads_equal_batches_over_the_window():
    assert drain_schedule(0, 10.0) == []
    # A handful of sessions: one batch, at once.
    assert drain_schedule(DRAIN_BATCH_MIN, 10.0) == [(0.0, DRAIN_BATCH_MIN)]
    plan = drain_schedule(1000, 10.0)
    assert sum(n for _, n in plan) == 1000 and len(plan) == 100
    assert plan[0][0] == 0.0 and plan[-1][0] == pytest.approx(9.9)
    assert max(n for _, n in plan) - min(n for _, n in plan) <= 1
    # Never closer than 50 ms: 100,000 sessions over 1 s are 20 batches.
    assert len(drain_schedule(100_000, 1.0)) == 20
    assert drain_schedule(500, 0.0) == [(0.0, 500)]


async def test_drain_closes_every_session_with_1012_spread_over_the_window_and_saves(tmp_path):
    window = 2.0 * UNIT
    agents_n = 4 * DRAIN_BATCH_MIN  # four batches: 0, 1/4, 1/2 and 3/4 of the window
    srv = DeskpushServer(drain_config(tmp_path, window), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    try:
        agents = [(await open_agent(srv, f"agent-{i}"))[0] for i in range(agents_n)]
        ig = await open_integrator(srv)
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-0",
                             "input": {"templateName": CHAT, "templateParameters": {"customerName": "Jane"}}})
        assert [(await recv_json(ig))["state"] for _ in range(2)] == ["queued", "displayed"]
        closes = [asyncio.ensure_future(closed_at(ws)) for ws in agents]
        ig_closed = asyncio.ensure_future(closed_at(ig))

        loop = asyncio.get_running_loop()
        started = loop.time()
        draining = asyncio.ensure_future(srv.drain())
        await asyncio.sleep(0)  # the drain has begun: not ready, and the first batch is closing

        status, _, body = await http_get(srv.port, "/readyz")
        assert (status, json.loads(body)) == (503, {"status": "draining"})
        status, _, body = await http_get(srv.port, "/livez")
        assert status == 200  # alive all the same
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{srv.port}/agent")
        assert refused.value.response.status_code == HTTPStatus.SERVICE_UNAVAILABLE
        assert refused.value.response.headers["Retry-After"] == "1"

        async with asyncio.timeout(30 * UNIT):
            times = await asyncio.gather(*closes)
            ig_time = await ig_closed
            await draining
        for ws in [*agents, ig]:
            assert (ws.close_code, ws.close_reason) == (CloseCode.SERVICE_RESTART, "server restarting")
        times = sorted(t - started for t in times)
        # Not all at once: the first batch closes at once, the last about 3/4 of the window later.
        assert times[DRAIN_BATCH_MIN - 1] < times[-1] - window / 4, times
        assert times[-1] >= 0.7 * window, times
        # The integrator goes with the last batch.
        assert ig_time - started >= 0.7 * window

        await srv.close()
    finally:
        await srv.close()
    snapshot = StateFile(str(tmp_path / "state.json")).load()
    assert snapshot is not None
    assert [(n.agent_id, n.state) for n in snapshot.notifications] == [("agent-0", "displayed")]


async def test_close_during_a_drain_closes_the_rest_at_once_with_1012(tmp_path):
    srv = DeskpushServer(drain_config(tmp_path, 60.0), jwt_secret=SECRET, api_keys={"crm": API_KEY})
    await srv.start()
    try:
        agents = [(await open_agent(srv, f"agent-{i}"))[0] for i in range(2 * DRAIN_BATCH_MIN)]
        draining = asyncio.ensure_future(srv.drain())
        await asyncio.sleep(0.2 * UNIT)  # the first batch is closed; the second is due in 30 s
        draining.cancel()  # a second SIGTERM
        async with asyncio.timeout(20 * UNIT):
            await srv.close()
            for ws in agents:
                await closed_at(ws)
        assert {ws.close_code for ws in agents} == {CloseCode.SERVICE_RESTART}
    finally:
        await srv.close()
    assert (tmp_path / "state.json").exists()


# ---------------------------------------------------------------------------
# Reload: templates and keys


def test_a_displayed_offer_keeps_the_template_it_was_rendered_with():
    h = Harness(templates={CHAT: BUILTINS[CHAT]})
    h.connect("a1", "agent-1")
    h.integrator("i1")
    shown = sent_to(h.notify("i1", "r1", "agent-1", params={"customerName": "Jane"}), "a1", f.Notification)[0]
    queued_effects = h.notify("i1", "r2", "agent-1", params={"customerName": "Joe"})
    assert not sent_to(queued_effects, "a1", f.Notification)  # queued behind the first (displayLimit 1)
    changed = Template(name=CHAT, title="Changed {customerName}", timeout=5.0, accept_text="Take")
    h.engine.replace_templates({CHAT: changed, "new": Template(name="new", title="New")})

    # The displayed card is replayed as it was shown.
    replay = sent_to(h.connect("a2", "agent-1"), "a2", f.Notification)
    assert replay == [shown]
    # The queued one was made before the reload too: shown with its own template.
    nxt = sent_to(h.respond("a1", shown.notification_id), "a1", f.Notification)[0]
    assert (nxt.title, nxt.accept_text, nxt.timeout_seconds) == ("New chat request", "Accept", 120.0)
    # A new one gets the new template; a template added by the reload works.
    h.respond("a1", nxt.notification_id)
    third = sent_to(h.notify("i1", "r3", "agent-1", params={"customerName": "Ann"}), "a1", f.Notification)[0]
    assert (third.title, third.accept_text, third.timeout_seconds) == ("Changed Ann", "Take", 5.0)
    h.respond("a1", third.notification_id)
    assert sent_to(h.notify("i1", "r4", "agent-1", "new"), "a1", f.Notification)[0].title == "New"


def test_api_keys_replace_checks_the_new_keys_only():
    keys = ApiKeys({"crm": K1})
    keys.replace({"crm": K2, "routing": K3})
    assert keys.check(K1) is None
    assert keys.check(K2) == "crm" and keys.check_bearer(f"Bearer {K3}") == "routing"
    assert keys.names() == ["crm", "routing"]
    with pytest.raises(ValueError, match="use at least 32"):
        keys.replace({"crm": "short"})
    assert keys.check(K2) == "crm"  # nothing replaced


def test_needs_restart_names_what_a_reload_leaves():
    old = Config()
    new = msgspec.structs.replace(
        old, builtin_templates=False, templates=(Template(name="x", title="X"),),
        server=msgspec.structs.replace(old.server, port=9000, drain_timeout=3.0),
        limits=msgspec.structs.replace(old.limits, queue_limit=3))
    assert needs_restart(old, new) == ["server.port", "server.drainTimeout", "limits.queueLimit"]
    assert needs_restart(old, msgspec.structs.replace(old, builtin_templates=False)) == []


async def test_reload_swaps_templates_and_keys_and_keeps_every_connection(server):
    agent, _ = await open_agent(server, "agent-7")
    ig = await open_integrator(server)  # authenticated with API_KEY, which the reload removes
    new = Config(templates=(Template(name="added", title="Added {x}"),))
    server.reload(new, {"crm": K2})

    with pytest.raises(InvalidStatus) as refused:
        await open_integrator(server)
    assert refused.value.response.status_code == 401
    ig2 = await open_integrator(server, K2)
    await send_json(ig2, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-7", "progress": False,
                          "input": {"templateName": "added", "templateParameters": {"x": "1"}}})
    card = await recv_json(agent)
    assert card["title"] == "Added 1"
    # The connection made with the old key still works.
    await send_json(agent, {"type": "respond", "notificationId": card["notificationId"], "action": "Accept"})
    assert (await recv_json(ig2))["value"]["actionName"] == "Accept"
    await send_json(ig, {"type": "notifyEvent", "requestId": "r2", "agentId": "agent-7", "progress": False,
                         "input": {"templateName": "added", "templateParameters": {"x": "2"}}})
    assert (await recv_json(agent))["type"] == "resolved"  # the first card
    assert (await recv_json(agent))["title"] == "Added 2"
    assert server.engine.templates.keys() >= {"added", CHAT}


# ---------------------------------------------------------------------------
# deskpush serve: SIGTERM, SIGHUP, deskpush reload


class Log:
    """Lines of a subprocess's stderr, read as they come."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._task = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode().rstrip("\n"))
            self._new.set()

    async def wait_for(self, text: str, after: int = 0) -> str:
        async with asyncio.timeout(20 * UNIT):
            while True:
                for line in self.lines[after:]:
                    if text in line:
                        return line
                self._new.clear()
                await self._new.wait()


TOKEN = AgentTokens(SECRET).issue("agent-1")


def write_config(path, *, key: str, templates: str = "", drain: float = 10.0, extra: str = "") -> None:
    path.write_text(f"""
{templates}
[server]
drainTimeout = {drain}
pidFile = "{path.parent / 'deskpush.pid'}"
stateFile = "{path.parent / 'state.json'}"
{extra}
[limits]
displayLimit = 3
[[auth.integratorKeys]]
name = "crm"
key = "{key}"
""")


async def run_cli(*args: str) -> tuple[int, str, str]:
    import sys

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "deskpush.server", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20 * UNIT):
        out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_serve_drains_on_sigterm_saves_and_exits_0(tmp_path):
    import signal

    from .test_cli import start_cli

    conf = tmp_path / "deskpush.toml"
    window = 1.5 * UNIT
    write_config(conf, key=K1, drain=window)
    proc, printed = await start_cli("--config", str(conf), env={"DESKPUSH_JWT_SECRET": SECRET})
    log = Log(proc.stderr)
    try:
        port = printed["port"]
        assert (tmp_path / "deskpush.pid").read_text() == f"{proc.pid}\n"
        agents = []
        for i in range(3 * DRAIN_BATCH_MIN):
            ws = await connect(f"ws://127.0.0.1:{port}/agent")
            await send_json(ws, {"type": "hello", "token": AgentTokens(SECRET).issue(f"agent-{i + 1}")})
            assert (await recv_json(ws))["type"] == "welcome"
            agents.append(ws)
        ig = await connect(f"ws://127.0.0.1:{port}/integrator", additional_headers={"Authorization": f"Bearer {K1}"})
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-1", "progress": False,
                             "input": {"templateName": CHAT}})
        await recv_json(agents[0])  # displayed
        closes = [asyncio.ensure_future(closed_at(ws)) for ws in [*agents, ig]]

        proc.send_signal(signal.SIGTERM)
        await log.wait_for("draining")
        status, _, body = await http_get(port, "/readyz")
        assert (status, json.loads(body)) == (503, {"status": "draining"})
        async with asyncio.timeout(30 * UNIT):
            await asyncio.gather(*closes)
            code = await proc.wait()
        assert code == 0
        assert {ws.close_code for ws in [*agents, ig]} == {CloseCode.SERVICE_RESTART}
        await log.wait_for("stopped")
        saved = StateFile(str(tmp_path / "state.json")).load()
        assert saved is not None and len(saved.notifications) == 1
        assert not (tmp_path / "deskpush.pid").exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sighup_and_deskpush_reload_take_new_templates_and_keys_and_refuse_a_bad_file(tmp_path):
    from .test_cli import start_cli

    conf = tmp_path / "deskpush.toml"
    old_template = '[[templates]]\nname = "case"\ntitle = "Case {id}"\n'
    write_config(conf, key=K1, templates=old_template)
    proc, printed = await start_cli("--config", str(conf), env={"DESKPUSH_JWT_SECRET": SECRET})
    log = Log(proc.stderr)
    try:
        port = printed["port"]
        url = f"ws://127.0.0.1:{port}"
        agent = await connect(f"{url}/agent")
        await send_json(agent, {"type": "hello", "token": TOKEN})
        await recv_json(agent)
        ig = await connect(f"{url}/integrator", additional_headers={"Authorization": f"Bearer {K1}"})
        await send_json(ig, {"type": "notifyEvent", "requestId": "r1", "agentId": "agent-1", "progress": False,
                             "input": {"templateName": "case", "templateParameters": {"id": "7"}}})
        first = await recv_json(agent)
        assert first["title"] == "Case 7"

        # The template changes, one is added, and the key changes.
        write_config(conf, key=K2, templates=old_template.replace("Case {id}", "Ticket {id}")
                     + '[[templates]]\nname = "added"\ntitle = "Added {id}"\n')
        code, out, err = await run_cli("reload", "--config", str(conf))
        assert code == 0, err
        assert f"pid {proc.pid}" in out
        line = await log.wait_for("reloaded")
        assert "integrator keys crm" in line

        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{url}/integrator", additional_headers={"Authorization": f"Bearer {K1}"})
        assert refused.value.response.status_code == 401
        ig2 = await connect(f"{url}/integrator", additional_headers={"Authorization": f"Bearer {K2}"})
        await send_json(ig2, {"type": "notifyEvent", "requestId": "r2", "agentId": "agent-1", "progress": False,
                              "input": {"templateName": "added", "templateParameters": {"id": "8"}}})
        assert (await recv_json(agent))["title"] == "Added 8"
        # The integrator connected with the old key stays, and gets the changed template.
        await send_json(ig, {"type": "notifyEvent", "requestId": "r3", "agentId": "agent-1", "progress": False,
                             "input": {"templateName": "case", "templateParameters": {"id": "9"}}})
        assert (await recv_json(agent))["title"] == "Ticket 9"
        # The card shown before the reload keeps its template: a second tab gets it replayed as it was.
        tab = await connect(f"{url}/agent")
        await send_json(tab, {"type": "hello", "token": TOKEN})
        assert (await recv_json(tab))["type"] == "welcome"
        assert (await recv_json(tab))["title"] == "Case 7"

        # A bad file: refused with the line a start would print; the old config stays.
        write_config(conf, key=K3, templates='[[templates]]\nname = "x"\ntitle = "X"\ntimeout = "soon"\n')
        code, out, err = await run_cli("reload", "--config", str(conf))
        assert code == 2 and not out
        start_line = err.strip()
        assert start_line.startswith("deskpush: ") and "$.templates[0].timeout" in start_line
        mark = len(log.lines)
        import signal

        proc.send_signal(signal.SIGHUP)  # as kill -HUP would, without the command's check
        line = await log.wait_for("reload refused", after=mark)
        assert line.endswith(start_line.removeprefix("deskpush: ")), (line, start_line)
        assert not [ln for ln in log.lines[mark:] if "Traceback" in ln]
        ig3 = await connect(f"{url}/integrator", additional_headers={"Authorization": f"Bearer {K2}"})
        await send_json(ig3, {"type": "notifyEvent", "requestId": "r4", "agentId": "agent-1",
                              "input": {"templateName": "added", "templateParameters": {"id": "10"}}})
        assert (await recv_json(ig3))["state"] == "queued"  # the agent has three cards shown
        assert agent.state.name == "OPEN" and ig.state.name == "OPEN"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_reload_without_a_pid_file_or_a_live_process_says_so(tmp_path):
    conf = tmp_path / "deskpush.toml"
    conf.write_text("[server]\nport = 0\n")
    code, _, err = await run_cli("reload", "--config", str(conf))
    assert code == 2 and "no pid file" in err
    pid_file = tmp_path / "gone.pid"
    pid_file.write_text("999999999\n")
    code, _, err = await run_cli("reload", "--config", str(conf), "--pid-file", str(pid_file))
    assert code == 1 and "stale" in err
