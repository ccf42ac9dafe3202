"""The server's configuration: one TOML file decoded into typed Structs.

Every key is optional; the embedded defaults run a server on 127.0.0.1 with the
built-in templates. Keys are camelCase, as on the wire. A bad key or value
raises ``ConfigError`` naming it (``Expected `int`, got `str` - at
`$.limits.queueLimit```). See ``docs/configuration.md`` and ``deskpush.example.toml``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from ..protocol import BUILTIN_TEMPLATES, Limits, Template
from .auth import MIN_SECRET_BYTES, AgentTokens, Network

__all__ = ["Config", "ServerSection", "AuthSection", "ClusterSection", "ApiKey", "ConfigError", "load", "default", "needs_restart"]

JWT_SECRET_ENV = "DESKPUSH_JWT_SECRET"
API_KEY_ENV = "DESKPUSH_API_KEY"


#: An origin as a browser serializes it in the Origin header (RFC 6454
#: section 6.1): scheme "://" host, and ":" port when it is not the scheme's
#: default; no path, not even "/".
Origin = Annotated[str, Meta(pattern=r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\s@]+$", max_length=256)]


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""


class _Section(msgspec.Struct, rename="camel", frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerSection(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8765
    # Connections the kernel queues before they are accepted: a reconnect storm
    # after a restart overflows a short queue and clients wait 1 s or more to retry.
    backlog: Annotated[int, Meta(ge=1, le=65535)] = 4096
    # Largest frame a client may send; larger ones close the connection with 1009.
    max_size: Annotated[int, Meta(ge=1024, le=16 * 2**20)] = 64 * 1024
    # Seconds from accepting a connection to its authentication: the opening
    # handshake and the hello frame together.
    hello_timeout: Annotated[float, Meta(gt=0)] = 10.0
    # Bytes that may wait in one connection's write buffer before it is closed as too slow.
    outbound_limit: Annotated[int, Meta(ge=4096)] = 1024 * 1024
    # Protocol pings (seconds); 0 turns them off.
    ping_interval: Annotated[float, Meta(ge=0)] = 20.0
    ping_timeout: Annotated[float, Meta(ge=0)] = 20.0
    # Frames per second a connection may send, and the burst above that; past it: close 1008.
    agent_rate: Annotated[float, Meta(gt=0)] = 50.0
    agent_burst: Annotated[float, Meta(ge=1)] = 200.0
    integrator_rate: Annotated[float, Meta(gt=0)] = 20000.0
    integrator_burst: Annotated[float, Meta(ge=1)] = 40000.0
    # Serve the demo agent desktop and integrator page at / .
    demo: bool = True
    # Where pending notifications are saved on shutdown and taken back on start,
    # so a restart or rolling deploy does not lose offers. None: memory only.
    state_file: str | None = None
    # Connections accepted and not yet authenticated (in their handshake, or
    # waiting for their hello); past it, an upgrade gets 503 instead of an fd.
    max_pending_handshakes: Annotated[int, Meta(ge=1)] = 1000
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the
    # client, for the failed-authentication throttle. Empty: the TCP peer is the client.
    trusted_proxies: tuple[str, ...] = ()
    # Seconds over which SIGTERM spreads the closes (1012) of the sessions, so
    # desktops reconnect elsewhere a batch at a time instead of all at once.
    drain_timeout: Annotated[float, Meta(ge=0, le=3600)] = 10.0
    # Where ``deskpush serve`` writes its process id, for ``deskpush reload``. None: nowhere.
    pid_file: str | None = None
    # Origins whose pages may open /agent and /integrator (scheme://host[:port],
    # as browsers send Origin). None: any origin. Requests without Origin pass.
    allowed_origins: tuple[Origin, ...] | None = None
    # Count for Prometheus and serve GET /metrics (with an integrator key). false: neither.
    metrics: bool = True
    # A port of its own for GET /metrics, without a key, on metricsHost. None: none.
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] | None = None
    metrics_host: str = "127.0.0.1"


class ApiKey(_Section):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    key: str | None = None
    key_env: str | None = None


class AuthSection(_Section):
    # HS256 secret for agent tokens; or the name of an environment variable holding it.
    jwt_secret: str | None = None
    jwt_secret_env: str = JWT_SECRET_ENV
    integrator_keys: tuple[ApiKey, ...] = ()
    # Optional checks of agent tokens: the iss claim they must carry, the aud they
    # must name, and the longest exp - iat (seconds; tokens must then carry iat).
    issuer: str | None = None
    audience: str | None = None
    max_token_lifetime: Annotated[float, Meta(gt=0)] | None = None
    # Failed integrator authentications allowed from one address within
    # failedAuthWindow seconds; past them it is refused that long. 0: no limit.
    failed_auth_limit: Annotated[int, Meta(ge=0)] = 10
    failed_auth_window: Annotated[float, Meta(gt=0)] = 60.0


class ClusterSection(_Section):
    """Cluster mode (docs/cluster.md): several nodes sharing one Redis 7. No ``redis``: embedded mode."""

    # redis://[:password@]host:port/db (rediss:// for TLS); every node of a cluster names the same one.
    redis: str | None = None
    # Namespace of the cluster's keys in Redis (one hash tag): two clusters may share a Redis.
    prefix: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")] = "deskpush"
    # Seconds between a node's heartbeats; a node silent for nodeTimeout is declared down.
    heartbeat: Annotated[float, Meta(gt=0, le=60)] = 1.0
    node_timeout: Annotated[float, Meta(gt=0, le=600)] = 3.0
    # Redis unreachable this long: at start, give up; running, /readyz 503 and new sessions refused.
    redis_timeout: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    # Seconds between snapshots of the state (the log is trimmed to the one before).
    snapshot_interval: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    # Events a node keeps while Redis is unreachable; past that a connection's next one closes it (1013).
    max_buffered: Annotated[int, Meta(ge=1000)] = 100_000


class Config(_Section):
    server: ServerSection = ServerSection()
    auth: AuthSection = AuthSection()
    limits: Limits = Limits()
    # Keep the built-in templates; [[templates]] with the same name replace them.
    builtin_templates: bool = True
    templates: tuple[Template, ...] = ()
    cluster: ClusterSection = ClusterSection()

    def template_map(self) -> dict[str, Template]:
        out = {t.name: t for t in BUILTIN_TEMPLATES} if self.builtin_templates else {}
        for t in self.templates:
            out[t.name] = t
        return out

    def jwt_secret(self) -> str | None:
        """The configured secret, from the file or the environment.

        Raises:
            ConfigError: it is shorter than 32 bytes.
        """
        if self.auth.jwt_secret:
            return _long_enough(self.auth.jwt_secret, "auth.jwtSecret")
        env = os.environ.get(self.auth.jwt_secret_env)
        return _long_enough(env, self.auth.jwt_secret_env) if env else None

    def api_keys(self) -> dict[str, str]:
        """Integrator keys as {name: key}; DESKPUSH_API_KEY adds one named "default"."""
        keys: dict[str, str] = {}
        names = [k.name for k in self.auth.integrator_keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"integrator key name used twice: {', '.join(dupes)} - at $.auth.integratorKeys")
        for k in self.auth.integrator_keys:
            value = k.key or (os.environ.get(k.key_env) if k.key_env else None)
            if not value and k.key_env and not k.key:
                raise ConfigError(f"integrator key {k.name!r}: keyEnv names {k.key_env}, which is not set "
                                  "(or empty) in the environment - at $.auth.integratorKeys")
            if not value:
                raise ConfigError(f"integrator key {k.name!r} has no key (set key or keyEnv) - at $.auth.integratorKeys")
            keys[k.name] = _long_enough(value, f"integrator key {k.name!r}", " - at $.auth.integratorKeys")
        env = os.environ.get(API_KEY_ENV)
        if env and "default" not in keys:
            keys["default"] = _long_enough(env, API_KEY_ENV)
        return keys

    def agent_tokens(self, secret: str) -> AgentTokens:
        """Agent tokens signed with ``secret``, with this config's issuer, audience and lifetime checks."""
        a = self.auth
        return AgentTokens(secret, issuer=a.issuer, audience=a.audience, max_lifetime=a.max_token_lifetime)

    def token_ttl(self, wanted: float = 12 * 3600) -> float:
        """``wanted`` seconds, or ``auth.maxTokenLifetime`` if that is shorter."""
        longest = self.auth.max_token_lifetime
        return wanted if longest is None else min(wanted, longest)

    def trusted_networks(self) -> tuple[Network, ...]:
        """``server.trustedProxies`` as networks.

        Raises:
            ConfigError: an entry is not an IP address or network.
        """
        out = []
        for entry in self.server.trusted_proxies:
            try:
                out.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfigError(f"{entry!r} is not an IP address or network - at $.server.trustedProxies") from None
        return tuple(out)

    def check_cluster(self) -> None:
        """Raise ``ConfigError`` for a cluster section that cannot work."""
        c = self.cluster
        if c.redis is None:
            return
        if not c.redis.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"cluster.redis must be a redis://, rediss:// or unix:// URL, not {c.redis!r} "
                              "- at $.cluster.redis")
        if self.server.state_file is not None:
            raise ConfigError("server.stateFile is for embedded mode: in cluster mode the state is in Redis "
                              "(remove one of them) - at $.server.stateFile")
        if c.node_timeout < 2 * c.heartbeat:
            raise ConfigError(f"cluster.nodeTimeout ({c.node_timeout:g} s) must be at least twice "
                              f"cluster.heartbeat ({c.heartbeat:g} s), or a busy node is declared down "
                              "- at $.cluster.nodeTimeout")

    def check_secrets(self) -> None:
        """Raise ``ConfigError`` for a secret or key that is missing or too short."""
        self.jwt_secret()
        self.api_keys()


