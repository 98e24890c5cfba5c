"""What each HTTP provider documents it accepts, and the size limit a route can promise.

`PROVIDER_LIMITS` holds per provider the largest message, the most recipients in one API
request and whether internationalised (SMTPUTF8) mailbox names go through. The transports
split larger recipient lists into several requests and refuse what cannot fit.

`effective_max_message_size` is pure so the relay's SIZE check (EHLO, MAIL SIZE=, end of
DATA) can call it per route: mail that no upstream of its route could carry is refused at
the door with 552 5.3.4 instead of being accepted and bounced later.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailrelay.relay.config import ApiUpstream, RouteConfig, SmtpUpstream

__all__ = ["PROVIDER_LIMITS", "ProviderLimits", "effective_max_message_size", "upstream_limit"]


@dataclass(frozen=True)
class ProviderLimits:
    """One provider's documented limits; `None` means the provider documents none."""

    max_message_size: int | None
    max_recipients: int | None
    smtputf8: bool


# Sizes use decimal megabytes: the providers write "MB", and the smaller reading is the safe
# one. SES counts the raw message, Postmark and Resend count the request after base64.
PROVIDER_LIMITS: dict[str, ProviderLimits] = {
    "mailgun": ProviderLimits(max_message_size=25_000_000, max_recipients=1000, smtputf8=False),
    "ses": ProviderLimits(max_message_size=40_000_000, max_recipients=50, smtputf8=False),
    "sparkpost": ProviderLimits(max_message_size=20_000_000, max_recipients=10_000, smtputf8=False),
    "sendgrid": ProviderLimits(max_message_size=30_000_000, max_recipients=1000, smtputf8=False),
    "postmark": ProviderLimits(max_message_size=10_000_000, max_recipients=50, smtputf8=False),
    "resend": ProviderLimits(max_message_size=40_000_000, max_recipients=50, smtputf8=False),
    # Our own protocol: the receiving service sets its limits, we do not guess them.
    "webhook": ProviderLimits(max_message_size=None, max_recipients=None, smtputf8=True),
}


def upstream_limit(upstream: SmtpUpstream | ApiUpstream) -> int | None:
    """The largest message one upstream takes, if known (SMTP servers say so only at EHLO)."""
    if isinstance(upstream, ApiUpstream):
        return PROVIDER_LIMITS[upstream.provider].max_message_size
    return None


def effective_max_message_size(route: RouteConfig, relay_limit: int) -> int:
    """The smallest of the relay's limit, the route's own and every provider on the route.

    Fallbacks count too: a message that only fits the primary would bounce the day the
    primary fails, so the route promises only what all its upstreams can carry.
    """
    limits = [relay_limit]
    if route.max_message_size is not None:
        limits.append(route.max_message_size)
    for upstream in (route.upstream, *route.fallbacks):
        limit = upstream_limit(upstream)
        if limit is not None:
            limits.append(limit)
    return min(limits)
