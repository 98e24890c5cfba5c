"""The relay config the operator renders: a golden file, read back by the relay's own loader.

Regenerate the golden file with ``UPDATE_GOLDEN=1 pytest tests/operator/test_relay_config.py``
and review the diff: it is the contract between the operator and the relay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailrelay.operator import models
from mailrelay.operator.relay_config import (
    BoundRoute,
    RelayConfigError,
    build_relay_config,
    config_hash,
    render_config_yaml,
    required_secret_keys,
)
from mailrelay.relay.config import SmtpUpstream, load_config

GOLDEN = Path(__file__).parent / "golden" / "relay-config.yaml"

SPEC = models.MailRelaySpec.model_validate(
    {
        "replicas": 2,
        "listener": {
            "port": 587,
            "implicitTlsPort": 465,
            "hostname": "relay.example.com",
            "tls": {"secretName": "relay-tls"},
        },
        "auth": {
            "required": True,
            "usersSecretRef": {"name": "relay-users", "key": "users.yaml"},
            "cache": {"ttl": "10m", "maxEntries": 500},
            "appCredentials": [
                {"name": "web"},
                {"name": "billing", "allowedSenderDomains": ["billing.example.com"]},
            ],
        },
        "allowedNetworks": ["10.244.0.0/16"],
        "limits": {
            "perClient": {
                "maxConnections": 20,
                "connectionRatePerMinute": 600,
                "authFailures": 5,
                "authFailureWindow": "10m",
                "exemptNetworks": ["10.244.7.0/24"],
                "ipv6PrefixLength": 128,
            }
        },
        "postmaster": "mail-admins@example.com",
        "queue": {"retry": {"initialBackoff": "1m", "maxBackoff": "30m", "maxAge": "48h"}},
    }
)


def _route(name: str, spec: dict[str, Any]) -> BoundRoute:
    return BoundRoute(
        name, models.MailRouteSpec.model_validate({"relayRef": {"name": "outbound"}, **spec})
    )


ROUTES = [
    _route(
        "billing",
        {
            "priority": 200,
            "match": {"senderDomains": ["billing.example.com"]},
            "upstream": {
                "smtp": {
                    "host": "smtp.example.net",
                    "credentialsSecretRef": {"name": "smarthost"},
                    "caSecretRef": {"name": "smarthost-ca"},
                }
            },
            "fallbacks": [
                {"api": {"provider": "postmark", "credentialsSecretRef": {"name": "postmark"}}}
            ],
            "rateLimit": {"perSecond": 2.5},
            "maxMessageSize": 1048576,
        },
    ),
    _route(
        "news",
        {
            "match": {"senderDomains": ["*.news.example.com"]},
            "upstream": {
                "api": {
                    "provider": "mailgun",
                    "region": "eu",
                    "domain": "news.example.com",
                    "credentialsSecretRef": {"name": "mailgun", "apiKeyKey": "key"},
                }
            },
        },
    ),
    _route(
        "alerts",
        {
            "priority": 50,
            "upstream": {
                "api": {
                    "provider": "ses",
                    "region": "eu-west-1",
                    "credentialsSecretRef": {"name": "aws"},
                }
            },
        },
    ),
]


def _render() -> str:
    config = build_relay_config(name="outbound", namespace="mail", spec=SPEC, routes=ROUTES)
    return render_config_yaml(config)


def test_rendered_config_matches_the_golden_file() -> None:
    text = _render()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert yaml.safe_load(text) == yaml.safe_load(GOLDEN.read_text())


def test_golden_file_is_accepted_by_the_relay_loader(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(GOLDEN.read_text())
    config = load_config(path)
    assert [r.name for r in config.routes] == ["alerts", "billing", "news"]
    billing = config.routes[1]
    assert isinstance(billing.upstream, SmtpUpstream)
    assert billing.upstream.password_file is not None and billing.upstream.ca_file is not None
    assert billing.upstream.password_file.name == "password"
    assert billing.upstream.ca_file.name == "ca.crt"
    # Credentials and a CA from another Secret: two sibling volumes (never nested).
    assert billing.upstream.password_file.parent != billing.upstream.ca_file.parent
    assert billing.upstream.password_file.parent.parent == Path("/etc/mailrelay/upstreams")
    assert billing.rate_limit is not None and billing.rate_limit.burst == 3
    assert config.retry.initial_backoff_seconds == 60
    assert config.hostname == "relay.example.com"
    apps = [
        (a.username, str(a.password_hash_file), a.allowed_sender_domains)
        for a in config.auth.app_credentials
    ]
    assert apps == [
        ("billing", "/etc/mailrelay/apps/billing/password_hash", ["billing.example.com"]),
        ("web", "/etc/mailrelay/apps/web/password_hash", []),
    ]
    assert config.auth.cache.model_dump() == {
        "enabled": True,
        "ttl_seconds": 600,
        "max_entries": 500,
    }


def test_no_secret_value_or_name_of_a_key_leaks_into_the_config() -> None:
    text = _render()
    # Only paths: the Secret names are not even needed by the relay.
    for secret in ("smarthost", "postmark", "mailgun", "aws", "relay-users", "relay-tls"):
        assert f"{secret}/" not in text
    needed = required_secret_keys(SPEC, ROUTES)
    assert needed["mailgun"] == {"key"}
    assert needed["aws"] == {"accessKeyId", "secretAccessKey"}


def test_hostname_defaults_to_the_service_name() -> None:
    spec = SPEC.model_copy(update={"listener": SPEC.listener.model_copy(update={"hostname": None})})
    config = build_relay_config(name="outbound", namespace="mail", spec=spec, routes=[])
    assert config.hostname == "outbound.mail.svc.cluster.local"


def test_a_config_the_relay_refuses_is_an_error_not_a_file() -> None:
    # The CRD allows users without TLS while AUTH is optional; the relay refuses that.
    spec = models.MailRelaySpec.model_validate(
        {
            "auth": {"required": False, "usersSecretRef": {"name": "relay-users"}},
            "allowedNetworks": ["10.0.0.0/8"],
        }
    )
    with pytest.raises(RelayConfigError, match=r"listener\.tls"):
        build_relay_config(name="outbound", namespace="mail", spec=spec, routes=ROUTES)


def test_bytes_in_flight_reach_the_relay_only_when_set() -> None:
    unset = build_relay_config(name="outbound", namespace="mail", spec=SPEC, routes=[])
    assert unset.limits.max_bytes_in_flight is None  # the relay derives it from its cgroup
    limits = SPEC.limits.model_copy(update={"max_bytes_in_flight": 128 * 1024 * 1024})
    spec = SPEC.model_copy(update={"limits": limits})
    config = build_relay_config(name="outbound", namespace="mail", spec=spec, routes=[])
    assert config.limits.max_bytes_in_flight == 128 * 1024 * 1024
    too_small = SPEC.limits.model_copy(update={"max_bytes_in_flight": 1024 * 1024})
    with pytest.raises(RelayConfigError, match=r"max_bytes_in_flight .* must be at least"):
        build_relay_config(
            name="outbound",
            namespace="mail",
            spec=SPEC.model_copy(update={"limits": too_small}),
            routes=[],
        )


def test_config_hash_is_stable_and_sensitive() -> None:
    assert config_hash(_render()) == config_hash(_render())
    assert config_hash(_render()) != config_hash(_render() + " ")


def test_the_acknowledgements_reach_the_relay(tmp_path: Path) -> None:
    """The relay applies the same open-relay and SSRF rules, so each acknowledgement set on
    the resources must reach its config, or the relay would refuse what the API accepted."""
    spec = models.MailRelaySpec.model_validate(
        {
            "auth": {"required": False},
            "allowedNetworks": ["10.0.0.0/8", "203.0.113.0/24"],
            "insecureAllowPublicNetworks": True,
        }
    )
    hook = _route(
        "hook",
        {
            "upstream": {
                "api": {
                    "provider": "webhook",
                    "endpoint": "http://127.0.0.1:8080/in",
                    "insecureAllowLocalEndpoint": True,
                    "credentialsSecretRef": {"name": "hook"},
                }
            }
        },
    )
    config = build_relay_config(name="outbound", namespace="mail", spec=spec, routes=[hook])
    path = tmp_path / "relay.yaml"
    path.write_text(render_config_yaml(config))
    loaded = load_config(path)
    assert loaded.insecure_allow_public_networks is True
    upstream = loaded.routes[0].upstream
    assert upstream.type == "api" and upstream.insecure_allow_local_endpoint is True


@pytest.mark.parametrize("ttl", ["0s", "500ms", "25h"])
def test_an_auth_cache_ttl_out_of_range_is_refused(ttl: str) -> None:
    with pytest.raises(ValueError, match="ttl must be between 1s and 24h"):
        models.AuthCache.model_validate({"ttl": ttl})


def test_a_disabled_auth_cache_is_rendered_disabled() -> None:
    auth = SPEC.auth.model_copy(update={"cache": models.AuthCache(enabled=False)})
    spec = SPEC.model_copy(update={"auth": auth})
    config = build_relay_config(name="outbound", namespace="mail", spec=spec, routes=[])
    assert config.auth.cache.enabled is False


def test_webhook_signing_keys_become_files_the_relay_reads() -> None:
    """Each signing key of the Secret is mounted as `signing_key_<id>`, the relay config
    names the ids and the active one, and the route's Secret references name both keys."""
    from mailrelay.operator.relay_config import secret_mounts  # noqa: PLC0415
    from mailrelay.operator.routes import secret_refs  # noqa: PLC0415

    route_spec = models.MailRouteSpec.model_validate(
        {
            "relayRef": {"name": "outbound"},
            "upstream": {
                "api": {
                    "provider": "webhook",
                    "endpoint": "https://hooks.example.org/mail",
                    "credentialsSecretRef": {"name": "hook-keys"},
                    "signingKeys": [
                        {"id": "2026-11", "secretKey": "old"},
                        {"id": "2026-12", "secretKey": "new"},
                    ],
                    "activeSigningKey": "2026-12",
                }
            },
        }
    )
    routes = [BoundRoute("hook", route_spec)]
    built = build_relay_config(name="outbound", namespace="mail", spec=SPEC, routes=routes)
    config = type(built).model_validate(yaml.safe_load(render_config_yaml(built)))
    (route,) = [r for r in config.routes if r.name == "hook"]
    upstream = route.upstream
    assert not isinstance(upstream, SmtpUpstream)
    assert upstream.signing_keys == ["2026-11", "2026-12"]
    assert upstream.active_signing_key == "2026-12"
    (mount,) = [m for m in secret_mounts(SPEC, routes) if m.secret_name == "hook-keys"]
    assert dict(mount.items) == {"new": "signing_key_2026-12", "old": "signing_key_2026-11"}
    assert upstream.credentials_dir is not None
    assert str(upstream.credentials_dir) == mount.mount_path
    assert required_secret_keys(SPEC, routes)["hook-keys"] == {"old", "new"}
    assert {key for _, _, key in secret_refs(route_spec)} == {"old", "new"}


