"""Webhook: the raw message and its envelope, POSTed and signed, to a team's own service.

POST {endpoint} with the message bytes unchanged as the body (`Content-Type:
message/rfc822`) and these headers:

- `X-Mailrelay-Envelope`: compact ASCII JSON {"queue_id", "mail_from", "recipients",
  "smtputf8", "body_8bitmime"};
- `Idempotency-Key`: the same on every retry of the same message and recipients; the
  receiver deduplicates on it;
- `X-Mailrelay-Timestamp`: unix seconds when the request was signed;
- `X-Mailrelay-Key-Id`: the id of the secret that signed (`default` for a single secret);
- `X-Mailrelay-Signature`: `v2=` and the hex HMAC-SHA256, keyed with that secret, of

      "v2" LF timestamp LF key id LF idempotency key LF envelope LF body

  (`signed_bytes`). The envelope and the idempotency key are signed, so nobody can
  re-address a captured request, nor replay it under a new key within the timestamp
  window and have a receiver that deduplicates on the key deliver it twice. None of the
  first five fields can hold a line feed (header values cannot), so the fields cannot
  be shifted into one another.

Rotation: `signing_keys` names up to two secrets (files `signing_key_<id>`) and
`active_signing_key` the one that signs. A receiver keeps every id it trusts with its
secret and checks with the one named by `X-Mailrelay-Key-Id` (`verify_signature` takes
that map), so the switch from the old to the new secret needs no coordination: add the new
id to the receiver, switch the relay, then drop the old id.

The envelope header is kept under 4 KiB: a longer recipient list is split over several
requests, each with its own recipients, signature and idempotency key.

Any 2xx is delivery of every recipient (the body is up to the receiver; a JSON `id` is
logged as the remote id). Status codes are classified like any provider.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence

from mailrelay.relay import upstream_rules
from mailrelay.relay.upstreams.providers.base import ApiTransport, Call, CredentialError
from mailrelay.relay.upstreams.providers.http import ApiResponse
from mailrelay.relay.upstreams.transport import Envelope

__all__ = ["WebhookTransport", "sign", "signed_bytes", "verify_signature"]

ENVELOPE_HEADER = "X-Mailrelay-Envelope"
TIMESTAMP_HEADER = "X-Mailrelay-Timestamp"
SIGNATURE_HEADER = "X-Mailrelay-Signature"
KEY_ID_HEADER = "X-Mailrelay-Key-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_VERSION = "v2"
# Envelope header size above which recipients are split over several requests.
MAX_ENVELOPE_HEADER = 4096
_DIGITS = re.compile(r"[0-9]{1,12}")


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


def signed_bytes(
    timestamp: str, key_id: str, idempotency_key: str, envelope_json: str, body: bytes
) -> bytes:
    """What the HMAC covers; ValueError if a field could run into the next."""
    fields = (SIGNATURE_VERSION, timestamp, key_id, idempotency_key, envelope_json)
    if any("\n" in f or "\r" in f for f in fields):
        raise ValueError("a signed header field holds a line break")
    return "\n".join(fields).encode("ascii") + b"\n" + body


def sign(
    secret: str,
    *,
    timestamp: str,
    key_id: str,
    idempotency_key: str,
    envelope_json: str,
    body: bytes,
) -> str:
    """The signature header value for one request."""
    signed = signed_bytes(timestamp, key_id, idempotency_key, envelope_json, body)
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_signature(
    secrets: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance_seconds: float = 300,
) -> bool:
    """What a receiver runs: the key id is one it trusts, the signature over timestamp,
    key id, idempotency key, envelope and body matches that key's secret, and the
    timestamp is recent. `secrets` maps key id -> secret (both during a rotation)."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp = lower.get(TIMESTAMP_HEADER.lower(), "")
    key_id = lower.get(KEY_ID_HEADER.lower(), "")
    secret = secrets.get(key_id)
    if secret is None or not _DIGITS.fullmatch(timestamp):
        return False
    if abs(now - int(timestamp)) > tolerance_seconds:
        return False
    try:
        expected = sign(
            secret,
            timestamp=timestamp,
            key_id=key_id,
            idempotency_key=lower.get(IDEMPOTENCY_HEADER.lower(), ""),
            envelope_json=lower.get(ENVELOPE_HEADER.lower(), ""),
            body=body,
        )
    except (ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(expected, lower.get(SIGNATURE_HEADER.lower(), ""))


class WebhookTransport(ApiTransport):
    """Signed raw-MIME POSTs to a configured URL."""

    provider = "webhook"
    remote_id_field = "id"  # an optional {"id": ...} in the receiver's answer
    sends_raw_message = True
    idempotency_header = IDEMPOTENCY_HEADER

    @property
    def key_id(self) -> str:
        """The id of the secret that signs."""
        return upstream_rules.active_signing_key_id(
            self.upstream.signing_keys or (), self.upstream.active_signing_key
        )

    def default_base_url(self) -> str:
        """The endpoint is the whole URL (required by the config)."""
        return str(self.upstream.endpoint)

    def answer_problem(self, response: ApiResponse) -> str | None:
        """The receiver's body is its own business: any 2xx is the documented answer."""
        return None

    async def load_secret(self) -> str:
        """The active HMAC key: `signing_key_<id>` when `signing_keys` names keys, else
        the file `signing_secret`, else `api_key` (the operator's name)."""
        if self.upstream.signing_keys:
            return await self.credentials.get(upstream_rules.signing_key_file(self.key_id))
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
        key_id = self.key_id
        for group in self._groups(envelope):
            envelope_json = _envelope_json(envelope, group)
            idempotency = self.key_headers(envelope.queue_id, group)
            signature = sign(
                key,
                timestamp=timestamp,
                key_id=key_id,
                idempotency_key=idempotency[IDEMPOTENCY_HEADER],
                envelope_json=envelope_json,
                body=message,
            )
            request = self.api_request(
                "POST",
                str(self.upstream.endpoint),
                message,
                {
                    "Content-Type": "message/rfc822",
                    ENVELOPE_HEADER: envelope_json,
                    TIMESTAMP_HEADER: timestamp,
                    KEY_ID_HEADER: key_id,
                    SIGNATURE_HEADER: signature,
                    **idempotency,
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
