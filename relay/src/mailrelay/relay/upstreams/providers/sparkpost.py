"""SparkPost: the raw message as `content.email_rfc822` of a transmission.

POST {base}/api/v1/transmissions with the API key as the bare `Authorization` header,
the envelope recipients as `recipients` and substitutions switched off, so `{{...}}` in
the message is left alone. `region: eu` selects api.eu.sparkpost.com. The message travels
inside a JSON string, so it must be valid UTF-8: 8-bit bytes in another charset cannot be
carried byte-exact and are refused permanently. SparkPost answers 420 when an account
sending limit is reached; that pauses the upstream like a 429.
"""

from __future__ import annotations

from mailrelay.relay.upstreams.providers.base import ApiTransport, Call, json_object
from mailrelay.relay.upstreams.providers.http import ApiResponse
from mailrelay.relay.upstreams.providers.mime import UnrepresentableMessage
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome, RecipientResult

__all__ = ["SparkPostTransport"]


class SparkPostTransport(ApiTransport):
    """SparkPost's transmissions API with RFC 822 content."""

    provider = "sparkpost"
    sends_raw_message = True

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

    def accepted(self, call: Call, response: ApiResponse) -> list[RecipientResult]:
        """A 200 where SparkPost accepted nobody is a rejection of every recipient."""
        results = (json_object(response) or {}).get("results", {})
        if isinstance(results, dict) and results.get("total_accepted_recipients") == 0:
            rejected = results.get("total_rejected_recipients")
            return self._all(
                call.recipients,
                RecipientOutcome.PERMANENT,
                f"SparkPost accepted none of the recipients ({rejected} rejected)",
            )
        return super().accepted(call, response)

    def remote_id(self, response: ApiResponse) -> str | None:
        """The transmission id from {"results": {"id": ...}}."""
        results = (json_object(response) or {}).get("results")
        value = results.get("id") if isinstance(results, dict) else None
        return str(value) if value else None
