"""The floor: the least a Python server on deskpush's stack must do for the same exchange.

websockets.asyncio + uvloop + msgspec; it forwards offers and answers with one
``call_later`` timer per offer, speaks the same frames as deskpush (same sizes),
and does nothing else: no token check (the agent id is read from the JWT's
payload unverified), no templates, no queue, no limits, no logging.

    python bench/peers/floor.py --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import os
import time
import uuid

import msgspec
import uvloop
from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosed

# Display timeout by template name (bench/run.py sets BENCH_TIMEOUT, as deskpush's bench_timeout); others 120 s.
TIMEOUTS = {"bench_timeout": float(os.environ.get("BENCH_TIMEOUT", "2.0"))}
TITLE = "New chat request"
HEADERS = {"customerName": "Customer", "queueName": "Queue", "comment": "Comment"}


class Input(msgspec.Struct, rename="camel"):
    template_name: str
    template_parameters: dict[str, str] = {}
    cancellation_token: str | None = None


class Inbound(msgspec.Struct, rename="camel", tag_field="type"):
    pass


class Hello(Inbound, tag="hello"):
    token: str = ""


class Respond(Inbound, tag="respond"):
    notification_id: str
    action: str


class NotifyEvent(Inbound, tag="notifyEvent"):
    request_id: str
    agent_id: str
    input: Input
    cancellation_token: str | None = None
    correlation_id: str | None = None


class CancelEvent(Inbound, tag="cancelEvent"):
    request_id: str
    cancellation_token: str


DECODER = msgspec.json.Decoder(Hello | Respond | NotifyEvent | CancelEvent)
encode = msgspec.json.Encoder().encode


class Offer:
    __slots__ = ("id", "agent", "integrator", "request_id", "token", "timer")


agents: dict[str, object] = {}
offers: dict[str, Offer] = {}
tokens: dict[str, Offer] = {}


if "text" in inspect.signature(broadcast).parameters:  # websockets 16.1 and later

    def send(conn, frame: dict) -> None:
        broadcast((conn,), encode(frame), text=True)

else:  # the oldest websockets deskpush supports, for its CI run there: str, not bytes

    def send(conn, frame: dict) -> None:
        broadcast((conn,), encode(frame).decode())


def end(offer: Offer, action: str, reason: str) -> None:
    offers.pop(offer.id, None)
    tokens.pop(offer.token, None)
    offer.timer.cancel()
    send(offer.integrator, {"type": "result", "requestId": offer.request_id,
                            "value": {"actionName": action, "responseReason": reason}})
    conn = agents.get(offer.agent)
    if conn is not None:
        send(conn, {"type": "resolved", "notificationId": offer.id, "actionName": action, "responseReason": reason})


def agent_id(token: str) -> str:
    payload = token.split(".")[1]
    return msgspec.json.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]


async def agent(ws) -> None:
    hello = DECODER.decode(await ws.recv(decode=False))
    aid = agent_id(hello.token)
    agents[aid] = ws
    send(ws, {"type": "welcome", "agentId": aid, "sessionId": "s", "serverTime": int(time.time() * 1000)})
    try:
        async for raw in ws:
            frame = DECODER.decode(raw)
            offer = offers.get(frame.notification_id)
            if offer is not None:
                end(offer, *(("Accept", "Accept") if frame.action == "Accept" else ("Reject", "DeclinedByAgent")))
    except ConnectionClosed:
        pass
    finally:
        if agents.get(aid) is ws:
            del agents[aid]


async def integrator(ws) -> None:
    loop = asyncio.get_running_loop()
    try:
        async for raw in ws:
            integrator_frame(ws, DECODER.decode(raw), loop)
    except ConnectionClosed:
        pass


def integrator_frame(ws, frame, loop) -> None:
    if type(frame) is CancelEvent:
        offer = tokens.get(frame.cancellation_token)
        if offer is not None:
            end(offer, "Cancel", "CancelledByIntegrator")
        send(ws, {"type": "result", "requestId": frame.request_id,
                  "value": {"cancellationToken": frame.cancellation_token, "actionName": "Cancel",
                            "responseReason": "CancelledByIntegrator"}})
        return
    conn = agents.get(frame.agent_id)
    if conn is None:
        send(ws, {"type": "error", "requestId": frame.request_id,
                  "error": {"message": "AgentNotConnectedError", "msdyn_name": "NotifyEvent"}})
        return
    offer = Offer()
    offer.id = uuid.uuid4().hex
    offer.agent = frame.agent_id
    offer.integrator = ws
    offer.request_id = frame.request_id
    offer.token = frame.cancellation_token or frame.input.cancellation_token or offer.id
    timeout = TIMEOUTS.get(frame.input.template_name, 120.0)
    offer.timer = loop.call_later(timeout, end, offer, "Timeout", "DisplayTimeout")
    offers[offer.id] = offer
    tokens[offer.token] = offer
    params = frame.input.template_parameters
    send(conn, {
        "type": "notification", "notificationId": offer.id, "templateName": frame.input.template_name,
        "title": TITLE, "icon": "chat",
        "fields": [{"header": HEADERS.get(k, k), "value": v} for k, v in params.items()],
        "acceptText": "Accept", "rejectText": "Reject", "showTimeout": True, "autoAccept": False,
        "timeoutSeconds": timeout, "expiresAt": int(time.time() * 1000 + timeout * 1000),
        "correlationId": frame.correlation_id,
    })


async def handler(ws) -> None:
    if ws.request.path == "/agent":
        await agent(ws)
    else:
        await integrator(ws)


async def main(port: int) -> None:
    # A listen backlog as deep as the kernel allows (net.core.somaxconn): asyncio's default of 100
    # drops SYNs when 200 agents connect at once, and each dropped one waits 1 s or more to retry.
    async with serve(handler, "127.0.0.1", port, compression=None, max_queue=16, backlog=4096) as server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    uvloop.run(main(p.parse_args().port))
