"""The delivery engine against a real spool on disk and real aiosmtpd upstreams on 127.0.0.1.

No SMTP front here: messages are enqueued straight into the spool and the engine is
notified, exactly as the front does after a durable enqueue. Retry delays are tiny so
retries and expiry happen within a second or two of real time.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any, Literal

import pytest
from prometheus_client import CollectorRegistry

from mailrelay.relay.budget import ByteBudget
from mailrelay.relay.config import RelayConfig
from mailrelay.relay.delivery import DeliveryEngine
from mailrelay.relay.journal import encode_record
from mailrelay.relay.metrics import RelayMetrics
from mailrelay.relay.spool import (
    Claim,
    QueueEntry,
    Spool,
    encode_header,
)
from mailrelay.relay.spool_admin import SpoolAdmin
from tests.relay.conftest import fresh_entry
from tests.relay.delivery_fixtures import Certificates, Upstream, make_certificates, start_upstream

MESSAGE = (
    b"Received: from client.test by relay.test; Mon, 30 Nov 2026 23:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: engine test\r\n"
    b"Message-ID: <engine-1@example.com>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)

# How a test message reaches the engine: found by the spool scan; handed over by the
# front with its queue file claimed; or handed over from the spool's journal (no file).
Held = Literal["scanned", "held", "journal"]
HOW_HELD = ["scanned", "held", "journal"]
ENVELOPE: dict[str, Any] = {
    "smtputf8": False,
    "body_8bitmime": False,
    "client_address": "127.0.0.1",
    "authenticated_user": None,
}

FAST_RETRY = {
    "initial_backoff_seconds": 0.05,
    "max_backoff_seconds": 0.2,
    "max_age_seconds": 30,
    "jitter": 0,
}


class World:
    """A spool, upstreams and engines for one test, all torn down at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.certs: Certificates = make_certificates(tmp_path)
        self.spool = Spool(tmp_path / "spool")
        self.upstreams: list[Upstream] = []
        self.engines: list[DeliveryEngine] = []
        self.registry = CollectorRegistry()
        self.metrics = RelayMetrics(self.registry)

    async def upstream(self, **kwargs: Any) -> Upstream:
        kwargs.setdefault("certs", self.certs)
        up = await start_upstream(**kwargs)
        self.upstreams.append(up)
        return up

    def smtp(self, up: Upstream, name: str, **extra: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": "smtp",
            "name": name,
            "host": up.host,
            "port": up.port,
            "tls": up.tls,
            "ca_file": str(self.certs.ca_file),
            "connect_timeout_seconds": 2,
            "timeout_seconds": 5,
            "insecure_allow_plaintext": up.tls == "none",
        }
        entry.update(extra)
        return entry

    def config(self, routes: list[dict[str, Any]], **overrides: Any) -> RelayConfig:
        data: dict[str, Any] = {
            "hostname": "relay.test",
            "auth": {"required": False},
            "allowed_networks": ["127.0.0.0/8"],
            "spool": {"directory": str(self.spool.directory)},
            "retry": FAST_RETRY,
            "delivery": {"concurrency": 8, "poll_interval_seconds": 0.05},
            "routes": routes,
        }
        data.update(overrides)
        return RelayConfig.model_validate(data)

    async def engine(self, config: RelayConfig, **kwargs: Any) -> DeliveryEngine:
        await self.spool.start()
        engine = DeliveryEngine(config, self.spool, self.metrics, **kwargs)
        await engine.start()
        self.engines.append(engine)
        return engine

    async def submit(
        self,
        engine: DeliveryEngine | None,
        recipients: list[tuple[str, str]],
        *,
        mail_from: str = "alice@example.com",
        data: bytes = MESSAGE,
        held: Held = "scanned",
    ) -> QueueEntry:
        """Spool a message and notify `engine`, handing it over as `held` says (see `Held`)."""
        await self.spool.start()
        if held == "scanned":
            entry = await self.spool.enqueue(mail_from, recipients, data, **ENVELOPE)
            if engine is not None:
                engine.notify(entry)
            return entry
        message = await self.spool.enqueue_held(
            mail_from, recipients, data, journal=held == "journal", **ENVELOPE
        )
        assert (message.claim is None) == (held == "journal")
        if engine is not None:
            engine.notify(message.entry, message)
        elif message.claim is not None:
            message.claim.release()
        return message.entry

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def close(self) -> None:
        for engine in self.engines:
            await engine.stop(1.0)
        await self.spool.aclose()
        for up in self.upstreams:
            await up.stop()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    yield w
    await w.close()


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def report_blocks(bounce: EmailMessage) -> list[Message]:
    parts = list(bounce.iter_parts())
    payload = parts[1].get_payload()
    assert isinstance(payload, list)
    return [b for b in payload if isinstance(b, Message)]


