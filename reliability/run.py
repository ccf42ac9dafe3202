"""deskpush's reliability run: a churn soak, a fuzz, a parser differential and faults; one table.

    python -m reliability.run              # everything (about 15 minutes on 2 cores): 10-minute soak
                                           # with 2,000 agents, 4,000 fuzz cases, 1,000 differential streams
    python -m reliability.run --quick      # the same in about 3 minutes: 1-minute soak, 200 agents, ...
    python -m reliability.run --only fuzz,differential --seed 7 --cases 10000
    make soak ARGS=--quick

Everything but the differential runs against real ``deskpush serve``
processes (``reliability.proc``) on 127.0.0.1 and free ports, each with its
own config file; the clients run in this process. Each part is bounded in
time and count. The seed (``--seed``) fixes every input: the soak's plan (who
gets which offer, who leaves when, when integrators are cut), every fuzz case
and differential stream; what the server's timing makes of them can differ
from run to run.

Prints the tables and writes them with the machine and the date to
``--out`` (``reliability/RESULTS.md``). The exit status is 0 only when every
expectation in the tables is met; the tables say which are not, and the
findings list the exact inputs that failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import fmt, machine, raise_nofile

from . import differential, faults, fuzz, soak

HERE = Path(__file__).resolve().parent
PARTS = ["soak", "fuzz", "differential", "faults"]
FULL = {"soak_seconds": 600.0, "agents": 2000, "rate": 100.0, "cases": 4000, "streams": 1000}
QUICK = {"soak_seconds": 60.0, "agents": 200, "rate": 50.0, "cases": 300, "streams": 30}
SLOPE_LIMIT = 0.5  # MiB per minute, once the outcome caps are full
CUTS = {"reset": "TCP resets", "close": "clean closes", "FIN": "TCP closes (the SDK's proxy)"}
JUDGE_SLOPE_AFTER = 300.0  # seconds: a shorter run ends before memory settles


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def n(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else fmt(x) if isinstance(x, float) else str(x)


def yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


# --------------------------------------------------------------------------
# Tables: rows of (figure, value, expected, met); met None for a figure with no expectation


def soak_rows(s: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    cuts = s["integrator_cuts"]
    rows: list[tuple[str, str, str, bool | None]] = [
        ("offers sent (notifyEvent)", n(s["offers"]), "", None),
        ("cancelEvents sent", n(s["cancels"]), "", None),
        ("outcomes received (one result per offer)", n(s["results"]), "", None),
        ("  of which", ", ".join(f"{k} {v:,}" for k, v in sorted(s["outcomes"].items(), key=lambda kv: -kv[1])), "",
         None),
        ("offers refused (error answer)", ", ".join(f"{k} {v:,}" for k, v in s["refused"].items()) or "0", "", None),
        ("lost: requests with no final answer", n(len(s["lost"])), "0", not s["lost"]),
        ("duplicated per requestId (two outcomes, or a result and an error)", n(len(s["dup_request"])), "0",
         not s["dup_request"]),
        ("duplicated per outcomeId (one id for two requests)", n(len(s["dup_outcome"])), "0", not s["dup_outcome"]),
        ("cancelEvents answered twice differently", n(len(s["dup_cancel"])), "0", not s["dup_cancel"]),
        ("requests offered to an agent as two notifications", n(len(s["second_offers"])), "0",
         not s["second_offers"]),
        ("agent's resolved differs from the integrator's result", n(len(s["mismatched"]) + len(s["agent_conflicts"])),
         "0", not s["mismatched"] and not s["agent_conflicts"]),
        ("results sent again with the same outcomeId (allowed by v1.1)", n(s["redelivered"]), "", None),
        ("integrator cuts, resumes", ", ".join(f"{v} {CUTS.get(k, k)}" for k, v in cuts.items()) +
         f"; {s['resumes']} resumes replaying {s['replayed']:,} results; {s['resent']:,} requests sent again "
         "(by the raw integrators; the SDK's own are not counted)", "", None),
        ("SDK calls that failed OutcomeUnknownError / gave up", f"{len(s['sdk_unknown'])} / {len(s['sdk_gave_up'])}",
         "0 / 0 (counted as lost too)", not s["sdk_unknown"] and not s["sdk_gave_up"]),
        ("incomplete resumes", n(len(s["incomplete"])), "0", not s["incomplete"]),
        ("frames that fit no request", n(len(s["stray"])), "0", not s["stray"]),
        ("agent sessions opened (leaves: 10% a minute, half reset)", n(s["agent_sessions"]), "", None),
        ("agent sessions or integrators closed by the server unasked",
         n(sum(s["agent_dropped"].values()) + sum(s["integrator_dropped"].values())), "0",
         not s["agent_dropped"] and not s["integrator_dropped"]),
        ("outcomes the server logged / the integrators received", f"{s['logged_outcomes']:,} / "
         f"{s['distinct_outcomes']:,}", "equal", s["logged_outcomes"] == s["distinct_outcomes"]),
        ("server exceptions (Traceback in its log)", n(len(s["tracebacks"])), "0", not s["tracebacks"]),
        ("server RSS at start / end / peak, MiB", f"{s['rss_start']:.1f} / {s['rss_end']:.1f} / {s['rss_max']:.1f}",
         "", None),
        (f"server RSS slope from {s['slope_from_s']:.0f} s, MiB/min", f"{s['rss_slope']:+.3f}",
         *((f"<= {SLOPE_LIMIT}", s["rss_slope"] <= SLOPE_LIMIT) if s["ran_s"] >= JUDGE_SLOPE_AFTER else
           (f"(judged on runs of {JUDGE_SLOPE_AFTER / 60:.0f} min or more)", None))),
        ("engine counts at the end of the run (/stats)", ", ".join(f"{k} {v:,}" for k, v in
                                                                      s.get("engine_counts", {}).items()) or
         "(not reported by this server)", "", None),
        ("server open fds: idle / at the end / once every client left",
         f"{s['fds_idle']} / {s['fds_end']:,} / {s['fds_after']}", "", None),
        ("server TCP sockets once every client left, by state", ", ".join(
            f"{k} {v}" for k, v in s["connections_after"].items()), "only LISTEN",
         set(s["connections_after"]) <= {"LISTEN", "not TCP"}),
    ]
    return rows


def fuzz_rows(fz: dict[str, Any], df: dict[str, Any] | None) -> list[list[str]]:
    head = ["family", "cases", "how the server ended them", "exceptions", "1011", "hung", "spec deviations",
            "most log lines for one case"]
    rows = [head, ["---"] * len(head)]
    for name, r in fz["families"].items():
        seen = ", ".join(f"{k} {v:,}" for k, v in sorted(r["seen"].items(), key=lambda kv: -kv[1]))
        rows.append([name, n(r["cases"]), seen, n(r["exceptions"]), n(r["internal_errors"]), n(r["hung"]),
                     n(r["deviations"]), n(r["max_log_lines"])])
    return rows


def fuzz_checks(fz: dict[str, Any] | None, df: dict[str, Any] | None) -> list[tuple[str, str, str, bool | None]]:
    out: list[tuple[str, str, str, bool | None]] = []
    if fz is not None:
        fam = fz["families"].values()
        b = fz["bystander"]
        out += [
            ("fuzz cases", n(sum(r["cases"] for r in fam)), "", None),
            ("server exceptions (Traceback in its log)", n(fz["tracebacks"]), "0", fz["tracebacks"] == 0),
            ("closed 1011 (internal error)", n(sum(r["internal_errors"] for r in fam)), "0",
             sum(r["internal_errors"] for r in fam) == 0),
            ("server did not close after the client's EOF", n(sum(r["hung"] for r in fam)), "0",
             sum(r["hung"] for r in fam) == 0),
            ("server died", n(fz["deaths"]), "0", fz["deaths"] == 0),
            ("spec deviations (RFC 6455 1007, RFC 9110 HEAD, methods)", n(sum(r["deviations"] for r in fam)), "0",
             sum(r["deviations"] for r in fam) == 0),
            ("bystander round trips ok / failed", f"{b['ok']:,} / {b['failed']}", "all ok",
             b["failed"] == 0 and b["ok"] > 0),
            ("bystander round trip p50 / max, ms", f"{fmt(b['p50_ms'])} / {fmt(b['max_ms'])}", "", None),
        ]
    if df is not None:
        out += [
            ("differential: streams, runs (every split), bytes",
             f"{df['streams']:,}, {df['runs']:,}, {df['bytes']:,}", "", None),
            ("differential: how websockets ended them", ", ".join(f"{k} {v}" for k, v in df["closes"].items()), "",
             None),
            ("differential: deskpush's own rule, a message that is not UTF-8 fails with 1007 (text, binary)",
             " / ".join("yes" if x else "no" for x in df["utf8_rule"]), "", None),
            ("differential: streams where deskpush differs from websockets", n(df["mismatch_count"]), "0",
             df["mismatch_count"] == 0),
        ]
    return out


def md_table(rows: list[tuple[str, str, str, bool | None]]) -> str:
    lines = ["| figure | value | expected | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {'' if ok is None else yes(ok)} |" for a, b, c, ok in rows]
    return "\n".join(lines)


def md_rows(rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def faults_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| fault | what the clients saw | everyone else | server exceptions | met |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        saw = r["saw"] + (f"; could not finish: {r['error']}" if r["error"] else "")
        failed = [what for what, ok in r["checks"] if not ok]
        met = yes(r["met"]) + (f" ({'; '.join(failed)})" if failed else "")
        lines.append(f"| {r['fault']} | {saw.replace('|', '/')} | {r['others']} | {len(r['exceptions'])} | {met} |")
    return "\n".join(lines)


def findings(fz: dict[str, Any] | None, df: dict[str, Any] | None, s: dict[str, Any] | None,
             fl: list[dict[str, Any]] | None) -> list[str]:
    out = []
    if fz:
        for x in fz["findings"]:
            out.append(f"- **{x['what']}** ({x['family']}; {x['count']:,} case(s)). Smallest input "
                       f"({x['input_bytes']:,} bytes after the opening): `{x['input']}`. The server: {x['seen']}."
                       + (f"\n\n  ```\n  " + "\n  ".join(x["traceback"].splitlines()[-8:]) + "\n  ```" if x["traceback"]
                          else ""))
    if df:
        shown: dict[str, int] = {}
        for x in df["mismatches"]:
            shown[x["input"]] = shown.get(x["input"], 0) + 1
        for x in df["mismatches"]:
            if shown.pop(x["input"], None) is None:
                continue  # the same input again (hypothesis drew it more than once)
            out.append(f"- **deskpush's parser differs from websockets'** on `{x['input']}` after the "
                       f"{len(differential.REQUEST)}-byte upgrade request, the whole written in pieces of "
                       f"{x['split']} bytes (the first split that differs), then EOF: deskpush {x['deskpush']}; "
                       f"websockets {x['websockets']}; logged {x['logged']}")
    if s:
        for name in ("lost", "dup_request", "dup_outcome", "second_offers", "mismatched", "agent_conflicts",
                     "incomplete", "stray"):
            if s[name]:
                out.append(f"- soak {name}: {len(s[name])}, e.g. {s[name][:5]}")
        for text in s.get("traceback_texts", []):
            out.append("- soak server exception:\n\n  ```\n  " + "\n  ".join(text.splitlines()[-8:]) + "\n  ```")
    if fl:
        for r in fl:
            for e in r["exceptions"]:
                out.append(f"- fault '{r['fault']}': server exception {e}")
    return out


# --------------------------------------------------------------------------


def versions() -> str:
    from importlib.metadata import version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except Exception:
            return "-"

    return (f"- Python {platform.python_version()} (websockets {v('websockets')}, msgspec {v('msgspec')}, "
            f"uvloop {v('uvloop')}, hypothesis {v('hypothesis')})")


NOTES = """\
## How it is measured