@pytest.mark.parametrize("grant", ["refresh_token", "client_credentials"])
def test_oauth2_upstream_reaches_the_relay_with_its_secret_files(
    grant: str, tmp_path: Path
) -> None:
    route = models.MailRouteSpec.model_validate(
        {
            "relayRef": {"name": "outbound"},
            "upstream": {
                "smtp": {
                    "host": "smtp.gmail.com",
                    "oauth2": {
                        "mechanism": "oauthbearer",
                        "grant": grant,
                        "tokenEndpoint": "https://oauth2.googleapis.com/token",
                        "scopes": ["https://mail.google.com/"],
                        "clientAuth": "basic",
                        "secretRef": {"name": "gmail", "refreshTokenKey": "rt"},
                    },
                }
            },
        }
    )
    routes = [BoundRoute("gmail", route)]
    path = tmp_path / "relay.yaml"
    path.write_text(
        render_config_yaml(
            build_relay_config(name="outbound", namespace="mail", spec=SPEC, routes=routes)
        )
    )
    (loaded,) = load_config(path).routes
    upstream = loaded.upstream
    assert isinstance(upstream, SmtpUpstream) and upstream.oauth2 is not None
    oauth = upstream.oauth2
    assert (oauth.mechanism, oauth.grant, oauth.client_auth) == ("oauthbearer", grant, "basic")
    assert oauth.scopes == ["https://mail.google.com/"]
    assert upstream.password_file is None and upstream.username_file is not None
    files = {upstream.username_file, oauth.client_id_file, oauth.client_secret_file}
    assert {f.name for f in files} == {"username", "client_id", "client_secret"}
    assert len({f.parent for f in files}) == 1  # one volume of the one Secret
    expected = {"username", "clientId", "clientSecret"}
    if grant == "refresh_token":
        assert oauth.refresh_token_file is not None
        assert oauth.refresh_token_file.name == "refresh_token"
        expected.add("rt")
    else:
        assert oauth.refresh_token_file is None
    assert required_secret_keys(SPEC, routes)["gmail"] == expected


@pytest.mark.parametrize(
    ("namespace", "domain", "seconds"),
    [("mail", "cluster.local", 60.0), ("team-a", "corp.example", 150.0)],
)
def test_handoff_block_names_the_headless_service_and_the_token(
    namespace: str, domain: str, seconds: float
) -> None:
    config = build_relay_config(
        name="outbound",
        namespace=namespace,
        spec=SPEC,
        routes=ROUTES,
        cluster_domain=domain,
        handoff_seconds=seconds,
    )
    assert config.handoff is not None
    assert config.handoff.model_dump(mode="json") == {
        "listen": {"host": "", "port": 2526},
        "token_file": "/etc/mailrelay/handoff/token",
        "peers": [f"outbound-headless.{namespace}.svc.{domain}"],
        "deadline_seconds": seconds,
    }
