"""ClientLimiter as data: admissions, AUTH failure windows, keys, exemptions, memory bound."""

from __future__ import annotations

from typing import Any

import pytest

from mailrelay.relay.client_limits import ClientLimiter, Refusal, client_key
from mailrelay.relay.config import ClientLimitsConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **limits: Any) -> ClientLimiter:
    return ClientLimiter(ClientLimitsConfig.model_validate(limits), clock=clock)


def test_defaults_are_what_a_platform_team_keeps() -> None:
    limits = ClientLimitsConfig()
    assert (limits.max_connections, limits.connection_rate_per_minute) == (50, 0)
    assert (limits.auth_failures, limits.auth_failure_window_seconds) == (10, 300)
    assert (limits.exempt_networks, limits.ipv6_prefix_length) == ([], 64)


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),
        ("2001:db8:1:2::7", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::7", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:2::7", 128, "2001:db8:1:2::7/128"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("/run/smtp.sock", 64, None),
    ],
)
def test_client_keys(ip: str, prefix: int, key: str | None) -> None:
    assert client_key(ip, prefix) == key


def test_concurrent_connections_are_limited_per_client() -> None:
    clock = Clock()
    lim = limiter(clock, max_connections=2)
    first, second = lim.admit("192.0.2.1"), lim.admit("192.0.2.1")
    assert first.key == second.key == "192.0.2.1"
    third = lim.admit("192.0.2.1")
    assert third == type(third)(None, Refusal("connections", 0.0))
    assert lim.admit("192.0.2.2").refusal is None  # another client is unaffected
    lim.release(first.key)
    assert lim.admit("192.0.2.1").refusal is None


def test_ipv6_clients_share_their_slash_64() -> None:
    lim = limiter(Clock(), max_connections=1)
    assert lim.admit("2001:db8::1").refusal is None
    assert lim.admit("2001:db8::2").refusal == Refusal("connections", 0.0)
    assert lim.admit("2001:db8:0:1::1").refusal is None


def test_connection_rate_is_a_bucket_refilled_over_a_minute() -> None:
    clock = Clock()
    lim = limiter(clock, max_connections=0, connection_rate_per_minute=3)
    for _ in range(3):
        admission = lim.admit("192.0.2.1")
        assert admission.refusal is None
        lim.release(admission.key)
    refusal = lim.admit("192.0.2.1").refusal
    assert refusal is not None and refusal.reason == "connection_rate"
    assert refusal.retry_after == pytest.approx(20.0)
    assert lim.admit("192.0.2.9").refusal is None
    clock.now += 20
    assert lim.admit("192.0.2.1").refusal is None


def test_auth_failures_across_sessions_block_until_the_oldest_leaves_the_window() -> None:
    clock = Clock()
    lim = limiter(clock, auth_failures=3, auth_failure_window_seconds=100)
    assert lim.auth_failed("192.0.2.1") is None
    clock.now += 10
    assert lim.auth_failed("192.0.2.1") is None
    clock.now += 10
    assert lim.auth_failed("192.0.2.1") == Refusal("auth_failures", 80.0)
    assert lim.auth_blocked("192.0.2.1") == Refusal("auth_failures", 80.0)
    admission = lim.admit("192.0.2.1")
    assert admission.key is None and admission.refusal == Refusal("auth_failures", 80.0)
    assert lim.auth_blocked("192.0.2.2") is None
    assert lim.admit("192.0.2.2").refusal is None
    clock.now += 80
    assert lim.auth_blocked("192.0.2.1") is None
    assert lim.admit("192.0.2.1").refusal is None
    # One more failure within the window of the other two blocks again.
    assert lim.auth_failed("192.0.2.1") == Refusal("auth_failures", 10.0)


def test_exempt_networks_are_never_limited() -> None:
    lim = limiter(Clock(), max_connections=1, auth_failures=1, exempt_networks=["10.0.0.0/8"])
    for _ in range(5):
        assert lim.admit("10.1.2.3") == type(lim.admit("10.1.2.3"))(None)
        assert lim.auth_failed("10.1.2.3") is None
        assert lim.admit("::ffff:10.1.2.3").refusal is None
    assert lim.auth_blocked("10.1.2.3") is None
    assert len(lim) == 0


def test_reload_keeps_counts_and_applies_new_limits() -> None:
    clock = Clock()
    lim = limiter(clock, max_connections=5, auth_failures=5)
    keys = [lim.admit("192.0.2.1").key for _ in range(3)]
    for _ in range(3):
        lim.auth_failed("192.0.2.1")
    lim.configure(ClientLimitsConfig(max_connections=3, auth_failures=4))
    refusal = lim.admit("192.0.2.1").refusal
    assert refusal is not None and refusal.reason == "connections"
    assert lim.auth_failed("192.0.2.1") is not None  # 4th failure: the new limit
    lim.configure(ClientLimitsConfig(max_connections=3, exempt_networks=["192.0.2.0/24"]))
    assert lim.admit("192.0.2.1").refusal is None
    for key in keys:  # connections admitted before the reload release under their old key
        lim.release(key)


def test_idle_clients_are_forgotten_and_memory_is_bounded() -> None:
    clock = Clock()
    lim = limiter(clock, auth_failures=2, auth_failure_window_seconds=60)
    for n in range(1000):
        admission = lim.admit(f"10.{n // 256}.{n % 256}.1")
        lim.release(admission.key)
    assert len(lim) < 10  # nothing to remember about clients that left
    for n in range(200):
        lim.auth_failed(f"10.9.{n}.1")
    assert len(lim) >= 190  # failures inside the window are remembered...
    clock.now += 61
    for n in range(100):
        lim.admit(f"10.8.{n}.1")  # kept open
    assert len(lim) <= 110  # ...and dropped once they left it

    bounded = ClientLimiter(ClientLimitsConfig(max_connections=1), clock=clock, max_tracked=50)
    for n in range(20):
        assert bounded.admit(f"10.7.0.{n}").refusal is None
    for n in range(500):
        bounded.auth_failed(f"10.6.{n // 256}.{n % 256}")
    assert len(bounded) <= 50
    # Clients holding connections are never forgotten: their count still holds.
    for n in range(20):
        assert bounded.admit(f"10.7.0.{n}").refusal == Refusal("connections", 0.0)


def test_refusal_replies_are_421_4_7_0() -> None:
    assert Refusal("connections", 0).reply("relay.test", "192.0.2.1") == (
        "421 4.7.0 relay.test Error: too many connections from 192.0.2.1"
    )
    assert (
        Refusal("auth_failures", 12.4)
        .reply("relay.test", "2001:db8::/64")
        .endswith("too many authentication failures from 2001:db8::/64, try again in 12 seconds")
    )
