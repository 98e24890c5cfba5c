"""The override of kopf's start-up barrier: the version it is written for, and what it saves."""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from typing import Any

import pytest
from kopf._cogs.aiokits import aiotoggles

from mailrelay.operator import kopf_patches

STOCK = {
    name: getattr(aiotoggles.ToggleSet, name)
    for name in ("make_toggle", "drop_toggle", "drop_toggles")
}


def test_kopf_is_the_version_the_patches_are_written_for() -> None:
    """On another kopf, read its queueing/processing/aiotoggles again before moving the pin."""
    assert version("kopf") == kopf_patches.KOPF_VERSION


@pytest.fixture
def patched() -> Any:
    assert kopf_patches.apply()
    yield
    for name, method in STOCK.items():
        setattr(aiotoggles.ToggleSet, name, method)


async def _barrier(objects: int) -> int:
    """kopf's start-up sequence; how often the waiters looked at the set's state."""
    toggles = aiotoggles.ToggleSet(all)
    looks = 0
    stock_is_on = toggles.is_on

    def is_on() -> bool:
        nonlocal looks
        looks += 1
        return stock_is_on()

    toggles.is_on = is_on  # type: ignore[method-assign]
    listing = await toggles.make_toggle(name="listing")

    async def worker(toggle: aiotoggles.Toggle) -> None:
        await asyncio.sleep(0)
        await toggles.drop_toggle(toggle)
        await toggles.wait_for(True)

    workers = []
    for index in range(objects):
        workers.append(asyncio.create_task(worker(await toggles.make_toggle(name=str(index)))))
        await asyncio.sleep(0)
    await toggles.drop_toggle(listing)
    async with asyncio.timeout(30):
        await asyncio.gather(*workers)
    return looks


async def test_the_barrier_wakes_waiters_only_when_it_opens(patched: None) -> None:
    looks = await _barrier(300)
    # Each worker looks when it starts waiting and once when the barrier opens; the patched
    # make/drop look twice each. Stock kopf: every make and drop wakes every waiter (~90,000).
    assert looks < 10 * 300


async def test_the_barrier_still_opens_and_closes(patched: None) -> None:
    toggles = aiotoggles.ToggleSet(all)
    first = await toggles.make_toggle(name="a")
    second = await toggles.make_toggle(name="b")
    waiter = asyncio.create_task(toggles.wait_for(True))
    await toggles.drop_toggle(first)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await toggles.drop_toggles([second])
    async with asyncio.timeout(5):
        await waiter
    closing = asyncio.create_task(toggles.wait_for(False))
    await asyncio.sleep(0.01)
    await toggles.make_toggle(name="c")
    async with asyncio.timeout(5):
        await closing


async def test_a_single_toggle_waiter_still_wakes(patched: None) -> None:
    """ToggleSet(any) with toggles turned on and off (kopf's pause): unchanged behaviour."""
    toggles = aiotoggles.ToggleSet(any)
    pause = await toggles.make_toggle(name="peering")
    on = asyncio.create_task(pause.wait_for(True))
    paused = asyncio.create_task(toggles.wait_for(True))
    await toggles.make_toggle(name="other")
    await pause.turn_to(True)
    async with asyncio.timeout(5):
        await asyncio.gather(on, paused)
