"""The operator against the real API server, as its least-privilege user.

Each test works in its own ``op-*`` namespace, which the shared operator watches.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from localkube import LocalKube

from mailrelay.relay.config import parse_config
from tests.operator import manifests as m
from tests.operator.harness import OperatorProcess, apply, condition, get, wait_for

pytestmark = pytest.mark.kube


def _config(kube: LocalKube, ns: str, relay: str = "outbound") -> dict[str, Any] | None:
    cm = get(kube, "configmap", f"{relay}-config", ns)
    if cm is None:
        return None
    data: dict[str, Any] = yaml.safe_load(cm["data"]["relay.yaml"])
    return data


def _route_names(kube: LocalKube, ns: str) -> list[str]:
    config = _config(kube, ns)
    return [r["name"] for r in (config or {}).get("routes", [])]


def _setup(kube: LocalKube, ns: str, *routes: dict[str, Any]) -> None:
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(kube, ns, m.relay(), *routes)


def test_creates_every_child_with_expected_content(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns, m.smtp_route("billing", senders=["billing.example.com"]))
    wait_for(lambda: "billing" in _route_names(kube, ns), what="the route in the ConfigMap")
    relay = get(kube, "mailrelay", "outbound", ns)
    assert relay is not None
    config = parse_config(get(kube, "configmap", "outbound-config", ns)["data"]["relay.yaml"])  # type: ignore[index]
    assert config.routes[0].upstream.name == "billing"
    assert config.listener.tls is not None
    sts = wait_for(lambda: get(kube, "statefulset", "outbound", ns), what="the StatefulSet")
    owner = sts["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "MailRelay",
        "outbound",
        relay["metadata"]["uid"],
        True,
    )
    assert get(kube, "service", "outbound", ns) is not None
    assert get(kube, "service", "outbound-headless", ns) is not None
    assert get(kube, "poddisruptionbudget", "outbound", ns) is not None
