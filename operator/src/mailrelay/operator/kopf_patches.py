"""Every override of kopf's internals, in one place, for exactly the kopf version tested.

kopf 1.45.2 holds every event handler at start-up until each listed object of each indexed
kind is indexed (``_core/reactor/queueing.py`` and ``processing.py``): the watcher adds a
toggle per object to one ``ToggleSet``, the object's worker drops it once indexed and then
waits for the whole set. ``ToggleSet.make_toggle`` and ``drop_toggle`` wake every waiter on
each call, and each waiter takes the set's lock in turn to look again: with n objects that is
n^2 lock hand-overs. Measured (``bench/kopf_barrier.py``): 1,000 objects 2.9 s, 2,000 objects
35 s, 3,000 Secrets not indexed after 4 minutes; a restart at 1,000 relays (about 9,000
watched objects) would not finish.

The override wakes the waiters only when adding or dropping a toggle changes the set's state.
That is the only thing its waiters wait for (``ToggleSet.wait_for``); a waiter on one toggle
(``Toggle.wait_for``) waits for that toggle's own state, which adding or dropping others does
not change, and ``Toggle.turn_to`` still wakes everyone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib.metadata import version

from kopf._cogs.aiokits import aiotoggles

KOPF_VERSION = "1.45.2"  # the version this module was written for and the tests cover
log = logging.getLogger(__name__)


async def _make_toggle(
    self: aiotoggles.ToggleSet, __val: bool = False, *, name: str | None = None
) -> aiotoggles.Toggle:
    toggle = aiotoggles.Toggle(__val, name=name, condition=self._condition)
    async with self._condition:
        before = self.is_on()
        self._toggles.add(toggle)
        if self.is_on() != before:
            self._condition.notify_all()
    return toggle


async def _drop_toggle(self: aiotoggles.ToggleSet, toggle: aiotoggles.Toggle) -> None:
    async with self._condition:
        before = self.is_on()
        self._toggles.discard(toggle)
        if self.is_on() != before:
            self._condition.notify_all()


async def _drop_toggles(self: aiotoggles.ToggleSet, toggles: Iterable[aiotoggles.Toggle]) -> None:
    async with self._condition:
        before = self.is_on()
        self._toggles.difference_update(toggles)
        if self.is_on() != before:
            self._condition.notify_all()


def apply() -> bool:
    """Install the overrides if kopf is the version they were written for; whether it did."""
    installed = version("kopf")
    if installed != KOPF_VERSION:
        log.warning(
            "kopf %s is installed, but the start-up fix in %s is written for kopf %s; it is "
            "not applied, and start-up with thousands of objects may be slow",
            installed,
            __name__,
            KOPF_VERSION,
        )
        return False
    aiotoggles.ToggleSet.make_toggle = _make_toggle  # type: ignore[method-assign]
    aiotoggles.ToggleSet.drop_toggle = _drop_toggle  # type: ignore[method-assign]
    aiotoggles.ToggleSet.drop_toggles = _drop_toggles  # type: ignore[method-assign]
    return True
