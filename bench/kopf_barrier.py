"""Benchmark: kopf's start-up barrier (index pre-population) with n objects, with and without
the override in ``operator/kopf_patches.py``.

Why: at start-up kopf makes a toggle per listed object and the object's worker, once it has
indexed the object, drops it and waits for all of them (``ToggleSet``); stock kopf wakes
every waiter on every toggle added or dropped. This replays exactly that sequence (the
watcher adds a toggle and spawns a worker per object, as objects arrive) and prints the
time until every worker is released. It asserts nothing.

Run: `.venv/bin/python bench/kopf_barrier.py [--objects 1000 2000 10000] [--stock-max 2000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from kopf._cogs.aiokits import aiotoggles

from mailrelay.operator import kopf_patches


async def barrier(objects: int) -> float:
    """Seconds until every worker of ``objects`` listed objects passes the barrier."""
    toggles = aiotoggles.ToggleSet(all)
    listing = await toggles.make_toggle(name="the kind's listing")

    async def worker(toggle: aiotoggles.Toggle) -> None:
        await asyncio.sleep(0)  # indexing the object
        await toggles.drop_toggle(toggle)
        await toggles.wait_for(True)

    started = time.perf_counter()
    workers = []
    for index in range(objects):
        toggle = await toggles.make_toggle(name=str(index))
        workers.append(asyncio.create_task(worker(toggle)))
        await asyncio.sleep(0)  # the next object arrives from the watch
    await toggles.drop_toggle(listing)
    await asyncio.gather(*workers)
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--objects", type=int, nargs="+", default=[1000, 2000, 10000, 50000])
    parser.add_argument(
        "--stock-max", type=int, default=2000, help="largest n to run on stock kopf (quadratic)"
    )
    args = parser.parse_args(argv)
    stock = {n: asyncio.run(barrier(n)) for n in args.objects if n <= args.stock_max}
    if not kopf_patches.apply():
        print("kopf is not the version kopf_patches is written for; nothing to compare")
        return 1
    patched = {n: asyncio.run(barrier(n)) for n in args.objects}
    print(f"{'objects':>8} {'stock kopf s':>13} {'with kopf_patches s':>20}")
    for n in args.objects:
        before = f"{stock[n]:.2f}" if n in stock else "-"
        print(f"{n:>8} {before:>13} {patched[n]:>20.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
