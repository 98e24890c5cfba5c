"""Backoff timing: doubling, cap, jitter bounds, and the maximum-age deadline."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.relay.backoff import backoff_delay, deadline, expired, next_attempt_at
from mailrelay.relay.config import RetryPolicy

POLICY = RetryPolicy(
    initial_backoff_seconds=60, max_backoff_seconds=3600, max_age_seconds=86400, jitter=0
)


def test_doubles_then_caps_without_jitter() -> None:
    delays = [backoff_delay(n, POLICY) for n in range(1, 10)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert backoff_delay(10_000, POLICY) == 3600


@given(attempts=st.integers(min_value=0, max_value=200), seed=st.integers())
def test_jitter_stays_in_bounds(attempts: int, seed: int) -> None:
    policy = RetryPolicy(
        initial_backoff_seconds=10, max_backoff_seconds=1000, max_age_seconds=1e6, jitter=0.2
    )
    base = min(10 * 2.0 ** max(attempts - 1, 0), 1000)
    delay = backoff_delay(attempts, policy, rng=random.Random(seed))
    assert base * 0.8 - 1e-9 <= delay <= min(base * 1.2, 1000) + 1e-9


def test_jitter_spreads_delays() -> None:
    policy = RetryPolicy(
        initial_backoff_seconds=100, max_backoff_seconds=1000, max_age_seconds=1e6, jitter=0.5
    )
    rng = random.Random(7)
    delays = {round(backoff_delay(1, policy, rng=rng), 3) for _ in range(20)}
    assert len(delays) > 10


def test_next_attempt_and_deadline() -> None:
    received = 1000.0
    assert next_attempt_at(received, received + 10, 1, POLICY) == received + 10 + 60
    # Close to the deadline, the last retry is pulled in to the deadline itself.
    late = deadline(received, POLICY) - 5
    assert next_attempt_at(received, late, 9, POLICY) == deadline(received, POLICY)
    # At or past it, the failure is final.
    assert next_attempt_at(received, deadline(received, POLICY), 9, POLICY) is None
    assert expired(received, received + 86400, POLICY)
    assert not expired(received, received + 86399, POLICY)


@pytest.mark.parametrize("attempts", [0, 1])
def test_first_failure_waits_the_initial_delay(attempts: int) -> None:
    assert backoff_delay(attempts, POLICY) == 60
