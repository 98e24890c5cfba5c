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

__all__ = [
    "BUILD_MEMORY_FACTORS",
    "PROVIDER_LIMITS",
    "ProviderLimits",
    "build_memory_factor",
    "effective_max_message_size",
    "upstream_limit",
]


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


# Peak memory while a transport builds its request(s), in multiples of the message size
# (tracemalloc around `prepare` with a 10 MB message with an attachment, 2026-12-07):
# mailgun streams the bytes as a multipart file (~0), the webhook sends them as they are
# (1.0), SES base64-encodes them into JSON (4.0), SparkPost decodes them into a JSON
# string (3.05), the field-based APIs parse the MIME tree and base64 every attachment
# into JSON (SendGrid and Resend 7.7; Postmark is built the same way). The budget for
# bytes in flight charges a message this many times its size on such a route.
BUILD_MEMORY_FACTORS: dict[str, float] = {
    "mailgun": 1.0,
    "webhook": 1.0,
    "ses": 4.0,
    "sparkpost": 3.0,
    "sendgrid": 8.0,
    "resend": 8.0,
    "postmark": 8.0,
}


def build_memory_factor(route: RouteConfig) -> float:
    """How many times its size a message costs in memory on `route` (its primary and its
    fallbacks: any of them may build the request); 1 for SMTP, which sends in pieces."""
    factors = [1.0]
    for upstream in (route.upstream, *route.fallbacks):
        if isinstance(upstream, ApiUpstream):
            factors.append(BUILD_MEMORY_FACTORS[upstream.provider])
    return max(factors)


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
