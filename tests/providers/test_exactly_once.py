"""Exactly-once where the provider allows it, and ambiguous retries counted where it does not.

A provider stand-in accepts the send and then loses the answer: it closes the connection
after the status line (`Fault(drop=True)`) or answers after the client gave up
(`Fault(delay=...)`). Where the API takes an idempotency key (Resend, and the webhook whose
receiver deduplicates on it) the retry is answered from the store and nothing is sent
twice; where it takes none the retry sends again, as the real provider would, and
`mailrelay_upstream_ambiguous_retries_total` counts it.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from mailrelay.relay.config import ApiUpstream
from mailrelay.relay.upstreams.providers.base import (
    AmbiguousSends,
    ApiTransport,
    idempotency_key,
)
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome
from mailrelay.support.provider_servers import Fault, ProviderServer
from tests.providers.messages import rich_message

ServerFactory = Callable[[str], Awaitable[ProviderServer]]
KEYED = ("resend", "webhook")
UNKEYED = ("mailgun", "ses", "sparkpost", "sendgrid", "postmark")
AMBIGUOUS = "mailrelay_upstream_ambiguous_retries_total"


def envelope(queue_id: str = "QONCE", recipients: tuple[str, ...] | None = None) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        mail_from="ann@example.com",
        recipients=recipients or ("bob@example.org", "carol@example.net"),
        smtputf8=False,
        body_8bitmime=True,
    )


async def setup(
    provider: str,
    provider_server: ServerFactory,
    api_upstream: Callable[..., ApiUpstream],
    transport_factory: Callable[..., ApiTransport],
    **fields: Any,
) -> tuple[ProviderServer, ApiTransport, CollectorRegistry]:
    server = await provider_server(provider)
    registry = CollectorRegistry()
    transport = transport_factory(api_upstream(provider, server, **fields), registry=registry)
    return server, transport, registry


def outcomes(results: list[Any]) -> set[RecipientOutcome]:
    return {r.outcome for r in results}


def ambiguous(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value(AMBIGUOUS, {"upstream_kind": kind}) or 0.0


LOST_ANSWERS = {
    "dropped": (Fault(drop=True), {}),
    "timed-out": (Fault(delay=1.0), {"timeout_seconds": 0.3}),
}


@pytest.mark.parametrize("lost", sorted(LOST_ANSWERS))
@pytest.mark.parametrize("provider", KEYED)
async def test_lost_answer_is_retried_with_the_same_key_and_sent_once(
    provider: str,
    lost: str,
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
) -> None:
    fault, fields = LOST_ANSWERS[lost]
    server, transport, registry = await setup(
        provider, provider_server, api_upstream, transport_factory, **fields
    )
    server.inject(fault)
    message = rich_message()
    first = await transport.deliver(envelope(), message)
    assert outcomes(first) == {RecipientOutcome.TEMPORARY}
    assert len(server.sent) == 1  # the provider acted; only the answer was lost
    again = await transport.deliver(envelope(), message)
    assert outcomes(again) == {RecipientOutcome.DELIVERED}
    keys = [r.headers["idempotency-key"] for r in server.requests]
    assert keys == [idempotency_key("QONCE", envelope().recipients)] * 2
    assert len(server.sent) == 1, "the retry must not send a second time"
    assert again[0].remote_id == server.idempotency[keys[0]][1]["id"]
    assert ambiguous(registry, provider) == 0


@pytest.mark.parametrize("lost", sorted(LOST_ANSWERS))
@pytest.mark.parametrize("provider", UNKEYED)
async def test_lost_answer_without_a_key_is_an_ambiguous_retry(
    provider: str,
    lost: str,
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
) -> None:
    """What the docs say plainly: the provider sends it twice; the metric shows it."""
    fault, fields = LOST_ANSWERS[lost]
    server, transport, registry = await setup(
        provider, provider_server, api_upstream, transport_factory, **fields
    )
    assert all("idempotency-key" not in r.headers for r in server.requests)
    server.inject(fault)
    message = rich_message()
    first = await transport.deliver(envelope(), message)
    assert outcomes(first) == {RecipientOutcome.TEMPORARY}
    assert ambiguous(registry, provider) == 0  # counted when the retry goes out
    again = await transport.deliver(envelope(), message)
    assert outcomes(again) == {RecipientOutcome.DELIVERED}
    assert len(server.sent) == 2
    assert ambiguous(registry, provider) == 1
    # A later message, or a third attempt, is not ambiguous again.
    await transport.deliver(envelope("QOTHER"), message)
    assert ambiguous(registry, provider) == 1


async def test_a_request_that_never_connected_is_not_ambiguous(
    api_upstream: Any, transport_factory: Any, provider_server: ServerFactory
) -> None:
    server = await provider_server("mailgun")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connection refused
        registry = CollectorRegistry()
        closed = transport_factory(
            api_upstream("mailgun", server, endpoint=f"http://127.0.0.1:{port}"),
            registry=registry,
        )
        results = await closed.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.TEMPORARY}
    working = transport_factory(api_upstream("mailgun", server), registry=registry)
    assert outcomes(await working.deliver(envelope(), rich_message())) == {
        RecipientOutcome.DELIVERED
    }
    assert ambiguous(registry, "mailgun") == 0


async def test_ambiguous_retry_through_another_upstream_is_counted_with_its_kind(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    """A fallback after an unknown outcome may duplicate too: counted on the fallback."""
    ses_server = await provider_server("ses")
    resend_server = await provider_server("resend")
    registry = CollectorRegistry()
    ses = transport_factory(api_upstream("ses", ses_server), registry=registry)
    resend = transport_factory(api_upstream("resend", resend_server), registry=registry)
    ses_server.inject(Fault(drop=True))
    assert outcomes(await ses.deliver(envelope(), rich_message())) == {RecipientOutcome.TEMPORARY}
    assert outcomes(await resend.deliver(envelope(), rich_message())) == {
        RecipientOutcome.DELIVERED
    }
    assert ambiguous(registry, "resend") == 1
    assert ambiguous(registry, "ses") == 0


def test_ambiguous_sends_are_bounded_and_taken_once() -> None:
    sends = AmbiguousSends(limit=3)
    sends.remember("Q1", ["A@x.org"])
    sends.remember("Q2", ["b@x.org", "c@x.org", "d@x.org"])
    assert len(sends) == 3
    assert not sends.take("Q1", ["a@x.org"])  # the oldest went first
    assert sends.take("Q2", ["B@X.ORG"])
    assert not sends.take("Q2", ["b@x.org"])


async def test_resend_same_key_with_another_body_is_its_409_and_not_sent_again(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    """Resend keeps the key 24 hours: the same key with a different payload is refused
    with 409 invalid_idempotent_request. The email went out under that key, so the
    relay takes it as delivered instead of deferring it until it expires."""
    server, transport, _ = await setup("resend", provider_server, api_upstream, transport_factory)
    server.inject(Fault(drop=True))
    await transport.deliver(envelope(), rich_message(extra_headers={"X-Version": "1"}))
    results = await transport.deliver(envelope(), rich_message(extra_headers={"X-Version": "2"}))
    assert outcomes(results) == {RecipientOutcome.DELIVERED}
    assert "already sent" in results[0].detail
    assert len(server.sent) == 1


async def test_resend_refuses_a_key_over_256_characters(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    """The stand-in enforces Resend's documented key length; ours stay far below it."""
    server = await provider_server("resend")
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            server.base_url + "/emails",
            json={"from": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"},
            headers={"Authorization": "Bearer test-key-0123456789", "Idempotency-Key": "k" * 257},
        )
        assert resp.status == 400
        assert (await resp.json())["name"] == "invalid_idempotency_key"
    longest = idempotency_key("Q" * 64, ["x" * 200 + "@example.org"] * 1000)
    assert len(longest) <= 256


