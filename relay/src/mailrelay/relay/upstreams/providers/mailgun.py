"""Mailgun: the raw message through `messages.mime`, so it arrives byte for byte.

POST {base}/v3/{domain}/messages.mime as multipart/form-data with a `to` field per
envelope recipient (Mailgun ignores the Cc and Bcc headers inside the MIME, so the
envelope is the only recipient list) and the message as the `message` file. Basic auth
with user `api` and the key from the credential file `api_key`. `region: eu` selects
api.eu.mailgun.net; `endpoint` overrides the base URL.
"""

from __future__ import annotations

import base64

from mailrelay.relay.redact import SECRETS
from mailrelay.relay.upstreams.providers.base import ApiTransport, Call
from mailrelay.relay.upstreams.providers.http import FilePart, multipart_form
from mailrelay.relay.upstreams.transport import Envelope

__all__ = ["MailgunTransport"]


class MailgunTransport(ApiTransport):
    """Mailgun's raw MIME endpoint."""

    provider = "mailgun"
    remote_id_field = "id"  # answers {"id": "<...>", "message": "Queued. Thank you."}
    sends_raw_message = True

    def default_base_url(self) -> str:
        """US by default, EU when the upstream's region says so."""
        if (self.upstream.region or "").lower() == "eu":
            return "https://api.eu.mailgun.net"
        return "https://api.mailgun.net"

    def build(self, envelope: Envelope, message: bytes, key: str) -> list[Call]:
        """One multipart request per batch of up to 1000 recipients."""
        SECRETS.add_credentials("api", key)  # its Basic form could be echoed in an error
        auth = "Basic " + base64.b64encode(f"api:{key}".encode()).decode("ascii")
        path = f"/v3/{self.upstream.domain}/messages.mime"
        calls = []
        for batch in self.batches(envelope.recipients):
            content_type, body = multipart_form(
                [("to", address) for address in self.api_addresses(batch)],
                [FilePart("message", "message.eml", "message/rfc822", message)],
            )
            request = self.api_request(
                "POST", path, body, {"Authorization": auth, "Content-Type": content_type}
            )
            calls.append(Call(recipients=batch, request=request))
        return calls
