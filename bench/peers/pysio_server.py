"""python-socketio on aiohttp (+uvloop): the usual Python choice, doing what deskpush does for the bench.

Agents authenticate with an HS256 JWT in the handshake's ``auth.token`` (PyJWT,
``exp`` checked); integrators with ``auth.apiKey`` (constant-time compare). An
offer is ``sio.call("notification", ..., timeout=...)``: the agent's ack is its
answer, a timeout is Timeout/DisplayTimeout. The integrator's ``notify`` is
acked with the outcome; ``cancel`` ends a pending offer and tells the agent with
a ``resolved`` event (as timeouts do). WebSocket transport only, no
compression, no logging.

    BENCH_SECRET=... BENCH_API_KEY=... python bench/peers/pysio_server.py --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import time
import uuid

import jwt
import socketio
import uvloop
from aiohttp import web

SECRET = os.environ["BENCH_SECRET"]
API_KEY = os.environ["BENCH_API_KEY"].encode()
# Display timeout by template name (bench/run.py sets BENCH_TIMEOUT, as deskpush's bench_timeout); others 120 s.
TIMEOUTS = {"bench_timeout": float(os.environ.get("BENCH_TIMEOUT", "2.0"))}
TITLE = "New chat request"
HEADERS = {"customerName": "Customer", "queueName": "Queue", "comment": "Comment"}

sio = socketio.AsyncServer(async_mode="aiohttp", transports=["websocket"], http_compression=False)
agents: dict[str, str] = {}  # agentId -> sid
integrators: set[str] = set()
offers: dict[str, Offer] = {}  # cancellationToken -> offer


class Offer:
    __slots__ = ("id", "token", "agent_sid", "result", "call")


@sio.event
async def connect(sid, environ, auth):
    auth = auth or {}
    if isinstance(auth.get("apiKey"), str):
        if hmac.compare_digest(auth["apiKey"].encode(), API_KEY):
            integrators.add(sid)
            return True
        return False
    try:
        claims = jwt.decode(auth.get("token", ""), SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.PyJWTError:
        return False
    agents[claims["sub"]] = sid
    await sio.save_session(sid, {"agentId": claims["sub"]})
    return True


@sio.event
async def disconnect(sid, reason=None):
    integrators.discard(sid)
    session = await sio.get_session(sid)
    agent_id = session.get("agentId")
    if agent_id is not None and agents.get(agent_id) == sid:
        del agents[agent_id]


def finish(offer: Offer, action: str, reason: str, tell_agent: bool) -> None:
    if offer.result.done():
        return
    offers.pop(offer.token, None)
    offer.result.set_result({"actionName": action, "responseReason": reason})
    if tell_agent:
        asyncio.ensure_future(sio.emit("resolved", {"notificationId": offer.id, "actionName": action,
                                                    "responseReason": reason}, to=offer.agent_sid))


def answered(offer: Offer, task: asyncio.Task) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, socketio.exceptions.TimeoutError):
        finish(offer, "Timeout", "DisplayTimeout", True)
    elif exc is None:
        answer = task.result() or {}
        if answer.get("action") == "Accept":
            finish(offer, "Accept", "Accept", False)
        else:
            finish(offer, "Reject", "DeclinedByAgent", False)


@sio.event
async def notify(sid, req):
    """The return value is the integrator's ack."""
    if sid not in integrators:
        return {"error": {"message": "UnauthorizedError", "msdyn_name": "NotifyEvent"}}
    agent_sid = agents.get(req["agentId"])
    if agent_sid is None:
        return {"error": {"message": "AgentNotConnectedError", "msdyn_name": "NotifyEvent"}}
    inp = req["input"]
    offer = Offer()
    offer.id = uuid.uuid4().hex
    offer.token = req.get("cancellationToken") or offer.id
    offer.agent_sid = agent_sid
    offer.result = asyncio.get_running_loop().create_future()
    offers[offer.token] = offer
    timeout = TIMEOUTS.get(inp["templateName"], 120.0)
    params = inp.get("templateParameters") or {}
    offer.call = asyncio.ensure_future(sio.call("notification", {
        "notificationId": offer.id, "templateName": inp["templateName"], "title": TITLE, "icon": "chat",
        "fields": [{"header": HEADERS.get(k, k), "value": v} for k, v in params.items()],
        "acceptText": "Accept", "rejectText": "Reject", "showTimeout": True, "autoAccept": False,
        "timeoutSeconds": timeout, "expiresAt": int(time.time() * 1000 + timeout * 1000),
        "correlationId": req.get("correlationId"),
    }, to=agent_sid, timeout=timeout))
    offer.call.add_done_callback(lambda task: answered(offer, task))
    return await offer.result


@sio.event
async def cancel(sid, req):
    token = req["cancellationToken"]
    offer = offers.get(token)
    if offer is not None:
        finish(offer, "Cancel", "CancelledByIntegrator", True)
        offer.call.cancel()
    return {"cancellationToken": token, "actionName": "Cancel", "responseReason": "CancelledByIntegrator"}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    port = p.parse_args().port
    app = web.Application()
    sio.attach(app)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
