"""Agent tokens (HS256 JWTs) and integrator API keys.

An agent token is a JWT whose ``sub`` is the agent id, signed with the server's
secret and always carrying ``exp``. Integrator API keys are compared in
constant time against every configured key, so timing tells nothing about
which key, or how much of one, matched.
"""

from __future__ import annotations

import hmac
import time

import jwt

__all__ = ["AgentTokens", "ApiKeys"]

ALGORITHM = "HS256"


class AgentTokens:
    def __init__(self, secret: str, *, leeway: float = 5.0) -> None:
        if not secret:
            raise ValueError("an agent token secret is required")
        self._secret = secret
        self._leeway = leeway

    def issue(self, agent_id: str, ttl: float = 12 * 3600, *, now: float | None = None) -> str:
        """A token for ``agent_id`` valid for ``ttl`` seconds."""
        if not agent_id:
            raise ValueError("agent id must not be empty")
        now = time.time() if now is None else now
        claims = {"sub": agent_id, "iat": int(now), "exp": int(now + ttl)}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> str | None:
        """The agent id of a valid token, or None (never says why: no oracle)."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub"]},
                leeway=self._leeway,
            )
        except jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 128:
            return None
        return sub


class ApiKeys:
    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = [(name, key.encode()) for name, key in keys.items()]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def replace(self, keys: dict[str, str]) -> None:
        """Check against ``keys`` from now on (a reload of the configuration).

        Only handshakes and hellos after this call see the change:
        connections already authenticated stay, whatever key they used.
        """
        self._keys = [(name, key.encode()) for name, key in keys.items()]

    def names(self) -> list[str]:
        """The configured keys' names (never the keys)."""
        return [name for name, _ in self._keys]

    def check(self, presented: str) -> str | None:
        """The name of the key ``presented`` matches, or None."""
        given = presented.encode()
        found = None
        for name, key in self._keys:
            # Compare against every key, no early exit.
            if hmac.compare_digest(given, key) and found is None:
                found = name
        return found

    def check_bearer(self, header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.check(value.strip())
