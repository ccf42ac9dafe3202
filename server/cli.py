"""``deskpush``: the command line.

    deskpush serve [--config FILE] [--host H] [--port P] [--log-level L]
    deskpush token AGENT_ID [--config FILE] [--ttl SECONDS]
    deskpush notify --agent ID --template NAME [--param key=value ...]

``serve`` runs the server (``app.DeskpushServer``) on uvloop when it is
installed; ``notify`` is a one-shot integrator built on the Python SDK,
``deskpush.client``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

from ..client import (
    CIFError,
    Integrator,
    IntegratorError,
    OutcomeUnknownError,
    Reconnect,
    Resumed,
    Status,
    UnauthorizedError,
)
from . import __version__, logs
from .config import API_KEY_ENV, JWT_SECRET_ENV, Config, ConfigError, ephemeral_secret, load

__all__ = ["main"]


def _run(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main`` to its end on uvloop when it is installed, else on asyncio's own loop."""
    import anyio

    try:
        import uvloop  # noqa: F401
    except ImportError:
        return anyio.run(main)
    return anyio.run(main, backend_options={"use_uvloop": True})


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.host or args.port is not None:
        server = config.server
        config = msgspec.structs.replace(config, server=msgspec.structs.replace(
            server, host=args.host or server.host, port=server.port if args.port is None else args.port))
    secret = config.jwt_secret()
    keys = config.api_keys()
    generated_key = None if keys else ephemeral_secret()
    handler = logs.setup(args.log_level)
    try:
        _run(functools.partial(_serve, config, secret or ephemeral_secret(), keys or {"default": generated_key},
                               banner=functools.partial(_banner, config, args.agent, ephemeral=secret is None,
                                                        generated_key=generated_key)))
    finally:
        handler.flush()
    return 0


