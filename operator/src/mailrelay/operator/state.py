"""What the operator keeps in memory per MailRelay, in one place, dropped when the relay goes.

A ``RelayState`` holds everything known about one relay between passes: its pass lock, the
inputs of its last settled pass, the reload marks its pods carry, what our own applies of its
children produced, its place in the work queue (waiting, running, asked again, held) and its
failure count for the backoff. ``RelayStates`` creates a state on first use and ``forget``
drops it once the relay is gone and nothing about it is waiting or running, so the memory
follows the relays that exist, not every relay ever seen.

``retry_delay`` is the backoff rule (pure): a pass that failed is tried again after 1 s,
2 s, 4 s ... capped at the resync period; a pass that succeeds resets it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mailrelay.operator.apply import ChildKey, Remembered

RelayKey = tuple[str, str]  # namespace, name

FIRST_RETRY_SECONDS = 1.0


def retry_delay(failures: int, cap: float, first: float = FIRST_RETRY_SECONDS) -> float:
    """Seconds before the next try after ``failures`` failed passes in a row (>= 1)."""
    if failures < 1:
        raise ValueError("retry_delay is for a relay whose last pass failed")
    # 2**failures overflows a float long before a cap is reached: stop doubling at the cap.
    return min(cap, first * 2.0 ** min(failures - 1, 62))


@dataclass
class RelayState:
    """Everything the operator remembers about one relay between its passes."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # What the last settled pass saw; a resync pass that sees the same skips.
    settled: tuple[Any, ...] | None = None
    # The marks (config hash, Secret versions) the live pods were last seen or made to carry.
    pods_synced: dict[str, str] | None = None
    # The resourceVersion of the hand-off Secret last found owned and complete (handoff.py).
    handoff_secret_version: str | None = None
    # Drain Jobs: the attempt each ordinal's last Job was (drain.py), for the retry backoff.
    drain_attempts: dict[int, int] = field(default_factory=dict)
    # Reports of finished drain Jobs by uid (drain.DrainReport or None), read once each, and
    # the uids whose outcome an Event has told.
    drain_reports: dict[str, Any] = field(default_factory=dict)
    drain_told: set[str] = field(default_factory=set)
    # What our last apply of each child produced (apply.py decides from it).
    applied: dict[ChildKey, Remembered] = field(default_factory=dict)
    # Work queue: the priority of the waiting entry, a pass running, asked again meanwhile.
    pending: int | None = None
    active: bool = False
    dirty: int | None = None
    due: float | None = None  # when the waiting entry became due (monotonic)
    held_until: float = 0.0  # no pass starts before this moment (monotonic)
    # Backoff: failed passes in a row, and the timer of the retry they asked for.
    failures: int = 0
    retry: asyncio.TimerHandle | None = None

    def idle(self) -> bool:
        """Nothing waits, runs or is scheduled for this relay."""
        return (
            self.pending is None
            and not self.active
            and self.dirty is None
            and self.retry is None
            and not self.lock.locked()
        )


@dataclass
class RelayStates:
    """The ``RelayState`` of every relay the operator currently knows, by (namespace, name)."""

    states: dict[RelayKey, RelayState] = field(default_factory=dict)

    def get(self, namespace: str, name: str) -> RelayState:
        """The relay's state, created empty on first use."""
        key = (namespace, name)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = RelayState()
        return state

    def peek(self, namespace: str, name: str) -> RelayState | None:
        """The relay's state if there is one (never creates it)."""
        return self.states.get((namespace, name))

    def forget(self, namespace: str, name: str) -> bool:
        """Drop the relay's state unless something still waits or runs for it."""
        state = self.states.get((namespace, name))
        if state is None or not state.idle():
            return False
        del self.states[(namespace, name)]
        return True

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[RelayKey]:
        return iter(list(self.states))
