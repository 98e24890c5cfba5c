"""HTTP API upstreams: one transport class per provider behind the relay's Transport protocol.

`build_api_transport` picks the class for an `ApiUpstream`. Raw-MIME providers (Mailgun,
SES, SparkPost, webhook) send the spooled bytes unchanged; JSON providers (SendGrid,
Postmark, Resend) rebuild the message from fields parsed by `mime`. `base` holds what all
share (HTTP client, throttle, error classes, credentials, metrics); `limits` what each
provider documents it accepts.

Importing this package is cheap: a provider's module (and its SDK, botocore for SES) is
imported only when an upstream of that provider is built, so the relay's size checks can
use `limits` without loading any of them.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from mailrelay.relay.providers.limits import effective_max_message_size

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from mailrelay.relay.config import ApiUpstream
    from mailrelay.relay.providers.base import ApiTransport

__all__ = ["TRANSPORTS", "build_api_transport", "effective_max_message_size"]

# provider -> (module under mailrelay.relay.providers, transport class)
TRANSPORTS: dict[str, tuple[str, str]] = {
    "mailgun": ("mailgun", "MailgunTransport"),
    "ses": ("ses", "SesTransport"),
    "sparkpost": ("sparkpost", "SparkPostTransport"),
    "sendgrid": ("sendgrid", "SendGridTransport"),
    "postmark": ("postmark", "PostmarkTransport"),
    "resend": ("resend", "ResendTransport"),
    "webhook": ("webhook", "WebhookTransport"),
}


def transport_class(provider: str) -> type[ApiTransport]:
    """The transport class of a provider, importing its module on first use."""
    module_name, class_name = TRANSPORTS[provider]
    module = importlib.import_module(f"{__name__}.{module_name}")
    cls: type[ApiTransport] = getattr(module, class_name)
    return cls


def preload_transports(providers: Iterable[str]) -> None:
    """Import the providers' modules (and their HTTP stack) ahead of the first delivery.

    Blocking: run it in a thread. Importing aiohttp and botocore takes 100-300 ms, which on
    the event loop would stall every SMTP session at the first message for an API upstream.
    """
    for provider in sorted(set(providers)):
        transport_class(provider)


def build_api_transport(
    upstream: ApiUpstream,
    *,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> ApiTransport:
    """The transport for one API upstream; metrics go to `registry` when given."""
    return transport_class(upstream.provider)(
        upstream, registry=registry, clock=clock, wall_clock=wall_clock
    )
