"""A relay's queue leaving with it: the hand-off on SIGTERM, and the `drain` command.

`leave` runs when a relay stops (after its SMTP front, delivery and workers stopped, so
the spool is all queue files): with `handoff` configured and peers resolving, it hands
the queue to them until `handoff.deadline_seconds`; what is left stays on the spool for
the relay's successor or the operator's drain Job. No peers: everything stays.

`drain` is that Job (`python -m mailrelay.relay --config ... drain`), on the spool of a
relay that is gone: hand the whole spool to peers; with no peers, deliver it with the
normal engine until the deadline, then dead-letter what is left through the bounce path
(a DSN to each sender, delivered while the time allows). Its `DrainReport` is printed
as one JSON line; exit 0 when no queued message is left, 3 when some is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from mailrelay.relay.budget import ByteBudget, budget_limit, cgroup_memory_limit
from mailrelay.relay.config import HandoffConfig, RelayConfig
from mailrelay.relay.delivery import DeliveryEngine
from mailrelay.relay.handoff import (
    hand_off,
    instance_id,
    local_addresses,
    read_token,
    resolve_peers,
)
from mailrelay.relay.metrics import RelayMetrics
from mailrelay.relay.spool import Spool

__all__ = ["EXIT_MAIL_REMAINS", "DrainError", "DrainReport", "drain", "leave"]

log = logging.getLogger(__name__)

EXIT_MAIL_REMAINS = 3
# At the end of a drain without peers, this share of the deadline (at most
# `_BOUNCE_WINDOW_MAX` seconds) is kept for delivering the DSNs of what is dead-lettered.
_BOUNCE_WINDOW_SHARE = 0.2
_BOUNCE_WINDOW_MAX = 10.0
_POLL_SECONDS = 0.2
# How often a drain that found no peer checks whether one resolves again.
_PEER_CHECK_SECONDS = 2.0
_GIVE_UP_REASON = "4.4.7 the relay was removed and no peer relay could take the message"


class DrainError(Exception):
    """A drain that cannot run as configured (the message is for humans)."""


class DrainReport(BaseModel):
    """What a drain did (the JSON line the operator's Job prints)."""

    handed_off: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    remaining: int = 0


async def leave(
    config: RelayConfig,
    handoff: HandoffConfig,
    metrics: RelayMetrics,
    *,
    budget: ByteBudget,
    instance: str,
) -> int:
    """Hand the stopped relay's queue to peers until the deadline; returns how many left."""
    loop = asyncio.get_running_loop()
    spool = Spool(config.spool.directory)
    await spool.start()  # also recovers journal segments a crashed worker left
    try:
        queued = len(await asyncio.to_thread(spool.queue_ids))
        if not queued:
            return 0
        log.info("Began handing %d queued message(s) to peers", queued)
        result = await hand_off(
            spool,
            handoff,
            metrics=metrics.handoff,
            instance=instance,
            deadline=loop.time() + handoff.deadline_seconds,
            max_message_size=config.limits.max_message_size,
            budget=budget,
        )
        left = len(await asyncio.to_thread(spool.queue_ids))
    finally:
        await spool.aclose()
    if not result.peers_found:
        log.warning("Kept %d message(s) on the spool: no peer relay resolved", left)
    elif left:
        log.warning(
            "Handed %d message(s) to peers; kept %d on the spool at the deadline",
            result.handed_off,
            left,
        )
    else:
        log.info("Handed all %d message(s) to peers", result.handed_off)
    return left


async def drain(config: RelayConfig, *, deadline_seconds: float | None = None) -> DrainReport:
    """Empty the spool of a relay that is gone; see the module docstring."""
    loop = asyncio.get_running_loop()
    handoff = config.handoff
    seconds = deadline_seconds
    if seconds is None:
        seconds = handoff.deadline_seconds if handoff is not None else 60.0
    deadline = loop.time() + seconds
    if handoff is not None and await asyncio.to_thread(read_token, handoff.token_file) is None:
        # Never fall back to dead-lettering because of our own misconfiguration.
        raise DrainError(f"handoff.token_file {handoff.token_file} is missing or empty")
    metrics = RelayMetrics(CollectorRegistry())
    budget = ByteBudget(budget_limit(config, cgroup_memory_limit()))
    spool = Spool(config.spool.directory)
    await spool.start()
    report = DrainReport()
    try:
        initial = len(await asyncio.to_thread(spool.queue_ids))
        dead_before = await asyncio.to_thread(spool.count_dead_letters)
        peers_found = uncertain = False
        if handoff is not None and initial:
            result = await hand_off(
                spool,
                handoff,
                metrics=metrics.handoff,
                instance=instance_id(),
                deadline=deadline,
                max_message_size=config.limits.max_message_size,
                budget=budget,
            )
            report.handed_off, peers_found = result.handed_off, result.peers_found
            uncertain = result.peers_uncertain
        left = len(await asyncio.to_thread(spool.queue_ids))
        if left and not peers_found and not uncertain:
            # Certainly nowhere to hand it (a resolver that failed temporarily is no proof):
            # deliver it ourselves, then dead-letter what is left. A
            # peer that is only restarting (a pod killed just before the drain started) may
            # come back meanwhile: then the rest goes to it, never to the dead letters.
            back = await _deliver_then_give_up(
                config, spool, metrics, budget, deadline, peers_back=_peers_back(handoff)
            )
            if back and handoff is not None:
                result = await hand_off(
                    spool,
                    handoff,
                    metrics=metrics.handoff,
                    instance=instance_id(),
                    deadline=deadline,
                    max_message_size=config.limits.max_message_size,
                    budget=budget,
                    stop_when_no_peers=False,
                )
                report.handed_off += result.handed_off
        report.remaining = len(await asyncio.to_thread(spool.queue_ids))
        dead = await asyncio.to_thread(spool.count_dead_letters) - dead_before
        created = sum(
            metrics.registry.get_sample_value("mailrelay_bounces_total", {"result": r}) or 0.0
            for r in ("queued", "unroutable")
        )
        report.dead_lettered = dead
        report.delivered = max(
            0, initial + int(created) - report.handed_off - dead - report.remaining
        )
    finally:
        await spool.aclose()
    return report


def _peers_back(handoff: HandoffConfig | None) -> Callable[[], Awaitable[bool]] | None:
    """A check whether a peer resolves now (None without a hand-off block)."""
    if handoff is None:
        return None

    async def check() -> bool:
        own = await asyncio.to_thread(local_addresses)
        return bool((await resolve_peers(handoff, own, handoff.listen.port)).addresses)

    return check


async def _deliver_then_give_up(
    config: RelayConfig,
    spool: Spool,
    metrics: RelayMetrics,
    budget: ByteBudget,
    deadline: float,
    *,
    peers_back: Callable[[], Awaitable[bool]] | None = None,
) -> bool:
    """Deliver until the deadline, then dead-letter what is left; True instead (engine
    stopped, nothing dead-lettered) as soon as `peers_back` says a peer resolves again."""
    loop = asyncio.get_running_loop()
    window = min(_BOUNCE_WINDOW_MAX, _BOUNCE_WINDOW_SHARE * max(0.0, deadline - loop.time()))
    engine = DeliveryEngine(config, spool, metrics, budget=budget)
    await engine.start()
    stopped = False
    try:
        log.info("Delivering the spool: no peer relay to hand it to")
        if await _wait_empty(spool, deadline - window, peers_back):
            log.info("Found a peer relay again: handing it the rest of the spool")
            await engine.stop(0)
            stopped = True
            return True
        left = await asyncio.to_thread(spool.queue_ids)
        if left:
            log.warning("Dead-lettering %d message(s) left at the drain's deadline", len(left))
            for queue_id in left:
                await engine.give_up(queue_id, _GIVE_UP_REASON)
            await _wait_empty(spool, deadline)  # the DSNs, delivered by the running engine
        await engine.stop(0)
        stopped = True
        # What is still queued now (DSNs not delivered, messages the engine held) has
        # nowhere to go: dead letters, the null-sender DSNs without a further bounce.
        for _ in range(3):
            left = await asyncio.to_thread(spool.queue_ids)
            if not left:
                break
            for queue_id in left:
                await engine.give_up(queue_id, _GIVE_UP_REASON)
    finally:
        if not stopped:
            await engine.stop(0)
    return False


async def _wait_empty(
    spool: Spool, until: float, peers_back: Callable[[], Awaitable[bool]] | None = None
) -> bool:
    """Until the spool is empty or `until`; True when `peers_back` found a peer first."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + _PEER_CHECK_SECONDS
    while loop.time() < until:
        if not await asyncio.to_thread(spool.queue_ids):
            return False
        if peers_back is not None and loop.time() >= next_check:
            # Bounded: a resolver that does not answer must not hold the drain past its
            # deadline (then the dead-lettering would come too late and mail would remain).
            try:
                back = await asyncio.wait_for(
                    peers_back(), timeout=max(0.1, min(_PEER_CHECK_SECONDS, until - loop.time()))
                )
            except TimeoutError:
                back = False
            if back:
                return True
            next_check = loop.time() + _PEER_CHECK_SECONDS
        await asyncio.sleep(min(_POLL_SECONDS, max(0.0, until - loop.time())))
    return False
