"""Agent tokens (HS256 JWTs) and integrator API keys.

An agent token is a JWT whose ``sub`` is the agent id, signed with the server's
secret and always carrying ``exp``. Integrator API keys are compared in
constant time against every configured key, so timing tells nothing about
which key, or how much of one, matched.

Secrets and keys are at least ``MIN_SECRET_BYTES`` (32) long: RFC 7518
section 3.2 asks for an HS256 key of at least 256 bits, and an API key that
short can be guessed no faster than the server answers.
"""

from __future__ import annotations

import hmac
import time

import jwt

__all__ = ["AgentTokens", "ApiKeys", "MIN_SECRET_BYTES"]

ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32


def _check_length(what: str, secret: str) -> None:
    n = len(secret.encode())
    if n < MIN_SECRET_BYTES:
        raise ValueError(f"{what} is {n} bytes; use at least {MIN_SECRET_BYTES}")


class AgentTokens:
    """Issues and checks agent tokens.

    Besides the signature, ``sub`` and ``exp``, a token may have to carry an
    ``iss`` equal to ``issuer`` and an ``aud`` naming ``audience`` (PyJWT's
    own checks), and, with ``max_lifetime`` (seconds), an ``iat`` no more
    than that before its ``exp`` and not in the future: a token minted for a
    year is refused even though it is signed, so a leaked one is not good
    for long. ``issue`` makes tokens that pass all of these.
    """

    def __init__(self, secret: str, *, leeway: float = 5.0, issuer: str | None = None,
                 audience: str | None = None, max_lifetime: float | None = None) -> None:
        if not secret:
            raise ValueError("an agent token secret is required")
        _check_length("the agent token secret", secret)
        self._secret = secret
        self._leeway = leeway
        self.issuer = issuer
        self.audience = audience
        self.max_lifetime = max_lifetime
        require = ["exp", "sub"]
        if issuer is not None:
            require.append("iss")
        if audience is not None:
            require.append("aud")
        if max_lifetime is not None:
            require.append("iat")
        self._options = {"require": require}

    def issue(self, agent_id: str, ttl: float = 12 * 3600, *, now: float | None = None) -> str:
        """A token for ``agent_id`` valid for ``ttl`` seconds (at most ``max_lifetime``)."""
        if not agent_id:
            raise ValueError("agent id must not be empty")
        if self.max_lifetime is not None and ttl > self.max_lifetime:
            raise ValueError(f"a token valid {ttl:g} s is longer than the longest allowed, {self.max_lifetime:g} s")
        now = time.time() if now is None else now
        claims: dict[str, object] = {"sub": agent_id, "iat": int(now), "exp": int(now + ttl)}
        if self.issuer is not None:
            claims["iss"] = self.issuer
        if self.audience is not None:
            claims["aud"] = self.audience
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> str | None:
        """The agent id of a valid token, or None (never says why: no oracle)."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options=self._options,
                leeway=self._leeway,
                issuer=self.issuer,
                audience=self.audience,
            )
        except jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 128:
            return None
        if self.max_lifetime is not None and not self._short_lived(claims):
            return None
        return sub

    def _short_lived(self, claims: dict) -> bool:
        """Whether ``exp`` is at most ``max_lifetime`` after ``iat``, and ``iat`` not in the future.

        (PyJWT checked both are numbers; from 2.10 it also refuses a future ``iat``.)
        """
        assert self.max_lifetime is not None
        try:
            iat, exp = float(claims["iat"]), float(claims["exp"])
        except (TypeError, ValueError):
            return False
        return exp - iat <= self.max_lifetime and iat <= time.time() + self._leeway


class ApiKeys:
    def __init__(self, keys: dict[str, str]) -> None:
        for name, key in keys.items():
            _check_length(f"integrator key {name!r}", key)
        self._keys = [(name, key.encode()) for name, key in keys.items()]

    def __bool__(self) -> bool:
        return bool(self._keys)

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
