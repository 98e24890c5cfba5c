"""Real mail through the whole relay to every provider stand-in.

The client submits over SMTP (STARTTLS, AUTH) to an in-process relay whose route sends to
an API upstream; the tests assert on what the provider stand-in recorded. Raw providers
get the submitted bytes exactly, behind the one Received header the relay adds; JSON
providers get every envelope recipient (the Bcc one only as bcc), the bodies and
byte-exact attachments. Then the failure paths: a 429 deferred and delivered later, a 400
bounced to the sender, a 401 kept queued with the metric up, a failing API upstream
falling back to SMTP, and a provider's size limit enforced at the door.

`relay_factory` comes last in the signatures so that it is torn down first.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailrelay.support.provider_servers import Fault, ProviderServer, raw_sent, sent_mail
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.providers.conftest import JSON_PROVIDERS, RAW_PROVIDERS, upstream_fields
from tests.providers.messages import (
    BINARY_ATTACHMENT,
    FILENAME,
    HTML_BODY,
    INLINE_IMAGE,
    SUBJECT,
    TEXT_BODY,
    plain_message,
    rich_message,
)
from tests.relay.conftest import USERS, RelayFactory, RelayHandle

ALICE = ("alice", USERS["alice"])
SENDER = "ann@example.com"
RCPTS = ["bob@example.org", "carol@example.net", "hidden@example.com"]
ServerFactory = Callable[[str], Awaitable[ProviderServer]]


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def send(relay: RelayHandle, rcpts: list[str], data: bytes) -> dict[str, Any]:
    async with relay.client(login=ALICE) as smtp:
        errors, _ = await smtp.sendmail(SENDER, rcpts, data)
    return dict(errors)


def api_route(
    provider: str, server: ProviderServer, credentials: Path, **extra: Any
) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": f"via-{provider}",
        "match": {"recipient_domains": ["example.org", "example.net", "example.com"]},
        "upstream": upstream_fields(provider, server, credentials),
    }
    route.update(extra)
    return route


@pytest.mark.parametrize("provider", RAW_PROVIDERS)
async def test_raw_provider_gets_the_submitted_bytes_through_the_relay(
    provider: str,
    provider_server: ServerFactory,
    credentials_dir: Path,
    relay_factory: RelayFactory,
) -> None:
    server = await provider_server(provider)
    relay = await relay_factory(routes=[api_route(provider, server, credentials_dir)])
    message = rich_message()
    assert await send(relay, RCPTS, message) == {}
    await eventually(lambda: len(server.sent) == 1)
    data, recipients = raw_sent(provider, server.sent[0])
    assert data.startswith(b"Received: ")
    assert data.endswith(message)
    head = data[: len(data) - len(message)]
    assert head.count(b"\r\n") - head.count(b"\r\n\t") - head.count(b"\r\n ") == 1
    assert sorted(recipients) == sorted(RCPTS)
    await eventually(lambda: relay.spool_dir.joinpath("queue").exists() and _queue_empty(relay))


def _queue_empty(relay: RelayHandle) -> bool:
    return not any(relay.spool_dir.joinpath("queue").glob("*.msg"))


@pytest.mark.parametrize("provider", JSON_PROVIDERS)
async def test_json_provider_gets_recipients_bodies_and_attachments_through_the_relay(
    provider: str,
    provider_server: ServerFactory,
    credentials_dir: Path,
    caplog: pytest.LogCaptureFixture,
    relay_factory: RelayFactory,
) -> None:
    caplog.set_level(logging.INFO, logger="mailrelay.relay.upstreams.providers")
    server = await provider_server(provider)
    relay = await relay_factory(routes=[api_route(provider, server, credentials_dir)])
    assert await send(relay, RCPTS, rich_message()) == {}
    await eventually(lambda: len(server.sent) == 1)
    (mail,) = sent_mail(provider, server.sent[0])
    assert (mail.to, mail.cc, mail.bcc) == (
        ["bob@example.org"],
        ["carol@example.net"],
        ["hidden@example.com"],
    )
    assert mail.sender == SENDER
    assert mail.subject == SUBJECT
    assert (mail.text, mail.html) == (TEXT_BODY, HTML_BODY)
    assert mail.attachments == {
        "logo.png": (INLINE_IMAGE, "image/png", "logo@example.com"),
        FILENAME: (BINARY_ATTACHMENT, "application/pdf", None),
    }
    assert not any("hidden@" in value for value in mail.headers.values())
    await eventually(lambda: _queue_empty(relay))

    def delivered_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Delivered")]

    # The provider's message id is logged with our queue id. The line follows the provider's
    # reply (a journaled message never had a queue file), so wait for it rather than race it.
    await eventually(lambda: bool(delivered_lines()))
    logged = delivered_lines()
    assert len(logged) == 1
    assert re.fullmatch(
        rf"Delivered message [0-9A-F]{{24}} to 3 recipient\(s\) through upstream "
        rf"{provider}-api; {provider} message id \S+",
        logged[0],
    ), logged[0]
    assert "message id None" not in logged[0]


async def test_429_is_deferred_then_delivered(
    provider_server: ServerFactory, credentials_dir: Path, relay_factory: RelayFactory
) -> None:
    server = await provider_server("resend")
    server.inject(Fault(429, {"name": "rate_limit_exceeded"}, {"Retry-After": "1"}))
    relay = await relay_factory(routes=[api_route("resend", server, credentials_dir)])
    started = time.monotonic()
    assert await send(relay, ["bob@example.org"], plain_message()) == {}
    await eventually(lambda: len(server.sent) == 1)
    # The engine waited for the provider's Retry-After, not its own shorter backoff.
    assert time.monotonic() - started >= 0.9
    assert len(server.requests) == 2
    labels = {"upstream": "resend-api", "provider": "resend"}
    assert relay.metric("mailrelay_provider_throttled_total", labels) == 1


async def test_500_is_retried(
    provider_server: ServerFactory, credentials_dir: Path, relay_factory: RelayFactory
) -> None:
    server = await provider_server("mailgun")
    server.inject(Fault(500, {"message": "oops"}), Fault(503, "unavailable"))
    relay = await relay_factory(routes=[api_route("mailgun", server, credentials_dir)])
    assert await send(relay, ["bob@example.org"], plain_message()) == {}
    await eventually(lambda: len(server.sent) == 1)
    assert len(server.requests) == 3


async def test_400_bounces_to_the_sender(
    provider_server: ServerFactory,
    credentials_dir: Path,
    tls_certs: TlsCerts,
    recording_upstream: Callable[..., RecordingUpstream],
    relay_factory: RelayFactory,
) -> None:
    server = await provider_server("postmark")
    server.inject(Fault(422, {"ErrorCode": 300, "Message": "Invalid 'To' address"}))
    sender_box = recording_upstream(tls="none")
    bounce_route = {
        "name": "senders",
        "priority": 10,
        "match": {"recipient_domains": ["example.com"]},
        "upstream": sender_box.smtp_upstream("sender-mx", tls_certs.ca_file),
    }
    relay = await relay_factory(
        routes=[api_route("postmark", server, credentials_dir), bounce_route]
    )
    assert await send(relay, ["bob@example.org"], plain_message()) == {}
    (bounce,) = await sender_box.wait_for(1)
    assert bounce.mail_from in ("", "<>")  # the null sender
    assert bounce.rcpt_tos == (SENDER,)
    assert b"multipart/report" in bounce.data
    assert b"Invalid 'To' address" in bounce.data
    assert server.sent == []


async def test_401_keeps_the_mail_queued_and_raises_the_metric(
    provider_server: ServerFactory, credentials_dir: Path, relay_factory: RelayFactory
) -> None:
    (credentials_dir / "api_key").write_text("revoked-key")
    server = await provider_server("sendgrid")
    relay = await relay_factory(routes=[api_route("sendgrid", server, credentials_dir)])
    assert await send(relay, ["bob@example.org"], plain_message()) == {}
    labels = {"upstream": "sendgrid-api", "provider": "sendgrid"}
    await eventually(lambda: relay.metric("mailrelay_provider_config_error", labels) == 1)
    await eventually(lambda: len(server.requests) >= 2)
    assert not _queue_empty(relay)
    assert list(relay.spool_dir.joinpath("deadletter").glob("*.msg")) == []
    assert server.sent == []
    # The Secret is fixed: the queued mail goes out, the alarm clears.
    from mailrelay.support.provider_servers import API_KEY  # noqa: PLC0415

    (credentials_dir / "api_key").write_text(API_KEY)
    await eventually(lambda: len(server.sent) == 1, within=15)
    # The provider records the send before our relay has read its reply and cleared it.
    await eventually(lambda: relay.metric("mailrelay_provider_config_error", labels) == 0)


async def test_failing_api_upstream_falls_back_to_smtp(
    provider_server: ServerFactory,
    credentials_dir: Path,
    tls_certs: TlsCerts,
    recording_upstream: Callable[..., RecordingUpstream],
    relay_factory: RelayFactory,
) -> None:
    server = await provider_server("ses")
    server.inject(*[Fault(503, {"message": "Service Unavailable"})] * 5)
    smtp_box = recording_upstream(tls="none")
    route = api_route(
        "ses",
        server,
        credentials_dir,
        fallbacks=[smtp_box.smtp_upstream("smtp-fallback", tls_certs.ca_file)],
    )
    relay = await relay_factory(routes=[route])
    message = plain_message()
    assert await send(relay, ["bob@example.org"], message) == {}
    (got,) = await smtp_box.wait_for(1)
    assert got.rcpt_tos == ("bob@example.org",)
    assert got.data.endswith(message)
    assert len(server.requests) == 1 and server.sent == []


async def test_provider_size_limit_is_enforced_at_the_door(
    provider_server: ServerFactory, credentials_dir: Path, relay_factory: RelayFactory
) -> None:
    """Postmark takes 10 MB: SIZE= above it gets 552 at RCPT, and so does a larger DATA."""
    server = await provider_server("postmark")
    relay = await relay_factory(routes=[api_route("postmark", server, credentials_dir)])
    async with relay.client(login=ALICE) as smtp:
        await smtp.mail(SENDER, options=["SIZE=12000000"])
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await smtp.rcpt("bob@example.org")
        assert refused.value.code == 552
        await smtp.rset()
        big = plain_message(body=("x" * 70 + "\n") * 150_000)
        assert 10_000_000 < len(big) < 26_214_400
        # Without SIZE= the recipient is taken, and the end of DATA refuses the message.
        await smtp.mail(SENDER)
        await smtp.rcpt("bob@example.org")
        with pytest.raises(aiosmtplib.SMTPDataError) as too_big:
            await smtp.data(big)
        assert too_big.value.code == 552
    assert server.requests == []


async def test_timeout_after_sending_is_retried_without_sending_twice(
    provider_server: ServerFactory, credentials_dir: Path, relay_factory: RelayFactory
) -> None:
    """Resend got the request but its answer was too slow: the retry reuses the key."""
    server = await provider_server("resend")
    server.inject(Fault(delay=1.0))
    route = api_route("resend", server, credentials_dir)
    route["upstream"]["timeout_seconds"] = 0.3
    relay = await relay_factory(routes=[route])
    assert await send(relay, ["bob@example.org"], plain_message()) == {}
    await eventually(lambda: len(server.requests) >= 2 and _queue_empty(relay))
    keys = {r.headers["idempotency-key"] for r in server.requests}
    assert len(keys) == 1
    assert len(server.sent) == 1


@pytest.mark.parametrize(("provider", "sends"), [("webhook", 1), ("resend", 1), ("ses", 2)])
async def test_answer_dropped_after_the_send_through_the_relay(
    provider: str,
    sends: int,
    provider_server: ServerFactory,
    credentials_dir: Path,
    relay_factory: RelayFactory,
) -> None:
    """The provider acted, then the connection closed before its answer. With a key the
    spool's retry is answered from the provider's store; without one it sends again, and
    the relay counts an ambiguous retry."""
    server = await provider_server(provider)
    server.inject(Fault(drop=True))
    relay = await relay_factory(routes=[api_route(provider, server, credentials_dir)])
    assert await send(relay, ["bob@example.org"], plain_message()) == {}
    await eventually(lambda: len(server.requests) >= 2 and _queue_empty(relay))
    assert len({r.headers.get("idempotency-key") for r in server.requests}) == 1
    assert len(server.sent) == sends
    ambiguous = relay.metric(
        "mailrelay_upstream_ambiguous_retries_total", {"upstream_kind": provider}
    )
    assert (ambiguous or 0) == sends - 1
