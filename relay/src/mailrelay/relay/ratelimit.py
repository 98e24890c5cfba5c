"""Token buckets for per-route rate limits, with an injected clock so tests need no sleeps.

`TokenBucket` is the classic algorithm: `burst` tokens at most, refilled at `per_second`.
`RouteRateLimits` keeps one bucket per route that has a `rate_limit`, and survives a
config reload: a route whose limit did not change keeps its bucket (and so its
current fill), so a reload cannot be used to reset a limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from mailrelay.relay.config import RateLimit, RouteConfig

__all__ = ["RouteRateLimits", "TokenBucket"]


class TokenBucket:
    """`burst` tokens, refilled continuously at `rate` per second."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now

    @property
    def tokens(self) -> float:
        """Tokens available now (fractional while refilling)."""
        self._refill()
        return self._tokens

    def try_acquire(self, n: int = 1) -> bool:
        """Take `n` tokens if they are there; never waits."""
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def seconds_until(self, n: int = 1) -> float:
        """How long until `n` tokens will be available (0 if they are now)."""
        self._refill()
        missing = n - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate


class RouteRateLimits:
    """One bucket per rate-limited route, rebuilt on reload only where the limit changed."""

    def __init__(
        self, routes: Iterable[RouteConfig], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._limits: dict[str, RateLimit] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self.update(routes)

    def update(self, routes: Iterable[RouteConfig]) -> None:
        """Adopt a new route list; unchanged limits keep their current fill."""
        limits = {r.name: r.rate_limit for r in routes if r.rate_limit is not None}
        buckets: dict[str, TokenBucket] = {}
        for name, limit in limits.items():
            old = self._buckets.get(name)
            if old is not None and self._limits.get(name) == limit:
                buckets[name] = old
            else:
                buckets[name] = TokenBucket(limit.per_second, limit.burst, clock=self._clock)
        self._limits = limits
        self._buckets = buckets

    def limit(self, route: str) -> RateLimit | None:
        """The route's configured limit, if any."""
        return self._limits.get(route)

    def try_acquire(self, route: str, n: int = 1) -> bool:
        """Take from the route's bucket; a route without a limit always may send."""
        bucket = self._buckets.get(route)
        return True if bucket is None else bucket.try_acquire(n)

    def seconds_until(self, route: str, n: int = 1) -> float:
        """How long the route must wait for `n` tokens (0 without a limit)."""
        bucket = self._buckets.get(route)
        return 0.0 if bucket is None else bucket.seconds_until(n)
