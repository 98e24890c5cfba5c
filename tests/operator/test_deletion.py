"""Deletion races: a status write for an object deleted meanwhile, routes deleted before a relay."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
import yaml
from lightkube import AsyncClient, KubeConfig
from prometheus_client import CollectorRegistry

from mailrelay.operator.apply import (
    Applier,
    MailRelayResource,
    MailRouteResource,
)
from mailrelay.operator.metrics import OperatorMetrics
from mailrelay.operator.relays import Context, Indices, reconcile_relay
from mailrelay.operator.routes import object_info
from mailrelay.operator.settings import FIELD_MANAGER, OperatorSettings
from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, apply, get, wait_for
from tests.operator import manifests as m

pytestmark = pytest.mark.kube

CHILD_KINDS = (
    "ConfigMap",
    "Service",
    "StatefulSet",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ServiceMonitor",
)


def _fetch(kube: LocalKube, kind: str, name: str, ns: str) -> dict[str, Any]:
    obj = get(kube, kind, name, ns)
    assert obj is not None
    return obj


async def test_a_status_write_for_objects_deleted_meanwhile_is_no_error(
    crds: LocalKube, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch cache still holds a relay and a route the API server has deleted."""
    kube, ns = crds, namespace
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(kube, ns, m.relay(), m.smtp_route("billing", senders=["billing.example.com"]))
    relay = object_info(_fetch(kube, "mailrelay", "outbound", ns))
    route = object_info(_fetch(kube, "mailroute", "billing", ns))
    kube.kubectl("delete", "mailroute", "billing", "-n", ns)
    kube.kubectl("delete", "mailrelay", "outbound", "-n", ns)

    metrics = OperatorMetrics(CollectorRegistry())
    client = AsyncClient(
        config=KubeConfig.from_file(str(kube.kubeconfig)), field_manager=FIELD_MANAGER
    )
    events: list[tuple[str, str]] = []
    ctx = Context(
        settings=OperatorSettings(),
        applier=Applier(client, metrics),
        metrics=metrics,
        post_event=lambda target, type_, reason, message: events.append((target.name, reason)),
    )
    secrets = {
        (ns, "relay-tls"): [frozenset({"tls.crt", "tls.key"})],
        (ns, "relay-users"): [frozenset({"users.yaml"})],
        (ns, "smarthost"): [frozenset({"username", "password"})],
    }
    indices = Indices(
        relays={(ns, "outbound"): [relay]},
        routes={(ns, "outbound"): [route]},
        secrets=secrets,
        children={kind: {} for kind in CHILD_KINDS},
    )
    caplog.set_level(logging.INFO)
    try:
        await reconcile_relay(ctx, indices, ns, "outbound")
        # The relay is gone from the cache too, but not its route yet.
        await reconcile_relay(
            ctx, Indices({}, indices.routes, secrets, indices.children), ns, "outbound"
        )
    finally:
        await client.close()

    def sample(name: str, **labels: str) -> float:
        value = metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    assert sample("mailrelay_operator_errors_total", kind="MailRelay") == 0
    assert sample("mailrelay_operator_reconciles_total", kind="MailRelay", result="error") == 0
    assert sample("mailrelay_operator_reconciles_total", kind="MailRelay", result="gone") == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not any(r.exc_info for r in caplog.records)
    assert f"MailRelay {ns}/outbound was deleted during its pass" in caplog.text
    assert events == []  # no Event about objects that no longer exist


def test_routes_deleted_just_before_their_relay_change_no_child(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    """``kubectl delete`` of routes, then of their relay: no config update, no pod roll."""
    kube, ns = crds, op_namespace
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(
        kube,
        ns,
        m.relay(),
        m.smtp_route("billing", senders=["billing.example.com"]),
        m.smtp_route("news", senders=["news.example.com"], priority=50),
    )

    def settled() -> tuple[str, str] | None:
        status = (get(kube, "mailrelay", "outbound", ns) or {}).get("status") or {}
        sts = get(kube, "statefulset", "outbound", ns)
        cm = get(kube, "configmap", "outbound-config", ns)
        if sts is None or cm is None or status.get("routes") != 2:
            return None
        data = yaml.safe_load(cm["data"]["relay.yaml"])
        if len(data.get("routes") or []) != 2:
            return None
        return cm["metadata"]["resourceVersion"], sts["metadata"]["resourceVersion"]

    before = wait_for(settled, what="the relay with both routes")

    async def delete_routes_then_relay() -> None:
        # Through the API (no kubectl start-up in between): a second between the two.
        client = AsyncClient(config=KubeConfig.from_file(str(kube.kubeconfig)))
        try:
            for route_name in ("billing", "news"):
                await client.delete(MailRouteResource, route_name, namespace=ns)
            await asyncio.sleep(1.0)
            await client.delete(MailRelayResource, "outbound", namespace=ns)
        finally:
            await client.close()

    asyncio.run(delete_routes_then_relay())
    wait_for(lambda: get(kube, "mailrelay", "outbound", ns) is None, what="the relay to be deleted")
    time.sleep(4)  # longer than the operator's grace after a route deletion
    # Without a garbage collector the children stay, as they were: nothing was rendered.
    cm = get(kube, "configmap", "outbound-config", ns)
    sts = get(kube, "statefulset", "outbound", ns)
    assert cm is not None and sts is not None
    assert (cm["metadata"]["resourceVersion"], sts["metadata"]["resourceVersion"]) == before
