"""The delivery engine: takes spooled mail out through transports, retries, bounces.

Shape of one process's engine:

- **Schedule.** A heap of (due time, queue id). `notify` (called by the SMTP front after
  a durable enqueue) puts a message at the front; a background scan of the spool's queue
  directory every `delivery.poll_interval_seconds` picks up what other processes (worker
  processes, the queue CLI) added or changed, by the version of its state (`Spool.
  queue_versions`), without re-reading what it already knows.
- **Dispatch.** At most `delivery.concurrency` messages are delivered at once. One
  message is never delivered twice at once: in this process a set of queue ids in flight,
  across processes the spool's lease (`Spool.lease`, taken afresh so a change made
  meanwhile by another process is honoured). A message the front just spooled arrives
  with its lease, entry and bytes already in hand (`MessageLease`; at most `_MAX_HELD`
  that keep a file open wait at once), so its first attempt starts without touching the
  disk. Where a message lives (journal or queue file) is the lease's business alone:
  a pass ends with `complete`, `dead_letter` then `release`, or `release`.
- **One pass over a message.** Recipients that are due are grouped by route; each group
  is one transaction per upstream. Rate-limited routes (`on_exceed: defer`) put the
  group off without counting an attempt. The primary upstream is tried, then each
  fallback in order for the recipients that failed temporarily (or on a configuration
  error). Per recipient: delivered (never sent again), permanent (final now), temporary
  (next attempt by `backoff` until `retry.max_age_seconds`, then final), or a
  configuration error (kept queued without expiring, logged loudly, counted: we never
  bounce mail for our own mistakes).
- **Final failures.** A DSN (`bounce.build_dsn`) to the envelope sender, enqueued with
  the null sender and routed like any other mail; a null-sender message is never
  bounced, and a bounce no route takes is dead-lettered. Once every recipient is done,
  a message with a final failure moves to the dead-letter folder with its reason; a
  fully delivered one is removed.

Crash safety is at-least-once: state is saved after the transactions of a pass (and,
when `stop` cancels a pass, what is known is saved before giving up), and a bounce is
enqueued before the original's state records the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mailrelay.relay.backoff import backoff_delay, next_attempt_at
from mailrelay.relay.bounce import FailedRecipient, build_dsn, status_for
from mailrelay.relay.budget import ByteBudget, budget_limit, charge, cost_factor
from mailrelay.relay.config import ApiUpstream, RelayConfig, RouteConfig, SmtpUpstream
from mailrelay.relay.metrics import DeliveryMetrics, RelayMetrics
from mailrelay.relay.ratelimit import RouteRateLimits
from mailrelay.relay.redact import redact_results
from mailrelay.relay.routing import domain_of, select_route
from mailrelay.relay.signing import RouteSigners, SignFailure, SigningPool
from mailrelay.relay.spool import MessageLease, QueueEntry, RecipientState, Spool
from mailrelay.relay.upstream_status import ReportsAuth, UpstreamAuth
from mailrelay.relay.upstreams.factory import build_transport, preload_transports
from mailrelay.relay.upstreams.smtp import PoolObserver
from mailrelay.relay.upstreams.transport import RecipientOutcome, RecipientResult, Transport

__all__ = ["DeliveryEngine", "TransportFactory"]

log = logging.getLogger(__name__)

_UNDONE = frozenset({"pending", "deferred"})
# A message another process is delivering is looked at again after this long at most
# (its own state change, seen by the scan, usually brings it back sooner).
_BUSY_RECHECK_SECONDS = 5.0
# After an unexpected error in a pass, the message waits this long before the next one.
_ERROR_RECHECK_SECONDS = 30.0
# Fresh messages kept leased in memory until their first attempt that hold a descriptor
# each; beyond this backlog they are handed back and leased again when their turn comes.
_MAX_HELD = 256

# Builds the transport for one upstream; tests and later issues may pass their own.
TransportFactory = Callable[[SmtpUpstream | ApiUpstream, PoolObserver, RelayMetrics], Transport]


class _PoolMetrics:
    """Adapts SMTP pool events to prometheus (the transport's `PoolObserver`)."""

    def __init__(self, metrics: DeliveryMetrics) -> None:
        self._m = metrics

    def connection_opened(self, upstream: str) -> None:
        self._m.connections_opened.labels(upstream).inc()
        self._m.connections_open.labels(upstream).inc()

    def connection_reused(self, upstream: str) -> None:
        self._m.connections_reused.labels(upstream).inc()

    def connection_closed(self, upstream: str) -> None:
        self._m.connections_open.labels(upstream).dec()


@dataclass
class _Failure:
    """A recipient that failed for good in this pass, for the bounce and the dead letter."""

    recipient: RecipientState
    result: RecipientResult
    expired: bool
    upstream: SmtpUpstream | ApiUpstream | None


class DeliveryEngine:
    """Delivers what the spool holds; see the module docstring for the whole picture."""

    def __init__(
        self,
        config: RelayConfig,
        spool: Spool,
        metrics: RelayMetrics,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        transport_factory: TransportFactory | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        self._config = config
        self._spool = spool
        # Shared with the SMTP front in a relay (see `budget.py`): a retry loads its bytes
        # only once it has its share.
        self._budget = budget if budget is not None else ByteBudget(budget_limit(config, None))
        self._relay_metrics = metrics
        self._metrics = metrics.delivery
        self._clock = clock
        self._rng = rng or random.Random()
        self._transport_factory = transport_factory
        self._pool_metrics = _PoolMetrics(self._metrics)
        self._routes = {route.name: route for route in config.routes}
        self._rates = RouteRateLimits(config.routes, clock=monotonic)
        self._signers = RouteSigners()  # loaded by start() and reload()
        self._signing_pool = SigningPool()
        self._transports: dict[str, Transport] = {}
        self._transport_configs: dict[str, SmtpUpstream | ApiUpstream] = {}
        self._heap: list[tuple[float, str]] = []
        self._scheduled: dict[str, float] = {}
        # Queue ids known to this process with the state version last seen (None: known
        # through `notify`, version not looked at yet).
        self._known: dict[str, int | None] = {}
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # The earliest due time asked for a message while a pass over it was running
        # (`notify` of its fresh copy, the scan seeing a change): the pass's end honours it.
        self._rerun: dict[str, float] = {}
        # Fresh messages handed over by the front with their lease (see `notify`).
        self._held: dict[str, MessageLease] = {}
        # Leases that could not be handed back after a pass: kept for the next pass.
        self._stranded: dict[str, MessageLease] = {}
        self._releasing: set[asyncio.Future[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Load the spool's queue and start scheduling (the spool must be started)."""
        await _preload_transports(self._config)
        self._signers = await asyncio.to_thread(RouteSigners.load, self._config)
        await self._scan()
        log.info("Started delivery with %d queued message(s)", len(self._known))
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="delivery-dispatch"),
            asyncio.create_task(self._scan_loop(), name="delivery-scan"),
        ]

    async def stop(self, grace_seconds: float) -> None:
        """Let deliveries in flight finish within the grace; everything else stays spooled."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        in_flight = list(self._in_flight.values())
        if in_flight:
            log.info("Waiting up to %.1fs for %d delivery(ies)", grace_seconds, len(in_flight))
            _, pending = await asyncio.wait(in_flight, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "Interrupted %d delivery(ies) at the end of the grace period; they stay queued",
                    len(pending),
                )
                await asyncio.gather(*pending, return_exceptions=True)
        # Messages not started are handed back; what cannot be stays in the spool's care
        # (see `Spool.aclose`).
        leases = [*self._held.values(), *self._stranded.values()]
        self._held.clear()
        self._stranded.clear()
        for lease in leases:
            lease.release_reservation()
            self._release_soon(lease)
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        for transport in self._transports.values():
            await transport.close()
        self._transports.clear()
        self._transport_configs.clear()
        await self._signing_pool.close()
        log.info("Stopped delivery")

    async def reload(self, config: RelayConfig) -> None:
        """Adopt a new config; queued mail stays, changed upstreams get new transports."""
        await _preload_transports(config)
        signers = await asyncio.to_thread(RouteSigners.load, config)
        upstreams = config.upstreams()
        stale = [
            name for name, old in self._transport_configs.items() if upstreams.get(name) != old
        ]
        closing = [self._transports.pop(name) for name in stale]
        for name in stale:
            del self._transport_configs[name]
        self._config = config
        self._routes = {route.name: route for route in config.routes}
        self._signers = signers
        self._rates.update(config.routes)
        for transport in closing:
            await transport.close()
        log.info("Reloaded delivery configuration (%d route(s))", len(self._routes))
        self._wake.set()

    def auth_status(self) -> dict[str, UpstreamAuth | None]:
        """Each live upstream's last login outcome (for `GET /status/upstreams`)."""
        return {
            name: transport.auth_status()
            for name, transport in self._transports.items()
            if isinstance(transport, ReportsAuth)
        }

    # -- the front's hooks ------------------------------------------------------------

    def notify(self, entry: QueueEntry, lease: MessageLease | None = None) -> None:
        """A message was just spooled: deliver it now.

        With `lease` (from `Spool.enqueue_held`) the engine takes over the writer's hold
        on the message and its bytes, and ends the lease when the first attempt ends.
        """
        if lease is not None:
            if self._stopping or (lease.pins_descriptor and len(self._held) >= _MAX_HELD):
                lease.release_reservation()
                self._release_soon(lease)
                if self._stopping:
                    return
            else:
                self._held[entry.queue_id] = lease
        self._known.setdefault(entry.queue_id, None)
        self._schedule(entry.queue_id, self._clock())

    def adopted(self, entry: QueueEntry) -> None:
        """A message arrived from a peer with its state (`handoff.py`): deliver it when
        its recipients are due, on the schedule it had there."""
        self._known.setdefault(entry.queue_id, None)
        due = self._next_due(entry)
        self._schedule(entry.queue_id, self._clock() if due is None else due)

    def _release_soon(self, lease: MessageLease) -> None:
        """Hand a lease back in the background (closing a flocked descriptor is slow here)."""
        future = asyncio.ensure_future(self._hand_back(lease))
        self._releasing.add(future)
        future.add_done_callback(self._releasing.discard)

    @staticmethod
    async def _hand_back(lease: MessageLease) -> None:
        try:
            await lease.release()
        except OSError as exc:
            # Still durable where it is: a stop or a restart moves it on.
            log.error("Failed to hand back message %s: %s", lease.queue_id, exc)

    async def give_up(self, queue_id: str, reason: str) -> Literal["done", "busy", "gone"]:
        """Fail every undone recipient of a queued message for good now, as if it had
        expired: a DSN to the sender (`_bounce`), then the dead letters.

        For a drain that has nowhere left to send the mail (`drain.py`). "busy": another
        holder has the message (try again once it is free); "gone": nothing was queued.
        """
        leased = await asyncio.to_thread(self._spool.lease, queue_id)
        if isinstance(leased, str):
            return leased
        lease = leased
        done = False
        try:
            data = await lease.read()
            entry = lease.entry
            failures = []
            for rcpt in entry.recipients:
                if rcpt.status in _UNDONE:
                    rcpt.status = "bounced"
                    last = f"; last error: {rcpt.last_error}" if rcpt.last_error else ""
                    rcpt.last_error = f"{reason}{last}"
                    result = RecipientResult(
                        rcpt.address, RecipientOutcome.TEMPORARY, rcpt.last_error
                    )
                    failures.append(_Failure(rcpt, result, expired=True, upstream=None))
            if failures:
                await self._bounce(entry, data, failures)
            _, done = await self._finish(lease, failures)
        finally:
            if done:
                await lease.complete()
            else:
                await asyncio.shield(lease.release())
        return "done"

    def try_acquire_rate(self, route_name: str) -> bool:
        """For `on_exceed: reject` routes, take a token at RCPT; other routes always pass."""
        limit = self._rates.limit(route_name)
        if limit is None or limit.on_exceed != "reject":
            return True
        return self._rates.try_acquire(route_name)

    # -- scheduling -------------------------------------------------------------------

    def _schedule(self, queue_id: str, due: float) -> None:
        current = self._scheduled.get(queue_id)
        if current is not None and current <= due:
            return  # already due no later than that
        self._scheduled[queue_id] = due
        heapq.heappush(self._heap, (due, queue_id))
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        concurrency = self._config.delivery.concurrency
        while not self._stopping:
            concurrency = self._config.delivery.concurrency
            now = self._clock()
            while self._heap and len(self._in_flight) < concurrency:
                due, queue_id = self._heap[0]
                if due > now:
                    break
                heapq.heappop(self._heap)
                if self._scheduled.get(queue_id) != due:
                    continue  # superseded by an earlier due time
                del self._scheduled[queue_id]
                if queue_id in self._in_flight:
                    # The running pass reschedules it when it ends, no later than this.
                    self._rerun[queue_id] = min(due, self._rerun.get(queue_id, due))
                    continue
                task = asyncio.create_task(self._run(queue_id), name=f"deliver-{queue_id}")
                self._in_flight[queue_id] = task
                self._metrics.in_flight.set(len(self._in_flight))
            timeout: float | None = None
            if self._heap and len(self._in_flight) < concurrency:
                timeout = max(0.0, self._heap[0][0] - self._clock())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _scan_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._config.delivery.poll_interval_seconds)
            try:
                await self._scan()
            except Exception:
                log.exception("Failed to scan the spool for due messages")

    async def _scan(self) -> None:
        """Find messages added or changed by anyone, and forget removed ones."""
        known = dict(self._known)
        skip = set(self._in_flight)
        found, changed = await asyncio.to_thread(self._scan_sync, known, skip)
        # Only what was known before the scan began can be missing for a reason: a message
        # notified meanwhile may have been renamed into the queue after the listing.
        # Messages we hold a lease on are not missing (the scan may not see them at all).
        held = set(self._in_flight) | set(self._held) | set(self._stranded)
        for queue_id in set(known) - set(found) - held:
            self._known.pop(queue_id, None)
            self._scheduled.pop(queue_id, None)
        for queue_id, mtime in found.items():
            if queue_id not in self._in_flight:
                self._known[queue_id] = mtime
        for entry in changed:
            due = self._next_due(entry)
            # None: every recipient is done, yet the message is queued; a pass finishes it.
            self._schedule(entry.queue_id, self._clock() if due is None else due)

    def _scan_sync(
        self, known: dict[str, int | None], skip: set[str]
    ) -> tuple[dict[str, int], list[QueueEntry]]:
        # Segments a crashed or stopped process left in the journal become queue files.
        self._spool.recover_journal_sync()
        found = self._spool.queue_versions()
        changed: list[QueueEntry] = []
        for queue_id, version in found.items():
            if queue_id in skip:
                continue
            if queue_id in known and known[queue_id] in (None, version):
                continue  # unchanged, or notified by our own front (we have its state)
            try:
                entry = self._spool.load_entry(queue_id)
            except ValueError:
                log.warning("Skipped unreadable envelope of message %s", queue_id)
                continue
            if entry is not None:
                changed.append(entry)
        return found, changed

    @staticmethod
    def _next_due(entry: QueueEntry) -> float | None:
        undone = [r.next_attempt_at for r in entry.recipients if r.status in _UNDONE]
        return min(undone) if undone else None

    # -- one message ------------------------------------------------------------------

    async def _run(self, queue_id: str) -> None:
        try:
            due = await self._deliver(queue_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Failed a delivery pass of message %s; it stays queued", queue_id)
            due = self._clock() + _ERROR_RECHECK_SECONDS
        finally:
            self._in_flight.pop(queue_id, None)
            self._metrics.in_flight.set(len(self._in_flight))
            self._wake.set()
        rerun = self._rerun.pop(queue_id, None)
        if queue_id in self._held:
            # Handed over by our front while this pass ran (a scan had listed the file
            # before `notify`, and the pass found it "busy" under the front's lease):
            # deliver now, not after the busy recheck, and not with the lease held idle.
            due = self._clock() if due is None else min(due, self._clock())
        elif due is not None and rerun is not None:
            due = min(due, rerun)
        if due is None:
            self._known.pop(queue_id, None)
        elif not self._stopping:
            self._schedule(queue_id, due)

    async def _deliver(self, queue_id: str) -> float | None:
        """One pass over a message; returns when to look at it again (None: it is done)."""
        lease = self._held.pop(queue_id, None) or self._stranded.pop(queue_id, None)
        if lease is not None:
            # Held by the front since before the message became visible: nobody else has
            # seen it, so the entry (and the bytes, unless they went straight to the queue
            # file) are current. Its share of the budget was taken when it arrived.
            try:
                data = await lease.read()
            except BaseException:
                lease.release_reservation()
                await asyncio.shield(lease.release())
                raise
        else:
            leased = await asyncio.to_thread(self._spool.lease, queue_id)
            if leased == "gone":
                return None
            if leased == "busy":
                return self._clock() + min(
                    _BUSY_RECHECK_SECONDS, self._config.retry.max_backoff_seconds
                )
            lease = leased
            try:
                entry = lease.entry
                routes = {r.route for r in entry.recipients if r.status in _UNDONE}
                factor = cost_factor(self._routes[name] for name in routes if name in self._routes)
                lease.reservation = await self._budget.reserve(charge(entry.size, factor))
                data = await lease.read()
            except BaseException:
                lease.release_reservation()
                await asyncio.shield(lease.release())
                raise
        done = False
        try:
            due, done = await self._deliver_claimed(lease, data)
            return due
        finally:
            try:
                await self._end_pass(lease, done)
            finally:
                # A stranded message stays in memory with its share of the budget.
                if queue_id not in self._stranded:
                    lease.release_reservation()

    async def _end_pass(self, lease: MessageLease, done: bool) -> None:
        """End the lease: the message is gone, or it stays queued for a later pass.

        A lease that cannot be handed back (the spool could not write what it needs, e.g.
        a journaled message's queue file) is kept in memory for the next pass, with its
        share of the budget.
        """
        if done:
            await lease.complete()
            return
        queue_id = lease.queue_id
        try:
            version = await lease.release()
        except OSError as exc:
            log.error("Failed to write message %s to a queue file: %s", queue_id, exc)
            self._stranded[queue_id] = lease
            return
        if version is not None:
            # Our own write: the scan notices only changes made by others from here on.
            self._known[queue_id] = version

    async def _deliver_claimed(self, lease: MessageLease, data: bytes) -> tuple[float | None, bool]:
        """The pass proper: (when to look again, whether the message is to be removed)."""
        entry = lease.entry
        now = self._clock()
        due = [r for r in entry.recipients if r.status in _UNDONE and r.next_attempt_at <= now]
        if not due:
            if any(r.status in _UNDONE for r in entry.recipients):
                return self._next_due(entry), False
            # Every recipient is done but the message is still queued (an interrupted
            # pass, or an edit by hand): finish it now rather than keep it forever.
            return await self._finish(lease, [])

        dirty = self._reroute(entry, due, now)
        groups: dict[str, list[RecipientState]] = {}
        for rcpt in due:
            if rcpt.route in self._routes:
                groups.setdefault(rcpt.route, []).append(rcpt)
        failures: list[_Failure] = []
        # Only a pass that changed something is saved (a rate-limit deferral is not).
        try:
            for route_name, group in groups.items():
                attempted = await self._deliver_group(
                    entry, data, self._routes[route_name], group, failures
                )
                dirty = dirty or attempted
        except asyncio.CancelledError:
            # Stopped mid-pass: keep what is known (delivered recipients are not resent).
            # Final failures of this pass are not recorded, because their bounce was not
            # sent yet: they are tried again, and bounced then.
            for failure in failures:
                failure.recipient.status = "deferred"
                failure.recipient.next_attempt_at = now
            with contextlib.suppress(Exception):
                await asyncio.shield(lease.defer())
            raise
        if failures:
            await self._bounce(entry, data, failures)
        undone = [r for r in entry.recipients if r.status in _UNDONE]
        if undone:
            if dirty:
                # Remember our own write, so the scan notices only changes made by others
                # (the queue CLI's "retry now", another worker) from here on.
                self._known[entry.queue_id] = await lease.defer()
            return min(r.next_attempt_at for r in undone), False
        return await self._finish(lease, failures)

    async def _finish(
        self, lease: MessageLease, failures: list[_Failure]
    ) -> tuple[float | None, bool]:
        """Every recipient is done: dead-letter the message if any failed, else remove it."""
        entry = lease.entry
        failed = [r for r in entry.recipients if r.status == "bounced"]
        if failed:
            reason, label = self._dead_reason(entry, failures)
            await lease.dead_letter(reason)
            self._metrics.dead_letters.labels(failed[0].route, label).inc()
            log.warning("Moved message %s to the dead letters: %s", entry.queue_id, reason)
            return None, False
        return None, True

    def _reroute(self, entry: QueueEntry, due: list[RecipientState], now: float) -> bool:
        """Recipients whose route a reload removed get today's route, or wait for one.

        Returns whether any recipient changed.
        """
        changed = False
        for rcpt in due:
            if rcpt.route in self._routes:
                continue
            route = select_route(
                self._config.routes, domain_of(entry.mail_from), domain_of(rcpt.address)
            )
            if route is not None:
                log.info(
                    "Rerouted %s of message %s from removed route %s to %s",
                    rcpt.address,
                    entry.queue_id,
                    rcpt.route,
                    route.name,
                )
                rcpt.route = route.name
                changed = True
                continue
            # Our configuration lost the route: keep the mail, never bounce it for that.
            rcpt.attempts += 1
            rcpt.status = "deferred"
            rcpt.last_error = f"route {rcpt.route!r} is no longer configured and no route takes it"
            rcpt.next_attempt_at = now + backoff_delay(
                rcpt.attempts, self._config.retry, rng=self._rng
            )
            log.error(
                "Kept %s of message %s queued: %s", rcpt.address, entry.queue_id, rcpt.last_error
            )
            changed = True
        return changed

    def _transport(self, upstream: SmtpUpstream | ApiUpstream) -> Transport:
        transport = self._transports.get(upstream.name)
        if transport is None:
            if self._transport_factory is not None:
                transport = self._transport_factory(
                    upstream, self._pool_metrics, self._relay_metrics
                )
            else:
                transport = build_transport(
                    upstream,
                    local_hostname=self._config.hostname,
                    observer=self._pool_metrics,
                    registry=self._relay_metrics.registry,
                )
            self._transports[upstream.name] = transport
            self._transport_configs[upstream.name] = upstream
        return transport

    async def _deliver_group(
        self,
        entry: QueueEntry,
        data: bytes,
        route: RouteConfig,
        group: list[RecipientState],
        failures: list[_Failure],
    ) -> bool:
        """One route's recipients: primary, then fallbacks, then the verdict per recipient.

        Returns whether anything was attempted (False when the rate limit put it off).
        """
        if route.held is not None:
            # Held (a signing route whose key is not usable): kept queued, never expired,
            # never sent another way (see RouteConfig.held).
            now = self._clock()
            for rcpt in group:
                rcpt.attempts += 1
                rcpt.status = "deferred"
                rcpt.last_error = f"4.7.5 {route.held}"
                rcpt.next_attempt_at = now + backoff_delay(
                    rcpt.attempts, self._config.retry, rng=self._rng
                )
            log.warning(
                "Kept message %s queued: route %s is held (%s)",
                entry.queue_id,
                route.name,
                route.held,
            )
            return True
        limit = route.rate_limit
        if (
            limit is not None
            and limit.on_exceed == "defer"
            and not self._rates.try_acquire(route.name)
        ):
            wait = self._rates.seconds_until(route.name)
            for rcpt in group:
                rcpt.next_attempt_at = self._clock() + wait
            self._metrics.rate_limited.labels(route.name).inc()
            log.debug(
                "Deferred message %s on route %s by its rate limit", entry.queue_id, route.name
            )
            return False
        remaining = list(group)
        last: dict[str, RecipientResult] = {}
        last_upstream: dict[str, SmtpUpstream | ApiUpstream] = {}
        config_error: set[str] = set()
        for rcpt in group:
            rcpt.attempts += 1
        upstreams = (route.upstream, *route.fallbacks)
        if route.dkim:
            # Signed here, after our Received header, so every upstream gets the same bytes;
            # never sent unsigned (a key problem keeps the mail queued).
            signed = await self._signers.sign(route.name, entry.mail_from, data, self._signing_pool)
            if isinstance(signed, SignFailure):
                self._metrics.dkim_signatures.labels(route.name, signed.label).inc()
                log.error(
                    "Could not sign message %s for route %s: %s",
                    entry.queue_id,
                    route.name,
                    signed.detail,
                )
                upstreams = ()
                for rcpt in remaining:
                    last[rcpt.address] = RecipientResult(
                        rcpt.address, signed.outcome, signed.detail
                    )
                    last_upstream[rcpt.address] = route.upstream
                    if signed.outcome is RecipientOutcome.CONFIG_ERROR:
                        config_error.add(rcpt.address)
                    elif signed.outcome is RecipientOutcome.PERMANENT:
                        rcpt.status = "bounced"
                        rcpt.last_error = signed.detail
                        failures.append(
                            _Failure(
                                rcpt, last[rcpt.address], expired=False, upstream=route.upstream
                            )
                        )
                if signed.outcome is RecipientOutcome.PERMANENT:
                    remaining = []
            else:
                self._metrics.dkim_signatures.labels(route.name, "signed").inc()
                data = signed
        for index, upstream in enumerate(upstreams):
            if index > 0:
                log.info(
                    "Trying fallback %s for %d recipient(s) of message %s",
                    upstream.name,
                    len(remaining),
                    entry.queue_id,
                )
            envelope = entry.envelope(r.address for r in remaining)
            # Redacted here, before any text reaches the spool, a log line or a bounce.
            results = redact_results(await self._transport(upstream).deliver(envelope, data))
            by_address = {result.address: result for result in results}
            still: list[RecipientState] = []
            delivered = 0
            for rcpt in remaining:
                result = by_address.get(rcpt.address) or RecipientResult(
                    rcpt.address,
                    RecipientOutcome.TEMPORARY,
                    "4.3.0 the transport gave no result (a bug)",
                )
                rcpt.upstream = upstream.name
                self._metrics.attempts.labels(route.name, upstream.name, result.outcome.value).inc()
                if result.outcome is RecipientOutcome.DELIVERED:
                    rcpt.status = "delivered"
                    rcpt.last_error = None
                    delivered += 1
                elif result.outcome is RecipientOutcome.PERMANENT:
                    rcpt.status = "bounced"
                    rcpt.last_error = result.detail
                    failures.append(_Failure(rcpt, result, expired=False, upstream=upstream))
                else:
                    if result.outcome is RecipientOutcome.CONFIG_ERROR:
                        config_error.add(rcpt.address)
                        self._metrics.upstream_config_errors.labels(upstream.name).inc()
                    last[rcpt.address] = result
                    last_upstream[rcpt.address] = upstream
                    still.append(rcpt)
            self._log_results(entry, route, upstream, remaining, by_address)
            if delivered:
                self._metrics.latency.labels(route.name).observe(
                    max(0.0, self._clock() - entry.received_at)
                )
            remaining = still
            if not remaining:
                break
        now = self._clock()
        retry = self._config.retry
        for rcpt in remaining:
            result = last[rcpt.address]
            rcpt.last_error = result.detail
            if rcpt.address in config_error:
                # Never expires: the fix is ours to make, the sender did nothing wrong.
                rcpt.status = "deferred"
                rcpt.next_attempt_at = now + backoff_delay(rcpt.attempts, retry, rng=self._rng)
                continue
            due = next_attempt_at(entry.received_at, now, rcpt.attempts, retry, rng=self._rng)
            if due is None:
                rcpt.status = "bounced"
                failures.append(
                    _Failure(rcpt, result, expired=True, upstream=last_upstream[rcpt.address])
                )
                continue
            if result.retry_after is not None:
                due = max(due, now + result.retry_after)
            rcpt.status = "deferred"
            rcpt.next_attempt_at = due
        return True

    def _log_results(
        self,
        entry: QueueEntry,
        route: RouteConfig,
        upstream: SmtpUpstream | ApiUpstream,
        recipients: list[RecipientState],
        results: dict[str, RecipientResult],
    ) -> None:
        """One line per recipient result, with the queue id, as the issue asks."""
        for rcpt in recipients:
            result = results.get(rcpt.address)
            if result is None:
                continue
            outcome = result.outcome
            args = (entry.queue_id, rcpt.address, route.name, upstream.name, result.detail)
            # Structured fields for JSON logs (the text format shows only the message).
            extra = {
                "queue_id": entry.queue_id,
                "event": "delivery",
                "recipient": rcpt.address,
                "route": route.name,
                "upstream": upstream.name,
                "result": outcome.value,
                "attempt": rcpt.attempts,
                "remote_id": result.remote_id,
            }
            if outcome is RecipientOutcome.DELIVERED:
                log.info(
                    "Delivered message %s to %s via route %s upstream %s: %s", *args, extra=extra
                )
            elif outcome is RecipientOutcome.PERMANENT:
                log.warning(
                    "Failed message %s to %s via route %s upstream %s permanently: %s",
                    *args,
                    extra=extra,
                )
            elif outcome is RecipientOutcome.TEMPORARY:
                log.info(
                    "Deferred message %s to %s via route %s upstream %s: %s", *args, extra=extra
                )
            else:
                log.error(
                    "Kept message %s to %s queued: route %s upstream %s is misconfigured: %s",
                    *args,
                    extra=extra,
                )

    @staticmethod
    def _dead_reason(entry: QueueEntry, failures: list[_Failure]) -> tuple[str, str]:
        """A readable reason and its metric label (from DEAD_LETTER_REASONS)."""
        failed = [r for r in entry.recipients if r.status == "bounced"]
        expired = any(f.expired for f in failures) and not any(not f.expired for f in failures)
        label = "expired" if expired else "permanent"
        details = "; ".join(f"{r.address}: {r.last_error}" for r in failed)
        return f"{label}: {details}", label

    # -- bounces ----------------------------------------------------------------------

    async def _bounce(self, entry: QueueEntry, data: bytes, failures: list[_Failure]) -> None:
        """Tell the sender about final failures, unless the message itself is a bounce."""
        if not entry.mail_from:
            self._metrics.bounces.labels("null_sender").inc()
            log.info(
                "Did not bounce message %s: it has the null sender (it is a bounce itself)",
                entry.queue_id,
            )
            return
        now = self._clock()
        failed = []
        for failure in failures:
            result = failure.result
            detail = result.detail
            if failure.expired:
                detail = f"delivery time expired; last error: {detail}"
            upstream = failure.upstream
            failed.append(
                FailedRecipient(
                    address=failure.recipient.address,
                    status=status_for(result.detail, result.code, expired=failure.expired),
                    diagnostic=detail,
                    remote_mta=upstream.host if isinstance(upstream, SmtpUpstream) else None,
                    last_attempt=now,
                )
            )
        dsn = build_dsn(
            reporting_mta=self._config.hostname,
            original_sender=entry.mail_from,
            original_message=data,
            failed=failed,
            queue_id=entry.queue_id,
            arrival_date=entry.received_at,
            now=now,
        )
        route = select_route(self._config.routes, "", domain_of(entry.mail_from))
        if route is None:
            reason = (
                f"unroutable_bounce: bounce for message {entry.queue_id} to "
                f"{entry.mail_from}: no route takes it"
            )
            bounce = await self._spool.enqueue_dead_letter(
                "",
                [(entry.mail_from, "")],
                dsn.data,
                reason,
                smtputf8=dsn.smtputf8,
                body_8bitmime=dsn.smtputf8,
            )
            self._metrics.bounces.labels("unroutable").inc()
            self._metrics.dead_letters.labels("", "unroutable_bounce").inc()
            log.error(
                "Stored bounce %s for message %s in the dead letters: no route takes %s",
                bounce.queue_id,
                entry.queue_id,
                entry.mail_from,
            )
            return
        bounce = await self._spool.enqueue(
            "",
            [(entry.mail_from, route.name)],
            dsn.data,
            smtputf8=dsn.smtputf8,
            body_8bitmime=dsn.smtputf8,
            client_address="",
            authenticated_user=None,
        )
        self._metrics.bounces.labels("queued").inc()
        log.info(
            "Queued bounce %s for message %s to %s (%d failed recipient(s))",
            bounce.queue_id,
            entry.queue_id,
            entry.mail_from,
            len(failed),
        )
        self.notify(bounce)


async def _preload_transports(config: RelayConfig) -> None:
    """Import the HTTP upstreams' modules (API providers, OAuth2's token requests) in a
    thread, not on the loop at the first send."""
    needing_http = [
        u for u in config.upstreams().values() if isinstance(u, ApiUpstream) or u.oauth2 is not None
    ]
    if needing_http:
        await asyncio.to_thread(preload_transports, needing_http)
