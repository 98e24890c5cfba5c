"""Webhook: the raw message and its envelope, POSTed and signed, to a team's own service.

POST {endpoint} with the message bytes unchanged as the body (`Content-Type:
message/rfc822`) and these headers:

- `X-Mailrelay-Envelope`: compact ASCII JSON {"queue_id", "mail_from", "recipients",
  "smtputf8", "body_8bitmime"};
- `X-Mailrelay-Timestamp`: unix seconds when the request was signed;
- `X-Mailrelay-Signature`: `v1=` and the hex HMAC-SHA256, keyed with the credential file
  `signing_secret`, of `timestamp + "." + envelope + "." + body` (the envelope is signed
  too, so nobody can re-address a captured request);
- `Idempotency-Key`: the same on every retry of the same message and recipients.

A receiver recomputes the HMAC, compares in constant time and rejects old timestamps
(`verify_signature` does all three). Any 2xx is delivery of every recipient; a JSON
answer's `id` is logged as the remote id. Status codes are classified like any provider.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx

from mailrelay.relay.providers.base import ApiTransport, Call
from mailrelay.relay.providers.resend import idempotency_key
from mailrelay.relay.transport import Envelope

__all__ = ["WebhookTransport", "sign", "verify_signature"]

ENVELOPE_HEADER = "X-Mailrelay-Envelope"
TIMESTAMP_HEADER = "X-Mailrelay-Timestamp"
SIGNATURE_HEADER = "X-Mailrelay-Signature"


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

    def default_base_url(self) -> str:
        """The endpoint is the whole URL (required by the config)."""
        return str(self.upstream.endpoint)

    async def load_secret(self) -> str:
        """The HMAC key."""
        return await self.credentials.get("signing_secret")

    def build(self, envelope: Envelope, message: bytes, key: str) -> list[Call]:
        """One request for all recipients; signed at preparation, just before sending."""
        envelope_json = json.dumps(
            {
                "queue_id": envelope.queue_id,
                "mail_from": envelope.mail_from,
                "recipients": list(envelope.recipients),
                "smtputf8": envelope.smtputf8,
                "body_8bitmime": envelope.body_8bitmime,
            },
            separators=(",", ":"),
        )
        timestamp = str(int(self._wall_clock()))
        request = self.client.build_request(
            "POST",
            str(self.upstream.endpoint),
            content=message,
            headers={
                "Content-Type": "message/rfc822",
                ENVELOPE_HEADER: envelope_json,
                TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(key, timestamp, envelope_json, message),
                "Idempotency-Key": idempotency_key(envelope.queue_id, envelope.recipients),
            },
        )
        return [Call(recipients=envelope.recipients, request=request)]

    def remote_id(self, response: httpx.Response) -> str | None:
        """An optional {"id": ...} in the receiver's answer."""
        try:
            body = response.json()
        except ValueError:
            return None
        value = body.get("id") if isinstance(body, dict) else None
        return str(value) if value else None
