"""``deskpush``: the command line.

    deskpush serve [--config FILE] [--host H] [--port P] [--agent ID] [--log-level L] [--log-format F]
                   [--dev-secrets FILE]
    deskpush token AGENT_ID [--config FILE] [--ttl SECONDS]
    deskpush notify --agent ID --template NAME [--param key=value ...]
    deskpush reload [--config FILE] [--pid-file FILE]

``serve`` runs the server (``app.DeskpushServer``) on uvloop when it is
installed; ``notify`` is a one-shot integrator built on the Python SDK,
``deskpush.client``; ``reload`` sends SIGHUP to a running ``serve``.

A running ``serve`` takes three signals: SIGTERM drains (``DeskpushServer.drain``:
sessions closed with 1012 over ``server.drainTimeout``, then the state file is
saved), SIGINT (Ctrl-C), or a second SIGTERM during a drain, closes everything
at once; SIGHUP rereads the templates and integrator keys of the config file.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
import typing
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
from ..protocol.frames import Id
from . import __version__, logs
from .config import (
    API_KEY_ENV,
    JWT_SECRET_ENV,
    Config,
    ConfigError,
    ephemeral_secret,
    load,
    needs_restart,
    read_dev_secrets,
)

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
    reloader = Reloader(args.config or os.environ.get("DESKPUSH_CONFIG"), config)
    if args.host or args.port is not None:
        server = config.server
        config = msgspec.structs.replace(config, server=msgspec.structs.replace(
            server, host=args.host or server.host, port=server.port if args.port is None else args.port))
    if args.redis:
        config = msgspec.structs.replace(config, cluster=msgspec.structs.replace(config.cluster, redis=args.redis))
    try:
        config.check_cluster()
    except ConfigError as exc:
        print(f"deskpush: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    secret = config.jwt_secret()
    keys = config.api_keys()
    dev = _dev_secrets(args.dev_secrets) if args.dev_secrets and not (secret and keys) else {}
    generated_key = None if keys else dev.get(API_KEY_ENV) or ephemeral_secret()
    generated_secret = None if secret else dev.get(JWT_SECRET_ENV) or ephemeral_secret()
    reloader.generated_key = generated_key
    handler = logs.setup(args.log_level, fmt=args.log_format)
    try:
        _run(functools.partial(_serve, config, secret or generated_secret, keys or {"default": generated_key},
                               banner=functools.partial(_banner, config, args.agent, ephemeral=secret is None,
                                                        generated_key=generated_key,
                                                        kept_in=args.dev_secrets if dev else None),
               reloader=reloader))
    finally:
        handler.flush()
    return 0


async def _serve(config: Config, secret: str, keys: dict[str, str], banner: Callable[[int, str], str],
                 reloader: Reloader | None = None) -> None:
    """Run a server until SIGTERM (drain, then close) or SIGINT (close at once); reload it on SIGHUP."""
    import anyio

    from .app import DeskpushServer
    from .cluster import ClusterError
    from .state import StateFileError

    log = logging.getLogger("deskpush")
    srv = DeskpushServer(config, jwt_secret=secret, api_keys=keys)
    pid_file = PidFile(config.server.pid_file) if config.server.pid_file else None
    # Signals are taken from before the start: a SIGTERM as soon as the server
    # listens (the state file already taken back) must still save it.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:

        async def next_stop() -> signal.Signals:
            """The next SIGTERM or SIGINT; each SIGHUP on the way reloads."""
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if reloader is not None:
                        reloader(srv)
                    continue
                return signal.Signals(signum)
            raise AssertionError("the signal receiver ended")  # pragma: no cover

        started = False
        try:
            if pid_file is not None:
                pid_file.write()
            await srv.start()
            started = True
        except (StateFileError, PidFileError, ClusterError) as exc:
            print(f"deskpush: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as exc:
            print(f"deskpush: cannot listen on {config.server.host}:{config.server.port}: {exc.strerror}",
                  file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            if pid_file is not None and not started:
                pid_file.remove()
        try:
            print(banner(srv.port, secret), flush=True)
            _tune_gc()
            stop = await next_stop()
            if stop == signal.SIGTERM:
                log.info("received SIGTERM: draining (another SIGTERM or a SIGINT closes at once)")
                async with anyio.create_task_group() as tg:

                    async def drain() -> None:
                        await srv.drain()
                        tg.cancel_scope.cancel()

                    async def hurry() -> None:
                        again = await next_stop()
                        log.info("received %s while draining: closing the rest now", again.name)
                        tg.cancel_scope.cancel()

                    tg.start_soon(drain)
                    tg.start_soon(hurry)
            else:
                log.info("received %s, shutting down", stop.name)
            with anyio.CancelScope(shield=True):
                try:
                    await srv.close()
                except StateFileError as exc:
                    log.error("%s", exc)
                    raise SystemExit(1) from None
        finally:
            if pid_file is not None:
                pid_file.remove()
    log.info("stopped")


class Reloader:
    """What SIGHUP does to a running ``deskpush serve``: reread the config file's templates and integrator keys.

    A file that does not load is refused with the one line ``deskpush serve``
    would print at start, and the server keeps what it has. A file without
    integrator keys keeps the key generated at start, if there was one, and
    is refused otherwise (every integrator would be locked out). Changed keys
    that only a restart applies are named in a WARNING line.
    """

    def __init__(self, path: str | None, loaded: Config) -> None:
        self.path = path
        self.loaded = loaded  # as read from the file at start, before --host and --port
        self.generated_key: str | None = None

    def __call__(self, srv: Any) -> bool:
        """Reload ``srv`` (a ``DeskpushServer``); whether the new configuration was taken."""
        log = logging.getLogger("deskpush")
        if self.path is None:
            log.warning("received SIGHUP: nothing to reload (started without --config or DESKPUSH_CONFIG)")
            return False
        try:
            new = load(self.path)
            keys = new.api_keys()
        except ConfigError as exc:
            log.error("reload refused, the configuration in use stays: %s", exc)
            return False
        if not keys:
            if self.generated_key is None:
                log.error("reload refused, the configuration in use stays: %s: no integrator key left "
                          "(set auth.integratorKeys or %s)", self.path, API_KEY_ENV)
                return False
            keys = {"default": self.generated_key}
        srv.reload(new, keys)
        log.info("reloaded %s: %d templates, integrator keys %s", self.path, len(srv.engine.templates),
                 ", ".join(keys))
        later = needs_restart(self.loaded, new)
        if later:
            log.warning("%s: %s changed; a reload takes templates and integrator keys only, the rest at a restart",
                        self.path, ", ".join(later))
        return True


class PidFileError(Exception):
    """``server.pidFile`` cannot be written."""


class PidFile:
    """``server.pidFile``: this process's id, for ``deskpush reload``; removed at exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mine = f"{os.getpid()}\n"

    def write(self) -> None:
        try:
            with open(self.path, "w", encoding="ascii") as fp:
                fp.write(self._mine)
        except OSError as exc:
            raise PidFileError(f"server.pidFile {self.path}: cannot write it: {exc.strerror}") from None

    def remove(self) -> None:
        """Remove the file if it still names this process (another may have started with the same path)."""
        try:
            with open(self.path, encoding="ascii") as fp:
                if fp.read() != self._mine:
                    return
            os.remove(self.path)
        except OSError:
            pass


