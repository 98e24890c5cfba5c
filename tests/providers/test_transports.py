"""Each provider transport against its local stand-in: what arrives, and how it is answered."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mailrelay.relay.config import ApiUpstream
from mailrelay.relay.upstreams.providers.base import ApiTransport, idempotency_key
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome
from mailrelay.support.provider_servers import ProviderServer, raw_sent, sent_mail
from tests.providers.conftest import JSON_PROVIDERS, PROVIDERS, RAW_PROVIDERS
from tests.providers.messages import (
    BINARY_ATTACHMENT,
    FILENAME,
    HTML_BODY,
    INLINE_IMAGE,
    SUBJECT,
    TEXT_BODY,
    rich_message,
)

ServerFactory = Callable[[str], Awaitable[ProviderServer]]
RCPTS = ("bob@example.org", "carol@example.net", "hidden@example.com")


def envelope(*recipients: str, queue_id: str = "Q0001", smtputf8: bool = False) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        mail_from="ann@example.com",
        recipients=recipients or RCPTS,
        smtputf8=smtputf8,
        body_8bitmime=True,
    )


async def _setup(
    provider: str,
    provider_server: ServerFactory,
    api_upstream: Callable[..., ApiUpstream],
    transport_factory: Callable[..., ApiTransport],
    **fields: Any,
) -> tuple[ProviderServer, ApiTransport]:
    server = await provider_server(provider)
    return server, transport_factory(api_upstream(provider, server, **fields))


@pytest.mark.parametrize("provider", RAW_PROVIDERS)
async def test_raw_providers_receive_the_exact_bytes(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport = await _setup(provider, provider_server, api_upstream, transport_factory)
    message = rich_message()
    results = await transport.deliver(envelope(), message)
    assert [(r.address, r.outcome) for r in results] == [
        (r, RecipientOutcome.DELIVERED) for r in RCPTS
    ]
    assert all(r.remote_id for r in results)
    assert len(server.sent) == 1
    data, recipients = raw_sent(provider, server.sent[0])
    assert data == message
    assert recipients == list(RCPTS)


@pytest.mark.parametrize("provider", JSON_PROVIDERS)
async def test_json_providers_get_every_recipient_bodies_and_exact_attachments(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport = await _setup(provider, provider_server, api_upstream, transport_factory)
    message = rich_message(extra_headers={"Bcc": "hidden@example.com"})
    results = await transport.deliver(envelope(), message)
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    assert all(r.remote_id for r in results)
    assert len(server.sent) == 1
    (mail,) = sent_mail(provider, server.sent[0])
    assert mail.sender == "ann@example.com"
    assert (mail.to, mail.cc, mail.bcc) == (
        ["bob@example.org"],
        ["carol@example.net"],
        ["hidden@example.com"],
    )
    assert mail.subject == SUBJECT
    assert (mail.text, mail.html) == (TEXT_BODY, HTML_BODY)
    assert mail.attachments["logo.png"] == (INLINE_IMAGE, "image/png", "logo@example.com")
    assert mail.attachments[FILENAME] == (BINARY_ATTACHMENT, "application/pdf", None)
    assert mail.headers["X-Campaign"] == "q4-report"
    # The Bcc recipient is delivered but appears in no header the provider will write.
    assert not any("hidden@" in v for v in mail.headers.values())
    assert not any(k.lower() == "bcc" for k in mail.headers)


async def test_resend_sends_a_stable_idempotency_key(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport = await _setup("resend", provider_server, api_upstream, transport_factory)
    await transport.deliver(envelope(queue_id="QIDEM"), rich_message())
    key = server.requests[0].headers["idempotency-key"]
    assert key == idempotency_key("QIDEM", RCPTS)
    assert key != idempotency_key("QIDEM", RCPTS[:1])


@pytest.mark.parametrize("provider", ["ses", "postmark", "resend"])
async def test_recipients_beyond_the_provider_limit_are_split(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport = await _setup(provider, provider_server, api_upstream, transport_factory)
    many = tuple(f"user{i}@example.org" for i in range(120))
    message = rich_message(to=", ".join(many[:60]), cc=None)
    results = await transport.deliver(envelope(*many), message)
    assert [r.address for r in results] == list(many)
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    assert len(server.sent) == 3
    if provider == "ses":
        got = [a for req in server.sent for a in raw_sent("ses", req)[1]]
    else:
        got = [
            a for req in server.sent for m in sent_mail(provider, req) for a in m.to + m.cc + m.bcc
        ]
    assert sorted(got) == sorted(many)


async def test_sendgrid_puts_a_bcc_only_envelope_in_separate_personalizations(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport = await _setup("sendgrid", provider_server, api_upstream, transport_factory)
    results = await transport.deliver(
        envelope("x@example.com", "y@example.com"), rich_message(cc=None)
    )
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    mails = sent_mail("sendgrid", server.sent[0])
    assert [(m.to, m.cc, m.bcc) for m in mails] == [
        (["x@example.com"], [], []),
        (["y@example.com"], [], []),
    ]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_smtputf8_mailbox_is_refused_permanently_unless_the_provider_takes_it(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport = await _setup(provider, provider_server, api_upstream, transport_factory)
    results = await transport.deliver(
        envelope("jürgen@example.org", smtputf8=True), rich_message(to="jürgen@example.org")
    )
    if provider == "webhook":
        assert results[0].outcome is RecipientOutcome.DELIVERED
        assert raw_sent("webhook", server.sent[0])[1] == ["jürgen@example.org"]
    else:
        assert results[0].outcome is RecipientOutcome.PERMANENT
        assert "SMTPUTF8" in results[0].detail
        assert server.requests == []


@pytest.mark.parametrize("provider", ["postmark", "sendgrid"])
async def test_message_over_the_provider_size_limit_is_permanent_before_sending(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport = await _setup(provider, provider_server, api_upstream, transport_factory)
    limit = transport.limits.max_message_size
    assert limit is not None
    results = await transport.deliver(envelope(), b"Subject: big\r\n\r\n" + b"x" * limit)
    assert results[0].outcome is RecipientOutcome.PERMANENT
    assert str(limit) in results[0].detail
    assert server.requests == []


async def test_postmark_counts_the_encoded_request_not_the_mime(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    """JSON escaping can make the request larger than the MIME; the limit is on the request."""
    server, transport = await _setup("postmark", provider_server, api_upstream, transport_factory)
    from email.message import EmailMessage  # noqa: PLC0415

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ann@example.com", "bob@example.org", "quotes"
    msg.set_content(('"' * 500 + "\n") * 11_000, subtype="html")
    message = msg.as_bytes()
    assert len(message) < 10_000_000
    results = await transport.deliver(envelope("bob@example.org"), message)
    assert results[0].outcome is RecipientOutcome.PERMANENT
    assert "after encoding" in results[0].detail
    assert server.requests == []


async def test_sparkpost_refuses_non_utf8_8bit_bytes(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport = await _setup("sparkpost", provider_server, api_upstream, transport_factory)
    assert server.requests == []
    message = b"From: a@example.com\r\nSubject: latin1\r\n\r\ncaf\xe9\r\n"
    results = await transport.deliver(envelope("bob@example.org"), message)
    assert results[0].outcome is RecipientOutcome.PERMANENT
    assert "UTF-8" in results[0].detail
    assert server.requests == []


@pytest.mark.parametrize("provider", ["sendgrid", "resend"])
async def test_json_provider_without_subject_fails_with_a_reason(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport = await _setup(provider, provider_server, api_upstream, transport_factory)
    message = b"From: a@example.com\r\nTo: bob@example.org\r\n\r\nno subject\r\n"
    results = await transport.deliver(envelope("bob@example.org"), message)
    assert results[0].outcome is RecipientOutcome.PERMANENT
    assert "Subject" in results[0].detail
    assert server.requests == []


@pytest.mark.parametrize("provider", ["ses", "resend"])
async def test_large_message_is_prepared_off_the_loop_and_still_exact(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    """Over OFFLOAD_BYTES the conversion runs in a worker thread; the result is the same."""
    from email.message import EmailMessage  # noqa: PLC0415

    from mailrelay.relay.upstreams.providers.base import OFFLOAD_BYTES  # noqa: PLC0415

    server, transport = await _setup(provider, provider_server, api_upstream, transport_factory)
    blob = bytes(range(256)) * (OFFLOAD_BYTES // 128)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ann@example.com", "bob@example.org", "big"
    msg.set_content("see attachment")
    msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename="b.bin")
    message = msg.as_bytes()
    assert len(message) > OFFLOAD_BYTES
    results = await transport.deliver(envelope("bob@example.org"), message)
    assert results[0].outcome is RecipientOutcome.DELIVERED
    if provider == "ses":
        assert raw_sent("ses", server.sent[0])[0] == message
    else:
        (mail,) = sent_mail("resend", server.sent[0])
        assert mail.attachments["b.bin"][0] == blob


async def test_webhook_splits_a_long_recipient_list_to_keep_headers_small(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    from mailrelay.relay.upstreams.providers.webhook import MAX_ENVELOPE_HEADER  # noqa: PLC0415

    server, transport = await _setup("webhook", provider_server, api_upstream, transport_factory)
    many = tuple(f"recipient-with-a-long-name-{i:04d}@department.example.org" for i in range(300))
    message = rich_message()
    results = await transport.deliver(envelope(*many), message)
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    assert len(server.sent) > 1
    headers = [req.headers["x-mailrelay-envelope"] for req in server.sent]
    assert all(len(h) <= MAX_ENVELOPE_HEADER for h in headers)
    # Filled up to the limit, not split needlessly.
    assert all(len(h) > MAX_ENVELOPE_HEADER - 100 for h in headers[:-1])
    got = [rcpt for req in server.sent for rcpt in raw_sent("webhook", req)[1]]
    assert got == list(many)
    assert all(raw_sent("webhook", req)[0] == message for req in server.sent)
    assert len({req.headers["idempotency-key"] for req in server.sent}) == len(server.sent)