- **Servers.** Each part starts `python -m deskpush.server serve --config FILE --port P --log-level INFO`
  (`reliability/proc.py`) on 127.0.0.1 and a free port, with a config written for it: agent JWTs and
  integrator API keys as in production (`demo = false` except for the fuzz, which fuzzes the static files
  too). "Server exceptions" are `Traceback` blocks in the process's stderr. RSS is `VmRSS` from
  `/proc/PID/status`, open fds the entries of `/proc/PID/fd`, sampled every 5 s.
- **Clients** run in the runner's process (`reliability/wire.py`): websockets' sans-I/O `ClientProtocol`
  (the same documented layer the server uses) on sockets the runner owns, so that it can reset a
  connection (SO_LINGER 0, then close: an RST, no close frame), stop reading, and write any bytes.
- **Churn soak** (`reliability/soak.py`). 2,000 agents connect, 100 at a time; 10% of them a minute leave
  (half with a clean close, half with a TCP reset) and come back, 80% within the presence grace (3 s; their
  displayed offers are replayed and answered again) and 20% after it (their offers end
  Reject/AgentDisconnected). Three integrators, each with its own API key, send 100 notifyEvents a second
  between them, to agents chosen at random whether present or not; each offer's plan is drawn from the
  seed: accepted (40%) or rejected (20%) after 0.05 to 1.5 s, left to time out on a template with a 2 s
  timeout (15%), cancelled after 0.1 to 2.5 s (15%), or accepted while a cancel is sent at the same moment
  (10%). Two integrators speak protocol v1.1 themselves, as `docs/protocol.md` tells a client to, so that
  every frame is counted: one connects with `Authorization: Bearer` and `?resumeAfter=`, the other with a
  hello carrying `resumeAfter`; every 30 s (±30%) each is reset or closed, stays away 0.2 to 2 s, resumes
  after the last outcomeId it received, and sends every unanswered request again with the same requestId.
  The third is the Python SDK (`deskpush.client.Integrator`), which does all that on its own; its
  connection runs through a relay that resets or closes both legs on the same schedule. All ack every
  10 s. `limits.recentOutcomes` and `limits.outcomeHistory`
  are lowered to 20 s of outcomes (2,000) so that memory reaches its steady state early and the RSS slope
  after the first minute shows a leak rather than the caps filling (with the defaults, 100,000 each, memory
  grows by design for the first 15 minutes at this rate). After the run every agent comes back, the drain
  waits until nothing is pending, and each integrator resumes once more.
