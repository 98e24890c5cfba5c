"""Generated app credentials (spec.auth.appCredentials): the pure plan and Secret, and the
operator against the real API server creating, keeping and regenerating the Secrets."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailrelay.operator import models
from mailrelay.operator.appcredentials import (
    APP_KEYS,
    plan_app_secrets,
    render_app_secret,
    selector_labels,
)
from mailrelay.operator.relay_config import app_credential_mounts
from mailrelay.operator.render import RelayInputs
from mailrelay.relay.auth import load_users
from mailrelay.relay.config import AppCredentialConfig
from mailrelay.relay.machinehash import check_machine_secret, hash_machine_secret
from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, apply, condition, get, wait_for
from tests.operator import manifests as m

APPS: list[dict[str, Any]] = [
    {"name": "web"},
    {"name": "billing", "allowedSenderDomains": ["billing.example.com"]},
]


def _spec(apps: list[dict[str, Any]]) -> models.MailRelaySpec:
    body = m.relay()["spec"]
    body["auth"]["appCredentials"] = apps
    return models.MailRelaySpec.model_validate(body)


# -- pure -----------------------------------------------------------------------------


def test_the_plan_creates_missing_secrets_and_names_incomplete_ones() -> None:
    spec = _spec([*APPS, {"name": "cron"}])
    existing = {
        "outbound-app-web": frozenset(APP_KEYS),
        "outbound-app-cron": frozenset({"username", "password"}),
    }
    plan = plan_app_secrets("outbound", spec, existing.get)
    assert [app.name for app in plan.create] == ["billing"]
    assert plan.incomplete == (("outbound-app-cron", ("password_hash",)),)
    assert plan_app_secrets("outbound", _spec([]), existing.get).create == ()


def test_the_secret_holds_username_password_and_a_hash_of_it_owned_by_the_relay() -> None:
    relay = RelayInputs("outbound", "mail", "uid-1", _spec(APPS))
    app = relay.spec.auth.app_credentials[1]
    body = render_app_secret(
        relay, app, "s3cret", hash_machine_secret("s3cret"), selector="mailrelay.dev/watch=true"
    )
    data = {k: base64.b64decode(v).decode() for k, v in body["data"].items()}
    assert set(data) == APP_KEYS
    assert data["username"] == "billing" and data["password"] == "s3cret"
    assert check_machine_secret(data["password_hash"], b"s3cret")
    assert body["metadata"]["name"] == "outbound-app-billing"
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert body["metadata"]["labels"]["mailrelay.dev/app"] == "billing"
    # Inside the operator's Secret selector, or its own watch would never see it.
    assert body["metadata"]["labels"]["mailrelay.dev/watch"] == "true"


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("mailrelay.dev/watch=true", {"mailrelay.dev/watch": "true"}),
        ("a==b, c=d", {"a": "b", "c": "d"}),
        ("a!=b,env in (x),c=d", {"c": "d"}),
        ("", {}),
    ],
)
def test_selector_labels_take_the_equality_terms(selector: str, expected: dict[str, str]) -> None:
    assert selector_labels(selector) == expected


def test_the_relay_mounts_only_the_hash_of_each_app() -> None:
    mounts = app_credential_mounts("outbound", _spec(APPS))
    assert [(mt.volume, mt.secret_name, mt.mount_path, mt.items) for mt in mounts] == [
        (
            "app-billing",
            "outbound-app-billing",
            "/etc/mailrelay/apps/billing",
            (("password_hash", "password_hash"),),
        ),
        (
            "app-web",
            "outbound-app-web",
            "/etc/mailrelay/apps/web",
            (("password_hash", "password_hash"),),
        ),
    ]


# -- against the API server ---------------------------------------------------------------


def _secret_data(kube: LocalKube, ns: str, name: str) -> dict[str, str] | None:
    secret = get(kube, "secret", name, ns)
    if secret is None:
        return None
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


@pytest.mark.kube
def test_the_operator_generates_keeps_and_regenerates_app_secrets(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str, tmp_path: Path
) -> None:
    kube, ns = crds, op_namespace
    apply(kube, ns, m.tls_secret(), m.users_secret())
    relay = m.relay()
    relay["spec"]["auth"]["appCredentials"] = APPS
    apply(kube, ns, relay)

    billing = wait_for(
        lambda: _secret_data(kube, ns, "outbound-app-billing"), what="billing's Secret"
    )
    web = wait_for(lambda: _secret_data(kube, ns, "outbound-app-web"), what="web's Secret")
    assert set(billing) == APP_KEYS and billing["username"] == "billing"
    assert len(billing["password"]) == 43 and billing["password"] != web["password"]
    owner = get(kube, "secret", "outbound-app-billing", ns)["metadata"]["ownerReferences"][0]  # type: ignore[index]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("MailRelay", "outbound", True)

    # The relay's own loader accepts the operator's hash for the app's password.
    hash_file = tmp_path / "password_hash"
    hash_file.write_text(billing["password_hash"])
    app = AppCredentialConfig(username="billing", password_hash_file=hash_file)
    db = load_users(None, apps=[app])
    try:
        assert asyncio.run(db.verify("billing", billing["password"].encode())) is not None
        assert asyncio.run(db.verify("billing", web["password"].encode())) is None
    finally:
        db.close()

    # The config lists the apps with mounted hash files; the pod mounts only the hash.
    def config() -> dict[str, Any] | None:
        cm = get(kube, "configmap", "outbound-config", ns)
        return yaml.safe_load(cm["data"]["relay.yaml"]) if cm else None

    rendered = wait_for(config, what="the relay config")
    assert [a["username"] for a in rendered["auth"]["app_credentials"]] == ["billing", "web"]
    sts = wait_for(lambda: get(kube, "statefulset", "outbound", ns), what="the StatefulSet")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["app-billing"]["secret"]["secretName"] == "outbound-app-billing"
    assert volumes["app-billing"]["secret"]["items"] == [
        {"key": "password_hash", "path": "password_hash"}
    ]

    # Later passes keep the password: a spec change rolls the relay, not the credentials.
    relay["spec"]["replicas"] = 3
    apply(kube, ns, relay)
    wait_for(
        lambda: (
            (get(kube, "statefulset", "outbound", ns) or {}).get("spec", {}).get("replicas") == 3
        ),
        what="the StatefulSet scaled",
    )
    assert _secret_data(kube, ns, "outbound-app-billing") == billing

    # Rotation: delete the Secret, get a new password.
    kube.kubectl("delete", "secret", "outbound-app-web", "-n", ns)

    def regenerated() -> dict[str, str] | None:
        data = _secret_data(kube, ns, "outbound-app-web")
        return data if data and data != web else None

    rotated = wait_for(regenerated, what="a regenerated web Secret")
    assert rotated["password"] != web["password"]
    assert check_machine_secret(rotated["password_hash"], rotated["password"].encode())

    # A Secret missing a key is reported, not overwritten.
    kube.kubectl(
        "patch", "secret", "outbound-app-web", "-n", ns, "--type=json",
        "-p", '[{"op": "remove", "path": "/data/password_hash"}]',
    )  # fmt: skip

    def not_ready() -> dict[str, Any] | None:
        found = condition(get(kube, "mailrelay", "outbound", ns), "SecretsResolved")
        return found if found and found["reason"] == "AppCredentialsNotReady" else None

    found = wait_for(not_ready, what="SecretsResolved=False AppCredentialsNotReady")
    assert found["status"] == "False"
    assert "outbound-app-web lacks key(s) password_hash" in found["message"]
    assert _secret_data(kube, ns, "outbound-app-web") == {
        k: v for k, v in rotated.items() if k != "password_hash"
    }
    # No generated value reaches the operator's log.
    log = operator.log_tail(2000)
    for value in (billing["password"], rotated["password"], billing["password_hash"]):
        assert value not in log
