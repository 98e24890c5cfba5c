"""The budget for bytes in flight (`budget.py`) and its default, as pure data."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailrelay.relay.budget import (
    ByteBudget,
    budget_limit,
    cgroup_memory_limit,
    charge,
    cost_factor,
    default_limit,
    parse_cgroup_limit,
)
from mailrelay.relay.config import ConfigError, RelayConfig, RouteConfig, parse_config

MIB = 1 << 20


def test_try_reserve_grow_and_release_count_every_byte() -> None:
    seen: list[tuple[int, int]] = []
    budget = ByteBudget(100, on_change=lambda used, limit: seen.append((used, limit)))
    first = budget.try_reserve(60)
    assert first is not None and budget.used == 60
    assert budget.try_reserve(41) is None  # would exceed: refused, nothing taken
    assert budget.used == 60
    assert first.grow(40) and budget.used == 100
    assert not first.grow(1) and first.size == 100
    first.release()
    first.release()  # idempotent
    assert budget.used == 0 and first.released
    assert seen[0] == (0, 100) and seen[-1] == (0, 100)
    with pytest.raises(RuntimeError):
        first.grow(1)


async def test_reserve_waits_first_come_first_served_and_try_does_not_jump_the_queue() -> None:
    budget = ByteBudget(100)
    held = budget.try_reserve(90)
    assert held is not None
    big = asyncio.create_task(budget.reserve(50))
    small = asyncio.create_task(budget.reserve(5))
    await asyncio.sleep(0)
    assert not big.done() and not small.done()  # 5 would fit, but 50 waits before it
    assert budget.try_reserve(5) is None  # a waiter is queued: the front must not jump it
    held.release()
    big_reservation = await big
    small_reservation = await small
    assert budget.used == 55
    big_reservation.release()
    small_reservation.release()
    assert budget.used == 0


async def test_a_message_larger_than_the_budget_gets_it_once_nothing_else_is_reserved() -> None:
    budget = ByteBudget(100)
    held = budget.try_reserve(10)
    assert held is not None
    oversized = asyncio.create_task(budget.reserve(250))
    await asyncio.sleep(0)
    assert not oversized.done()
    held.release()
    reservation = await oversized
    assert budget.used == 250
    reservation.release()
    assert budget.used == 0


async def test_a_cancelled_waiter_takes_nothing_and_lets_the_next_one_in() -> None:
    budget = ByteBudget(100)
    held = budget.try_reserve(80)
    assert held is not None
    first = asyncio.create_task(budget.reserve(50))
    second = asyncio.create_task(budget.reserve(20))
    await asyncio.sleep(0)
    first.cancel()
    reservation = await second  # 20 fits beside 80 once 50 is gone from the queue
    assert budget.used == 100
    held.release()
    reservation.release()
    assert budget.used == 0
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_larger_limit_on_reload_lets_waiters_in() -> None:
    budget = ByteBudget(100)
    held = budget.try_reserve(100)
    assert held is not None
    waiter = asyncio.create_task(budget.reserve(50))
    await asyncio.sleep(0)
    budget.set_limit(150)
    reservation = await waiter
    assert budget.used == 150
    reservation.release()
    held.release()


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("max\n", None),
        ("536870912\n", 512 * MIB),
        ("9223372036854771712\n", None),  # cgroup v1's "no limit"
        ("", None),
        ("garbage", None),
    ],
)
def test_cgroup_limit_parsing(text: str, limit: int | None) -> None:
    assert parse_cgroup_limit(text) == limit


def test_cgroup_limit_is_read_from_the_first_file_that_exists(tmp_path: Path) -> None:
    present = tmp_path / "memory.max"
    present.write_text("268435456\n")
    assert cgroup_memory_limit((tmp_path / "absent", present)) == 256 * MIB
    assert cgroup_memory_limit((tmp_path / "absent",)) is None


@pytest.mark.parametrize(
    ("memory_limit", "max_message_size", "workers", "expected"),
    [
        (512 * MIB, 25 * MIB, 1, 128 * MIB),  # a quarter of the pod's limit
        (512 * MIB, 25 * MIB, 2, 64 * MIB),  # shared by the workers
        (64 * MIB, 25 * MIB, 1, 25 * MIB),  # never below one message of the largest size
        (None, 25 * MIB, 1, 100 * MIB),  # no limit known: four of the largest messages
    ],
)
def test_default_limit(
    memory_limit: int | None, max_message_size: int, workers: int, expected: int
) -> None:
    assert (
        default_limit(memory_limit=memory_limit, max_message_size=max_message_size, workers=workers)
        == expected
    )


def _config(limits: dict[str, int], workers: int = 1) -> RelayConfig:
    return RelayConfig.model_validate(
        {
            "hostname": "relay.test",
            "listener": {"workers": workers},
            "auth": {"required": False},
            "spool": {"directory": "/tmp/spool"},
            "limits": limits,
            "routes": [],
            "allowed_networks": ["10.0.0.0/8"],
        }
    )


def test_budget_limit_takes_the_config_else_the_default() -> None:
    assert budget_limit(_config({"max_bytes_in_flight": 64 * MIB}), 512 * MIB) == 64 * MIB
    assert budget_limit(_config({}, workers=4), 512 * MIB) == 32 * MIB


def test_config_refuses_a_budget_smaller_than_the_largest_message() -> None:
    with pytest.raises(ConfigError, match=r"max_bytes_in_flight .* must be at least"):
        parse_config(
            "hostname: relay.test\nauth: {required: false}\nspool: {directory: /tmp/s}\n"
            "limits: {max_message_size: 2000000, max_bytes_in_flight: 1000000}\nroutes: []\n"
            "allowed_networks: [10.0.0.0/8]\n"
        )


def test_a_message_larger_than_the_budget_is_taken_only_when_nothing_else_is() -> None:
    budget = ByteBudget(100)
    oversized = budget.try_reserve(300)  # an HTTP provider's encoding made it this large
    assert oversized is not None and budget.used == 300
    assert budget.try_reserve(1) is None
    oversized.release()
    small = budget.try_reserve(1)
    assert small is not None
    assert budget.try_reserve(300) is None  # not while anything else is in flight


def _route(upstream: dict[str, str], *fallbacks: dict[str, str]) -> RouteConfig:
    return RouteConfig.model_validate(
        {"name": "r", "upstream": upstream, "fallbacks": list(fallbacks)}
    )


SMTP = {"type": "smtp", "name": "smarthost", "host": "mx.example.com"}
SES = {"type": "api", "name": "ses", "provider": "ses", "region": "eu-west-1"}
SENDGRID = {"type": "api", "name": "sendgrid", "provider": "sendgrid"}
MAILGUN = {"type": "api", "name": "mailgun", "provider": "mailgun", "domain": "example.com"}


@pytest.mark.parametrize(
    ("routes", "factor"),
    [
        ([], 1.0),
        ([_route(SMTP)], 1.0),
        ([_route(MAILGUN)], 1.0),  # the message goes out as a multipart file, as it is
        ([_route(SMTP, SES)], 4.0),  # a fallback may build the request too
        ([_route(SMTP), _route(SENDGRID)], 8.0),  # the costliest route of the message
    ],
)
def test_cost_factor_follows_what_the_routes_transports_build(
    routes: list[RouteConfig], factor: float
) -> None:
    assert cost_factor(routes) == factor


def test_charge() -> None:
    assert charge(1000, 1.0) == 1000
    assert charge(1000, 4.0) == 4000
    assert charge(3, 2.5) == 8  # rounded up: never under-charged
