"""Who may call the gateway, and how often: API keys known only by their SHA-256, per-key limits.

Keys are random 32-byte tokens (``sdagent gateway hash-key`` makes one), so a plain SHA-256 is the
right hash: there is nothing to brute-force that a slow password hash would protect.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from sdagent.errors import ConfigError, GatewayError
from sdagent.gateway.config import GatewayConfig

ANONYMOUS = "anonymous"
KEY_PREFIX = "sdk_"


@dataclass(frozen=True)
class Caller:
    name: str
    rate_per_s: int
    burst: int | None = None

    def limit(self) -> RateLimitItemPerSecond:
        """rate_per_s on average; a burst as a longer window holding as many seconds of rate."""
        window_s = math.ceil((self.burst or self.rate_per_s) / self.rate_per_s)
        return RateLimitItemPerSecond(self.rate_per_s * window_s, window_s)


class NotAuthenticated(GatewayError):
    """No key, or one this gateway does not know."""


class RateLimited(GatewayError):
    """Raised when a key has used up its rate; ``retry_after_s`` says when to come back."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"rate limit exceeded; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


def new_key() -> tuple[str, str]:
    """A new API key and the SHA-256 hex digest to put in ``[[gateway.api_keys]]``."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Gatekeeper:
    """Authenticates a request's key and applies its caller's rate limit."""

    def __init__(self, config: GatewayConfig) -> None:
        if not config.api_keys and not config.allow_anonymous:
            raise ConfigError("gateway.api_keys", "no API key configured; add one (sdagent gateway hash-key) "
                              "or set gateway.allow_anonymous = true explicitly")  # fmt: skip
        self._callers = {key.sha256: Caller(key.name, key.rate_per_s, key.burst) for key in config.api_keys}
        self._anonymous = Caller(ANONYMOUS, config.anonymous_rate_per_s) if config.allow_anonymous else None
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._limits = {caller.name: caller.limit()
                        for caller in [*self._callers.values(), *([self._anonymous] if self._anonymous else [])]}  # fmt: skip

    def authenticate(self, authorization: str | None, api_key: str | None) -> Caller:
        """The caller of ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; NotAuthenticated if
        neither names a known key (and anonymous calls are not allowed)."""
        key = api_key or _bearer(authorization)
        if key is None:
            if self._anonymous is not None:
                return self._anonymous
            raise NotAuthenticated("an API key is required: Authorization: Bearer KEY")
        digest = hash_key(key)
        for known, caller in self._callers.items():
            if hmac.compare_digest(known, digest):
                return caller
        raise NotAuthenticated("unknown API key")

    def admit(self, caller: Caller) -> None:
        """Count one request against the caller's limit; RateLimited when it is used up."""
        item = self._limits[caller.name]
        if not self._limiter.hit(item, caller.name):
            reset_at, _remaining = self._limiter.get_window_stats(item, caller.name)
            raise RateLimited(max(1, int(reset_at - time.time() + 0.999)))


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
