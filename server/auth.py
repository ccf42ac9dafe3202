"""Agent tokens (HS256 JWTs) and integrator API keys.

An agent token is a JWT whose ``sub`` is the agent id, signed with the server's
secret and always carrying ``exp``. Integrator API keys are compared in
constant time against every configured key, so timing tells nothing about
which key, or how much of one, matched.

Secrets and keys are at least ``MIN_SECRET_BYTES`` (32) long: RFC 7518
section 3.2 asks for an HS256 key of at least 256 bits, and an API key that
short can be guessed no faster than the server answers.

``FailureThrottle`` counts failed integrator authentications per source
address (``source_address``: the peer, or the client a trusted proxy names)
and refuses an address that fails too often for a while, so guessing keys
from one address goes at a few guesses a minute, not a thousand a second.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Sequence

import jwt

__all__ = ["AgentTokens", "ApiKeys", "FailureThrottle", "MIN_SECRET_BYTES", "Network", "source_address"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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

    def replace(self, keys: dict[str, str]) -> None:
        """Check against ``keys`` from now on (a reload of the configuration).

        Only handshakes and hellos after this call see the change:
        connections already authenticated stay, whatever key they used.

        Raises:
            ValueError: a key is too short (nothing is replaced).
        """
        for name, key in keys.items():
            _check_length(f"integrator key {name!r}", key)
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


# --------------------------------------------------------------------------
# Failed authentications per source address


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:192.0.2.7 is 192.0.2.7
    return ip


def source_address(peer: str, forwarded_for: str | None = None, trusted: Sequence[Network] = ()) -> str:
    """The key of a client's address in the throttle: the address, or its /64 for IPv6.

    ``peer`` is the TCP peer's address. When it is one of the ``trusted``
    proxies, the client is the rightmost ``X-Forwarded-For`` entry that is
    not itself a trusted proxy (each proxy appends the address it got the
    request from; what is left of it, the client may have written). An
    IPv6 client is counted by its /64, the least a network hands one host.
    """
    ip = _ip(peer)
    if ip is None:
        return peer
    if forwarded_for and any(ip in net for net in trusted):
        for entry in reversed(forwarded_for.split(",")):
            hop = _ip(entry)
            if hop is None:
                break  # a malformed entry from our own proxy: keep the proxy's address
            ip = hop
            if not any(hop in net for net in trusted):
                break
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Failures:
    __slots__ = ("count", "window_end", "blocked_until")

    def __init__(self, window_end: float) -> None:
        self.count = 0
        self.window_end = window_end
        self.blocked_until = 0.0

    def expires(self) -> float:
        return max(self.window_end, self.blocked_until)


class FailureThrottle:
    """Failed authentications per source address, in a table of at most ``capacity`` addresses.

    An address that fails ``limit`` times within ``window`` seconds (counted
    from its first failure) is refused for ``window`` seconds from the last
    of them; attempts while it is refused are not checked, so they neither
    count nor can succeed. Then it starts afresh. A success does not clear
    the count: a client holding one valid key could otherwise reset it
    between guesses at the others. ``limit`` 0 turns the throttle off.

    The table forgets an address once its window and refusal are over, and
    when full, the address that failed least recently (only an attacker
    spread over ``capacity`` addresses gets there, and each of those has
    its own ``limit`` anyway). Times are seconds of any monotonic clock.
    """

    def __init__(self, limit: int, window: float, *, capacity: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.capacity = capacity
        self._table: OrderedDict[str, _Failures] = OrderedDict()  # least recently failed first

    def __len__(self) -> int:
        return len(self._table)

    def refused_for(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again (0: it may now)."""
        entry = self._table.get(address)
        if entry is None or entry.blocked_until <= now:
            return 0.0
        return entry.blocked_until - now

    def failed(self, address: str, now: float) -> bool:
        """Count a failure of ``address``; True if that made it refused."""
        if not self.limit:
            return False
        table = self._table
        entry = table.get(address)
        if entry is None or now >= entry.expires():
            if entry is not None:
                del table[address]
            self._make_room(now)
            entry = table[address] = _Failures(now + self.window)
        else:
            table.move_to_end(address)
        entry.count += 1
        if entry.count < self.limit:
            return False
        entry.count = 0
        entry.blocked_until = entry.window_end = now + self.window
        return True

    def _make_room(self, now: float) -> None:
        table = self._table
        while table:
            address, oldest = next(iter(table.items()))
            if now < oldest.expires() and len(table) < self.capacity:
                break
            del table[address]
