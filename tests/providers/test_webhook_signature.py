"""The webhook's v2 signature: it covers the idempotency key, names its key id, and rotates.

The local receiver (`servers.webhook`) verifies like docs/providers.md tells a receiver to
and deduplicates on `Idempotency-Key`. A request captured on the way is replayed to it
within the timestamp window: with the same key it is answered from the store (one
delivery); with a new key it no longer verifies, so the receiver cannot be made to
deliver twice.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from mailrelay.relay.config import ApiUpstream
from mailrelay.relay.upstreams.providers.webhook import sign, signed_bytes, verify_signature
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome
from mailrelay.support.provider_servers import SIGNING_SECRET, ProviderServer, Recorded
from tests.providers.messages import rich_message

ServerFactory = Callable[[str], Awaitable[ProviderServer]]
OLD, NEW = "2026-11", "2026-12"
SECRETS = {OLD: "whsec-old-0123456789", NEW: "whsec-new-9876543210"}


def envelope(queue_id: str = "QHOOK") -> Envelope:
    return Envelope(
        queue_id=queue_id,
        mail_from="ann@example.com",
        recipients=("bob@example.org",),
        smtputf8=False,
        body_8bitmime=True,
    )


async def replay(server: ProviderServer, captured: Recorded, **changes: str) -> int:
    """POST the captured request again, with some headers changed, as an attacker would."""
    headers = {k: v for k, v in captured.headers.items() if k not in {"host", "content-length"}}
    headers.update({k.lower(): v for k, v in changes.items()})
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.base_url + "/hook", data=captured.body, headers=headers) as resp,
    ):
        return resp.status


async def test_replay_with_a_new_idempotency_key_no_longer_verifies(
    provider_server: ServerFactory, api_upstream: Any, transport_factory: Any
) -> None:
    server = await provider_server("webhook")
    transport = transport_factory(api_upstream("webhook", server))
    results = await transport.deliver(envelope(), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    (captured,) = server.requests
    assert captured.headers["x-mailrelay-signature"].startswith("v2=")
    assert captured.headers["x-mailrelay-key-id"] == "default"

    # Same key: the receiver's store answers, nothing is delivered twice.
    assert await replay(server, captured) == 200
    assert len(server.sent) == 1
    # New key: the signature covers the key, so the replay is refused.
    assert await replay(server, captured, **{"Idempotency-Key": "mailrelay/QHOOK/other"}) == 401
    assert len(server.sent) == 1
    headers = dict(captured.headers)
    now = float(headers["x-mailrelay-timestamp"])
    secrets = {"default": SIGNING_SECRET}
    assert verify_signature(secrets, headers, captured.body, now=now)
    forged = {**headers, "idempotency-key": "mailrelay/QHOOK/other"}
    assert not verify_signature(secrets, forged, captured.body, now=now)
    # Nor can the key id, the timestamp, the envelope or the body be changed.
    for name, value in [
        ("x-mailrelay-key-id", "other"),
        ("x-mailrelay-timestamp", str(int(now) + 1)),
        ("x-mailrelay-envelope", headers["x-mailrelay-envelope"].replace("bob", "eve")),
    ]:
        trusted = {**secrets, "other": SIGNING_SECRET}
        assert not verify_signature(trusted, {**headers, name: value}, captured.body, now=now)
    assert not verify_signature(secrets, headers, captured.body + b"x", now=now)
    assert not verify_signature(secrets, headers, captured.body, now=now + 301)


def test_fields_cannot_run_into_each_other() -> None:
    with pytest.raises(ValueError, match="line break"):
        signed_bytes("1", "k", "a\nb", "{}", b"")

    def signature(idempotency_key: str) -> str:
        return sign(
            "s",
            timestamp="1700000000",
            key_id="k",
            idempotency_key=idempotency_key,
            envelope_json="{}",
            body=b"m",
        )

    assert signature("a") != signature("a.")
    headers = {
        "X-Mailrelay-Timestamp": "+1700000000",
        "X-Mailrelay-Key-Id": "k",
        "Idempotency-Key": "a",
        "X-Mailrelay-Envelope": "{}",
        "X-Mailrelay-Signature": signature("a"),
    }
    # int() would read "+1700000000"; the receiver takes digits only.
    assert not verify_signature({"k": "s"}, headers, b"m", now=1700000000)


def _rotation(credentials_dir: Path) -> None:
    for key_id, secret in SECRETS.items():
        (credentials_dir / f"signing_key_{key_id}").write_text(secret + "\n")


@pytest.mark.parametrize("active", [OLD, NEW])
async def test_rotation_signs_with_the_active_key_and_names_it(
    active: str,
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    credentials_dir: Path,
) -> None:
    _rotation(credentials_dir)
    server = await provider_server("webhook")
    server.webhook_keys = dict(SECRETS)  # the receiver trusts both during the rotation
    transport = transport_factory(
        api_upstream("webhook", server, signing_keys=[OLD, NEW], active_signing_key=active)
    )
    results = await transport.deliver(envelope(), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    (request,) = server.requests
    assert request.headers["x-mailrelay-key-id"] == active
    now = float(request.headers["x-mailrelay-timestamp"])
    assert verify_signature(SECRETS, request.headers, request.body, now=now)
    assert verify_signature({active: SECRETS[active]}, request.headers, request.body, now=now)
    other = NEW if active == OLD else OLD
    assert not verify_signature({other: SECRETS[other]}, request.headers, request.body, now=now)
    # A receiver that already dropped the active key refuses it: the mail stays queued.
    server.webhook_keys = {other: SECRETS[other]}
    results = await transport.deliver(envelope("QHOOK2"), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.CONFIG_ERROR}


async def test_missing_active_key_file_is_a_configuration_error(
    provider_server: ServerFactory,
    api_upstream: Any,
    transport_factory: Any,
    credentials_dir: Path,
) -> None:
    (credentials_dir / f"signing_key_{OLD}").write_text(SECRETS[OLD])
    server = await provider_server("webhook")
    transport = transport_factory(
        api_upstream("webhook", server, signing_keys=[OLD, NEW], active_signing_key=NEW)
    )
    results = await transport.deliver(envelope(), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.CONFIG_ERROR}
    assert f"signing_key_{NEW}" in results[0].detail
    assert server.requests == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"signing_keys": ["a", "b", "c"], "active_signing_key": "a"}, "at most 2"),
        ({"signing_keys": ["a", "b"]}, "must name the key that signs"),
        ({"signing_keys": ["a"], "active_signing_key": "b"}, "must be the id of one of"),
        ({"active_signing_key": "a"}, "must be the id of one of"),
        ({"signing_keys": ["a", "a"], "active_signing_key": "a"}, "every id must be different"),
        ({"signing_keys": ["../x"]}, "an id is 1 to 63 letters"),
        ({"signing_keys": ["a.b"]}, "an id is 1 to 63 letters"),
    ],
)
def test_signing_key_rules(fields: dict[str, Any], message: str) -> None:
    base = {"type": "api", "name": "hook", "provider": "webhook", "endpoint": "https://h.test/"}
    with pytest.raises(ValidationError, match=message):
        ApiUpstream.model_validate({**base, **fields})
    ApiUpstream.model_validate({**base, "signing_keys": ["a"]})  # one key: it is active


def test_signing_keys_only_for_the_webhook() -> None:
    with pytest.raises(ValidationError, match="only used by provider webhook"):
        ApiUpstream.model_validate(
            {"type": "api", "name": "rs", "provider": "resend", "signing_keys": ["a"]}
        )


def test_docs_receiver_example_verifies_a_real_request() -> None:
    """The verifier printed in docs/providers.md accepts what the relay sends."""
    docs = (Path(__file__).parents[2] / "docs" / "providers.md").read_text()
    code = docs.split("```python\n# verify_webhook.py\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "verify_webhook.py", "exec"), namespace)
    now = time.time()
    base = {
        "timestamp": str(int(now)),
        "key_id": NEW,
        "idempotency_key": "mailrelay/Q/abc",
        "envelope_json": '{"recipients":["b@x.org"]}',
        "body": b"Subject: hi\r\n\r\nbody\r\n",
    }
    headers = {
        "X-Mailrelay-Timestamp": base["timestamp"],
        "X-Mailrelay-Key-Id": NEW,
        "Idempotency-Key": "mailrelay/Q/abc",
        "X-Mailrelay-Envelope": base["envelope_json"],
        "X-Mailrelay-Signature": sign(SECRETS[NEW], **base),  # type: ignore[arg-type]
    }
    verify = namespace["verify"]
    keys = {k: v.encode() for k, v in SECRETS.items()}
    assert verify(keys, headers, base["body"])
    assert not verify(keys, {**headers, "Idempotency-Key": "new"}, base["body"])
    assert not verify({OLD: keys[OLD]}, headers, base["body"])
