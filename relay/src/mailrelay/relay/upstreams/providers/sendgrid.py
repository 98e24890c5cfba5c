"""SendGrid: v3 `mail/send`, built from the parsed message.

POST {base}/v3/mail/send with `Authorization: Bearer <api_key>`. Recipients become
personalizations (to/cc/bcc from the envelope, sorted by the message's To and Cc
headers), so one request carries up to 1000 recipients; the bodies go in `content`
(text/plain first, as SendGrid requires), every other part in `attachments` (base64,
with `disposition` and `content_id` for inline images), and the remaining headers in
`headers`, minus the ones SendGrid reserves. SendGrid answers 202 with an empty body and
the message id in `X-Message-Id`; another 2xx, or one without the id, is still delivery
(SendGrid takes no idempotency key, so a retry could send twice) but is logged and
counted. A part with a Content-ID goes as `disposition: inline` when it is meant inline
(see `mime.Attachment`), also when it says `attachment` inside a multipart/related.
"""

from __future__ import annotations

import base64

from mailrelay.relay.upstreams.providers.base import ApiTransport, Call
from mailrelay.relay.upstreams.providers.http import ApiResponse
from mailrelay.relay.upstreams.providers.mime import (
    Batch,
    Mailbox,
    UnrepresentableMessage,
    parse_message,
    plan_batches,
    split_recipients,
)
from mailrelay.relay.upstreams.transport import Envelope

__all__ = ["SendGridTransport"]

# SendGrid refuses these in `headers`; they come from fields or SendGrid itself.
_RESERVED = frozenset({"x-sg-id", "x-sg-eid"})


def _person(mailbox: Mailbox) -> dict[str, str]:
    return (
        {"email": mailbox.address, "name": mailbox.name}
        if mailbox.name
        else {"email": mailbox.address}
    )


def _personalization(batch: Batch) -> dict[str, object]:
    out: dict[str, object] = {"to": [_person(m) for m in batch.to]}
    if batch.cc:
        out["cc"] = [_person(m) for m in batch.cc]
    if batch.bcc:
        out["bcc"] = [_person(m) for m in batch.bcc]
    return out


class SendGridTransport(ApiTransport):
    """SendGrid's v3 mail send API."""

    provider = "sendgrid"

    def default_base_url(self) -> str:
        """The global API; `region: eu` for EU-pinned subusers."""
        if (self.upstream.region or "").lower() == "eu":
            return "https://api.eu.sendgrid.com"
        return "https://api.sendgrid.com"

    def build(self, envelope: Envelope, message: bytes, key: str) -> list[Call]:
        """One request per 1000 recipients, each batch a personalization."""
        parsed = parse_message(message, envelope_sender=envelope.mail_from)
        if not parsed.subject:
            raise UnrepresentableMessage("SendGrid requires a non-empty Subject")
        content = []
        if parsed.text:
            content.append({"type": "text/plain", "value": parsed.text})
        if parsed.html:
            content.append({"type": "text/html", "value": parsed.html})
        if not content:
            raise UnrepresentableMessage(
                "SendGrid requires a text or HTML body; the message has none"
            )
        base: dict[str, object] = {
            "from": _person(parsed.sender),
            "subject": parsed.subject,
            "content": content,
        }
        if len(parsed.reply_to) == 1:
            base["reply_to"] = _person(parsed.reply_to[0])
        elif parsed.reply_to:
            base["reply_to_list"] = [_person(m) for m in parsed.reply_to]
        if parsed.attachments:
            attachments = []
            for att in parsed.attachments:
                item = {
                    "content": base64.b64encode(att.content).decode("ascii"),
                    "filename": att.filename,
                    "type": att.content_type,
                    "disposition": "inline" if att.inline else "attachment",
                }
                if att.content_id:
                    item["content_id"] = att.content_id
                attachments.append(item)
            base["attachments"] = attachments
        headers: dict[str, str] = {}
        for name, value in parsed.headers:
            if name.lower() not in _RESERVED and name not in headers:
                headers[name] = value
        if headers:
            base["headers"] = headers
        to, cc, bcc = split_recipients(parsed, envelope.recipients)
        limit = self.limits.max_recipients or 1000
        groups: list[list[Batch]] = [[]]
        for batch in plan_batches(to, cc, bcc, limit):
            if sum(len(b.recipients) for b in groups[-1]) + len(batch.recipients) > limit:
                groups.append([])
            groups[-1].append(batch)
        calls = []
        for group in groups:
            if not group:
                continue
            payload = {"personalizations": [_personalization(b) for b in group], **base}
            request = self.json_request(
                "/v3/mail/send", payload, {"Authorization": f"Bearer {key}"}
            )
            recipients = tuple(r for b in group for r in b.recipients)
            calls.append(Call(recipients=recipients, request=request))
        return calls

    def answer_problem(self, response: ApiResponse) -> str | None:
        """The documented answer: 202 with the id in `X-Message-Id`."""
        if response.status_code != 202:
            return "SendGrid accepts with 202"
        if not response.headers.get("x-message-id"):
            return "no X-Message-Id header"
        return None

    def remote_id(self, response: ApiResponse) -> str | None:
        """SendGrid's id is a response header; the body is empty."""
        value = response.headers.get("x-message-id")
        return str(value) if value else None