def _long_enough(secret: str, what: str, where: str = "") -> str:
    """``secret``, if it has at least 32 bytes (PyJWT warns about shorter HMAC keys; RFC 7518 3.2)."""
    n = len(secret.encode())
    if n < MIN_SECRET_BYTES:
        raise ConfigError(f"{what} is {n} bytes; use at least {MIN_SECRET_BYTES} "
                          f"(e.g. from: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'){where}")
    return secret


def read_dev_secrets(path: str) -> dict[str, str]:
    """The development secret and integrator key kept in ``path``, made there the first time.

    A convenience for ``make serve`` and ``make cluster`` (``--dev-secrets``):
    one secret and one key per checkout, so a restart keeps open desktop tabs
    signed in and printed links working. The file is ``NAME=value`` lines
    (``set -a; . FILE`` loads it into a shell, for ``deskpush token``),
    created readable by its owner only; a file others may read is refused,
    since its key lets anyone offer notifications.

    Raises:
        ConfigError: the file cannot be made or read, others may read it, or a value is too short.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    else:
        with os.fdopen(fd, "w") as f:
            f.write("# deskpush development secrets, made by `deskpush serve --dev-secrets` (make serve).\n"
                    "# For this checkout only; delete the file for new ones. Never use these in production.\n"
                    f"{JWT_SECRET_ENV}={ephemeral_secret()}\n{API_KEY_ENV}={ephemeral_secret()}\n")
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} may be read by others (mode {stat.S_IMODE(mode):04o}): "
                          f"chmod 600 it, or delete it for new development secrets")
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() in (JWT_SECRET_ENV, API_KEY_ENV) and value.strip():
            values[name.strip()] = value.strip()
    for name, value in values.items():
        if len(value.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"{path}: {name} is {len(value.encode())} bytes; use at least "
                              f"{MIN_SECRET_BYTES}, or delete the file for new development secrets")
    return values


def default() -> Config:
    return Config()


def load(path: str | os.PathLike[str] | None) -> Config:
    """Decode the TOML file at ``path``; None gives the embedded defaults.

    Either way the secret and keys it names (or the environment gives) are
    checked: present where named, and at least 32 bytes.
    """
    if path is None:
        config = default()
        config.check_secrets()
        return config
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror}") from None
    try:
        config = msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}{_where_it_belongs(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    names = [t.name for t in config.templates]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: template defined twice: {', '.join(dupes)} - at $.templates")
    try:
        config.check_secrets()  # key names, keyEnv references, lengths: before anything starts
        config.trusted_networks()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _sections() -> list[tuple[str, type[msgspec.Struct]]]:
    """Every table of the file, as written in TOML, with its Struct."""
    return [("the top level", Config), ("[server]", ServerSection), ("[auth]", AuthSection),
            ("[limits]", Limits), ("[[auth.integratorKeys]]", ApiKey), ("[[templates]]", Template)]


def _where_it_belongs(message: str) -> str:
    """For an unknown key, the section(s) that have it: a key put in the wrong table is the usual cause.

    Compared without case or underscores, so ``queue_limit`` is found as ``queueLimit``.
    """
    m = re.search(r"unknown field `([^`]+)`", message)
    if not m:
        return ""
    key = m.group(1)
    wanted = key.replace("_", "").replace("-", "").lower()
    homes = []
    for section, struct in _sections():
        for field in msgspec.structs.fields(struct):
            if field.encode_name.lower() == wanted:
                homes.append(f"{field.encode_name} in {section}")
    return f" (did you mean {' or '.join(homes)}?)" if homes else ""


def ephemeral_secret() -> str:
    return secrets.token_urlsafe(32)


#: What a reload (SIGHUP, ``deskpush reload``) takes from the file; everything else waits for a restart.
RELOADED = ("templates", "builtinTemplates", "auth.integratorKeys")


def needs_restart(old: Config, new: Config) -> list[str]:
    """The keys (``section.key``, camelCase) whose value differs between ``old`` and ``new`` and that a reload leaves.

    A reload takes ``RELOADED`` only: the listener's settings, the limits
    the engine was made with and the token secret live as long as the process.
    """
    changed = []
    for section in msgspec.structs.fields(Config):
        before, after = getattr(old, section.name), getattr(new, section.name)
        if isinstance(before, msgspec.Struct):
            for fi in msgspec.structs.fields(before):
                key = f"{section.encode_name}.{fi.encode_name}"
                if key not in RELOADED and getattr(before, fi.name) != getattr(after, fi.name):
                    changed.append(key)
        elif section.encode_name not in RELOADED and before != after:
            changed.append(section.encode_name)
    return changed
