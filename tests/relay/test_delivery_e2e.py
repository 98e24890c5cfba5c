"""The whole relay in-process: SMTP submission in, delivery to recording upstreams out.

Uses the shared fixtures (`relay_factory`, `recording_upstream`, `tls_certs`): the client
authenticates over STARTTLS, the relay spools and delivers, and the tests check what the
upstreams received (exact bytes: the original plus one Received header), what the relay
bounced, and what stayed queued.

`relay_factory` comes last in every signature so that it is torn down first: the relay
then closes its pooled upstream connections (QUIT) before the upstreams stop, and no
server-side socket is left open.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections.abc import Callable
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailrelay.relay.spool import Spool
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.relay.conftest import UPSTREAM_USER, USERS, RelayFactory, RelayHandle, smtp_route

ALICE = ("alice", USERS["alice"])


def message(tag: str) -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\n"
        b"To: bob@dest.test\r\n"
        b"Subject: " + tag.encode() + b"\r\n"
        b"Message-ID: <" + tag.encode() + b"@example.com>\r\n"
        b"\r\n"
        b"Body of " + tag.encode() + b".\r\n"
    )


async def send(relay: RelayHandle, rcpts: list[str], data: bytes) -> dict[str, Any]:
    async with relay.client(login=ALICE) as smtp:
        errors, _ = await smtp.sendmail("alice@example.com", rcpts, data)
    return dict(errors)


async def send_many(relay: RelayHandle, batches: list[tuple[list[str], bytes]]) -> None:
    """Several messages in one session (one AUTH: password hashing is slow on purpose)."""
    async with relay.client(login=ALICE) as smtp:
        for rcpts, data in batches:
            errors, _ = await smtp.sendmail("alice@example.com", rcpts, data)
            assert errors == {}


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """(our Received header, the rest): the relay adds exactly one header at the top."""
    assert data.startswith(b"Received: ")
    end = data.index(b"\r\nFrom: ")
    return data[: end + 2], data[end + 2 :]


def spool_of(relay: RelayHandle) -> Spool:
    return Spool(relay.spool_dir)


async def eventually(check: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def report_of(data: bytes) -> tuple[EmailMessage, list[Message]]:
    bounce = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(bounce, EmailMessage)
    payload = list(bounce.iter_parts())[1].get_payload()
    assert isinstance(payload, list)
    return bounce, [b for b in payload if isinstance(b, Message)]


async def test_delivers_original_bytes_plus_one_received_header(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    tmp_path: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls", auth=UPSTREAM_USER)
    (tmp_path / "user").write_text(UPSTREAM_USER[0] + "\n")
    (tmp_path / "pass").write_text(UPSTREAM_USER[1] + "\n")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    route["upstream"].update(
        username_file=str(tmp_path / "user"), password_file=str(tmp_path / "pass")
    )
    relay = await relay_factory(routes=[route])
    raw = message("exact")

    assert await send(relay, ["bob@dest.test", "carol@dest.test"], raw) == {}
    [got] = await upstream.wait_for(1)

    received, rest = split_received(got.data)
    assert rest == raw
    assert received.count(b"\r\n") == received.count(b"\r\n\t") + 1  # one folded header
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ("bob@dest.test", "carol@dest.test")
    assert got.tls and got.auth_user == UPSTREAM_USER[0]
    await eventually(lambda: SpoolAdmin(spool_of(relay).directory).list_queue() == [])
    # Counted once the upstream's reply is read, which may follow its handler's record (and
    # a journaled message never had a queue file to wait on): wait for it, don't race it.
    await eventually(
        lambda: (
            relay.metric(
                "mailrelay_delivery_attempts_total",
                {"route": "out", "upstream": "out-up", "result": "delivered"},
            )
            == 2
        )
    )


async def test_partial_failure_delivers_one_and_bounces_the_other(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    upstream.rcpt_reply = lambda rcpt: "550 5.1.1 No such user" if rcpt.startswith("gone") else None
    relay = await relay_factory(routes=[smtp_route("out", upstream, tls_certs.ca_file)])

    assert await send(relay, ["ok@dest.test", "gone@dest.test"], message("partial")) == {}
    delivered, bounce = await upstream.wait_for(2)

    assert delivered.rcpt_tos == ("ok@dest.test",)
    assert bounce.mail_from in ("", "<>")
    assert bounce.rcpt_tos == ("alice@example.com",)
    report, blocks = report_of(bounce.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; gone@dest.test"]
    assert blocks[1]["Status"].startswith("5.")
    assert blocks[1]["Status"] == "5.1.1"
    headers = list(report.iter_parts())[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <partial@example.com>" in headers.get_payload()
    await eventually(lambda: len(SpoolAdmin(spool_of(relay).directory).list_dead_letters()) == 1)
    [dead] = SpoolAdmin(spool_of(relay).directory).list_dead_letters()
    assert {r.address: r.status for r in dead.recipients} == {
        "ok@dest.test": "delivered",
        "gone@dest.test": "bounced",
    }
    # The bounce itself leaves the queue once the upstream took it (moments later).
    await eventually(lambda: SpoolAdmin(spool_of(relay).directory).list_queue() == [])


async def test_upstream_down_then_back(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    upstream.stop()
    relay = await relay_factory(routes=[smtp_route("out", upstream, tls_certs.ca_file)])

    assert await send(relay, ["bob@dest.test"], message("later")) == {}

    def deferred() -> bool:
        queued = SpoolAdmin(spool_of(relay).directory).list_queue()
        return bool(queued) and queued[0].recipients[0].attempts >= 2

    await eventually(deferred)
    upstream.start()
    [got] = await upstream.wait_for(1)
    assert split_received(got.data)[1] == message("later")
    await eventually(lambda: SpoolAdmin(spool_of(relay).directory).list_queue() == [])
    assert SpoolAdmin(spool_of(relay).directory).list_dead_letters() == []


async def test_fallback_upstream_is_used(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    primary = recording_upstream(tls="starttls")
    primary.stop()
    fallback = recording_upstream(tls="implicit")
    route = smtp_route("out", primary, tls_certs.ca_file)
    route["fallbacks"] = [fallback.smtp_upstream("backup", tls_certs.ca_file)]
    relay = await relay_factory(routes=[route])

    assert await send(relay, ["bob@dest.test"], message("fallback")) == {}
    [got] = await fallback.wait_for(1)

    assert split_received(got.data)[1] == message("fallback")
    assert got.tls

    def recorded() -> bool:
        return (
            relay.metric(
                "mailrelay_delivery_attempts_total",
                {"route": "out", "upstream": "backup", "result": "delivered"},
            )
            == 1
        )

    await eventually(recorded)


async def test_starttls_required_upstream_without_starttls_stays_queued(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    plain = recording_upstream(tls="none")
    route = smtp_route("out", plain, tls_certs.ca_file)
    route["upstream"]["tls"] = "starttls"
    relay = await relay_factory(routes=[route])

    assert await send(relay, ["bob@dest.test"], message("notls")) == {}

    def config_error() -> bool:
        return relay.metric("mailrelay_upstream_config_errors_total", {"upstream": "out-up"}) >= 1

    await eventually(config_error)

    def recorded() -> bool:
        queued = SpoolAdmin(spool_of(relay).directory).list_queue()
        return bool(queued) and "STARTTLS" in (queued[0].recipients[0].last_error or "")

    await eventually(recorded)
    assert plain.snapshot() == []
    assert SpoolAdmin(spool_of(relay).directory).list_dead_letters() == []


async def test_wrong_upstream_credentials_keep_mail_queued(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    tmp_path: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls", auth=UPSTREAM_USER)
    (tmp_path / "user").write_text(UPSTREAM_USER[0])
    (tmp_path / "pass").write_text("not-the-password")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    route["upstream"].update(
        username_file=str(tmp_path / "user"), password_file=str(tmp_path / "pass")
    )
    relay = await relay_factory(routes=[route], retry={"max_age_seconds": 0.5})

    assert await send(relay, ["bob@dest.test"], message("creds")) == {}

    def retried() -> bool:
        queued = SpoolAdmin(spool_of(relay).directory).list_queue()
        return bool(queued) and queued[0].recipients[0].attempts >= 3

    await eventually(retried)
    await asyncio.sleep(0.5)  # past max_age: still no bounce, still queued
    [queued] = SpoolAdmin(spool_of(relay).directory).list_queue()
    assert queued.recipients[0].status == "deferred"
    assert "535" in (queued.recipients[0].last_error or "")
    assert upstream.snapshot() == []
    assert SpoolAdmin(spool_of(relay).directory).list_dead_letters() == []


async def test_rate_limit_defer_and_reject(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    defer = smtp_route(
        "defer",
        upstream,
        tls_certs.ca_file,
        upstream_name="up",
        match={"recipient_domains": ["slow.test"]},
        rate_limit={"per_second": 4, "burst": 1, "on_exceed": "defer"},
    )
    reject = smtp_route(
        "reject",
        upstream,
        tls_certs.ca_file,
        upstream_name="up",
        match={"recipient_domains": ["strict.test"]},
        rate_limit={"per_second": 0.001, "burst": 1, "on_exceed": "reject"},
    )
    relay = await relay_factory(routes=[defer, reject])

    started = time.monotonic()
    await send_many(relay, [([f"r{i}@slow.test"], message(f"slow{i}")) for i in range(4)])
    await upstream.wait_for(4, within=20)
    # One at once, then one per 0.25 s.
    assert time.monotonic() - started >= 0.6
    assert relay.metric("mailrelay_delivery_rate_limited_total", {"route": "defer"}) >= 1

    assert await send(relay, ["first@strict.test"], message("strict1")) == {}
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(relay, ["second@strict.test"], message("strict2"))
    assert refused.value.recipients[0].code == 450
    await upstream.wait_for(5, within=20)


async def test_pooled_connections_are_reused(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    # aiosmtpd's Controller connects to itself once on start; count from here.
    baseline = upstream.connections
    route = smtp_route("out", upstream, tls_certs.ca_file)
    route["upstream"]["pool_size"] = 1
    relay = await relay_factory(routes=[route])

    await send_many(relay, [([f"r{i}@dest.test"], message(f"pool{i}")) for i in range(5)])
    await upstream.wait_for(5, within=20)

    assert upstream.connections - baseline == 1
    assert relay.metric("mailrelay_upstream_connections_reused_total", {"upstream": "out-up"}) == 4
    assert upstream.message_ids() == {f"<pool{i}@example.com>" for i in range(5)}
