"""Token buckets with an injected clock: burst, refill, waiting time, and reload behaviour."""

from __future__ import annotations

import pytest

from mailrelay.relay.config import RateLimit, RouteConfig, SmtpUpstream
from mailrelay.relay.ratelimit import RouteRateLimits, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, 3, clock=clock)

    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert bucket.seconds_until() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.try_acquire()
    assert not bucket.try_acquire()
    clock.now += 100
    assert bucket.tokens == 3  # never more than the burst


def test_clock_going_backwards_adds_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1.0, 1, clock=clock)
    assert bucket.try_acquire()
    clock.now -= 50
    assert not bucket.try_acquire()


def test_invalid_bucket() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def route(name: str, limit: RateLimit | None) -> RouteConfig:
    return RouteConfig(
        name=name,
        upstream=SmtpUpstream(type="smtp", name=f"up-{name}", host="127.0.0.1"),
        rate_limit=limit,
    )


def test_route_limits_survive_a_reload_unless_changed() -> None:
    clock = FakeClock()
    limit = RateLimit(per_second=1, burst=2)
    limits = RouteRateLimits([route("a", limit), route("free", None)], clock=clock)

    assert limits.try_acquire("a") and limits.try_acquire("a")
    assert not limits.try_acquire("a")
    assert all(limits.try_acquire("free") for _ in range(100))
    assert limits.seconds_until("free") == 0

    # Same limit after a reload: still empty, so a reload cannot reset a limit.
    limits.update([route("a", limit)])
    assert not limits.try_acquire("a")
    # A changed limit starts with a full bucket.
    limits.update([route("a", RateLimit(per_second=1, burst=5))])
    assert sum(limits.try_acquire("a") for _ in range(10)) == 5
    assert limits.limit("a") == RateLimit(per_second=1, burst=5)
    # A route whose limit is removed is unlimited.
    limits.update([route("a", None)])
    assert limits.try_acquire("a")
