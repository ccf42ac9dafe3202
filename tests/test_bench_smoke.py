"""Keeps the benchmark harness (bench/) from rotting. No timing assertions: numbers are the bench's job.

The end-to-end test runs the offer workload on deskpush and the floor with the
pure-Python generator, so it needs neither Node.js nor npm.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from bench import run as bench

ROOT = Path(__file__).resolve().parent.parent


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def number(cell: str) -> float:
    return float(cell.split()[0].rstrip("×").replace(",", ""))


def test_quick_offer_runs_deskpush_and_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--gen", "python", "--only", "offer",
         "--servers", "deskpush,floor", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert rows["figure"][:2] == ["deskpush", "floor"], rows
    rate = rows["offer: outcomes/s"]
    assert number(rate[0]) > 0 and number(rate[1]) > 0, rate
    assert number(rate[2]) > 0, "the deskpush ÷ floor ratio is missing"
    assert number(rows["offer: server CPU µs/outcome"][0]) > 0
    written = out.read_text()
    assert "| offer: outcomes/s |" in written and "Python 3" in written


def test_table_summarises_runs_and_judges_targets() -> None:
    """The aggregation for every workload, on made-up figures from two runs."""
    def figs(scale: float) -> dict:
        return {
            ("offer", name): {"rate": rate * scale, "p50": 1.0, "p99": p99, "cpu_us": 100.0, "cpu_pct": 90.0,
                              "hwm_mib": 40.0, "gen_pct": 50.0}
            for name, rate, p99 in [("deskpush", 900, 3.0), ("deskpush-progress", 800, 3.0), ("floor", 1000, 2.5),
                                    ("socketio", 800, 2.0), ("pysio", 200, 9.0)]
        } | {
            ("storm", name): {"seconds": s, "kib_agent": k, "cpu_s": 1.0, "overflows": 0, "gen_pct": 20.0}
            for name, s, k in [("deskpush", 2.0, 20.0), ("floor", 1.5, 15.0), ("socketio", 3.0, 30.0),
                               ("pysio", 4.0, 30.0)]
        } | {
            ("timeout", name): {"p50": 5.0, "p99": 40.0, "max": 250.0, "cpu_s": 2.0, "gen_pct": 5.0}
            for name in ("deskpush", "floor", "socketio", "pysio")
        } | {
            ("cancel", name): {"rate": 500.0, "p50": 1.0, "p99": 2.0, "cpu_us": 150.0, "gen_pct": 40.0}
            for name in ("deskpush", "floor", "socketio", "pysio")
        }

    results = [figs(1.0), figs(1.1)]
    servers = bench.DEFAULT_SERVERS.split(",")
    rows = table_rows(bench.table(results, servers, bench.WORKLOADS))
    assert len(rows) == 1 + len(bench.METRICS)
    rate = rows["offer: outcomes/s"]
    assert rate[0] == "945 (900–990)"  # median (min–max) of the runs
    assert rate[5] == "0.90× (0.90–0.90)"  # deskpush ÷ floor, pair by pair
    assert rate[-1] == "yes (0.90× floor); yes (1.12× Socket.IO (Node)); yes (4.50× python-socketio)"
    assert rows["offer: p99 ms"][-1] == "yes (1.20× floor)"
    assert rows["storm: s until all welcomed"][-1] == "NO (1.33× floor); yes (2.00)"
    assert rows["timeout: lateness max ms"][-1] == "NO (250)"
    assert not any(math.isnan(number(c)) for c in rate[:5])
