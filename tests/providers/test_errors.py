"""Error handling against the stand-ins: throttling, retries, bounces, configuration errors."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mailrelay.relay.config import ApiUpstream
from mailrelay.relay.upstreams.providers.base import SPLIT_REFUSED_UP_TO, ApiTransport
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome
from mailrelay.support.provider_servers import Fault, ProviderServer, raw_sent, ses_error
from tests.providers.conftest import PROVIDERS, RAW_PROVIDERS
from tests.providers.messages import rich_message

ServerFactory = Callable[[str], Awaitable[ProviderServer]]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def envelope(queue_id: str = "QERR") -> Envelope:
    return Envelope(
        queue_id=queue_id,
        mail_from="ann@example.com",
        recipients=("bob@example.org", "carol@example.net"),
        smtputf8=False,
        body_8bitmime=True,
    )


async def setup(
    provider: str,
    provider_server: ServerFactory,
    api_upstream: Callable[..., ApiUpstream],
    transport_factory: Callable[..., ApiTransport],
    **kwargs: Any,
) -> tuple[ProviderServer, ApiTransport, FakeClock, CollectorRegistry]:
    server = await provider_server(provider)
    clock = FakeClock()
    registry = CollectorRegistry()
    fields = kwargs.pop("fields", {})
    transport = transport_factory(
        api_upstream(provider, server, **fields), clock=clock, registry=registry, **kwargs
    )
    return server, transport, clock, registry


def outcomes(results: list[Any]) -> set[RecipientOutcome]:
    return {r.outcome for r in results}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_429_defers_pauses_the_upstream_then_delivers(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport, clock, registry = await setup(
        provider, provider_server, api_upstream, transport_factory
    )
    server.inject(Fault(429, {"message": "slow down"}, {"Retry-After": "7"}))
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.TEMPORARY}
    assert [r.retry_after for r in results] == [7.0, 7.0]
    # While paused the upstream is not called at all.
    clock.now += 5
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.TEMPORARY}
    assert results[0].retry_after == pytest.approx(2.0)
    assert len(server.requests) == 1
    clock.now += 2.5
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.DELIVERED}
    assert len(server.sent) == 1
    labels = {"upstream": f"{provider}-api", "provider": provider}
    assert registry.get_sample_value("mailrelay_provider_throttled_total", labels) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_500_is_temporary_and_the_retry_delivers(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport, _, _ = await setup(
        provider, provider_server, api_upstream, transport_factory
    )
    server.inject(Fault(500, {"message": "internal error"}))
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {
        RecipientOutcome.TEMPORARY
    }
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {
        RecipientOutcome.DELIVERED
    }
    assert (len(server.requests), len(server.sent)) == (2, 1)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_400_is_permanent(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport, _, _ = await setup(
        provider, provider_server, api_upstream, transport_factory
    )
    # Three times: a raw provider asks again once per recipient after a refused request.
    server.inject(*[Fault(400, {"message": "'to' parameter is not a valid address"})] * 3)
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.PERMANENT}
    assert "not a valid address" in results[0].detail


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_401_is_a_configuration_error_with_the_metric_raised(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport, _, registry = await setup(
        provider, provider_server, api_upstream, transport_factory
    )
    labels = {"upstream": f"{provider}-api", "provider": provider}
    server.inject(Fault(401, {"message": "Unauthorized"}))
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.CONFIG_ERROR}
    assert registry.get_sample_value("mailrelay_provider_config_error", labels) == 1
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {
        RecipientOutcome.DELIVERED
    }
    assert registry.get_sample_value("mailrelay_provider_config_error", labels) == 0


async def test_wrong_key_then_fixed_secret_is_picked_up(
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    credentials_dir: Path,
) -> None:
    """The server's own 401 (not an injected one): the file is re-read after the fix."""
    good = (credentials_dir / "api_key").read_text()
    (credentials_dir / "api_key").write_text("wrong-key")
    server, transport, clock, _ = await setup(
        "sendgrid", provider_server, api_upstream, transport_factory
    )
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.CONFIG_ERROR}
    assert "credentials" in results[0].detail
    (credentials_dir / "api_key").write_text(good)
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {
        RecipientOutcome.DELIVERED
    }
    # A rotated file is noticed without any failure once the check interval has passed.
    (credentials_dir / "api_key").write_text("rotated-away")
    os.utime(credentials_dir / "api_key", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {
        RecipientOutcome.DELIVERED
    }
    clock.now += 5
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {
        RecipientOutcome.CONFIG_ERROR
    }
    assert len(server.sent) == 2


async def test_missing_credentials_is_a_configuration_error_without_a_request(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any, tmp_path: Path
) -> None:
    server, transport, _, _ = await setup(
        "postmark",
        provider_server,
        api_upstream,
        transport_factory,
        fields={"credentials_dir": str(tmp_path / "nothing-here")},
    )
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.CONFIG_ERROR}
    assert "api_key" in results[0].detail and "missing" in results[0].detail
    assert server.requests == []