async def _serve(config: Config, secret: str, keys: dict[str, str], banner: Callable[[int, str], str]) -> None:
    """Run a server until SIGINT or SIGTERM, then close it: its connections, its state file."""
    import anyio

    from .app import DeskpushServer
    from .state import StateFileError

    log = logging.getLogger("deskpush")
    srv = DeskpushServer(config, jwt_secret=secret, api_keys=keys)
    # Signals are taken from before the start: a SIGTERM as soon as the server
    # listens (the state file already taken back) must still save it.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            await srv.start()
        except StateFileError as exc:
            print(f"deskpush: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as exc:
            print(f"deskpush: cannot listen on {config.server.host}:{config.server.port}: {exc.strerror}",
                  file=sys.stderr)
            raise SystemExit(1) from None
        print(banner(srv.port, secret), flush=True)
        _tune_gc()
        async with anyio.create_task_group() as tg:

            async def wait_signal() -> None:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    break
                tg.cancel_scope.cancel()

            tg.start_soon(wait_signal)
            tg.start_soon(srv.serve_forever)
        with anyio.CancelScope(shield=True):
            try:
                await srv.close()
            except StateFileError as exc:
                log.error("%s", exc)
                raise SystemExit(1) from None
    log.info("stopped")


def _banner(config: Config, agent: str, port: int, secret: str, *, ephemeral: bool, generated_key: str | None) -> str:
    """What ``deskpush serve`` prints once listening: where to connect, and with what."""
    from .auth import AgentTokens

    host = config.server.host
    shown = f"[{host}]" if ":" in host else host
    http = f"http://{shown}:{port}"
    ws = f"ws://{shown}:{port}"
    token = AgentTokens(secret).issue(agent, ttl=12 * 3600)
    lines = [
        f"deskpush {__version__} listening on {ws}  (agents: {ws}/agent, integrators: {ws}/integrator)",
        f"  health:            {http}/healthz",
    ]
    if config.server.demo:
        lines.append(f"  agent desktop:     {http}/#token={token}")
    lines.append(f"  agent token:       {token}  ({agent}, valid 12 h)")
    if generated_key:
        lines.append(f"  integrator key:    {generated_key}  (generated for this run; set {API_KEY_ENV} to fix one)")
        key_shown = generated_key
    else:
        lines.append(f"  integrator keys:   {', '.join(config.api_keys())} (from the config or {API_KEY_ENV})")
        key_shown = "<your key>"
    if config.server.demo:
        lines.append(f"  integrator page:   {http}/integrator.html#apiKey={key_shown}&agentId={agent}")
    lines.append(
        f"  try:  deskpush notify --url {ws}/integrator --api-key {key_shown} --agent {agent} "
        f"--template msdyn_chat_incoming_unauthenticated --param customerName=Jane"
    )
    if ephemeral:
        lines.append(f"  (no {JWT_SECRET_ENV} set: tokens are signed with a secret that lasts for this run only)")
    return "\n".join(lines)


def _tune_gc() -> None:
    # What exists now (templates, config, imported modules) lives as long as
    # the process: keep it out of every later garbage collection.
    gc.collect()
    gc.freeze()
    # The engine frees its objects by reference counting; what needs the
    # cycle collector is mostly closed connections. A full collection walks
    # every live object and, with thousands of sessions and offers, stalls
    # every timer meanwhile (bench/RESULTS.md): run it 10x less often.
    gc.set_threshold(700, 10, 100)


def cmd_token(args: argparse.Namespace) -> int:
    from .auth import AgentTokens

    config = _load(args.config)
    secret = config.jwt_secret()
    if secret is None:
        print(
            f"deskpush token: no secret configured: set {JWT_SECRET_ENV} or auth.jwtSecret in the config "
            "(the one 'deskpush serve' uses)",
            file=sys.stderr,
        )
        return 2
    print(AgentTokens(secret).issue(args.agent_id, ttl=args.ttl))
    return 0


# --------------------------------------------------------------------------
# deskpush notify: one notifyEvent through the Python SDK (deskpush.client)


def _outcome_line(value: Mapping[str, Any]) -> str:
    return f"{value.get('actionName')}/{value.get('responseReason')}"


#: How long ``deskpush notify`` keeps reconnecting after a drop, by default:
#: long enough for a server restart or a rolling deploy.
NOTIFY_RECONNECT_TIMEOUT = 60.0


def notify_reconnect_policy(timeout: float) -> Reconnect | None:
    """Reconnect for ``timeout`` seconds after a drop, however many attempts (0: not at all).

    Attempts start quickly (a network blip) and back off to one every 2 s at
    most (a restarting server is back within seconds of listening again).
    """
    if timeout <= 0:
        return None
    return Reconnect(attempts=None, timeout=timeout, initial=0.1, maximum=2.0)


async def _notify_main(args: argparse.Namespace) -> int:
    err = sys.stderr
    reconnect_timeout = getattr(args, "reconnect_timeout", NOTIFY_RECONNECT_TIMEOUT)
    params = dict(args.param or [])
    cancel_after = getattr(args, "cancel_after", None)
    token = args.cancellation_token
    if cancel_after is not None and token is None:
        # Known up front, so the cancel does not depend on a status frame.
        token = f"cli-{secrets.token_hex(8)}"
    notify_input: dict[str, Any] = {"templateName": args.template, "templateParameters": params}

    def on_status(status: Status) -> None:
        extra = f" cancellationToken={status.cancellation_token}" if status.state == "queued" else ""
        print(f"{status.state}: notificationId={status.notification_id}{extra}", file=err, flush=True)

    lost = False

    def on_lost(what: str) -> None:
        nonlocal lost
        lost = True
        print(f"{what}; reconnecting for up to {reconnect_timeout:g} s", file=err, flush=True)

    def on_resumed(resumed: Resumed) -> None:
        # The first connection's resumed is the start, not news.
        if not lost:
            return
        gap = "" if resumed.complete else f"; outcomes may be missing: {resumed.details}"
        print(f"reconnected and resumed: {resumed.count} outcome(s) replayed{gap}", file=err, flush=True)

    async with Integrator(args.url, args.api_key, agent_id=args.agent,
                          reconnect=notify_reconnect_policy(reconnect_timeout),
                          on_lost=on_lost, on_resumed=on_resumed) as ig:
        print(f"notifyEvent: template {args.template} to agent {args.agent} via {ig.url}", file=err, flush=True)
        notify = asyncio.ensure_future(ig.notify_event(
            notify_input, args.correlation_id, token, on_status=on_status))
        cancel_value: dict[str, Any] | None = None
        cancel_error: CIFError | None = None
        try:
            if cancel_after is not None:
                cancel_value, cancel_error = await _cancel_if_pending(ig, notify, token, cancel_after,
                                                                      args.correlation_id)
            value = await notify
        finally:
            if not notify.done():
                notify.cancel()
                await asyncio.wait({notify})
    print(_outcome_line(value))
    print(msgspec.json.encode(value).decode())
    if cancel_value is not None:
        print(f"cancel: {msgspec.json.encode(cancel_value).decode()}")
    if cancel_error is not None:
        raise cancel_error
    sys.stdout.flush()
    return 0


async def _cancel_if_pending(
    ig: Integrator, notify: asyncio.Future[dict[str, Any]], token: str, after: float, correlation_id: str | None,
) -> tuple[dict[str, Any] | None, CIFError | None]:
    """After ``after`` seconds, cancelEvent ``token`` unless ``notify`` ended: its value, or its error."""
    done, _ = await asyncio.wait({notify}, timeout=max(0.0, after))
    if done:
        if notify.exception() is None:
            print(f"the notification ended before {after:g} s; no cancelEvent sent", file=sys.stderr)
        return None, None
    print(f"cancelEvent: cancellationToken={token} after {after:g} s", file=sys.stderr, flush=True)
    try:
        return await ig.cancel_event(token, correlation_id), None
    except CIFError as exc:
        return None, exc


def cmd_notify(args: argparse.Namespace) -> int:
    """``deskpush notify``: one notifyEvent; prints progress to stderr and the outcome to stdout.

    stdout gets the outcome as ``Accept/Accept`` and then the CIF value as
    JSON (and, with ``--cancel-after``, a ``cancel: {...}`` line with the
    cancelEvent's value). Exit status: 0 for an outcome, 1 when the server
    refused the request, 2 for connection or authentication problems.

    The first connection must open; after that the command survives drops
    and server restarts: it reconnects for up to ``--reconnect-timeout``
    seconds (default 60) and resumes (protocol v1.1), so the outcome still
    arrives, without a second offer to the agent. If the server cannot tell
    (it restarted without ``server.stateFile``, or forgot the outcome), the
    command says ``OutcomeUnknownError`` and exits with 2.
    """
    prog = "deskpush notify"
    if not args.api_key:
        print(f"{prog}: no API key: pass --api-key or set {API_KEY_ENV} "
              "(deskpush serve prints the integrator key)", file=sys.stderr)
        return 2
    # The command says itself what happens to the connection (on_lost,
    # on_resumed); without a handler, the SDK's own warnings would reach
    # stderr a second time through logging's last resort.
    sdk_log = logging.getLogger("deskpush.integrator")
    if not sdk_log.handlers:
        sdk_log.addHandler(logging.NullHandler())
    try:
        return _run(functools.partial(_notify_main, args))
    except OutcomeUnknownError as exc:
        # Refused by nobody: the connection broke and the outcome cannot be
        # learnt any more. A connection problem; the offer may still be live.
        token = f"; cancel it with cancellationToken {exc.cancellation_token}" if exc.cancellation_token else ""
        print(f"{prog}: {exc.message}: {exc.details}; the notification may still be pending on the server{token}",
              file=sys.stderr)
        return 2
    except CIFError as exc:
        print(f"error: {exc.message} ({exc.msdyn_name}): {exc.details}", file=sys.stderr)
        return 1
    except UnauthorizedError as exc:
        print(f"{prog}: {exc}; check --api-key", file=sys.stderr)
        return 2
    except IntegratorError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the notification keeps running on the server", file=sys.stderr)
        return 130


def _load(path: str | None) -> Config:
    try:
        return load(path or os.environ.get("DESKPUSH_CONFIG"))
    except ConfigError as exc:
        print(f"deskpush: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deskpush", description="WebSocket push server for agent desktops (CIF 2.0 notifyEvent/cancelEvent).")
    p.add_argument("--version", action="version", version=f"deskpush {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server (embedded defaults with no arguments)")
    s.add_argument("--config", help="TOML config file (or DESKPUSH_CONFIG)")
    s.add_argument("--host", help="listen address (default from config: 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (default from config: 8765; 0 picks one)")
    s.add_argument("--agent", default="agent-1", help="agent id of the token printed at start (default agent-1)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("token", help="print an agent token")
    t.add_argument("agent_id")
    t.add_argument("--config", help="TOML config file (or DESKPUSH_CONFIG)")
    t.add_argument("--ttl", type=float, default=12 * 3600, help="seconds the token is valid (default 12 h)")
    t.set_defaults(func=cmd_token)

    n = sub.add_parser(
        "notify", help="send one notifyEvent and print its outcome",
        description="Send one notifyEvent and wait for its outcome: progress on stderr, the outcome on stdout. "
                    "A dropped connection or a server restart is waited out: the command reconnects for up to "
                    "--reconnect-timeout seconds and resumes, so the outcome still arrives (protocol v1.1). "
                    "Exit status: 0 outcome, 1 refused by the server, 2 connection or authentication problem "
                    "(including OutcomeUnknownError: the server could no longer tell the outcome).")
    n.add_argument("--url", default=os.environ.get("DESKPUSH_URL", "ws://127.0.0.1:8765/integrator"))
    n.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"integrator API key (or {API_KEY_ENV})")
    n.add_argument("--agent", required=True, help="target agent id")
    n.add_argument("--template", default="msdyn_chat_incoming_unauthenticated")
    n.add_argument("--param", action="append", type=_param, default=[], metavar="KEY=VALUE")
    n.add_argument("--cancellation-token")
    n.add_argument("--correlation-id")
    n.add_argument("--cancel-after", type=float, help="send cancelEvent after this many seconds")
    n.add_argument("--reconnect-timeout", type=float, default=NOTIFY_RECONNECT_TIMEOUT, metavar="SECONDS",
                   help="after a drop, keep reconnecting this long, e.g. through a server restart "
                        f"(default {NOTIFY_RECONNECT_TIMEOUT:g}; 0: fail at once)")
    n.set_defaults(func=cmd_notify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