- **Lost and duplicated.** A request is lost when it has no final answer (a `result` or an `error`) after
  the drain. A notifyEvent is duplicated when it got two different outcomeIds, or a result and an error;
  an outcomeId is duplicated when it came for two requestIds; an offer is shown twice when an agent saw two
  notificationIds for one correlationId (the requestId). The same result sent again with the same
  outcomeId (a replay crossing a resend) is what v1.1 allows and is counted apart. The agents' own view is
  checked against the integrators': each `resolved` must name the outcome of the matching `result`.
- **Fuzz** (`reliability/fuzz.py`, `reliability/strategies.py`). Hypothesis, seeded, no database, no
  shrinking (every case runs; a finding reports the smallest input that showed it). Each case is one TCP
  connection: the handshake, then either the case's bytes as the very first frames (before
  authentication) or a valid hello (or a Bearer header) and then the case's bytes. JSON cases are frames
  built from `protocol/frames.py`'s Structs through `msgspec.inspect`, then mutated; raw cases are frames
  with every header field drawn, lengths up to 2^64-1, control frames, fragments, floods. Well-formed cases
  end with a ping whose pong proves the server read everything, then a close frame; every case then
  half-closes and waits (5 s) for the server to close. The failed-authentication throttle
  (`auth.failedAuthLimit`, where the server has it) is off for the fuzz, which fails authentication on
  purpose from one address: with it on, every later case would be refused before reaching the code it
  targets. Deviations are checked where the RFCs are exact: a
  text message that is not UTF-8 must fail the connection with 1007 (RFC 6455 section 8.1) unless another
  limit closed it first (1002, 1008, 1009); a response to a HEAD request (one with a valid request
  line: an invalid one gets its 400 like any other) has no content (RFC 9110 section 9.3.2); a
  method other than GET and HEAD is not served a page (issue 13 asks for 405). The bystander: an agent and
  an integrator with their own key doing offer round trips (notifyEvent, notification, Accept, result,
  resolved) every 20 ms for the whole fuzz, each within 5 s.
