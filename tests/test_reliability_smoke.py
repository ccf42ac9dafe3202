"""The reliability run (reliability/), small: a short churn soak, a few fuzz cases, streams and a fault.

``make soak`` is the evidence; this keeps it working and keeps its claims
checked in ``make test``. One run of ``python -m reliability.run`` with tiny
counts (a real server per part, as in the full run) serves every test here
that needs a server. No timing assertions.

``test_the_quick_run_finds_nothing`` is the regression guard: it fails,
listing each failing input, for as long as the fuzz finds a server exception
or a spec deviation.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from deskpush.server.config import Config
from reliability import differential, proc, run, soak, strategies
from reliability.wire import frame, mask

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--soak-seconds", "12", "--agents", "30", "--rate", "20", "--cases", "90", "--streams", "5",
        "--faults", "agent"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path_factory.mktemp("reliability") / "RESULTS.md"
    done = subprocess.run([sys.executable, "-m", "reliability.run", *ARGS, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done, out.read_text() if out.exists() else ""


def rows(text: str) -> dict[str, list[str]]:
    """Table rows by their first cell (first occurrence)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out.setdefault(cells[0], cells[1:])
    return out


def test_the_quick_run_writes_every_table(quick):
    done, written = quick
    assert done.returncode in (0, 1), done.stderr[-3000:]
    for section in ("## Churn soak", "## Bad input", "## Faults", "## How it is measured"):
        assert section in written, section
    assert "Python 3" in written and "cores" in written
    r = rows(done.stdout)
    assert int(r["offers sent (notifyEvent)"][0].replace(",", "")) > 100
    assert int(r["fuzz cases"][0].replace(",", "")) >= 90
    assert r["family"][0] == "cases"  # the per-family table
    assert any(line.startswith("| agent drop mid-offer |") for line in written.splitlines())


def test_the_soak_loses_and_duplicates_nothing(quick):
    """What holds on the server today: these fail only if the server (or the runner) breaks."""
    r = rows(quick[0].stdout)
    for figure in ("lost: requests with no final answer",
                   "duplicated per requestId (two outcomes, or a result and an error)",
                   "duplicated per outcomeId (one id for two requests)",
                   "requests offered to an agent as two notifications",
                   "agent's resolved differs from the integrator's result",
                   "incomplete resumes", "frames that fit no request",
                   "outcomes the server logged / the integrators received",
                   "server TCP sockets once every client left, by state"):
        value, expected, met = r[figure]
        assert met == "yes", (figure, value, expected)
    value, _, met = r["server exceptions (Traceback in its log)"]  # the soak's, the first table
    assert met == "yes", value


def test_bystanders_and_the_differential_hold(quick):
    r = rows(quick[0].stdout)
    assert r["bystander round trips ok / failed"][2] == "yes", r["bystander round trips ok / failed"]
    assert r["differential: streams where deskpush differs from websockets"][2] == "yes"
    fault = next(line for line in quick[1].splitlines() if line.startswith("| agent drop mid-offer |"))
    assert fault.endswith("| yes |"), fault


def test_the_exit_status_is_what_the_tables_say(quick):
    done, written = quick
    unmet = "**NO**" in done.stdout
    assert (done.returncode == 1) == unmet, done.stdout[-2000:]
    assert written.count("Every expectation met.") == (0 if unmet else 1)
    if unmet:
        assert "## Findings" in written or "faults:" in written


def test_the_quick_run_finds_nothing(quick):
    """Every server exception and spec deviation the fuzz finds, with its input."""
    done, written = quick
    found = written.partition("## Findings")[2].partition("## How it is measured")[0].strip()
    assert done.returncode == 0 and not found, (
        "the reliability run found problems (python -m reliability.run --quick shows more):\n" + found[:6000])


# --------------------------------------------------------------------------
# The parts, without a server


def test_a_differing_parser_is_caught():
    """The differential can fail: a Connection whose max_size is one byte larger differs on a frame of that size."""
    case = strategies.Case(data=frame(b"x" * (differential.MAX_SIZE + 1), 1, key=b"abcd"))
    stream = differential.REQUEST + case.data
    want = differential.websockets_side(stream)
    assert want.messages == () and want.written.startswith(b"\x88")  # 1009
    same = differential.deskpush_side([stream])
    assert same == want
    looser = differential.deskpush_side([stream], differential.ConnectionOptions(
        max_size=differential.MAX_SIZE + 1, ping_interval=0, ping_timeout=0))
    assert looser != want and looser.messages == (b"x" * (differential.MAX_SIZE + 1),)


def test_frames_are_built_as_asked():
    assert frame(b"", 9, key=b"\0\0\0\0") == b"\x89\x80\0\0\0\0"
    assert frame(b"ab", 1, masked=False) == b"\x81\x02ab"
    assert frame(b"ab", 1, masked=False, width=64) == b"\x81\x7f" + (2).to_bytes(8, "big") + b"ab"
    assert frame(b"", 2, masked=False, length=2**63) == b"\x82\x7f\x80" + b"\0" * 7
    assert mask(mask(b"hello", b"k3y!"), b"k3y!") == b"hello"


def test_tracebacks_are_found_with_their_exception():
    log = ("2026-01-01 00:00:00,000 ERROR deskpush error handling a message from x\n"
           "Traceback (most recent call last):\n  File \"a.py\", line 1, in f\n    g()\n"
           "RecursionError: maximum recursion depth exceeded\n"
           "2026-01-01 00:00:01,000 INFO deskpush ok\n")
    (tb,) = proc.tracebacks(log)
    assert tb.exception == "RecursionError: maximum recursion depth exceeded"


def test_the_config_writer_gives_a_config_the_server_loads():
    p = soak.SoakParams(agents=10, offer_rate=5)
    a, b = "key-a-" + "x" * 32, "key \"b\" " + "y" * 32  # 32 bytes at least, as the server asks
    config = soak.soak_config(p, {"a": a, "b": b})
    config["server"]["stateFile"] = "/tmp/x.json"
    text = proc.toml(config)
    config = msgspec.toml.decode(text.encode(), type=Config)
    assert config.api_keys() == {"a": a, "b": b}
    assert config.limits.recent_outcomes == p.caps and config.server.state_file == "/tmp/x.json"
    assert config.template_map()[soak.SHORT].timeout == p.short_timeout


def test_slope():
    assert soak.slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert soak.slope([(0, 1.0)]) == 0.0


def test_the_table_marks_what_is_not_met():
    text = run.md_table([("lost", "3", "0", False), ("sent", "10", "", None), ("dup", "0", "0", True)])
    assert "| lost | 3 | 0 | **NO** |" in text and "| sent | 10 |  |  |" in text and "| dup | 0 | 0 | yes |" in text
    assert json.dumps(rows(text)["lost"]) == json.dumps(["3", "0", "**NO**"])
    assert re.search(r"\| dup \| 0 \| 0 \| yes \|", text)


def test_a_close_the_server_echoes_is_not_its_internal_error():
    """The fuzz may send close 1011 itself; the server's echo of it is no internal error of the server's."""
    from reliability.fuzz import client_closes

    data = frame(b"\x03\xf3bye", 8, key=b"abcd") + frame(b"x" * 300, 2, key=b"abcd") + frame(b"\x03\xe8", 8)[:3]
    assert client_closes(data) == [(1011, "bye")]
    assert client_closes(frame(b"\x03\xf3", 8, masked=False)) == [(1011, "")]