@pytest.mark.parametrize("provider", ["resend", "webhook"])
async def test_timeout_after_sending_retries_with_the_same_idempotency_key(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport, _, _ = await setup(
        provider,
        provider_server,
        api_upstream,
        transport_factory,
        fields={"timeout_seconds": 0.3},
    )
    server.inject(Fault(delay=1.0))
    message = rich_message()  # the spooled bytes: the same on every attempt
    results = await transport.deliver(envelope("QSLOW"), message)
    assert outcomes(results) == {RecipientOutcome.TEMPORARY}
    assert "timed out" in results[0].detail
    assert len(server.sent) == 1  # the provider did get it
    results = await transport.deliver(envelope("QSLOW"), message)
    assert outcomes(results) == {RecipientOutcome.DELIVERED}
    keys = [r.headers["idempotency-key"] for r in server.requests]
    assert len(keys) == 2 and keys[0] == keys[1]
    # The provider (Resend) or the receiver (webhook) answered the retry from its
    # idempotency store: still one email sent.
    assert len(server.sent) == 1
    assert results[0].remote_id == server.idempotency[keys[0]][1]["id"]


async def test_network_error_is_temporary(api_upstream: Any, transport_factory: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    class Closed:
        base_url = f"http://127.0.0.1:{port}"

    upstream = api_upstream("mailgun", Closed())
    results = await transport_factory(upstream).deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.TEMPORARY}
    assert "unreachable" in results[0].detail


@pytest.mark.parametrize(
    "case",
    [
        ("AccountSuspendedException", 400, RecipientOutcome.CONFIG_ERROR),
        ("SendingPausedException", 400, RecipientOutcome.CONFIG_ERROR),
        ("MailFromDomainNotVerifiedException", 400, RecipientOutcome.CONFIG_ERROR),
        ("MessageRejected", 400, RecipientOutcome.PERMANENT),
        ("TooManyRequestsException", 429, RecipientOutcome.TEMPORARY),
        ("LimitExceededException", 400, RecipientOutcome.TEMPORARY),
    ],
)
async def test_ses_error_names_decide(
    case: tuple[str, int, RecipientOutcome],
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
) -> None:
    kind, status, expected = case
    server, transport, _, _ = await setup("ses", provider_server, api_upstream, transport_factory)
    # Three times: a permanently refused request is asked again once per recipient.
    server.inject(*[ses_error(status, kind, "as injected")] * 3)
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {expected}
    assert kind in results[0].detail
    if expected is RecipientOutcome.TEMPORARY:
        # SES sends no Retry-After: the upstream still pauses, for the default time.
        assert results[0].retry_after == 10.0


async def test_ses_signature_is_checked_by_the_server(
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    credentials_dir: Path,
) -> None:
    (credentials_dir / "aws_secret_access_key").write_text("not-the-secret")
    server, transport, _, _ = await setup("ses", provider_server, api_upstream, transport_factory)
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.CONFIG_ERROR}
    assert "signature" in results[0].detail
    assert server.sent == []


async def test_ses_uses_the_standard_aws_chain_without_credential_files(
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from mailrelay.support.provider_servers import AWS_KEY_ID, AWS_SECRET  # noqa: PLC0415

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server, transport, _, _ = await setup(
        "ses", provider_server, api_upstream, transport_factory, fields={"credentials_dir": None}
    )
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {
        RecipientOutcome.DELIVERED
    }
    assert len(server.sent) == 1


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (405, RecipientOutcome.CONFIG_ERROR),
        (413, RecipientOutcome.CONFIG_ERROR),
        (300, RecipientOutcome.PERMANENT),
        (406, RecipientOutcome.PERMANENT),
        (100, RecipientOutcome.TEMPORARY),
    ],
)
async def test_postmark_error_codes(
    code: int,
    expected: RecipientOutcome,
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
) -> None:
    server, transport, _, _ = await setup(
        "postmark", provider_server, api_upstream, transport_factory
    )
    server.inject(Fault(422, {"ErrorCode": code, "Message": "as injected"}))
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {expected}