def _banner(config: Config, agent: str, port: int, secret: str, *, ephemeral: bool, generated_key: str | None,
            kept_in: str | None = None) -> str:
    """What ``deskpush serve`` prints once listening: where to connect, and with what.

    ``ephemeral``: the secret was generated, not configured: for this run, or
    kept in ``kept_in`` (``--dev-secrets``, a development convenience, so a
    demo all the same). The ``try:`` line names the command as this process
    was started, so it runs as pasted in the same shell and folder.

    A working agent token only for a demo: when the demo page is on and the
    secret was made for this run (so the token dies with it). A server with
    a secret of its own is not a demo, and its start-up output ends up in
    logs that more people read than should sign in as an agent.
    """
    host = config.server.host
    shown = f"[{host}]" if ":" in host else host
    http = f"http://{shown}:{port}"
    ws = f"ws://{shown}:{port}"
    secret_env = config.auth.jwt_secret_env
    lines = [
        f"deskpush {__version__} listening on {ws}  (agents: {ws}/agent, integrators: {ws}/integrator)",
        f"  health:            {http}/healthz",
    ]
    if config.server.demo and ephemeral:
        ttl = config.token_ttl()
        token = config.agent_tokens(secret).issue(agent, ttl=ttl)
        lines.append(f"  agent desktop:     {http}/#token={token}")
        lines.append(f"  agent token:       {token}  ({agent}, valid {_duration(ttl)})")
    elif config.server.demo:
        lines.append(f"  agent desktop:     {http}/  (sign in with a token from: {command_name()} token AGENT_ID)")
    elif ephemeral:
        lines.append(f"  agent tokens:      none can be issued: the secret lasts for this run only "
                     f"(set {secret_env}, then: {command_name()} token AGENT_ID)")
    else:
        lines.append(f"  agent tokens:      {command_name()} token AGENT_ID  (with the same config and environment)")
    if generated_key and kept_in:
        lines.append(f"  integrator key:    {generated_key}  (development key kept in {kept_in}; set {API_KEY_ENV} to fix one)")
        key_shown = generated_key
    elif generated_key:
        lines.append(f"  integrator key:    {generated_key}  (generated for this run; set {API_KEY_ENV} to fix one)")
        key_shown = generated_key
    else:
        lines.append(f"  integrator keys:   {', '.join(config.api_keys())} (from the config or {API_KEY_ENV})")
        key_shown = "<your key>"
    if config.server.demo:
        lines.append(f"  integrator page:   {http}/integrator.html#apiKey={key_shown}&agentId={agent}")
    lines.append(
        f"  try:  {command_name()} notify --url {ws}/integrator --api-key {key_shown} --agent {agent} "
        f"--template msdyn_chat_incoming_unauthenticated --param customerName=Jane"
    )
    if ephemeral and config.server.demo and kept_in:
        lines.append(f"  (no {secret_env} set: tokens are signed with a development secret kept in {kept_in})")
    elif ephemeral and config.server.demo:
        lines.append(f"  (no {secret_env} set: tokens are signed with a secret that lasts for this run only)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def command_name() -> str:
    """``deskpush`` as this process was started, for a line that is pasted into the same shell.

    ``make serve`` runs ``.venv/bin/deskpush``, which is not on the PATH of
    the shell that ran make: the line says ``.venv/bin/deskpush`` then, and
    plain ``deskpush`` only when that is the one the PATH finds.
    """
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "__main__.py" or argv0 in ("", "-c", "-m"):
        return f"{_path_shown(sys.executable)} -m deskpush.server"
    found = shutil.which("deskpush")
    try:
        if found and os.path.samefile(found, argv0):
            return "deskpush"
    except OSError:
        pass
    return _path_shown(argv0)


def _path_shown(path: str) -> str:
    """``path`` relative to the current directory when it lies under it, else absolute; quoted for a shell."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full)
    return shlex.quote(rel if not rel.startswith(os.pardir) else full)


def _dev_secrets(path: str) -> dict[str, str]:
    """``config.read_dev_secrets``, its refusal as ``deskpush serve``'s one line and exit status."""
    try:
        return read_dev_secrets(path)
    except ConfigError as exc:
        raise SystemExit(f"deskpush: {exc}") from None


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
    config = _load(args.config)
    secret = config.jwt_secret()
    if secret is None:
        print(
            f"deskpush token: no secret configured: set {JWT_SECRET_ENV} or auth.jwtSecret in the config "
            "(the one 'deskpush serve' uses)",
            file=sys.stderr,
        )
        return 2
    longest = config.auth.max_token_lifetime
    if args.ttl is not None and longest is not None and args.ttl > longest:
        print(f"deskpush token: --ttl {args.ttl:g} is longer than auth.maxTokenLifetime ({longest:g} s): "
              "the server would refuse the token", file=sys.stderr)
        return 2
    ttl = config.token_ttl() if args.ttl is None else args.ttl
    print(config.agent_tokens(secret).issue(args.agent_id, ttl=ttl))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """``deskpush reload``: check the config file, then send SIGHUP to the server named by its pid file.

    The file is loaded here first, so a bad one is reported at once (the
    line ``deskpush serve`` would print, exit 2) and no signal is sent. The
    server rereads its own ``--config`` file: give this command the same one.
    """
    prog = "deskpush reload"
    config = _load(args.config)
    path = args.pid_file or config.server.pid_file
    if not path:
        print(f"{prog}: no pid file: set server.pidFile in the config (or pass --pid-file), "
              "or send SIGHUP to the server's process (kill -HUP PID)", file=sys.stderr)
        return 2
    try:
        with open(path, encoding="ascii") as fp:
            text = fp.read().strip()
    except OSError as exc:
        print(f"{prog}: cannot read pid file {path}: {exc.strerror} (is deskpush serve running?)", file=sys.stderr)
        return 1
    if not text.isdigit() or int(text) <= 1:
        print(f"{prog}: pid file {path} holds no process id: {text[:40]!r}", file=sys.stderr)
        return 1
    pid = int(text)
    # A pid file left by a process that was killed may name another program
    # by now, and SIGHUP ends most programs: where /proc tells, check.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fp:
            cmdline = fp.read()
    except FileNotFoundError:
        cmdline = None if os.path.isdir("/proc/self") else b"deskpush"
    except OSError:
        cmdline = b"deskpush"
    if cmdline is None:
        print(f"{prog}: no process {pid} (pid file {path} is stale: is deskpush serve running?)", file=sys.stderr)
        return 1
    if b"deskpush" not in cmdline:
        print(f"{prog}: process {pid} of pid file {path} is not deskpush; no signal sent", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"{prog}: no process {pid} (pid file {path} is stale: is deskpush serve running?)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"{prog}: not allowed to signal process {pid} (run as the user of deskpush serve)", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to deskpush serve (pid {pid}): it rereads its config's templates and integrator keys; "
          "its log says whether it took them")
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


def port_arg(text: str) -> int:
    """A port as ``server.port`` takes it: 0 (the system picks one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 0 to 65535 (0 picks a free one)")
    return port


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _agent_id(text: str) -> str:
    """An agent id the server takes: what a token's ``sub`` and the frames' ``agentId`` may be (``frames.Id``)."""
    try:
        return msgspec.convert(text, Id)
    except msgspec.ValidationError:
        meta = typing.get_args(Id)[1]
        shown = f"{text[:40]!r}{'...' if len(text) > 40 else ''}"
        raise argparse.ArgumentTypeError(
            f"{shown} is not an agent id the server accepts: it takes {meta.min_length} to {meta.max_length} "
            f"characters, this has {len(text)}") from None


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deskpush", description="WebSocket push server for agent desktops (CIF 2.0 notifyEvent/cancelEvent).")
    p.add_argument("--version", action="version", version=f"deskpush {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server (embedded defaults with no arguments)",
                       description="Run the server until SIGTERM or SIGINT. With no arguments: the embedded "
                                   "defaults, 127.0.0.1:8765, the demo desktop at /, and a token secret and "
                                   "integrator key made for this run (printed at start).")
    s.add_argument("--config", metavar="FILE",
                   help="TOML config file (default: $DESKPUSH_CONFIG, else the embedded defaults)")
    s.add_argument("--host", help="listen address (default: server.host, 127.0.0.1)")
    s.add_argument("--port", type=port_arg, help="listen port, 0 to 65535; 0 picks a free one "
                                              "(default: server.port, 8765)")
    s.add_argument("--agent", default="agent-1", type=_agent_id, metavar="ID",
                   help="agent id of the token printed at start (default: agent-1)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logs go to stderr; INFO has one line per outcome (default: INFO)")
    s.add_argument("--log-format", default="text", choices=list(logs.FORMATS),
                   help="text: one line per record; json: one JSON object per line, the outcome's fields "
                        "as keys (default: text)")
    s.add_argument("--dev-secrets", metavar="FILE",
                   help=f"development only: keep the generated token secret and integrator key in FILE "
                        f"(made owner-only the first time) so they survive a restart; what {JWT_SECRET_ENV}, "
                        f"{API_KEY_ENV} or the config sets wins (make serve uses .venv/deskpush-dev.env; "
                        "default: none, new ones each run)")
    s.add_argument("--redis", metavar="URL",
                   help="run as a node of a cluster on this Redis 7 (cluster.redis), e.g. redis://127.0.0.1:6379/0; "
                        "every node names the same one and shares auth.jwtSecret and the integrator keys "
                        "(default: none, embedded mode)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("token", help="print an agent token",
                       description=f"Print an agent token (a JWT) signed with the configured secret "
                                   f"(auth.jwtSecret, or ${JWT_SECRET_ENV}).")
    t.add_argument("agent_id", type=_agent_id, metavar="AGENT_ID", help="the agent id (1 to 128 characters)")
    t.add_argument("--config", metavar="FILE",
                   help="TOML config file (default: $DESKPUSH_CONFIG, else the embedded defaults)")
    t.add_argument("--ttl", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="seconds the token is valid, more than 0 "
                        "(default: 43200, 12 h, or auth.maxTokenLifetime if shorter)")
    t.set_defaults(func=cmd_token)

    n = sub.add_parser(
        "notify", help="send one notifyEvent and print its outcome",
        description="Send one notifyEvent and wait for its outcome: progress on stderr, the outcome on stdout. "
                    "A dropped connection or a server restart is waited out: the command reconnects for up to "
                    "--reconnect-timeout seconds and resumes, so the outcome still arrives (protocol v1.1). "
                    "Exit status: 0 outcome, 1 refused by the server, 2 connection or authentication problem "
                    "(including OutcomeUnknownError: the server could no longer tell the outcome).")
    n.add_argument("--url", default=os.environ.get("DESKPUSH_URL", "ws://127.0.0.1:8765/integrator"),
                   help="the server's integrator endpoint; a URL with no path gets /integrator "
                        "(default: $DESKPUSH_URL, else ws://127.0.0.1:8765/integrator)")
    n.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help=f"integrator API key (default: ${API_KEY_ENV})")
    n.add_argument("--agent", required=True, type=_agent_id, metavar="ID", help="target agent id (required)")
    n.add_argument("--template", default="msdyn_chat_incoming_unauthenticated", metavar="NAME",
                   help="template name (default: msdyn_chat_incoming_unauthenticated)")
    n.add_argument("--param", action="append", type=_param, default=[], metavar="KEY=VALUE",
                   help="a templateParameters entry; repeat for more (default: none)")
    n.add_argument("--cancellation-token", metavar="TOKEN",
                   help="the offer's cancellationToken, for a cancelEvent from elsewhere (default: none)")
    n.add_argument("--correlation-id", metavar="ID",
                   help="correlationId, logged with the outcome (default: none)")
    n.add_argument("--cancel-after", type=float, metavar="SECONDS",
                   help="send cancelEvent after this many seconds if still pending (default: never)")
    n.add_argument("--reconnect-timeout", type=float, default=NOTIFY_RECONNECT_TIMEOUT, metavar="SECONDS",
                   help="after a drop, keep reconnecting this long, e.g. through a server restart "
                        f"(default {NOTIFY_RECONNECT_TIMEOUT:g}; 0: fail at once)")
    n.set_defaults(func=cmd_notify)

    r = sub.add_parser(
        "reload", help="make a running server reread its templates and integrator keys (SIGHUP)",
        description="Check the config file, then send SIGHUP to the deskpush serve named by the pid file "
                    "(server.pidFile): it rereads the templates and integrator keys of its own config file, "
                    "keeping every connection and pending notification.")
    r.add_argument("--config", help="the server's TOML config file (or DESKPUSH_CONFIG)")
    r.add_argument("--pid-file", help="the server's pid file (default: server.pidFile of the config)")
    r.set_defaults(func=cmd_reload)

    from .localcluster import add_parser as add_local_cluster

    add_local_cluster(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
