"""The relay-wide budget for message bytes in flight, so a burst of large mail cannot
exhaust the process's memory.

A message is *in flight* from the start of its DATA until its first delivery attempt
ends: those are the moments the relay may hold its bytes in memory (buffering a small
body, the first attempt, which starts from memory or reads the whole message back). A
message loaded again for a retry is in flight for that attempt too. Every such message
holds a `Reservation` of its size on the process's `ByteBudget`:

* the SMTP front reserves at DATA (the `SIZE=` the client declared, else as bytes
  arrive) and answers `452 4.3.1` when the budget cannot take the message (`try_reserve`,
  `Reservation.grow`: never waits, a client is waiting);
* the reservation travels with the accepted message to the delivery engine, which
  releases it when the first attempt ends;
* a retry waits for its share (`reserve`, first come first served), so a backlog of
  large messages is delivered a budget's worth at a time instead of all at once.

The limit is `limits.max_bytes_in_flight`, or derived from the container's memory limit
(`default_limit`). Memory stays near the sum of the reservations: the front streams large
bodies to the spool (`data_sink`), and the SMTP transport sends the body in chunks
(`upstreams.smtp_pipelining.write_data`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from mailrelay.relay.config import ApiUpstream, RelayConfig, RouteConfig

__all__ = [
    "ByteBudget",
    "Reservation",
    "budget_limit",
    "cgroup_memory_limit",
    "charge",
    "cost_factor",
    "default_limit",
    "parse_cgroup_limit",
]

log = logging.getLogger(__name__)

# Share of the container's memory limit the budget may take: what a message in flight
# costs beyond its size (the first attempt's chunk buffers, an HTTP provider's encoding,
# allocator slack) and the process itself (~45 MB) need the rest.
_MEMORY_SHARE = 4
# Without a known memory limit: room for this many messages of the largest size at once.
_MESSAGES_WITHOUT_LIMIT = 4
_CGROUP_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
# cgroup v1 reports "no limit" as a huge page-aligned number.
_NO_LIMIT_ABOVE = 1 << 60


def parse_cgroup_limit(text: str) -> int | None:
    """The byte limit in a cgroup memory file's text; None for `max` or no real limit."""
    value = text.strip()
    if not value or value == "max":
        return None
    try:
        limit = int(value)
    except ValueError:
        return None
    return limit if 0 < limit < _NO_LIMIT_ABOVE else None


def cgroup_memory_limit(files: tuple[Path, ...] = _CGROUP_FILES) -> int | None:
    """This container's memory limit in bytes, if the cgroup file system shows one."""
    for path in files:
        try:
            return parse_cgroup_limit(path.read_text())
        except OSError:
            continue
    return None


def default_limit(*, memory_limit: int | None, max_message_size: int, workers: int) -> int:
    """The budget per process when the config sets none.

    A quarter of the container's memory limit shared by the worker processes, or room for
    four messages of the largest size when there is no limit; never less than one
    message of the largest size, which must always fit.
    """
    if memory_limit is None:
        derived = _MESSAGES_WITHOUT_LIMIT * max_message_size
    else:
        derived = memory_limit // (_MEMORY_SHARE * max(1, workers))
    return max(derived, max_message_size)


def budget_limit(config: RelayConfig, memory_limit: int | None) -> int:
    """The budget of one process for `config`: its `limits.max_bytes_in_flight`, else
    `default_limit` for a container with `memory_limit` (see `cgroup_memory_limit`)."""
    limits = config.limits
    if limits.max_bytes_in_flight is not None:
        return limits.max_bytes_in_flight
    return default_limit(
        memory_limit=memory_limit,
        max_message_size=limits.max_message_size,
        workers=config.listener.workers,
    )


