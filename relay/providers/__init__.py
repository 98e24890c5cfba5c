"""HTTP API upstreams: one transport class per provider behind the relay's Transport protocol.

`build_api_transport` picks the class for an `ApiUpstream`. Raw-MIME providers (Mailgun,
SES, SparkPost, webhook) send the spooled bytes unchanged; JSON providers (SendGrid,
Postmark, Resend) rebuild the message from fields parsed by `mime`. `base` holds what all
share (HTTP client, throttle, error classes, credentials, metrics); `limits` what each
provider documents it accepts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from mailrelay.relay.config import ApiUpstream
from mailrelay.relay.providers.base import ApiTransport
from mailrelay.relay.providers.limits import effective_max_message_size
from mailrelay.relay.providers.mailgun import MailgunTransport
from mailrelay.relay.providers.postmark import PostmarkTransport
from mailrelay.relay.providers.resend import ResendTransport
from mailrelay.relay.providers.sendgrid import SendGridTransport
from mailrelay.relay.providers.ses import SesTransport
from mailrelay.relay.providers.sparkpost import SparkPostTransport
from mailrelay.relay.providers.webhook import WebhookTransport

__all__ = ["TRANSPORTS", "ApiTransport", "build_api_transport", "effective_max_message_size"]

TRANSPORTS: dict[str, type[ApiTransport]] = {
    cls.provider: cls
    for cls in (
        MailgunTransport,
        SesTransport,
        SparkPostTransport,
        SendGridTransport,
        PostmarkTransport,
        ResendTransport,
        WebhookTransport,
    )
}


def build_api_transport(
    upstream: ApiUpstream,
    *,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> ApiTransport:
    """The transport for one API upstream; metrics go to `registry` when given."""
    return TRANSPORTS[upstream.provider](
        upstream, registry=registry, clock=clock, wall_clock=wall_clock
    )