async def test_sparkpost_420_pauses_like_429(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport, _, _ = await setup(
        "sparkpost", provider_server, api_upstream, transport_factory
    )
    server.inject(Fault(420, {"errors": [{"message": "Exceed Sending Limit (daily)"}]}))
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.TEMPORARY}
    assert "Exceed Sending Limit" in results[0].detail
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {
        RecipientOutcome.TEMPORARY
    }
    assert len(server.requests) == 1


NOW = 1_000_000_000.0


@pytest.mark.parametrize(
    "case",
    [
        # Resend: seconds to wait.
        ("resend", {"ratelimit-reset": "3"}, 3.0),
        # Mailgun style: epoch milliseconds.
        ("mailgun", {"X-RateLimit-Reset": str(int((NOW + 30) * 1000))}, 30.0),
        # SendGrid style: epoch seconds, here 4000 s away, so capped at an hour.
        ("sendgrid", {"X-RateLimit-Reset": str(int(NOW + 4000))}, 3600.0),
    ],
)
async def test_rate_limit_reset_headers_set_the_pause(
    case: tuple[str, dict[str, str], float],
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
) -> None:
    provider, headers, expected = case
    server, transport, _, _ = await setup(
        provider, provider_server, api_upstream, transport_factory, wall_clock=lambda: NOW
    )
    server.inject(Fault(429, {"message": "rate limited"}, headers))
    results = await transport.deliver(envelope(), rich_message())
    assert results[0].retry_after == pytest.approx(expected)


async def test_webhook_signs_with_api_key_when_there_is_no_signing_secret_file(
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    credentials_dir: Path,
) -> None:
    """The operator projects every API Secret to `api_key`; the webhook accepts that name."""
    from mailrelay.support.provider_servers import SIGNING_SECRET  # noqa: PLC0415

    (credentials_dir / "signing_secret").unlink()
    (credentials_dir / "api_key").write_text(SIGNING_SECRET)
    server, transport, _, _ = await setup(
        "webhook", provider_server, api_upstream, transport_factory
    )
    assert outcomes(await transport.deliver(envelope(), rich_message())) == {
        RecipientOutcome.DELIVERED
    }
    (credentials_dir / "api_key").unlink()
    transport.credentials.invalidate()
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.CONFIG_ERROR}
    assert "signing_secret" in results[0].detail
    assert len(server.requests) == 1


async def test_unreadable_credential_file_is_a_configuration_error(
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    credentials_dir: Path,
) -> None:
    (credentials_dir / "api_key").unlink()
    (credentials_dir / "api_key").mkdir()  # a directory where the file should be
    server, transport, _, _ = await setup(
        "resend", provider_server, api_upstream, transport_factory
    )
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.CONFIG_ERROR}
    assert "cannot read credential file" in results[0].detail
    assert server.requests == []


