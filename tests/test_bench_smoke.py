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


def table_cells(text: str) -> dict[str, dict[str, str]]:
    """Each row's cells by column heading: ``cells["offer: outcomes/s"]["deskpush ÷ floor"]``."""
    rows = table_rows(text)
    head = rows.pop("figure")
    return {label: dict(zip(head, cells)) for label, cells in rows.items()}


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


def test_quick_offer_runs_cluster_nodes_on_their_own_redis(tmp_path: Path) -> None:
    """One node and two nodes on a redis-server the bench starts; Redis's CPU on its own row."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--gen", "python", "--only", "offer",
         "--servers", "deskpush,deskpush-cluster-1,deskpush-cluster-2", "--out", "-"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = table_cells(proc.stdout)
    one, two = "deskpush 1 node + Redis", "deskpush 2 nodes + Redis"
    for server in (one, two):
        assert number(cells["offer: outcomes/s"][server]) > 0, cells["offer: outcomes/s"]
        assert number(cells["offer: Redis CPU µs/outcome"][server]) > 0
        assert number(cells["offer: outcomes/s"][f"{server} ÷ deskpush"]) > 0
    assert cells["offer: Redis CPU µs/outcome"]["deskpush"] == "-"
    assert cells["offer: outcomes/s"]["met"].count("1 node + Redis") == 1, cells["offer: outcomes/s"]["met"]


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
        } | {
            ("offer", name): {"rate": rate * scale, "p50": 5.0, "p99": 20.0, "cpu_us": 300.0, "redis_us": 80.0,
                              "cpu_pct": 95.0, "redis_pct": 30.0, "hwm_mib": 60.0, "gen_pct": 20.0}
            for name, rate in [("deskpush-cluster-1", 324), ("deskpush-cluster-2", 270)]
        } | {
            ("timeout", name): {"p50": 20.0, "p99": p99, "max": 120.0, "cpu_s": 3.0, "redis_s": 1.0, "gen_pct": 5.0}
            for name, p99 in [("deskpush-cluster-1", 90.0), ("deskpush-cluster-2", 110.0)]
        } | {
            ("failover", "deskpush-cluster-3"): {"seconds": 4.0 * scale, "welcomed": 3.0, "p50": 2.0,
                                                 "connect_p50": 0.5, "retries": 0, "cpu_s": 5.0, "redis_s": 1.0,
                                                 "balancer_s": 0.5, "gen_pct": 60.0}
        }

    results = [figs(1.0), figs(1.1)]
    servers = bench.DEFAULT_SERVERS.split(",")
    text = bench.table(results, servers, bench.WORKLOADS)
    rows, cells = table_rows(text), table_cells(text)
    assert len(rows) == 1 + len(bench.METRICS)
    rate = cells["offer: outcomes/s"]
    assert rate["deskpush"] == "945 (900–990)"  # median (min–max) of the runs
    assert rate["deskpush ÷ floor"] == "0.90× (0.90–0.90)"  # pair by pair
    assert rate["deskpush 1 node + Redis ÷ deskpush"] == "0.36× (0.36–0.36)"
    assert rate["met"] == ("yes (0.90× floor); yes (1.12× Socket.IO (Node)); yes (4.50× python-socketio); "
                           "yes (1 node + Redis 0.36× deskpush)")
    assert cells["offer: p99 ms"]["met"] == "yes (1.20× floor)"
    assert cells["storm: s until all welcomed"]["met"] == "NO (1.33× floor); yes (2.00)"
    assert cells["timeout: lateness max ms"]["met"] == "NO (250)"
    assert cells["timeout: lateness p99 ms"]["met"] == ("yes (40.0); yes (1 node + Redis 90.0); "
                                                        "NO (2 nodes + Redis 110)")
    assert cells["timeout: Redis CPU s"]["deskpush"] == "-"
    assert cells["failover: s from kill -9 until all its agents offered again"]["met"] == "yes (3 nodes + Redis 4.20)"
    assert not any(math.isnan(number(rate[bench.BY_NAME[s].title])) for s in servers
                   if "offer" in bench.BY_NAME[s].workloads)
