"""Postmark: the `/email` endpoint, built from the parsed message.

POST {base}/email with `X-Postmark-Server-Token: <api_key>`, at most 50 recipients
across To, Cc and Bcc per request. Addresses are "Name <address>" strings joined by
commas; bodies go to `TextBody`/`HtmlBody`; other parts to `Attachments` with `ContentID`
(`cid:...`) for inline images; remaining headers to `Headers`; `message_stream` of the
upstream to `MessageStream`. Postmark explains errors with an `ErrorCode`: bad token
(10), sender signature missing or unconfirmed (400, 401), sending not allowed (405),
account pending (412) or not allowed to send (413) are our configuration; maintenance
(100) is temporary; other 422s (300 invalid request, 406 inactive recipient ...) are
permanent for the message.
"""

from __future__ import annotations

import base64

from mailrelay.relay.upstreams.providers.base import ApiTransport, Call, Verdict, error_text
from mailrelay.relay.upstreams.providers.http import ApiResponse
from mailrelay.relay.upstreams.providers.mime import (
    Mailbox,
    UnrepresentableMessage,
    parse_message,
    plan_batches,
    split_recipients,
)
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome

__all__ = ["PostmarkTransport"]

# 10 bad token, 400/401 sender signature missing/unconfirmed, 405 not allowed to send,
# 412 account pending, 413 account may not send. 100 is Postmark's maintenance.
_CONFIG_ERROR_CODES = frozenset({10, 400, 401, 405, 412, 413})
_MAINTENANCE = 100


def _joined(mailboxes: tuple[Mailbox, ...]) -> str:
    return ", ".join(m.formatted() for m in mailboxes)


class PostmarkTransport(ApiTransport):
    """Postmark's single-message API."""

    provider = "postmark"
    remote_id_field = "MessageID"  # answers {"MessageID": ..., "ErrorCode": 0, ...}

    def default_base_url(self) -> str:
        """Postmark has one API host."""
        return "https://api.postmarkapp.com"

    def build(self, envelope: Envelope, message: bytes, key: str) -> list[Call]:
        """One request per batch of up to 50 recipients."""
        parsed = parse_message(message, envelope_sender=envelope.mail_from)
        if not parsed.text and not parsed.html:
            raise UnrepresentableMessage(
                "Postmark requires a text or HTML body; the message has none"
            )
        base: dict[str, object] = {"From": parsed.sender.formatted()}
        if parsed.subject is not None:
            base["Subject"] = parsed.subject
        if parsed.text:
            base["TextBody"] = parsed.text
        if parsed.html:
            base["HtmlBody"] = parsed.html
        if parsed.reply_to:
            base["ReplyTo"] = _joined(parsed.reply_to)
        if parsed.headers:
            base["Headers"] = [{"Name": n, "Value": v} for n, v in parsed.headers]
        if parsed.attachments:
            attachments = []
            for att in parsed.attachments:
                item = {
                    "Name": att.filename,
                    "Content": base64.b64encode(att.content).decode("ascii"),
                    "ContentType": att.content_type,
                }
                if att.content_id:
                    item["ContentID"] = f"cid:{att.content_id}"
                attachments.append(item)
            base["Attachments"] = attachments
        if self.upstream.message_stream:
            base["MessageStream"] = self.upstream.message_stream
        to, cc, bcc = split_recipients(parsed, envelope.recipients)
        calls = []
        for batch in plan_batches(to, cc, bcc, self.limits.max_recipients):
            payload = dict(base, To=_joined(batch.to))
            if batch.cc:
                payload["Cc"] = _joined(batch.cc)
            if batch.bcc:
                payload["Bcc"] = _joined(batch.bcc)
            request = self.json_request("/email", payload, {"X-Postmark-Server-Token": key})
            calls.append(Call(recipients=batch.recipients, request=request))
        return calls

    def answer_problem(self, response: ApiResponse) -> str | None:
        """The documented answer: {"ErrorCode": 0, "MessageID": ...}."""
        problem = super().answer_problem(response)
        if problem is None and _error_code(response) != 0:
            return "its ErrorCode is not 0"
        return problem

    def classify_error(self, response: ApiResponse) -> Verdict:
        """Postmark's ErrorCode tells an account problem from a bad message."""
        code = _error_code(response)
        if code == _MAINTENANCE:
            return Verdict(
                RecipientOutcome.TEMPORARY,
                f"Postmark is in maintenance (HTTP {response.status_code}): {error_text(response)}",
            )
        if code in _CONFIG_ERROR_CODES:
            return Verdict(
                RecipientOutcome.CONFIG_ERROR,
                f"Postmark ErrorCode {code} (HTTP {response.status_code}): {error_text(response)}",
            )
        return super().classify_error(response)


def _error_code(response: ApiResponse) -> int | None:
    try:
        body = response.json()
    except ValueError:
        return None
    code = body.get("ErrorCode") if isinstance(body, dict) else None
    return code if isinstance(code, int) else None
