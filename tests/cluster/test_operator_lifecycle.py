"""The operator's own life on a real cluster: killed mid-reconcile, and `helm upgrade`."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trustme
import yaml

from mailrelay.support import incluster
from mailrelay.support.localnode import LocalNode
from tests.cluster.conftest import apply_relay, load_log, received_smtp, start_load, wait_accepted

pytestmark = [pytest.mark.node, pytest.mark.slow]

OPERATOR_SELECTOR = "app.kubernetes.io/component=operator,app.kubernetes.io/instance=mailrelay"
RELAYS = ("r1", "r2", "r3")


def _operator_pods(node: LocalNode) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = json.loads(
        node.kubectl(
            "get",
            "pods",
            "-n",
            incluster.OPERATOR_NAMESPACE,
            "-l",
            OPERATOR_SELECTOR,
            "-o",
            "json",
        ).stdout
    )["items"]
    return [p for p in pods if p["metadata"].get("deletionTimestamp") is None]


def _owned(node: LocalNode, namespace: str, relay_uid: str) -> list[tuple[str, str]]:
    """(kind, name) of every object in the namespace whose owner is the relay."""
    items = json.loads(
        node.kubectl(
            "get",
            "configmaps,services,statefulsets,secrets,poddisruptionbudgets",
            "-n",
            namespace,
            "-o",
            "json",
        ).stdout
    )["items"]
    return sorted(
        (item["kind"], item["metadata"]["name"])
        for item in items
        if any(o.get("uid") == relay_uid for o in item["metadata"].get("ownerReferences") or [])
    )


def test_operator_pod_killed_mid_reconcile_next_one_finishes_without_duplicates(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    ns = node_namespace
    (first,) = _operator_pods(node)
    objects: list[dict[str, Any]] = []
    for name in RELAYS:
        manifests = incluster.relay_manifests(upstreams, ns, name=name)
        relay = next(o for o in manifests if o["kind"] == "MailRelay")
        relay["spec"]["queue"]["size"] = "0"  # no PVC: the test is about the operator
        relay["spec"]["auth"]["appCredentials"] = [
            {"name": "web", "allowedSenderDomains": ["billing.demo.test"]}
        ]
        objects += manifests
    # One Secret name is shared by the relays' routes; apply it once.
    unique = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    node.kubectl("apply", "-n", ns, "-f", "-", input=incluster.yaml_stream(list(unique.values())))

    # Kill the operator as soon as it has started on the relays, before it has finished.
    deadline = time.monotonic() + 120
    while not node.kubectl("get", "configmaps", "-n", ns, "-o", "name").stdout.count("-config"):
        assert time.monotonic() < deadline, "the operator never started on the relays"
        time.sleep(0.1)
    node.kubectl(
        "delete", "pod", first["metadata"]["name"], "-n", incluster.OPERATOR_NAMESPACE,
        "--force", "--grace-period=0",
    )  # fmt: skip
    killed_at = time.monotonic()

    for name in RELAYS:
        node.kubectl(
            "wait", "-n", ns, "--for=condition=Ready", f"mailrelay/{name}", "--timeout=300s"
        )
    print(f"\noperator pod killed -> every relay Ready: {time.monotonic() - killed_at:.1f} s")
    (second,) = _operator_pods(node)
    assert second["metadata"]["name"] != first["metadata"]["name"]

    for name in RELAYS:
        relay = json.loads(node.kubectl("get", "mailrelay", name, "-n", ns, "-o", "json").stdout)
        assert relay["status"]["routes"] == 2, relay["status"]
        assert _owned(node, ns, relay["metadata"]["uid"]) == sorted(
            [
                ("ConfigMap", f"{name}-config"),
                ("Secret", f"{name}-app-web"),
                ("Secret", f"{name}-handoff"),  # the hand-off token, generated once
                ("Service", name),
                ("Service", f"{name}-headless"),
                ("StatefulSet", name),
            ]
        )
        pods = json.loads(
            node.kubectl(
                "get", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}", "-o", "json"
            ).stdout
        )["items"]
        assert [p["metadata"]["name"] for p in pods] == [f"{name}-0"]


def test_helm_upgrade_of_a_running_install_replaces_the_operator_and_relays_keep_serving(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    ns = node_namespace
    apply_relay(node, ns, upstreams)
    (before,) = _operator_pods(node)
    relay_pod = json.loads(
        node.kubectl("get", "pod", f"{incluster.RELAY}-0", "-n", ns, "-o", "json").stdout
    )
    count = 40
    start_load(node, ns, count=count, interval=0.25)
    try:
        wait_accepted(node, ns, 5)
        incluster.install_operator(
            node, extra=("--set", "operator.resyncSeconds=7", "--set", "operator.logFormat=json")
        )
        (after,) = _operator_pods(node)
        assert after["metadata"]["name"] != before["metadata"]["name"]
        env = {e["name"]: e.get("value") for e in after["spec"]["containers"][0]["env"]}
        assert env["MAILRELAY_OPERATOR_RESYNC_SECONDS"] == "7"
        assert env["MAILRELAY_OPERATOR_LOG_FORMAT"] == "json"

        # The new operator acts: a route change reaches the relay's config.
        manifests = incluster.relay_manifests(upstreams, ns)
        billing = next(o for o in manifests if o["metadata"]["name"].endswith("-billing-smtp"))
        billing["spec"]["match"]["senderDomains"] = ["billing.demo.test", "upgraded.demo.test"]
        node.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(billing))
        deadline = time.monotonic() + 60
        while (
            "upgraded.demo.test"
            not in node.kubectl(
                "get", "configmap", f"{incluster.RELAY}-config", "-n", ns, "-o", "yaml"
            ).stdout
        ):
            assert time.monotonic() < deadline, "the upgraded operator did not reconcile"
            time.sleep(0.5)

        deadline = time.monotonic() + 300
        phase = ""
        while time.monotonic() < deadline and phase not in ("Succeeded", "Failed"):
            phase = node.kubectl(
                "get", "pod", "load", "-n", ns, "-o", "jsonpath={.status.phase}"
            ).stdout
            time.sleep(1)
        log = load_log(node, ns)
        assert phase == "Succeeded", log
        accepted = set(incluster.accepted_ids(log))
        assert len(accepted) == count
        arrivals = received_smtp(node, ns, count, within=120)
        assert len(arrivals) >= count
        # The relay kept serving: the same pod, never restarted.
        now = json.loads(
            node.kubectl("get", "pod", f"{incluster.RELAY}-0", "-n", ns, "-o", "json").stdout
        )
        assert now["metadata"]["uid"] == relay_pod["metadata"]["uid"]
        assert now["status"]["containerStatuses"][0]["restartCount"] == 0
    finally:
        incluster.install_operator(node)
