"""Retry timing for temporary failures: pure functions of the policy and the attempt count.

The delay doubles from `initial_backoff_seconds` per attempt, is capped at
`max_backoff_seconds`, and is spread by +/- `jitter` so that a burst of failures does
not come back as a burst of retries. A recipient is given up on once `max_age_seconds`
have passed since the message was received; the last retry is pulled in to that
deadline so the final verdict comes on time rather than one whole delay later.
"""

from __future__ import annotations

import random

from mailrelay.relay.config import RetryPolicy

__all__ = ["backoff_delay", "deadline", "expired", "next_attempt_at"]


def backoff_delay(attempts: int, policy: RetryPolicy, *, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1 = the first failure)."""
    exponent = max(attempts, 1) - 1
    # Cap the exponent before raising 2 to it: a message retried for days must not overflow.
    base = policy.initial_backoff_seconds * 2.0 ** min(exponent, 64)
    base = min(base, policy.max_backoff_seconds)
    spread = (rng or random).uniform(-policy.jitter, policy.jitter) if policy.jitter else 0.0
    delay = base * (1.0 + spread)
    return max(0.0, min(delay, policy.max_backoff_seconds))


def deadline(received_at: float, policy: RetryPolicy) -> float:
    """The moment after which a still-undelivered recipient is a final failure."""
    return received_at + policy.max_age_seconds


def expired(received_at: float, now: float, policy: RetryPolicy) -> bool:
    """Whether a temporary failure at `now` is final because the message is too old."""
    return now >= deadline(received_at, policy)


def next_attempt_at(
    received_at: float,
    now: float,
    attempts: int,
    policy: RetryPolicy,
    *,
    rng: random.Random | None = None,
) -> float | None:
    """When to try again after a temporary failure at `now`, or None when it is final."""
    if expired(received_at, now, policy):
        return None
    return min(now + backoff_delay(attempts, policy, rng=rng), deadline(received_at, policy))