@pytest.mark.parametrize("held", HOW_HELD)
async def test_delivers_exact_bytes_and_removes_from_spool(
    world: World, caplog: pytest.LogCaptureFixture, held: Held
) -> None:
    caplog.set_level(logging.INFO, logger="mailrelay.relay.delivery")
    up = await world.upstream()
    engine = await world.engine(world.config([{"name": "r", "upstream": world.smtp(up, "up")}]))

    recipients = [("bob@example.net", "r"), ("carol@example.org", "r")]
    entry = await world.submit(engine, recipients, held=held)
    await up.wait_for(1)

    [got] = up.messages
    assert got.data == MESSAGE
    assert got.rcpt_tos == ("bob@example.net", "carol@example.org")
    await eventually(lambda: list(world.spool.queue_dir.iterdir()) == [])
    assert SpoolAdmin(world.spool.directory).list_dead_letters() == []
    assert (
        world.metric(
            "mailrelay_delivery_attempts_total", route="r", upstream="up", result="delivered"
        )
        == 2
    )
    assert world.metric("mailrelay_delivery_latency_seconds_count", route="r") == 1
    # One log line per recipient result, carrying the queue id (a field in JSON logs).
    lines = [r for r in caplog.records if getattr(r, "event", None) == "delivery"]
    assert sorted(getattr(r, "recipient", "") for r in lines) == [
        "bob@example.net",
        "carol@example.org",
    ]
    assert all(getattr(r, "queue_id", None) == entry.queue_id for r in lines)
    assert all(entry.queue_id in r.getMessage() for r in lines)


async def test_resumes_the_spool_on_start(world: World) -> None:
    up = await world.upstream()
    config = world.config([{"name": "r", "upstream": world.smtp(up, "up")}])
    queued = [await world.submit(None, [(f"r{i}@example.net", "r")]) for i in range(3)]

    await world.engine(config)
    await up.wait_for(3)

    assert sorted(m.rcpt_tos[0] for m in up.messages) == [f"r{i}@example.net" for i in range(3)]
    await eventually(lambda: SpoolAdmin(world.spool.directory).list_queue() == [])
    assert len(queued) == 3


async def test_scan_recovers_a_journal_segment_a_dead_process_left(world: World) -> None:
    """A worker that crashed leaves its journal segment unlocked: a live engine's scan
    turns its messages into queue files and delivers them; done ones are not sent."""
    up = await world.upstream()
    await world.engine(world.config([{"name": "r", "upstream": world.smtp(up, "up")}]))
    records: list[bytes] = []
    for n in range(3):
        entry = fresh_entry(f"r{n}@example.net", "r", MESSAGE, mail_from="alice@example.com")
        records += encode_record(b"M", encode_header(entry), MESSAGE)
        if n == 1:  # delivered before the crash
            records += encode_record(b"D", entry.queue_id.encode())
    (world.spool.journal_dir / "deadbeef-000001.jnl").write_bytes(b"".join(records))
    await up.wait_for(2)
    assert sorted(m.rcpt_tos[0] for m in up.messages) == ["r0@example.net", "r2@example.net"]
    await eventually(lambda: SpoolAdmin(world.spool.directory).list_queue() == [])
    assert list(world.spool.journal_dir.iterdir()) == []


