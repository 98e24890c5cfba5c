"""SparkPost: the raw message as `content.email_rfc822` of a transmission.

POST {base}/api/v1/transmissions with the API key as the bare `Authorization` header,
the envelope recipients as `recipients` and substitutions switched off, so `{{...}}` in
the message is left alone. `region: eu` selects api.eu.sparkpost.com. The message travels
inside a JSON string, so it must be valid UTF-8: 8-bit bytes in another charset cannot be
carried byte-exact and are refused permanently. SparkPost answers 420 when an account
sending limit is reached; that pauses the upstream like a 429.

A transmission is accepted with 200 and `{"results": {"total_rejected_recipients": n,
"total_accepted_recipients": m, "id": "..."}}`. SparkPost takes no idempotency key. Its
answer says how many recipients it took, not which: none taken is a permanent refusal of
the batch (retried one recipient per request by the base class, which then tells which);
some refused is delivery of the batch with the refusal counted and logged, since sending
again would reach the accepted ones twice. A 2xx without those counts (a proxy's page, a
truncated body) cannot say whether anyone was accepted: it is an unknown outcome and is
retried, counted as ambiguous on the retry, rather than taken as delivery of mail that
may never have reached SparkPost.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mailrelay.relay.upstreams.providers.base import ApiTransport, Call, json_object
from mailrelay.relay.upstreams.providers.http import ApiResponse
from mailrelay.relay.upstreams.providers.mime import UnrepresentableMessage
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome, RecipientResult

__all__ = ["SparkPostTransport"]


class SparkPostTransport(ApiTransport):
    """SparkPost's transmissions API with RFC 822 content."""

    provider = "sparkpost"
    sends_raw_message = True
    unexpected_answer: ClassVar[RecipientOutcome] = RecipientOutcome.TEMPORARY

    def default_base_url(self) -> str:
        """US by default, EU when the upstream's region says so."""
        if (self.upstream.region or "").lower() == "eu":
            return "https://api.eu.sparkpost.com"
        return "https://api.sparkpost.com"

    def build(self, envelope: Envelope, message: bytes, key: str) -> list[Call]:
        """One transmission per batch of recipients."""
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnrepresentableMessage(
                "SparkPost carries the message in a JSON string; it has 8-bit bytes that are "
                f"not UTF-8 (offset {exc.start}), which cannot be sent unchanged"
            ) from exc
        calls = []
        for batch in self.batches(envelope.recipients):
            payload = {
                "recipients": [{"address": {"email": a}} for a in self.api_addresses(batch)],
                "content": {"email_rfc822": text},
                "options": {"perform_substitutions": False},
            }
            # The 20 MB limit is on the message (checked before); JSON escaping adds a little.
            request = self.json_request(
                "/api/v1/transmissions", payload, {"Authorization": key}, check_size=False
            )
            calls.append(Call(recipients=batch, request=request))
        return calls

    def answer_problem(self, response: ApiResponse) -> str | None:
        """The documented answer: `results` with both recipient counts and the id."""
        results = _results(response)
        if results is None:
            return "no 'results' object"
        for name in ("total_accepted_recipients", "total_rejected_recipients"):
            value = results.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"no count {name!r}"
        if not results.get("id"):
            return "no transmission 'id'"
        return None

    def accepted(self, call: Call, response: ApiResponse) -> list[RecipientResult]:
        """None accepted: every recipient refused. Some refused: delivered, refusal noted."""
        results = _results(response) or {}
        accepted, rejected = (
            results.get("total_accepted_recipients"),
            results.get("total_rejected_recipients"),
        )
        if accepted == 0:
            return self._all(
                call.recipients,
                RecipientOutcome.PERMANENT,
                f"5.1.0 SparkPost accepted none of the recipients ({rejected} rejected)",
            )
        delivered = super().accepted(call, response)
        if isinstance(rejected, int) and rejected > 0:
            # Every recipient stays delivered: sending again would reach the accepted ones
            # twice. The refusal is counted and logged (`refused_within`).
            note = (
                f"; SparkPost refused {rejected} of the {len(call.recipients)} recipients of "
                "this transmission without saying which"
            )
            return [dataclasses.replace(r, detail=r.detail + note) for r in delivered]
        return delivered

    def refused_within(self, response: ApiResponse) -> int:
        """Recipients refused by a transmission that accepted others."""
        results = _results(response) or {}
        accepted, rejected = (
            results.get("total_accepted_recipients"),
            results.get("total_rejected_recipients"),
        )
        if isinstance(rejected, int) and isinstance(accepted, int) and accepted > 0:
            return max(rejected, 0)
        return 0

    def remote_id(self, response: ApiResponse) -> str | None:
        """The transmission id from {"results": {"id": ...}}."""
        results = _results(response)
        value = results.get("id") if results is not None else None
        return str(value) if value else None


def _results(response: ApiResponse) -> dict[str, object] | None:
    results = (json_object(response) or {}).get("results")
    return results if isinstance(results, dict) else None