@pytest.mark.parametrize("provider", ["resend", "webhook"])
async def test_each_batch_has_its_own_stable_key(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    """A message split over requests gets a key per batch; a retry of one batch (the
    others delivered) reuses that batch's key whatever the recipients' order or case."""
    server, transport, _ = await setup(provider, provider_server, api_upstream, transport_factory)
    count = 60 if provider == "resend" else 200  # Resend: 50 per request; webhook: 4 KiB
    recipients = tuple(f"user{i:03d}-{'x' * 20}@example.org" for i in range(count))
    message = rich_message()
    await transport.deliver(envelope("QSPLIT", recipients), message)
    first_keys = [r.headers["idempotency-key"] for r in server.requests]
    assert len(first_keys) >= 2 and len(set(first_keys)) == len(first_keys)
    calls = await transport.prepare(envelope("QSPLIT", recipients), message)
    assert [c.request.headers["Idempotency-Key"] for c in calls] == first_keys
    server.requests.clear()
    await transport.deliver(envelope("QSPLIT", calls[-1].recipients), message)
    assert [r.headers["idempotency-key"] for r in server.requests] == [first_keys[-1]]
    assert len({r.headers["idempotency-key"] for r in server.sent}) == len(first_keys)


def test_the_key_ignores_order_and_case_but_not_the_message_or_the_batch() -> None:
    key = idempotency_key("Q1", ["a@x.org", "B@x.org"])
    assert key == idempotency_key("Q1", ["b@X.org", "A@x.org"])
    assert key != idempotency_key("Q2", ["a@x.org", "b@x.org"])
    assert key != idempotency_key("Q1", ["a@x.org"])
    assert key.startswith("mailrelay/Q1/") and key.isascii()