def cost_factor(routes: Iterable[RouteConfig]) -> float:
    """How many times its size a message taking `routes` is charged: 1 for SMTP routes,
    more for HTTP providers that encode the message while building their request
    (`providers.limits.BUILD_MEMORY_FACTORS`)."""
    factor = 1.0
    for route in routes:
        if any(isinstance(u, ApiUpstream) for u in (route.upstream, *route.fallbacks)):
            # The providers package loads every provider SDK: only for HTTP routes.
            from mailrelay.relay.upstreams.providers.limits import build_memory_factor  # noqa: PLC0415

            factor = max(factor, build_memory_factor(route))
    return factor


def charge(size: int, factor: float) -> int:
    """The bytes charged for a message of `size` at `factor`."""
    return size if factor == 1.0 else math.ceil(size * factor)


class Reservation:
    """Bytes of one message held on the budget; `release` gives them back (idempotent)."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: ByteBudget, size: int) -> None:
        self._budget: ByteBudget | None = budget
        self.size = size

    @property
    def released(self) -> bool:
        """Whether the bytes went back to the budget."""
        return self._budget is None

    def grow(self, extra: int) -> bool:
        """Take `extra` more bytes if the budget has them now; False (nothing taken) if not."""
        budget = self._budget
        if budget is None:
            raise RuntimeError("grow on a released reservation")
        if extra <= 0:
            return True
        if not budget.fits(extra):
            return False
        budget.take(extra)
        self.size += extra
        return True

    def release(self) -> None:
        """Give the bytes back (a second call does nothing)."""
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.give_back(self.size)


class ByteBudget:
    """How many message bytes this process may hold in flight; see the module docstring.

    Lives on the event loop (no locks). `on_change(used, limit)` is told of every change,
    for the gauges.
    """

    def __init__(self, limit: int, *, on_change: Callable[[int, int], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("the budget for bytes in flight must be at least one byte")
        self._limit = limit
        self._used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._on_change = on_change
        self._report()

    @property
    def limit(self) -> int:
        """The budget in bytes."""
        return self._limit

    @property
    def used(self) -> int:
        """Bytes reserved now."""
        return self._used

    def set_limit(self, limit: int) -> None:
        """A new limit (config reload); reservations held stay, waiters may now fit."""
        if limit < 1:
            raise ValueError("the budget for bytes in flight must be at least one byte")
        self._limit = limit
        self._report()
        self._grant()

    def fits(self, size: int) -> bool:
        """Whether `size` more bytes may be taken right now without waiting."""
        return not self._waiters and self._used + size <= self._limit

    def try_reserve(self, size: int) -> Reservation | None:
        """A reservation of `size` bytes now, or None if the budget cannot take it (the
        front then answers 452 4.3.1). Never jumps the queue of `reserve` waiters. A
        message larger than the whole budget (an HTTP provider's encoding counts) gets it
        when nothing else is reserved, or it could never be accepted."""
        if not self.fits(size) and not (self._used == 0 and not self._waiters):
            return None
        self.take(size)
        return Reservation(self, size)

    async def reserve(self, size: int) -> Reservation:
        """A reservation of `size` bytes, waiting first come first served until it fits.

        A message larger than the whole budget (it shrank in a reload) gets it once
        nothing else is reserved, so it is never stuck.
        """
        if self.fits(size) or (self._used == 0 and not self._waiters):
            self.take(size)
            return Reservation(self, size)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                # Granted just as we were cancelled: give the bytes back.
                self.give_back(size)
            else:
                with contextlib.suppress(ValueError):  # `_grant` drops cancelled waiters
                    self._waiters.remove(entry)
                self._grant()
            raise
        return Reservation(self, size)

    # -- bookkeeping (Reservation and the methods above) ---------------------------------

    def take(self, size: int) -> None:
        """Count `size` bytes as reserved (callers checked that they may)."""
        self._used += size
        self._report()

    def give_back(self, size: int) -> None:
        """Count `size` reserved bytes as free again, and wake waiters that now fit."""
        self._used -= size
        self._report()
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self._used + size > self._limit and self._used > 0:
                return
            self._waiters.popleft()
            self.take(size)
            future.set_result(None)

    def _report(self) -> None:
        if self._on_change is not None:
            self._on_change(self._used, self._limit)
