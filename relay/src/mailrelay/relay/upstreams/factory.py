"""The factory of upstream transports: an upstream from the config -> its `Transport`.

Imports flow one way: `transport` holds the types every transport shares (the
`Transport` protocol, `Envelope`, `RecipientResult`, error wording) and imports no
implementation; `smtp` and the provider modules import those types; this module imports
both implementations and nothing in them imports it back. The delivery engine builds its
transports here.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from mailrelay.relay.config import ApiUpstream, SmtpUpstream
from mailrelay.relay.upstreams.providers.registry import build_api_transport
from mailrelay.relay.upstreams.providers.registry import preload_transports as _preload_providers
from mailrelay.relay.upstreams.smtp import PoolObserver, SmtpTransport
from mailrelay.relay.upstreams.transport import Transport

__all__ = ["build_transport", "preload_transports"]


def build_transport(
    upstream: SmtpUpstream | ApiUpstream,
    *,
    local_hostname: str | None = None,
    observer: PoolObserver | None = None,
    registry: CollectorRegistry | None = None,
) -> Transport:
    """The transport for one configured upstream.

    `local_hostname` is our EHLO name, `observer` receives SMTP pool events, and
    `registry` is the relay's metrics registry for transports that keep their own metrics
    (the HTTP providers).
    """
    if isinstance(upstream, SmtpUpstream):
        return SmtpTransport(upstream, local_hostname=local_hostname, observer=observer)
    return build_api_transport(upstream, registry=registry)


def preload_transports(upstreams: Iterable[SmtpUpstream | ApiUpstream]) -> None:
    """Import the modules the API upstreams among `upstreams` need (aiohttp, botocore), and
    the HTTP layer of OAuth2 when an SMTP upstream fetches tokens.

    Blocking: run it in a thread, ahead of the first delivery (see the provider registry).
    """
    upstreams = list(upstreams)
    _preload_providers(u.provider for u in upstreams if isinstance(u, ApiUpstream))
    if any(isinstance(u, SmtpUpstream) and u.oauth2 is not None for u in upstreams):
        from mailrelay.relay.upstreams.providers import http  # noqa: F401, PLC0415
