"""Resend: the `/emails` endpoint with an idempotency key.

POST {base}/emails with `Authorization: Bearer <api_key>`, at most 50 recipients per
request. `from`, `to`, `cc`, `bcc` and `reply_to` take "Name <address>" strings; bodies go
to `text`/`html`; other parts to `attachments` (base64 `content`, `filename`,
`content_type`, and `content_id` for inline images); remaining headers to `headers`.

Every request carries an `Idempotency-Key` derived from the queue id and the batch's
recipients, so the retry after a timeout (the request may have been sent) is the same
request with the same key, and Resend sends it once: for 24 hours it answers the same key
and body with the first answer. The same key with another body (the relay was upgraded or
reconfigured between the attempts, so the request is built differently) is answered 409
`invalid_idempotent_request`: an email was already sent under that key, so it counts as
delivered. 409 `concurrent_idempotent_requests` (the first is still being processed) is
retried. A 2xx without the documented `{"id": ...}` is an unknown outcome and retried:
the key makes that safe.
"""

from __future__ import annotations

import base64
from typing import ClassVar

from mailrelay.relay.upstreams.providers.base import (
    ApiTransport,
    Call,
    Verdict,
    error_text,
    json_object,
)
from mailrelay.relay.upstreams.providers.http import ApiResponse
from mailrelay.relay.upstreams.providers.mime import (
    UnrepresentableMessage,
    parse_message,
    plan_batches,
    split_recipients,
)
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome

__all__ = ["ResendTransport"]


class ResendTransport(ApiTransport):
    """Resend's send-email API."""

    provider = "resend"
    remote_id_field = "id"  # answers {"id": "..."}
    idempotency_header = "Idempotency-Key"
    unexpected_answer: ClassVar[RecipientOutcome] = RecipientOutcome.TEMPORARY

    def default_base_url(self) -> str:
        """Resend has one API host."""
        return "https://api.resend.com"

    def build(self, envelope: Envelope, message: bytes, key: str) -> list[Call]:
        """One request per batch of up to 50 recipients, each with its idempotency key."""
        parsed = parse_message(message, envelope_sender=envelope.mail_from)
        if not parsed.subject:
            raise UnrepresentableMessage("Resend requires a non-empty Subject")
        if not parsed.text and not parsed.html:
            raise UnrepresentableMessage(
                "Resend requires a text or HTML body; the message has none"
            )
        base: dict[str, object] = {"from": parsed.sender.formatted(), "subject": parsed.subject}
        if parsed.text:
            base["text"] = parsed.text
        if parsed.html:
            base["html"] = parsed.html
        if parsed.reply_to:
            base["reply_to"] = [m.formatted() for m in parsed.reply_to]
        headers: dict[str, str] = {}
        for name, value in parsed.headers:
            headers.setdefault(name, value)
        if headers:
            base["headers"] = headers
        if parsed.attachments:
            attachments = []
            for att in parsed.attachments:
                item = {
                    "content": base64.b64encode(att.content).decode("ascii"),
                    "filename": att.filename,
                    "content_type": att.content_type,
                }
                if att.content_id:
                    item["content_id"] = att.content_id
                attachments.append(item)
            base["attachments"] = attachments
        to, cc, bcc = split_recipients(parsed, envelope.recipients)
        calls = []
        for batch in plan_batches(to, cc, bcc, self.limits.max_recipients):
            payload = dict(base, to=[m.formatted() for m in batch.to])
            if batch.cc:
                payload["cc"] = [m.formatted() for m in batch.cc]
            if batch.bcc:
                payload["bcc"] = [m.formatted() for m in batch.bcc]
            request = self.json_request(
                "/emails",
                payload,
                {
                    "Authorization": f"Bearer {key}",
                    **self.key_headers(envelope.queue_id, batch.recipients),
                },
            )
            calls.append(Call(recipients=batch.recipients, request=request))
        return calls

    def classify_error(self, response: ApiResponse) -> Verdict:
        """A 409 for a key already used with another body: that email was sent."""
        body = json_object(response) or {}
        if response.status_code == 409 and body.get("name") == "invalid_idempotent_request":
            return Verdict(
                RecipientOutcome.DELIVERED,
                "Resend already sent an email under this message's idempotency key "
                f"(HTTP 409: {error_text(response)})",
            )
        return super().classify_error(response)
