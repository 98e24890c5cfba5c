"""Route selection: a pure function from (sender domain, recipient domain) to a route.

Order: highest `priority` first; among equal priorities the most specific match wins
(an exact domain beats a `*.` wildcard, which beats an empty list meaning "any"),
scored on the recipient side first and then the sender side; a name tie-break keeps the
choice deterministic. `*.example.com` matches subdomains only, not `example.com` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailrelay.relay.address import PLAIN_ADDRESS
from mailrelay.relay.config import RouteConfig

__all__ = ["PLAIN_ADDRESS", "domain_of", "match_specificity", "select_route"]

# Specificity of one side of a match: how precisely the pattern named the domain.
_ANY, _WILDCARD, _EXACT = 0, 1, 2


def domain_of(address: str) -> str:
    """The lower-cased domain of an address; "" for the null sender or a bare local part."""
    _, at, domain = address.rpartition("@")
    return domain.strip().strip("[]").lower().rstrip(".") if at else ""


def match_specificity(patterns: Sequence[str], domain: str) -> int | None:
    """How specifically `patterns` match `domain`, or None if they do not match it."""
    if not patterns:
        return _ANY
    domain = domain.lower().rstrip(".")
    best: int | None = None
    for pattern in patterns:
        if pattern.startswith("*."):
            if domain.endswith(pattern[1:]) and len(domain) > len(pattern) - 1:
                best = _WILDCARD if best is None else max(best, _WILDCARD)
        elif domain == pattern:
            return _EXACT
    return best


def select_route(
    routes: Sequence[RouteConfig], sender_domain: str, recipient_domain: str
) -> RouteConfig | None:
    """The route for one recipient, or None when no route takes it (then: 550 5.7.1)."""
    best: tuple[int, int, int, str] | None = None
    chosen: RouteConfig | None = None
    for route in routes:
        rcpt = match_specificity(route.match.recipient_domains, recipient_domain)
        if rcpt is None:
            continue
        sender = match_specificity(route.match.sender_domains, sender_domain)
        if sender is None:
            continue
        # Sort key, smallest wins: priority descending, specificity descending, name.
        key = (-route.priority, -rcpt, -sender, route.name)
        if best is None or key < best:
            best, chosen = key, route
    return chosen