async def test_partial_failure_bounces_only_the_refused_recipient(world: World) -> None:
    up = await world.upstream()
    up.refuse_rcpt["gone@example.net"] = "550 5.1.1 <gone@example.net>: no such user"
    # Bounces to alice@example.com travel over the same route and upstream.
    engine = await world.engine(world.config([{"name": "r", "upstream": world.smtp(up, "up")}]))

    entry = await world.submit(engine, [("bob@example.net", "r"), ("gone@example.net", "r")])
    await up.wait_for(2)

    original, bounce = up.messages
    assert original.rcpt_tos == ("bob@example.net",)
    assert bounce.mail_from in ("", "<>")
    assert bounce.rcpt_tos == ("alice@example.com",)
    report = parse(bounce.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    [per_rcpt] = report_blocks(report)[1:]
    assert per_rcpt["Final-Recipient"] == "rfc822; gone@example.net"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Action"] == "failed"
    # bob is delivered and never sent again; the message is a dead letter for gone@ only.
    await eventually(lambda: len(SpoolAdmin(world.spool.directory).list_dead_letters()) == 1)
    [dead] = SpoolAdmin(world.spool.directory).list_dead_letters()
    assert dead.queue_id == entry.queue_id
    assert dead.dead_reason is not None and "gone@example.net" in dead.dead_reason
    states = {r.address: r.status for r in dead.recipients}
    assert states == {"bob@example.net": "delivered", "gone@example.net": "bounced"}
    await eventually(
        lambda: world.metric("mailrelay_dead_letters_total", route="r", reason="permanent") == 1
    )
    assert world.metric("mailrelay_bounces_total", result="queued") == 1


@pytest.mark.parametrize("held", HOW_HELD)
async def test_upstream_down_then_back_is_retried(world: World, held: Held) -> None:
    up = await world.upstream()
    await up.go_down()
    engine = await world.engine(world.config([{"name": "r", "upstream": world.smtp(up, "up")}]))

    entry = await world.submit(engine, [("bob@example.net", "r")], held=held)

    def deferred() -> bool:
        state = world.spool.load_entry(entry.queue_id)
        return state is not None and state.recipients[0].attempts >= 2

    await eventually(deferred)
    state = world.spool.load_entry(entry.queue_id)
    assert state is not None
    assert state.recipients[0].status == "deferred"
    assert state.recipients[0].last_error
    await up.start()
    await up.wait_for(1)
    assert up.messages[0].data == MESSAGE
    await eventually(lambda: world.spool.load_entry(entry.queue_id) is None)
    assert SpoolAdmin(world.spool.directory).list_dead_letters() == []
    # The state saved by the failed attempts goes with the message (a held message's
    # first pass skips that unlink only when it is never saved).
    await eventually(lambda: list(world.spool.queue_dir.iterdir()) == [])


async def test_temporary_failures_expire_into_a_bounce(world: World) -> None:
    dead_up = await world.upstream()
    await dead_up.go_down()
    bounce_up = await world.upstream()
    retry = dict(FAST_RETRY, max_age_seconds=0.5)
    config = world.config(
        [
            {
                "name": "out",
                "match": {"recipient_domains": ["example.net"]},
                "upstream": world.smtp(dead_up, "down"),
            },
            {
                "name": "home",
                "match": {"recipient_domains": ["example.com"]},
                "upstream": world.smtp(bounce_up, "home-up"),
            },
        ],
        retry=retry,
    )
    engine = await world.engine(config)

    entry = await world.submit(engine, [("bob@example.net", "out")])
    await bounce_up.wait_for(1, within=10)

    [per_rcpt] = report_blocks(parse(bounce_up.messages[0].data))[1:]
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_rcpt["Status"] == "4.4.7"
    assert "expired" in per_rcpt["Diagnostic-Code"]
    await eventually(lambda: len(SpoolAdmin(world.spool.directory).list_dead_letters()) == 1)
    assert SpoolAdmin(world.spool.directory).list_dead_letters()[0].queue_id == entry.queue_id
    await eventually(
        lambda: world.metric("mailrelay_dead_letters_total", route="out", reason="expired") == 1
    )


async def test_fallback_takes_over_when_primary_fails_temporarily(world: World) -> None:
    primary = await world.upstream()
    primary.refuse_mail = "421 4.3.2 Service shutting down"
    fallback = await world.upstream()
    config = world.config(
        [
            {
                "name": "r",
                "upstream": world.smtp(primary, "primary"),
                "fallbacks": [world.smtp(fallback, "fallback")],
            }
        ]
    )
    engine = await world.engine(config)

    entry = await world.submit(engine, [("bob@example.net", "r")])
    await fallback.wait_for(1)

    assert primary.messages == []
    assert fallback.messages[0].data == MESSAGE
    await eventually(lambda: world.spool.load_entry(entry.queue_id) is None)
    assert (
        world.metric(
            "mailrelay_delivery_attempts_total", route="r", upstream="primary", result="temporary"
        )
        == 1
    )
    assert (
        world.metric(
            "mailrelay_delivery_attempts_total", route="r", upstream="fallback", result="delivered"
        )
        == 1
    )


async def test_fallback_is_not_used_for_permanent_failures(world: World) -> None:
    primary = await world.upstream()
    primary.refuse_rcpt["bob@example.net"] = "550 5.1.1 no such user"
    fallback = await world.upstream()
    config = world.config(
        [
            {
                "name": "r",
                "match": {"recipient_domains": ["example.net"]},
                "upstream": world.smtp(primary, "primary"),
                "fallbacks": [world.smtp(fallback, "fallback")],
            }
        ]
    )
    engine = await world.engine(config)

    await world.submit(engine, [("bob@example.net", "r")])
    await eventually(lambda: len(SpoolAdmin(world.spool.directory).list_dead_letters()) == 2)

    assert fallback.messages == []
    # No route takes the bounce to example.com: it is dead-lettered, not looped.
    reasons = sorted(
        d.dead_reason or "" for d in SpoolAdmin(world.spool.directory).list_dead_letters()
    )
    assert reasons[0].startswith("permanent: bob@example.net")
    assert reasons[1].startswith("unroutable_bounce")
    assert world.metric("mailrelay_bounces_total", result="unroutable") == 1


async def test_config_error_keeps_mail_queued_and_never_bounces(world: World) -> None:
    up = await world.upstream(users={"relay": "right"})
    (world.tmp_path / "user").write_text("relay\n")
    (world.tmp_path / "pass").write_text("wrong\n")
    retry = dict(FAST_RETRY, max_age_seconds=0.3)
    smtp = world.smtp(
        up,
        "up",
        username_file=str(world.tmp_path / "user"),
        password_file=str(world.tmp_path / "pass"),
    )
    engine = await world.engine(world.config([{"name": "r", "upstream": smtp}], retry=retry))

    entry = await world.submit(engine, [("bob@example.net", "r")])

    def tried_past_max_age() -> bool:
        state = world.spool.load_entry(entry.queue_id)
        return state is not None and state.recipients[0].attempts >= 3

    await eventually(tried_past_max_age)
    await asyncio.sleep(0.4)  # well past max_age_seconds
    state = world.spool.load_entry(entry.queue_id)
    assert state is not None
    assert state.recipients[0].status == "deferred"
    assert "535" in (state.recipients[0].last_error or "")
    assert SpoolAdmin(world.spool.directory).list_dead_letters() == []
    assert up.messages == []
    assert world.metric("mailrelay_upstream_config_errors_total", upstream="up") >= 3
    assert world.metric("mailrelay_bounces_total", result="queued") == 0

    # The credentials are fixed (a rotated Secret): the queued mail goes out.
    (world.tmp_path / "pass").write_text("right\n")
    await up.wait_for(1, within=10)
    assert up.messages[0].auth_user == "relay"


async def test_misconfigured_api_primary_falls_back_to_smtp(world: World) -> None:
    # A webhook upstream without its signing secret is our configuration error: the
    # SMTP fallback takes the mail, and nothing is bounced.
    fallback = await world.upstream()
    hook = {
        "type": "api",
        "name": "hook",
        "provider": "webhook",
        "endpoint": "http://127.0.0.1:9/",
        "insecure_allow_local_endpoint": True,
    }
    config = world.config(
        [{"name": "r", "upstream": hook, "fallbacks": [world.smtp(fallback, "smtp")]}]
    )
    engine = await world.engine(config)

    entry = await world.submit(engine, [("bob@example.net", "r")])
    await fallback.wait_for(1)

    assert fallback.messages[0].data == MESSAGE
    await eventually(lambda: world.spool.load_entry(entry.queue_id) is None)
    assert world.metric("mailrelay_upstream_config_errors_total", upstream="hook") == 1
    assert SpoolAdmin(world.spool.directory).list_dead_letters() == []


async def test_null_sender_is_never_bounced(world: World) -> None:
    up = await world.upstream()
    up.refuse_rcpt["gone@example.net"] = "550 5.1.1 no such user"
    engine = await world.engine(world.config([{"name": "r", "upstream": world.smtp(up, "up")}]))

    entry = await world.submit(engine, [("gone@example.net", "r")], mail_from="")
    await eventually(lambda: len(SpoolAdmin(world.spool.directory).list_dead_letters()) == 1)

    assert SpoolAdmin(world.spool.directory).list_dead_letters()[0].queue_id == entry.queue_id
    assert SpoolAdmin(world.spool.directory).list_queue() == []
    assert up.messages == []
    assert world.metric("mailrelay_bounces_total", result="null_sender") == 1


@pytest.mark.parametrize("held", HOW_HELD)
async def test_rate_limit_defer_sends_later_without_failing(world: World, held: Held) -> None:
    """A deferral saves nothing, yet a journaled message must get its queue file (later
    passes read it from there)."""
    up = await world.upstream()
    route = {
        "name": "r",
        "upstream": world.smtp(up, "up"),
        "rate_limit": {"per_second": 5, "burst": 2, "on_exceed": "defer"},
    }
    engine = await world.engine(world.config([route]))

    started = time.monotonic()
    for i in range(6):
        await world.submit(engine, [(f"r{i}@example.net", "r")], held=held)
    await up.wait_for(6)
    elapsed = time.monotonic() - started

    # Two at once, then one per 0.2 s: at least 4 x 0.2 s for the other four.
    assert elapsed >= 0.7
    assert world.metric("mailrelay_delivery_rate_limited_total", route="r") >= 1
    assert (
        world.metric(
            "mailrelay_delivery_attempts_total", route="r", upstream="up", result="temporary"
        )
        == 0
    )
    await eventually(lambda: SpoolAdmin(world.spool.directory).list_queue() == [])
    assert SpoolAdmin(world.spool.directory).list_dead_letters() == []
    assert sorted(m.rcpt_tos[0] for m in up.messages) == [f"r{i}@example.net" for i in range(6)]
    assert world.spool.journaled_count == 0


async def test_try_acquire_rate_only_limits_reject_routes(world: World) -> None:
    up = await world.upstream()
    config = world.config(
        [
            {
                "name": "strict",
                "match": {"recipient_domains": ["strict.test"]},
                "upstream": world.smtp(up, "up"),
                "rate_limit": {"per_second": 0.01, "burst": 2, "on_exceed": "reject"},
            },
            {
                "name": "lenient",
                "upstream": world.smtp(up, "up"),
                "rate_limit": {"per_second": 0.01, "burst": 1, "on_exceed": "defer"},
            },
            {"name": "free", "priority": -1, "upstream": world.smtp(up, "up")},
        ]
    )
    engine = await world.engine(config)

    assert [engine.try_acquire_rate("strict") for _ in range(3)] == [True, True, False]
    assert all(engine.try_acquire_rate("lenient") for _ in range(5))
    assert all(engine.try_acquire_rate("free") for _ in range(5))


async def test_pool_reuses_one_connection_for_many_messages(world: World) -> None:
    up = await world.upstream()
    config = world.config(
        [{"name": "r", "upstream": world.smtp(up, "up", pool_size=1)}],
        delivery={"concurrency": 4, "poll_interval_seconds": 0.05},
    )
    engine = await world.engine(config)

    for i in range(10):
        await world.submit(engine, [(f"r{i}@example.net", "r")])
    await up.wait_for(10)

    assert up.connections == 1
    assert world.metric("mailrelay_upstream_connections_opened_total", upstream="up") == 1
    assert world.metric("mailrelay_upstream_connections_reused_total", upstream="up") == 9


async def test_concurrency_is_bounded(world: World) -> None:
    up = await world.upstream()
    up.data_delay = 0.1
    config = world.config(
        [{"name": "r", "upstream": world.smtp(up, "up", pool_size=10)}],
        delivery={"concurrency": 2, "poll_interval_seconds": 0.05},
    )
    engine = await world.engine(config)
    peak = 0

    for i in range(6):
        await world.submit(engine, [(f"r{i}@example.net", "r")])
    while len(up.messages) < 6:
        peak = max(peak, int(world.metric("mailrelay_deliveries_in_flight")))
        await asyncio.sleep(0.01)

    assert peak == 2
    assert up.connections == 2


async def test_a_claimed_message_is_not_delivered_twice(world: World) -> None:
    up = await world.upstream()
    engine = await world.engine(world.config([{"name": "r", "upstream": world.smtp(up, "up")}]))
    entry = await world.submit(None, [("bob@example.net", "r")])
    # Another process (say, a second worker) holds the message.
    claim = world.spool.try_claim(entry.queue_id)
    assert claim is not None

    engine.notify(entry)
    await asyncio.sleep(0.3)
    assert up.messages == []

    claim.release()
    engine.notify(entry)
    await up.wait_for(1)
    await asyncio.sleep(0.2)
    assert len(up.messages) == 1


async def test_stop_lets_in_flight_finish_and_keeps_the_rest(world: World) -> None:
    up = await world.upstream()
    up.data_delay = 0.3
    config = world.config(
        [{"name": "r", "upstream": world.smtp(up, "up", pool_size=1)}],
        delivery={"concurrency": 1, "poll_interval_seconds": 0.05},
    )
    engine = await world.engine(config)
    entries = [await world.submit(engine, [(f"r{i}@example.net", "r")]) for i in range(3)]
    await asyncio.sleep(0.1)  # the first one is in DATA now

    await engine.stop(grace_seconds=2.0)
    world.engines.remove(engine)

    assert len(up.messages) == 1
    left = {e.queue_id for e in SpoolAdmin(world.spool.directory).list_queue()}
    assert left == {e.queue_id for e in entries[1:]}

    # A restart delivers the rest, and nothing twice.
    up.data_delay = 0
    await world.engine(config)
    await up.wait_for(3)
    await asyncio.sleep(0.2)
    assert sorted(m.rcpt_tos[0] for m in up.messages) == [f"r{i}@example.net" for i in range(3)]


async def test_stop_after_grace_interrupts_and_keeps_the_message(world: World) -> None:
    up = await world.upstream()
    up.data_delay = 5
    engine = await world.engine(world.config([{"name": "r", "upstream": world.smtp(up, "up")}]))
    entry = await world.submit(engine, [("bob@example.net", "r")])
    await asyncio.sleep(0.2)

    started = time.monotonic()
    await engine.stop(grace_seconds=0.2)
    world.engines.remove(engine)

    assert time.monotonic() - started < 2
    state = world.spool.load_entry(entry.queue_id)
    assert state is not None and state.recipients[0].status in ("pending", "deferred")


async def test_reload_swaps_upstreams_without_losing_mail(world: World) -> None:
    old = await world.upstream()
    await old.go_down()
    new = await world.upstream()
    engine = await world.engine(world.config([{"name": "r", "upstream": world.smtp(old, "up")}]))
    entry = await world.submit(engine, [("bob@example.net", "r")])

    def deferred() -> bool:
        state = world.spool.load_entry(entry.queue_id)
        return state is not None and state.recipients[0].attempts >= 1

    await eventually(deferred)
    await engine.reload(world.config([{"name": "r", "upstream": world.smtp(new, "up")}]))
    await new.wait_for(1)

    assert new.messages[0].data == MESSAGE
    await eventually(lambda: SpoolAdmin(world.spool.directory).list_queue() == [])


async def test_reload_removing_a_route_reroutes_queued_mail(world: World) -> None:
    old = await world.upstream()
    await old.go_down()
    new = await world.upstream()
    engine = await world.engine(
        world.config([{"name": "old-route", "upstream": world.smtp(old, "old")}])
    )
    entry = await world.submit(engine, [("bob@example.net", "old-route")])

    def deferred() -> bool:
        state = world.spool.load_entry(entry.queue_id)
        return state is not None and state.recipients[0].attempts >= 1

    await eventually(deferred)
    await engine.reload(world.config([{"name": "new-route", "upstream": world.smtp(new, "new")}]))
    await new.wait_for(1)
    await eventually(lambda: SpoolAdmin(world.spool.directory).list_queue() == [])


async def test_changes_by_another_process_are_picked_up(world: World) -> None:
    up = await world.upstream()
    await up.go_down()
    retry = dict(FAST_RETRY, initial_backoff_seconds=60, max_backoff_seconds=60)
    engine = await world.engine(
        world.config([{"name": "r", "upstream": world.smtp(up, "up")}], retry=retry)
    )
    entry = await world.submit(engine, [("bob@example.net", "r")])

    def deferred() -> bool:
        state = world.spool.load_entry(entry.queue_id)
        return state is not None and state.recipients[0].status == "deferred"

    await eventually(deferred)
    await up.start()
    # The queue CLI's "retry now" in another process: the next scan notices.
    # (In a thread, as the CLI is another process: the engine may still hold the claim.)
    admin = SpoolAdmin(world.spool.directory)
    claim = await asyncio.to_thread(admin.claim_blocking, entry.queue_id)
    with claim:
        await asyncio.sleep(0.02)  # a new mtime even on coarse file systems
        admin.retry_now(entry.queue_id)
    await up.wait_for(1, within=5)


async def test_two_engines_sharing_a_spool_deliver_each_message_once(world: World) -> None:
    # Two worker processes share one spool: each notifies only its own mail, and each
    # scan also sees the other's. The claim must keep every message to one delivery.
    up = await world.upstream()
    up.data_delay = 0.01
    config = world.config(
        [{"name": "r", "upstream": world.smtp(up, "up", pool_size=4)}],
        delivery={"concurrency": 4, "poll_interval_seconds": 0.02},
    )
    first = await world.engine(config)
    second = await world.engine(config)

    for i in range(40):
        await world.submit(first if i % 2 else second, [(f"r{i}@example.net", "r")])
    await up.wait_for(40, within=20)
    await eventually(lambda: SpoolAdmin(world.spool.directory).list_queue() == [])
    await asyncio.sleep(0.3)  # time for any duplicate to show up

    rcpts = [m.rcpt_tos[0] for m in up.messages]
    assert sorted(rcpts) == sorted(f"r{i}@example.net" for i in range(40))


async def test_messages_left_with_every_recipient_done_are_finished(world: World) -> None:
    # An interrupted pass (or an edit by hand) can leave a message whose recipients are
    # all done; the engine finishes it instead of keeping it queued for ever.
    up = await world.upstream()
    delivered = await world.submit(None, [("a@example.net", "r")])
    failed = await world.submit(None, [("b@example.net", "r"), ("c@example.net", "r")])
    delivered.recipients[0].status = "delivered"
    failed.recipients[0].status = "delivered"
    failed.recipients[1].status = "bounced"
    failed.recipients[1].last_error = "550 5.1.1 no such user"
    await world.spool.save(delivered)
    await world.spool.save(failed)

    await world.engine(world.config([{"name": "r", "upstream": world.smtp(up, "up")}]))

    await eventually(lambda: SpoolAdmin(world.spool.directory).list_queue() == [])
    [dead] = SpoolAdmin(world.spool.directory).list_dead_letters()
    assert dead.queue_id == failed.queue_id
    assert "c@example.net: 550 5.1.1 no such user" in (dead.dead_reason or "")
    assert up.messages == []


async def test_interrupted_pass_keeps_progress_and_still_bounces(world: World) -> None:
    refusing = await world.upstream()
    refusing.refuse_rcpt["gone@refuse.test"] = "550 5.1.1 no such user"
    slow = await world.upstream()
    slow.data_delay = 5
    home = await world.upstream()
    config = world.config(
        [
            {
                "name": "refuse",
                "match": {"recipient_domains": ["refuse.test"]},
                "upstream": world.smtp(refusing, "refusing"),
            },
            {
                "name": "slow",
                "match": {"recipient_domains": ["slow.test"]},
                "upstream": world.smtp(slow, "slow"),
            },
            {
                "name": "home",
                "match": {"recipient_domains": ["example.com"]},
                "upstream": world.smtp(home, "home"),
            },
        ]
    )
    engine = await world.engine(config)
    entry = await world.submit(engine, [("gone@refuse.test", "refuse"), ("bob@slow.test", "slow")])
    await asyncio.sleep(0.5)  # gone@ failed for good; bob@ is in the slow DATA

    await engine.stop(grace_seconds=0.1)
    world.engines.remove(engine)

    # No bounce went out, so the failure is not recorded as final yet.
    assert home.messages == []
    state = world.spool.load_entry(entry.queue_id)
    assert state is not None
    assert [r.status for r in state.recipients] == ["deferred", "pending"]

    slow.data_delay = 0
    await world.engine(config)
    await home.wait_for(1)
    [per_rcpt] = report_blocks(parse(home.messages[0].data))[1:]
    assert per_rcpt["Final-Recipient"] == "rfc822; gone@refuse.test"
    await eventually(lambda: len(SpoolAdmin(world.spool.directory).list_dead_letters()) == 1)
    assert any(m.rcpt_tos == ("bob@slow.test",) for m in slow.messages)


async def test_fresh_message_listed_by_the_scan_before_notify_is_not_delayed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The front makes a message visible, then notifies. A scan in between starts a pass
    # that finds the front's claim "busy"; the front's hand-over arriving during that pass
    # must be delivered when the pass ends, not after the busy recheck (5 s here).
    up = await world.upstream()
    retry = dict(FAST_RETRY, max_backoff_seconds=60)
    engine = await world.engine(
        world.config([{"name": "r", "upstream": world.smtp(up, "up")}], retry=retry)
    )
    entered = threading.Event()
    proceed = threading.Event()
    real_claim_entry = world.spool.claim_entry

    def claim_entry(queue_id: str) -> tuple[Claim, QueueEntry] | Literal["busy", "gone"]:
        entered.set()
        proceed.wait(5)
        return real_claim_entry(queue_id)

    monkeypatch.setattr(world.spool, "claim_entry", claim_entry)
    held = await world.spool.enqueue_held(
        "alice@example.com",
        [("bob@example.net", "r")],
        MESSAGE,
        smtputf8=False,
        body_8bitmime=False,
        client_address="127.0.0.1",
        authenticated_user=None,
    )
    await eventually(entered.is_set, within=5)  # the scan's pass is claiming it

    engine.notify(held.entry, held)
    proceed.set()
    started = time.monotonic()
    await up.wait_for(1, within=4)

    assert time.monotonic() - started < 2.0
    await eventually(lambda: SpoolAdmin(world.spool.directory).list_queue() == [])
    assert len(up.messages) == 1


async def test_retries_load_large_messages_a_budget_at_a_time(world: World) -> None:
    # Four queued 400 KB messages (left by an earlier process, so no front reserved them)
    # and a budget for two: the engine may run eight deliveries at once, yet never holds
    # more bytes than the budget; all four arrive byte-exact, and the budget is given back.
    up = await world.upstream(tls="none")
    up.data_delay = 0.2  # each delivery takes a while: without the budget all four overlap
    peak = 0

    def seen(used: int, limit: int) -> None:
        nonlocal peak
        peak = max(peak, used)

    budget = ByteBudget(900_000, on_change=seen)
    body = b"".join(b"line %06d of a large message\r\n" % i for i in range(13_000))
    messages = [MESSAGE.replace(b"Subject: ", b"Subject: %d " % i) + body for i in range(4)]
    assert all(390_000 < len(m) < 450_000 for m in messages)
    await world.spool.start()
    for data in messages:
        await world.spool.enqueue("alice@example.com", [("bob@example.net", "r")], data, **ENVELOPE)
    await world.engine(
        world.config([{"name": "r", "upstream": world.smtp(up, "up")}]), budget=budget
    )
    await up.wait_for(4)

    assert sorted(m.data for m in up.messages) == sorted(messages)
    assert 390_000 < peak <= 900_000
    await eventually(lambda: budget.used == 0)
