"""Route selection: priority, then specificity (exact > wildcard > any), then name."""

from __future__ import annotations

from typing import Any

import pytest

from mailrelay.relay.config import RouteConfig
from mailrelay.relay.routing import domain_of, match_specificity, select_route


def r(
    name: str, priority: int = 0, rcpt: list[str] | None = None, sender: list[str] | None = None
) -> RouteConfig:
    data: dict[str, Any] = {
        "name": name,
        "priority": priority,
        "match": {"recipient_domains": rcpt or [], "sender_domains": sender or []},
        "upstream": {"type": "smtp", "name": f"{name}-up", "host": "mx.test"},
    }
    return RouteConfig.model_validate(data)


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("a@Example.COM", "example.com"),
        ("", ""),
        ("postmaster", ""),
        ("x@[10.0.0.1]", "10.0.0.1"),
        ('"a@b"@c.test', "c.test"),
        ("a@d.test.", "d.test"),
    ],
)
def test_domain_of(address: str, domain: str) -> None:
    assert domain_of(address) == domain


@pytest.mark.parametrize(
    ("patterns", "domain", "expected"),
    [
        ([], "any.test", 0),
        (["example.com"], "example.com", 2),
        (["example.com"], "sub.example.com", None),
        (["*.example.com"], "sub.example.com", 1),
        (["*.example.com"], "a.b.example.com", 1),
        (["*.example.com"], "example.com", None),  # wildcard is not the apex
        (["*.example.com"], "badexample.com", None),
        (["*.example.com", "sub.example.com"], "sub.example.com", 2),
        (["example.com"], "EXAMPLE.com", 2),
    ],
)
def test_match_specificity(patterns: list[str], domain: str, expected: int | None) -> None:
    assert match_specificity(patterns, domain) == expected


def test_priority_beats_specificity() -> None:
    routes = [r("exact", 0, rcpt=["d.test"]), r("any-high", 5)]
    assert select_route(routes, "s.test", "d.test").name == "any-high"  # type: ignore[union-attr]


def test_exact_beats_wildcard_beats_any() -> None:
    routes = [r("any"), r("wild", rcpt=["*.d.test"]), r("exact", rcpt=["x.d.test"])]
    assert select_route(routes, "s.test", "x.d.test").name == "exact"  # type: ignore[union-attr]
    assert select_route(routes, "s.test", "y.d.test").name == "wild"  # type: ignore[union-attr]
    assert select_route(routes, "s.test", "other.test").name == "any"  # type: ignore[union-attr]


def test_sender_specificity_breaks_recipient_ties() -> None:
    routes = [r("by-sender", sender=["corp.test"]), r("plain")]
    assert select_route(routes, "corp.test", "d.test").name == "by-sender"  # type: ignore[union-attr]
    assert select_route(routes, "other.test", "d.test").name == "plain"  # type: ignore[union-attr]


def test_name_breaks_full_ties_whatever_the_order() -> None:
    a, b = r("alpha", rcpt=["d.test"]), r("beta", rcpt=["d.test"])
    assert select_route([b, a], "s", "d.test").name == "alpha"  # type: ignore[union-attr]
    assert select_route([a, b], "s", "d.test").name == "alpha"  # type: ignore[union-attr]


def test_no_route_when_nothing_matches() -> None:
    routes = [r("only-d", rcpt=["d.test"]), r("only-corp", sender=["corp.test"])]
    assert select_route(routes, "other.test", "e.test") is None
    assert select_route([], "s", "d") is None


def test_null_sender_matches_only_sender_agnostic_routes() -> None:
    routes = [r("by-sender", 9, sender=["corp.test"]), r("plain")]
    assert select_route(routes, "", "d.test").name == "plain"  # type: ignore[union-attr]
