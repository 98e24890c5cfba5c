"""The operator watches only labelled Secrets; a referenced one without the label is reported."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, apply, condition, get, wait_for
from tests.operator import manifests as m

pytestmark = pytest.mark.kube


def _unlabelled(secret: dict[str, Any]) -> dict[str, Any]:
    secret["metadata"].pop("labels")
    return secret


def _has(kube: LocalKube, kind: str, name: str, ns: str, *want: str) -> bool:
    found = condition(get(kube, kind, name, ns), want[0])
    return found is not None and (found["status"], found["reason"])[: len(want) - 1] == want[1:]


def _warnings(kube: LocalKube, ns: str, name: str) -> set[str]:
    result = kube.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    return {e["reason"] for e in json.loads(result.stdout)["items"] if e["type"] == "Warning"}


def test_a_referenced_secret_without_the_label_is_a_condition_and_an_event(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    apply(
        kube, ns, m.tls_secret(), _unlabelled(m.users_secret()), _unlabelled(m.smtp_credentials())
    )
    apply(kube, ns, m.relay(), m.smtp_route("billing", senders=["billing.example.com"]))

    wait_for(
        lambda: _has(
            kube, "mailroute", "billing", ns, "ResolvedRefs", "False", "SecretNotLabelled"
        ),
        what="the route's ResolvedRefs=False SecretNotLabelled",
    )
    message = condition(get(kube, "mailroute", "billing", ns), "ResolvedRefs")["message"]  # type: ignore[index]
    assert "kubectl label secret smarthost mailrelay.dev/watch=true" in message
    assert _has(kube, "mailrelay", "outbound", ns, "SecretsResolved", "False", "SecretNotLabelled")
    assert _has(kube, "mailrelay", "outbound", ns, "RoutesResolved", "False", "SecretNotLabelled")
    wait_for(
        lambda: "SecretNotLabelled" in _warnings(kube, ns, "billing"),
        what="a SecretNotLabelled Warning Event on the route",
    )
    wait_for(
        lambda: "SecretNotLabelled" in _warnings(kube, ns, "outbound"),
        what="a SecretNotLabelled Warning Event on the relay",
    )

    # A Secret that really does not exist is still SecretNotFound, and says to label it.
    apply(kube, ns, m.smtp_route("news", senders=["news.example.com"], credentials="absent"))
    wait_for(
        lambda: _has(kube, "mailroute", "news", ns, "ResolvedRefs", "False", "SecretNotFound"),
        what="SecretNotFound for a Secret that does not exist",
    )
    message = condition(get(kube, "mailroute", "news", ns), "ResolvedRefs")["message"]  # type: ignore[index]
    assert "mailrelay.dev/watch=true" in message

    for name in ("smarthost", "relay-users"):
        kube.kubectl("label", "secret", name, "-n", ns, "mailrelay.dev/watch=true")
    wait_for(
        lambda: _has(kube, "mailroute", "billing", ns, "ResolvedRefs", "True"),
        what="the route to recover once its Secret is labelled",
    )
    wait_for(lambda: _has(kube, "mailrelay", "outbound", ns, "SecretsResolved", "True"))
    config = get(kube, "configmap", "outbound-config", ns)
    assert config is not None and "billing" in config["data"]["relay.yaml"]