@pytest.mark.parametrize("provider", ["sendgrid", "sparkpost", "postmark", "resend"])
async def test_a_key_file_with_a_line_break_is_a_configuration_error(
    provider: str,
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    credentials_dir: Path,
) -> None:
    """The key goes into a header as it is; a second line would end the header there. That
    is our configuration (the metric says so), and nothing is sent."""
    (credentials_dir / "api_key").write_text("first-line\nsecond-line-of-the-key\n")
    server, transport, _, registry = await setup(
        provider, provider_server, api_upstream, transport_factory
    )
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.CONFIG_ERROR}
    assert "line break" in results[0].detail
    assert "second-line" not in results[0].detail
    labels = {"upstream": f"{provider}-api", "provider": provider}
    assert registry.get_sample_value("mailrelay_provider_config_error", labels) == 1
    assert server.requests == []


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "no such file or directory"), ("not a certificate\n", "it is not a PEM bundle")],
)
async def test_a_ca_file_that_cannot_be_loaded_is_a_configuration_error(
    *,
    content: str | None,
    reason: str,
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    tmp_path: Path,
) -> None:
    """The CA bundle is loaded off the loop when the first request goes out; a missing or
    broken one keeps the mail queued as our configuration problem, and nothing is sent."""
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_text(content)
    server, transport, _, registry = await setup(
        "resend", provider_server, api_upstream, transport_factory, fields={"ca_file": ca_file}
    )
    results = await transport.deliver(envelope(), rich_message())
    assert outcomes(results) == {RecipientOutcome.CONFIG_ERROR}
    assert f"the CA file {ca_file} cannot be loaded: {reason}" in results[0].detail
    labels = {"upstream": "resend-api", "provider": "resend"}
    assert registry.get_sample_value("mailrelay_provider_config_error", labels) == 1
    assert server.requests == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_unaddressable_recipient_fails_alone(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    # A non-ASCII mailbox name (for a provider without SMTPUTF8) or a control character
    # spooled before the front refused it: that recipient bounces, the others in the
    # same message are delivered (today the whole message was refused for everyone).
    server, transport, _, _ = await setup(
        provider, provider_server, api_upstream, transport_factory
    )
    smtputf8 = transport.limits.smtputf8
    bad = ["nul\x00@example.org"] + ([] if smtputf8 else ["zoë@example.org"])
    mixed = Envelope(
        queue_id="QMIX",
        mail_from="ann@example.com",
        recipients=("bob@example.org", *bad, "carol@example.net"),
        smtputf8=True,
        body_8bitmime=True,
    )
    results = await transport.deliver(mixed, rich_message())
    assert [(r.address, r.outcome) for r in results] == [
        ("bob@example.org", RecipientOutcome.DELIVERED),
        *((b, RecipientOutcome.PERMANENT) for b in bad),
        ("carol@example.net", RecipientOutcome.DELIVERED),
    ]
    assert results[1].detail.startswith("5.1.3 Bad recipient address: ")
    if not smtputf8:
        assert results[2].detail.startswith("5.6.7 non-ASCII mailbox names")
    assert len(server.sent) >= 1


@pytest.mark.parametrize("provider", RAW_PROVIDERS)
async def test_a_request_refused_for_one_recipient_is_split_so_the_others_arrive(
    provider: str, provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    # The provider refuses the whole request because of one address it does not take
    # (its validator is stricter than SMTP): the relay asks again one recipient at a
    # time, so only that recipient bounces. The message bytes are the same each time.
    server, transport, _, _ = await setup(
        provider, provider_server, api_upstream, transport_factory
    )
    server.refuse_containing = (
        "refused@example.org",
        Fault(400, {"message": "'to' parameter is not a valid address"}),
    )
    rcpts = ("bob@example.org", "refused@example.org", "carol@example.net")
    env = Envelope(
        queue_id="QSPLIT",
        mail_from="ann@example.com",
        recipients=rcpts,
        smtputf8=False,
        body_8bitmime=True,
    )
    message = rich_message()

    results = await transport.deliver(env, message)

    assert [(r.address, r.outcome) for r in results] == [
        ("bob@example.org", RecipientOutcome.DELIVERED),
        ("refused@example.org", RecipientOutcome.PERMANENT),
        ("carol@example.net", RecipientOutcome.DELIVERED),
    ]
    assert "not a valid address" in results[1].detail
    sent = [raw_sent(provider, req) for req in server.sent]
    assert sorted(r for _, recipients in sent for r in recipients) == [
        "bob@example.org",
        "carol@example.net",
    ]
    assert all(data == message for data, _ in sent)


async def test_a_refused_request_for_everyone_is_not_split_beyond_the_limit(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server, transport, _, _ = await setup(
        "mailgun", provider_server, api_upstream, transport_factory
    )
    server.inject(Fault(400, {"message": "message rejected"}))
    many = tuple(f"r{i}@example.org" for i in range(SPLIT_REFUSED_UP_TO + 1))
    env = Envelope(
        queue_id="QMANY",
        mail_from="ann@example.com",
        recipients=many,
        smtputf8=False,
        body_8bitmime=True,
    )
    results = await transport.deliver(env, rich_message())
    assert outcomes(results) == {RecipientOutcome.PERMANENT}
    assert len(server.requests) == 1
