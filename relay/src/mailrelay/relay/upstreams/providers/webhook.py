"""Webhook: the raw message and its envelope, POSTed and signed, to a team's own service.

POST {endpoint} with the message bytes unchanged as the body (`Content-Type:
message/rfc822`) and these headers:

- `X-Mailrelay-Envelope`: compact ASCII JSON {"queue_id", "mail_from", "recipients",
  "smtputf8", "body_8bitmime"};
- `X-Mailrelay-Timestamp`: unix seconds when the request was signed;
- `X-Mailrelay-Signature`: `v1=` and the hex HMAC-SHA256 of
  `timestamp + "." + envelope + "." + body`, keyed with the credential file
  `signing_secret` (or `api_key`, the name the operator projects Secrets to). The
  envelope is signed too, so nobody can re-address a captured request;
- `Idempotency-Key`: the same on every retry of the same message and recipients.

The envelope header is kept under 4 KiB: a longer recipient list is split over several
requests, each with its own recipients, signature and idempotency key.

A receiver recomputes the HMAC, compares in constant time and rejects old timestamps
(`verify_signature` does all three). Any 2xx is delivery of every recipient; a JSON
answer's `id` is logged as the remote id. Status codes are classified like any provider.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence

from mailrelay.relay.upstreams.providers.base import (
    ApiTransport,
    Call,
    CredentialError,
    idempotency_key,
)
from mailrelay.relay.upstreams.transport import Envelope

__all__ = ["WebhookTransport", "sign", "verify_signature"]

ENVELOPE_HEADER = "X-Mailrelay-Envelope"
TIMESTAMP_HEADER = "X-Mailrelay-Timestamp"
SIGNATURE_HEADER = "X-Mailrelay-Signature"
# Envelope header size above which recipients are split over several requests.
MAX_ENVELOPE_HEADER = 4096


def _envelope_json(envelope: Envelope, recipients: Sequence[str]) -> str:
    """The envelope header value: compact JSON, ASCII only (non-ASCII as \\uXXXX)."""
    return json.dumps(
        {
            "queue_id": envelope.queue_id,
            "mail_from": envelope.mail_from,
            "recipients": list(recipients),
            "smtputf8": envelope.smtputf8,
            "body_8bitmime": envelope.body_8bitmime,
        },
        separators=(",", ":"),
    )


def sign(secret: str, timestamp: str, envelope_json: str, body: bytes) -> str:
    """The signature header value for one request."""
    signed = f"{timestamp}.{envelope_json}.".encode("ascii") + body
    return "v1=" + hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str,
    headers: dict[str, str],
    body: bytes,
    *,
    now: float,
    tolerance_seconds: float = 300,
) -> bool:
    """What a receiver runs: the signature matches and the timestamp is recent."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp = lower.get(TIMESTAMP_HEADER.lower(), "")
    envelope_json = lower.get(ENVELOPE_HEADER.lower(), "")
    given = lower.get(SIGNATURE_HEADER.lower(), "")
    try:
        age = abs(now - int(timestamp))
    except ValueError:
        return False
    expected = sign(secret, timestamp, envelope_json, body)
    return age <= tolerance_seconds and hmac.compare_digest(expected, given)


class WebhookTransport(ApiTransport):
    """Signed raw-MIME POSTs to a configured URL."""

    provider = "webhook"
    remote_id_field = "id"  # an optional {"id": ...} in the receiver's answer
    sends_raw_message = True

    def default_base_url(self) -> str:
        """The endpoint is the whole URL (required by the config)."""
        return str(self.upstream.endpoint)

    async def load_secret(self) -> str:
        """The HMAC key: the file `signing_secret`, else `api_key` (the operator's name)."""
        secret = await self.credentials.get_optional("signing_secret")
        if secret is None:
            secret = await self.credentials.get_optional("api_key")
        if secret is None:
            raise CredentialError(
                f"upstream {self.name!r}: the webhook is signed, but credentials_dir "
                f"({self.upstream.credentials_dir}) has neither `signing_secret` nor `api_key`"
            )
        return secret

    def build(self, envelope: Envelope, message: bytes, key: str) -> list[Call]:
        """One signed request per group of recipients whose envelope header stays small."""
        timestamp = str(int(self._wall_clock()))
        calls = []
        for group in self._groups(envelope):
            envelope_json = _envelope_json(envelope, group)
            request = self.api_request(
                "POST",
                str(self.upstream.endpoint),
                message,
                {
                    "Content-Type": "message/rfc822",
                    ENVELOPE_HEADER: envelope_json,
                    TIMESTAMP_HEADER: timestamp,
                    SIGNATURE_HEADER: sign(key, timestamp, envelope_json, message),
                    "Idempotency-Key": idempotency_key(envelope.queue_id, group),
                },
            )
            calls.append(Call(recipients=group, request=request))
        return calls

    @staticmethod
    def _groups(envelope: Envelope) -> list[tuple[str, ...]]:
        """Recipients in order, cut where the envelope header would pass the size limit.

        Web servers refuse large header sections (nginx: 8 KiB per line by default), so
        a big recipient list is split over several requests instead of one huge header.
        """
        base = len(_envelope_json(envelope, []))
        groups: list[list[str]] = [[]]
        size = base
        for rcpt in envelope.recipients:
            # Each recipient adds its JSON string and, after the first, a comma.
            grows = len(json.dumps(rcpt)) + (1 if groups[-1] else 0)
            if groups[-1] and size + grows > MAX_ENVELOPE_HEADER:
                groups.append([])
                size, grows = base, grows - 1
            groups[-1].append(rcpt)
            size += grows
        return [tuple(g) for g in groups if g]
