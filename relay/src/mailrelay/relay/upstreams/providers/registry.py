"""Provider name -> transport class, each provider's module imported on first use.

The one place that knows every provider module. A provider's module pulls in the HTTP
client (aiohttp) and, for SES, botocore (100-300 ms to import), so each is imported only
when an upstream of that provider is built, or ahead of time in a thread by
`preload_transports`; nothing else in the relay imports a provider module. The imports
sit in small functions for that weight, not to dodge a cycle: no provider module imports
this one (tests/relay/test_import_layers.py checks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from mailrelay.relay.config import ApiUpstream
    from mailrelay.relay.upstreams.providers.base import ApiTransport

__all__ = ["PROVIDERS", "build_api_transport", "preload_transports", "transport_class"]


def _mailgun() -> type[ApiTransport]:
    from mailrelay.relay.upstreams.providers.mailgun import MailgunTransport  # noqa: PLC0415

    return MailgunTransport


def _ses() -> type[ApiTransport]:
    from mailrelay.relay.upstreams.providers.ses import SesTransport  # noqa: PLC0415

    return SesTransport


def _sparkpost() -> type[ApiTransport]:
    from mailrelay.relay.upstreams.providers.sparkpost import SparkPostTransport  # noqa: PLC0415

    return SparkPostTransport


def _sendgrid() -> type[ApiTransport]:
    from mailrelay.relay.upstreams.providers.sendgrid import SendGridTransport  # noqa: PLC0415

    return SendGridTransport


def _postmark() -> type[ApiTransport]:
    from mailrelay.relay.upstreams.providers.postmark import PostmarkTransport  # noqa: PLC0415

    return PostmarkTransport


def _resend() -> type[ApiTransport]:
    from mailrelay.relay.upstreams.providers.resend import ResendTransport  # noqa: PLC0415

    return ResendTransport


def _webhook() -> type[ApiTransport]:
    from mailrelay.relay.upstreams.providers.webhook import WebhookTransport  # noqa: PLC0415

    return WebhookTransport


# provider (as `ApiUpstream.provider` names it) -> loader of its transport class
PROVIDERS: dict[str, Callable[[], type[ApiTransport]]] = {
    "mailgun": _mailgun,
    "ses": _ses,
    "sparkpost": _sparkpost,
    "sendgrid": _sendgrid,
    "postmark": _postmark,
    "resend": _resend,
    "webhook": _webhook,
}


def transport_class(provider: str) -> type[ApiTransport]:
    """The transport class of a provider, importing its module on first use."""
    return PROVIDERS[provider]()


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
