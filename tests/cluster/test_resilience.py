"""Relay pods killed under load: every message that got a 250 arrives, from the same PVC."""

from __future__ import annotations

import base64
import email
import json
import subprocess
import time
from email import policy
from typing import Any

import pytest
import trustme

from mailrelay.support import incluster
from mailrelay.support.localnode import LocalNode
from tests.cluster.conftest import (
    apply_relay,
    load_log,
    received_smtp,
    start_load,
    wait_accepted,
)

pytestmark = [pytest.mark.node, pytest.mark.slow]

COUNT = 60


def _wait_restarted_and_ready(node: LocalNode, namespace: str, restarts_before: int) -> float:
    """When the relay container, restarted after a kill, reports ready again."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = _relay_pod(node, namespace)["status"]["containerStatuses"][0]
        if status["restartCount"] > restarts_before and status.get("ready"):
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError("the relay container did not come back ready within 180 s")


def _relay_pod(node: LocalNode, namespace: str) -> dict[str, Any]:
    pod: dict[str, Any] = json.loads(
        node.kubectl("get", "pod", f"{incluster.RELAY}-0", "-n", namespace, "-o", "json").stdout
    )
    return pod


def _claim_uid(node: LocalNode, namespace: str) -> str:
    return node.kubectl(
        "get",
        "pvc",
        f"spool-{incluster.RELAY}-0",
        "-n",
        namespace,
        "-o",
        "jsonpath={.metadata.uid}",
    ).stdout


def test_relay_pod_killed_under_load_delivers_every_accepted_message(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    apply_relay(node, node_namespace, upstreams)
    claim = _claim_uid(node, node_namespace)
    start_load(node, node_namespace, count=COUNT, interval=0.1)

    wait_accepted(node, node_namespace, 15)
    node.kubectl(
        "delete", "pod", f"{incluster.RELAY}-0", "-n", node_namespace, "--force",
        "--grace-period=0",
    )  # fmt: skip
    wait_accepted(node, node_namespace, 35)

    # SIGKILL the relay process itself (containerd's task), not the pod.
    pod = _relay_pod(node, node_namespace)
    statuses = pod["status"]["containerStatuses"]
    container_id = statuses[0]["containerID"].split("://", 1)[1]
    ctr = [str(node.node_bin / "ctr"), "--address", str(node.containerd_socket), "-n", "k8s.io"]
    subprocess.run([*ctr, "tasks", "kill", "--signal", "SIGKILL", container_id], check=True)
    killed = time.monotonic()
    ready_after = _wait_restarted_and_ready(node, node_namespace, statuses[0]["restartCount"])
    print(f"\nrelay process SIGKILLed -> its container Ready again: {ready_after - killed:.1f} s")

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        phase = node.kubectl(
            "get", "pod", "load", "-n", node_namespace, "-o", "jsonpath={.status.phase}"
        ).stdout
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    log = load_log(node, node_namespace)
    assert phase == "Succeeded", log
    accepted = incluster.accepted_ids(log)
    assert len(set(accepted)) == COUNT

    arrivals = received_smtp(node, node_namespace, COUNT, within=180)
    arrived = {
        str(
            email.message_from_bytes(base64.b64decode(a["data"]), policy=policy.default)[
                "Message-ID"
            ]
        )
        for a in arrivals
    }
    assert set(accepted) <= arrived, sorted(set(accepted) - arrived)
    print(
        f"relay process SIGKILLed -> every accepted message delivered: "
        f"{time.monotonic() - killed:.1f} s (the load pod kept sending meanwhile)"
    )
    assert _claim_uid(node, node_namespace) == claim  # the same spool volume throughout
    restarts = _relay_pod(node, node_namespace)["status"]["containerStatuses"][0]["restartCount"]
    assert restarts >= 1
