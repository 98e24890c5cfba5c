"""ServiceMonitor: a clear condition while its CRD is missing, the object once it exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, apply, condition, get, wait_for
from tests.operator import manifests as m

pytestmark = pytest.mark.kube
CRD = Path(__file__).parent / "servicemonitor-crd.yaml"


def _monitor_condition(kube: LocalKube, ns: str) -> tuple[str, str] | None:
    found = condition(get(kube, "mailrelay", "outbound", ns), "ServiceMonitorReady")
    return (found["status"], found["reason"]) if found else None


def test_missing_crd_is_a_condition_then_the_monitor_appears(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    if (
        kube.kubectl("get", "crd", "servicemonitors.monitoring.coreos.com", check=False).returncode
        == 0
    ):
        pytest.fail("the ServiceMonitor CRD must not exist yet: this test installs it")
    apply(kube, ns, m.tls_secret(), m.users_secret())
    relay = m.relay(
        metrics={"port": 9090, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}
    )
    apply(kube, ns, relay)
    wait_for(
        lambda: _monitor_condition(kube, ns) == ("False", "ServiceMonitorCRDMissing"),
        what="ServiceMonitorReady=False ServiceMonitorCRDMissing",
    )
    message = condition(get(kube, "mailrelay", "outbound", ns), "ServiceMonitorReady")["message"]  # type: ignore[index]
    assert "install the prometheus-operator CRDs" in message
    # Everything else is still in place.
    assert get(kube, "statefulset", "outbound", ns) is not None

    kube.install_crds([CRD])
    monitor = wait_for(lambda: get(kube, "servicemonitor", "outbound", ns), timeout=60)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    wait_for(lambda: _monitor_condition(kube, ns) == ("True", "Applied"), timeout=30)
