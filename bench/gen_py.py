"""A pure-Python load generator for the offer workload on deskpush's wire protocol (deskpush, floor).

It exists so that the smoke test (tests/test_bench_smoke.py) needs no Node.js;
bench/gen.js is the generator for real numbers (cheaper per frame, all workloads,
Socket.IO too). Same command line and output as gen.js:

    python bench/gen_py.py '{"proto":"raw","workload":"offer","url":"http://127.0.0.1:8000",...}'
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import jwt
import msgspec
import uvloop
from websockets.asyncio.client import connect

TEMPLATE = "msdyn_chat_incoming_unauthenticated"
PARAMS = {"customerName": "Jane Doe", "queueName": "Billing"}
encode = msgspec.json.encode
decode = msgspec.json.decode


def say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pct(samples: list[float], p: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def agent(url: str, agent_id: str, secret: str) -> object:
    ws = await connect(url + "/agent", compression=None)
    await ws.send(encode({"type": "hello", "token": jwt.encode(
        {"sub": agent_id, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")}), text=True)
    welcome = decode(await ws.recv(decode=False))
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"{agent_id}: {welcome}")

    async def answer() -> None:
        async for raw in ws:
            m = decode(raw)
            if m["type"] == "notification":
                await ws.send(encode({"type": "respond", "notificationId": m["notificationId"], "action": "Accept"}),
                              text=True)

    asyncio.ensure_future(answer())
    return ws


async def offer(cfg: dict) -> dict:
    # Cluster mode: agent i on urls[i % len(urls)], the integrator on the last one (as in gen.js).
    urls = [u.replace("http", "ws", 1) for u in cfg.get("urls") or [cfg["url"]]]
    ids = [f"agent-{i}" for i in range(cfg["agents"])]
    for b in range(0, len(ids), cfg["burst"]):
        await asyncio.gather(*(agent(urls[int(i.rpartition("-")[2]) % len(urls)], i, cfg["secret"])
                               for i in ids[b:b + cfg["burst"]]))
    integ = await connect(urls[-1] + "/integrator", compression=None,
                          additional_headers={"Authorization": f"Bearer {cfg['apiKey']}"})
    inflight = cfg["inflight"]
    pending: dict[str, tuple[int, int, float]] = {}
    state = {"counting": False, "running": True, "active": inflight, "seq": 0, "outcomes": 0, "errors": 0}
    lat: list[float] = []

    async def fire(slot: int, k: int) -> None:
        state["seq"] += 1
        rid = f"r{state['seq']}"
        pending[rid] = (slot, k, time.perf_counter())
        req = {"type": "notifyEvent", "requestId": rid, "agentId": ids[(slot + k * inflight) % len(ids)],
               "input": {"templateName": TEMPLATE, "templateParameters": PARAMS}, "correlationId": rid}
        if not cfg.get("progress"):
            req["progress"] = False
        await integ.send(encode(req), text=True)

    async def results() -> None:
        async for raw in integ:
            m = decode(raw)
            if m["type"] != "result":
                continue
            slot, k, t0 = pending.pop(m["requestId"])
            if state["counting"]:
                if m["value"]["actionName"] == "Accept":
                    state["outcomes"] += 1
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    state["errors"] += 1
            if state["running"]:
                await fire(slot, k + 1)
            else:
                state["active"] -= 1

    reader = asyncio.ensure_future(results())
    for slot in range(inflight):
        await fire(slot, 0)
    await asyncio.sleep(cfg["warmup"])
    say({"mark": "start"})
    state["counting"] = True
    t0 = time.perf_counter()
    await asyncio.sleep(cfg["seconds"])
    state["counting"] = False
    seconds = time.perf_counter() - t0
    say({"mark": "end"})
    state["running"] = False
    deadline = time.monotonic() + 10
    while state["active"] > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    reader.cancel()
    n = state["outcomes"]
    return {"outcomes": n, "outcomesPerSec": n / seconds, "errors": state["errors"], "seconds": seconds,
            "stuck": state["active"],
            "latencyMs": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": pct(lat, 100), "n": len(lat)}}


def main() -> int:
    cfg = json.loads(sys.argv[1])
    if cfg["workload"] != "offer" or cfg["proto"] != "raw":
        print("gen_py: only the offer workload on deskpush's protocol; use bench/gen.js", file=sys.stderr)
        return 2
    say({"result": uvloop.run(offer(cfg))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