- **Differential** (`reliability/differential.py`). deskpush's `Connection` (its own header parser and
  fast path, websockets for the rest) driven through its asyncio.Protocol methods with a recording
  transport, against websockets' `ServerProtocol` alone, on an upgrade request followed by generated frames
  (`max_size` 256 so that frames cross it): for every split of the stream into two writes, whole, and one
  byte per write, the same messages to the application, the same bytes written after the 101 (pongs, close
  frame and reason), the same end of the TCP stream.
- **Faults** (`reliability/faults.py`): each on a fresh server, with a bystander pair doing round trips
  throughout except across a restart.
- The machine is shared and has 2 cores: timings (round trip latencies, how long a drop takes) move with
  whatever else runs; the counts do not.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reliability.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 1-minute soak and fewer cases (about 3 minutes)")
    p.add_argument("--seed", type=int, default=1, help="fixes every input (default 1)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, from: {', '.join(PARTS)}")
    p.add_argument("--soak-seconds", type=float)
    p.add_argument("--agents", type=int)
    p.add_argument("--rate", type=float, help="notifyEvents per second in the soak")
    p.add_argument("--cases", type=int, help="fuzz cases, over every family")
    p.add_argument("--streams", type=int, help="differential streams (each checked at every split)")
    p.add_argument("--faults", help="comma-separated words naming the faults to run (default: all)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file to write ('-' for none)")
    p.add_argument("--keep", action="store_true", help="keep the servers' configs and logs (the path is printed)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"unknown part {', '.join(bad)}")
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("soak_seconds", "agents", "rate", "cases", "streams"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    raise_nofile(sizes["agents"] * 2 + 2000)

    tmp = Path(tempfile.mkdtemp(prefix="deskpush-reliability-"))
    load0, t0, started = os.getloadavg()[0], time.monotonic(), dt.datetime.now(dt.timezone.utc)
    s = fz = df = None
    fl: list[dict[str, Any]] | None = None
    if "soak" in parts:
        sp = soak.SoakParams(seconds=sizes["soak_seconds"], agents=int(sizes["agents"]), offer_rate=sizes["rate"])
        if sp.seconds < 120:  # short runs: the slope from a quarter in, integrators cut more often
            sp.warmup = sp.seconds / 4
            sp.cut_every = max(3.0, sp.seconds / 6)
        s = soak.run_soak(sp, tmp, args.seed, say)
    if "fuzz" in parts:
        fz = fuzz.run_fuzz(fuzz.FuzzParams(cases=int(sizes["cases"]), seed=args.seed), tmp, say)
    if "differential" in parts:
        t1 = time.monotonic()
        df = differential.run_differential(int(sizes["streams"]), args.seed)
        say(f"differential: {df['streams']} streams, {df['runs']:,} runs, {df['mismatch_count']} mismatches "
            f"({time.monotonic() - t1:.0f} s)")
    if "faults" in parts:
        fl = faults.run_faults(tmp, say, args.faults.split(",") if args.faults else None)
    elapsed, load1 = time.monotonic() - t0, os.getloadavg()[0]

    sections: list[str] = []
    unmet: list[str] = []
    if s is not None:
        rows = soak_rows(s)
        unmet += [f"soak: {a}" for a, _, _, ok in rows if ok is False]
        prm = s["params"]
        sections += ["## Churn soak", "",
                     f"{prm['seconds']:.0f} s, {prm['agents']:,} agents, {prm['offerRate']:g} notifyEvents/s from "
                     f"{prm['integrators']} integrators" + (" (one of them the Python SDK)" if prm["sdk"] else "") +
                     ", 10% of the agents leaving each minute, integrators cut every "
                     f"{prm['cutEvery']:g} s; presenceGrace {prm['presenceGrace']:g} s, short template timeout "
                     f"{prm['shortTimeout']:g} s, recentOutcomes and outcomeHistory {prm['caps']:,}. Agents connected "
                     f"in {s['connect_s']:.1f} s; the run took {s['ran_s']:.0f} s and the drain {s['drain_s']:.1f} s.",
                     "", md_table(rows), ""]
    if fz is not None or df is not None:
        checks = fuzz_checks(fz, df)
        unmet += [f"bad input: {a}" for a, _, _, ok in checks if ok is False]
        sections += ["## Bad input", "", md_table(checks), ""]
        if fz is not None:
            sections += [md_rows(fuzz_rows(fz, df)), ""]
    if fl is not None:
        unmet += [f"faults: {r['fault']}" for r in fl if not r["met"]]
        sections += ["## Faults", "", faults_table(fl), ""]
    found = findings(fz, df, s, fl)
    if found:
        sections += ["## Findings", "", "What failed, with the exact input (the smallest of its kind):", "", *found, ""]

    verdict = ("Every expectation met." if not unmet else
               f"**{len(unmet)} expectation(s) not met:** " + "; ".join(unmet) + ".")
    body = "\n".join([verdict, "", *sections])
    print(body)
    say(f"reliability: {elapsed:.0f} s in all; {'all met' if not unmet else f'{len(unmet)} not met'}")
    if args.out != "-":
        cmd = "python -m reliability.run" + (" --quick" if args.quick else "") + (
            f" --seed {args.seed}" if args.seed != 1 else "") + (
            f" --only {args.only}" if parts != PARTS else "") + "".join(
            f" --{k.replace('_', '-')} {getattr(args, k):g}" for k in ("soak_seconds", "agents", "rate", "cases",
                                                                      "streams") if getattr(args, k) is not None)
        head = [
            "# deskpush reliability results", "",
            f"`{cmd}` on {started.strftime('%Y-%m-%d %H:%M UTC')}; it took {elapsed:.0f} s.", "",
            *machine()[:1], versions(),
            f"- Load average {load0:.1f} just before the run and {load1:.1f} at its end: the machine is shared "
            f"(other work ran meanwhile) and has {len(os.sched_getaffinity(0))} cores, which the server and every "
            "client share.", "",
        ]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(head) + "\n" + body + "\n" + NOTES)
        say(f"wrote {out}")
    if args.keep:
        say(f"servers' configs and logs: {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not unmet else 1


if __name__ == "__main__":
    sys.exit(main())
