"""Provider defects: inline parts for SendGrid, 2xx answers that are not the documented
one, and SparkPost's permanent outcomes in the request counter."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mailrelay.relay.upstreams.providers.mime import parse_message
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome
from mailrelay.support.provider_servers import Fault, ProviderServer
from tests.providers.messages import rich_message

ServerFactory = Callable[[str], Awaitable[ProviderServer]]
LOGO = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def envelope(queue_id: str = "QANS", recipients: tuple[str, ...] | None = None) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        mail_from="ann@example.com",
        recipients=recipients or ("bob@example.org", "carol@example.net"),
        smtputf8=False,
        body_8bitmime=True,
    )


def related_message(*, referenced: bool = True) -> bytes:
    """What Python's `add_related` makes: the image says `Content-Disposition: attachment`."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "ann@example.com"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "Logo"
    msg.set_content("see the logo")
    cid = "<logo@example.com>"
    img = '<img src="cid:logo@example.com">' if referenced else ""
    msg.add_alternative(f"<p>{img} logo</p>", subtype="html")
    parts = msg.get_payload()
    assert isinstance(parts, list)
    html = parts[1]
    assert isinstance(html, EmailMessage)
    html.add_related(LOGO, "image", "png", cid=cid, filename="logo.png")
    raw = msg.as_bytes()
    assert b"Content-Disposition: attachment" in raw
    return raw


def test_add_related_part_is_inline() -> None:
    (att,) = parse_message(related_message()).attachments
    assert (att.content_id, att.inline, att.content) == ("logo@example.com", True, LOGO)


def test_attachment_with_a_content_id_outside_related_and_unreferenced_stays_attachment() -> None:
    """Some clients give every attachment a Content-ID; only meant-inline parts go inline."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "ann@example.com"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "Report"
    msg.set_content("attached")
    msg.add_attachment(b"%PDF-1.4", "application", "pdf", filename="r.pdf", cid="<r@x>")
    (att,) = parse_message(msg.as_bytes()).attachments
    assert (att.content_id, att.inline) == ("r@x", False)


async def test_sendgrid_sends_the_related_image_inline(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server = await provider_server("sendgrid")
    transport = transport_factory(api_upstream("sendgrid", server))
    results = await transport.deliver(envelope(recipients=("bob@example.org",)), related_message())
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    (att,) = server.sent[0].json["attachments"]
    assert (att["disposition"], att["content_id"], att["filename"]) == (
        "inline",
        "logo@example.com",
        "logo.png",
    )


# A 2xx with a body that is not the provider's documented success answer: the provider
# -> (outcome, counted as unexpected). A proxy's page, a truncated body, a wrong endpoint.
NOT_DOCUMENTED: dict[str, tuple[RecipientOutcome, bool]] = {
    "mailgun": (RecipientOutcome.DELIVERED, True),
    "ses": (RecipientOutcome.DELIVERED, True),
    "postmark": (RecipientOutcome.DELIVERED, True),
    "sendgrid": (RecipientOutcome.DELIVERED, True),
    # Resend takes a key: a retry cannot send twice, so the unknown outcome is retried.
    "resend": (RecipientOutcome.TEMPORARY, True),
    # SparkPost's answer says how many recipients it took; without it nothing is known.
    "sparkpost": (RecipientOutcome.TEMPORARY, True),
    # The receiver's body is its own business.
    "webhook": (RecipientOutcome.DELIVERED, False),
}


@pytest.mark.parametrize("provider", sorted(NOT_DOCUMENTED))
async def test_2xx_that_is_not_the_documented_answer(
    provider: str,
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcome, counted = NOT_DOCUMENTED[provider]
    server = await provider_server(provider)
    registry = CollectorRegistry()
    transport = transport_factory(api_upstream(provider, server), registry=registry)
    server.inject(Fault(200, "<html><body>Welcome to nginx!</body></html>"))
    results = await transport.deliver(envelope(), rich_message())
    assert {r.outcome for r in results} == {outcome}
    labels = {"upstream": f"{provider}-api", "provider": provider}
    unexpected = registry.get_sample_value("mailrelay_provider_unexpected_answers_total", labels)
    assert (unexpected or 0) == (1 if counted else 0)
    requests = registry.get_sample_value(
        "mailrelay_provider_requests_total", {**labels, "result": outcome.value}
    )
    assert requests == 1
    if counted:
        assert "without its documented success answer" in caplog.text
    if outcome is RecipientOutcome.TEMPORARY:
        assert "outcome is unknown" in results[0].detail


async def test_sendgrid_202_without_message_id_is_counted(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server = await provider_server("sendgrid")
    registry = CollectorRegistry()
    transport = transport_factory(api_upstream("sendgrid", server), registry=registry)
    server.inject(Fault(202))
    results = await transport.deliver(envelope(), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    labels = {"upstream": "sendgrid-api", "provider": "sendgrid"}
    assert registry.get_sample_value("mailrelay_provider_unexpected_answers_total", labels) == 1


async def test_sparkpost_unknown_outcome_retry_is_ambiguous(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server = await provider_server("sparkpost")
    registry = CollectorRegistry()
    transport = transport_factory(api_upstream("sparkpost", server), registry=registry)
    server.inject(Fault(200, {"results": {"id": "1"}}))  # the counts are missing
    first = await transport.deliver(envelope(), rich_message())
    assert {r.outcome for r in first} == {RecipientOutcome.TEMPORARY}
    again = await transport.deliver(envelope(), rich_message())
    assert {r.outcome for r in again} == {RecipientOutcome.DELIVERED}
    ambiguous = registry.get_sample_value(
        "mailrelay_upstream_ambiguous_retries_total", {"upstream_kind": "sparkpost"}
    )
    assert ambiguous == 1


def _sparkpost_answer(accepted: int, rejected: int) -> Fault:
    return Fault(
        200,
        {
            "results": {
                "total_rejected_recipients": rejected,
                "total_accepted_recipients": accepted,
                "id": "102258889940193105",
            }
        },
    )


async def test_sparkpost_nobody_accepted_counts_as_permanent(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server = await provider_server("sparkpost")
    registry = CollectorRegistry()
    transport = transport_factory(api_upstream("sparkpost", server), registry=registry)
    server.inject(_sparkpost_answer(0, 1))
    results = await transport.deliver(envelope(recipients=("bob@example.org",)), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.PERMANENT}
    labels = {"upstream": "sparkpost-api", "provider": "sparkpost"}
    assert (
        registry.get_sample_value(
            "mailrelay_provider_requests_total", {**labels, "result": "permanent"}
        )
        == 1
    )


async def test_sparkpost_partly_refused_transmission_counts_the_refusal(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    """SparkPost took one of two and does not say which: sending again would reach the
    accepted one twice, so both stay delivered; the refusal is counted and said."""
    server = await provider_server("sparkpost")
    registry = CollectorRegistry()
    transport = transport_factory(api_upstream("sparkpost", server), registry=registry)
    server.inject(_sparkpost_answer(1, 1))
    results = await transport.deliver(envelope(), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    assert "refused 1 of the 2 recipients" in results[0].detail
    labels = {"upstream": "sparkpost-api", "provider": "sparkpost"}
    for result in ("delivered", "permanent"):
        value = registry.get_sample_value(
            "mailrelay_provider_requests_total", {**labels, "result": result}
        )
        assert value == 1, result
