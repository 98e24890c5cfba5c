"""Pure decisions about Secrets the watch cache lacks: which to look up, and what to report."""

from __future__ import annotations

from typing import Any

import pytest

from mailrelay.operator import models
from mailrelay.operator.relays import uncached_secrets, with_looked_up
from mailrelay.operator.routes import (
    ObjectInfo,
    SecretNotWatched,
    check_secret_refs,
    judge_routes,
)
from mailrelay.operator.settings import SECRET_SELECTOR

RELAY_SPEC: dict[str, Any] = {
    "listener": {"tls": {"secretName": "tls"}},
    "auth": {"usersSecretRef": {"name": "users"}},
}
CACHED = {"tls": frozenset({"tls.crt", "tls.key"}), "users": frozenset({"users.yaml"})}


def _route(name: str, secret: str, ca: str | None = None) -> ObjectInfo:
    smtp: dict[str, Any] = {"host": "smtp.example.net", "credentialsSecretRef": {"name": secret}}
    if ca is not None:
        smtp["caSecretRef"] = {"name": ca}
    spec = {
        "relayRef": {"name": "outbound"},
        "priority": 100,
        "match": {"senderDomains": [f"{name}.example.com"]},
        "upstream": {"smtp": smtp},
    }
    return ObjectInfo("MailRoute", "ns", name, "uid", 1, spec=spec)


RELAY = ObjectInfo("MailRelay", "ns", "outbound", "uid", 1, spec=RELAY_SPEC)


def test_only_referenced_secrets_missing_from_the_cache_are_looked_up() -> None:
    spec = models.MailRelaySpec.model_validate(
        {**RELAY_SPEC, "auth": {"usersSecretRef": {"name": "gone"}}}
    )
    routes = [_route("a", "smarthost", ca="tls"), _route("b", "users")]
    verdicts = judge_routes(RELAY, spec, routes, CACHED.get)
    assert uncached_secrets(spec, verdicts, CACHED.get) == {"gone", "smarthost"}
    assert uncached_secrets(None, verdicts[1:], CACHED.get) == set()


def test_a_secret_outside_the_selector_is_told_from_an_absent_one() -> None:
    looked_up = {
        "unlabelled": SecretNotWatched(exists=True, selector=SECRET_SELECTOR),
        "absent": SecretNotWatched(exists=False, selector=SECRET_SELECTOR),
    }
    lookup = with_looked_up(CACHED.get, looked_up)
    assert lookup("tls") == CACHED["tls"]
    assert lookup("other") is None  # not looked up: unknown

    unlabelled = check_secret_refs([("path", "unlabelled", "key")], lookup, subject="route")
    assert (unlabelled.status, unlabelled.reason) == ("False", "SecretNotLabelled")
    assert "kubectl label secret unlabelled mailrelay.dev/watch=true" in unlabelled.message

    absent = check_secret_refs([("path", "absent", "key")], lookup, subject="route")
    assert (absent.status, absent.reason) == ("False", "SecretNotFound")
    assert "'key'" in absent.message and "mailrelay.dev/watch=true" in absent.message

    unknown = check_secret_refs([("path", "other", "key")], lookup, subject="route")
    assert unknown.reason == "SecretNotFound"


@pytest.mark.parametrize(
    ("selector", "hint"),
    [
        ("mailrelay.dev/watch=true", "kubectl label secret s mailrelay.dev/watch=true"),
        ("team=mail,tier==prod", "kubectl label secret s team=mail tier=prod"),
        ("team in (mail)", "give Secret 's' labels matching 'team in (mail)'"),
        ("team!=web", "give Secret 's' labels matching 'team!=web'"),
        ("team", "give Secret 's' labels matching 'team'"),
    ],
)
def test_label_hint(selector: str, hint: str) -> None:
    assert SecretNotWatched(exists=True, selector=selector).label_hint("s") == hint


@pytest.mark.parametrize(
    ("grant", "keys", "included"),
    [
        ("refresh_token", {"username", "clientId", "clientSecret", "refreshToken"}, True),
        ("client_credentials", {"username", "clientId", "clientSecret"}, True),
        ("refresh_token", {"username", "clientId", "clientSecret"}, False),
    ],
)
def test_an_oauth2_route_needs_the_keys_of_its_grant(
    grant: str, keys: set[str], included: bool
) -> None:
    spec = {
        "relayRef": {"name": "outbound"},
        "upstream": {
            "smtp": {
                "host": "smtp.gmail.com",
                "oauth2": {
                    "grant": grant,
                    "tokenEndpoint": "https://oauth2.googleapis.com/token",
                    "secretRef": {"name": "gmail"},
                },
            }
        },
    }
    route = ObjectInfo("MailRoute", "ns", "gmail", "uid", 1, spec=spec)
    relay = models.MailRelaySpec.model_validate(RELAY_SPEC)
    secrets = {**CACHED, "gmail": frozenset(keys)}
    (verdict,) = judge_routes(RELAY, relay, [route], secrets.get)
    assert verdict.included is included
    if not included:
        assert verdict.resolved_refs.reason == "SecretKeyMissing", verdict.resolved_refs
        assert "refreshToken" in verdict.resolved_refs.message
