"""The shipped artefacts on real pods: chart, operator pod, relay pods, Services, PVCs.

Everything runs on the single-node cluster of mailrelay.support.localnode, whose containerd does
not lower `ip_unprivileged_port_start` for pods (`enable_unprivileged_ports = false`, like
most runtimes), so the relay's ports 587/465 work only through the pod's own sysctl.
"""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest
import trustme

from mailrelay.support import incluster
from mailrelay.support.localnode import LocalNode
from tests.cluster.conftest import apply_relay, received_smtp

pytestmark = [pytest.mark.node, pytest.mark.slow]

RAW = (
    b"From: Billing <billing@billing.demo.test>\r\n"
    b"To: customer@example.org\r\n"
    b"Subject: =?utf-8?q?Rechnung_f=C3=BCr_Dezember?=\r\n"
    b"Message-ID: <byte-exact-1@billing.demo.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe,\r\n"
    b".leading dot and trailing spaces   \r\n"
    b"\tand a tab\r\n"
)


def test_mailrelay_becomes_ready_pods_that_serve_587_and_465(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    apply_relay(node, node_namespace, upstreams)
    pods = json.loads(
        node.kubectl(
            "get",
            "pods",
            "-n",
            node_namespace,
            "-l",
            f"app.kubernetes.io/instance={incluster.RELAY}",
            "-o",
            "json",
        ).stdout
    )["items"]
    assert len(pods) == 1
    pod = pods[0]
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True"
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "spool")
    assert "persistentVolumeClaim" in claim  # the spool lives on a real PVC
    phase = node.kubectl(
        "get",
        "pvc",
        claim["persistentVolumeClaim"]["claimName"],
        "-n",
        node_namespace,
        "-o",
        "jsonpath={.status.phase}",
    ).stdout
    assert phase == "Bound"

    message = {
        "from": "billing@billing.demo.test",
        "to": "customer@example.org",
        "subject": "over 587",
        "message_id": "<p587@billing.demo.test>",
    }
    sent_587 = incluster.send_from_pod(node, node_namespace, [message], name="client-587")
    assert sent_587.ok, sent_587.log
    message = {**message, "subject": "over 465", "message_id": "<p465@billing.demo.test>"}
    sent_465 = incluster.send_from_pod(node, node_namespace, [message], name="client-465", port=465)
    assert sent_465.ok, sent_465.log
    assert len(received_smtp(node, node_namespace, 2)) == 2


def test_in_cluster_client_through_service_arrives_byte_exact_with_one_received_header(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    apply_relay(node, node_namespace, upstreams)
    plan = [
        {
            "from": "billing@billing.demo.test",
            "to": "customer@example.org",
            "raw": base64.b64encode(RAW).decode(),
            "subject": "byte-exact",
        }
    ]
    sent = incluster.send_from_pod(node, node_namespace, plan)
    assert sent.ok, sent.log
    (arrival,) = received_smtp(node, node_namespace, 1)
    data = base64.b64decode(arrival["data"])
    assert arrival["mail_from"] == "billing@billing.demo.test"
    assert arrival["rcpt_tos"] == ["customer@example.org"]
    assert arrival["tls"] is True  # STARTTLS to the upstream pod
    assert data.endswith(RAW)
    added = data[: -len(RAW)].split(b"\r\n")[:-1]
    assert added[0].startswith(b"Received: ")
    assert all(line[:1] in (b" ", b"\t") for line in added[1:])  # one header, folded


def test_operator_runs_as_a_pod_under_its_chart_service_account(
    node: LocalNode, operator_release: str
) -> None:
    namespace = incluster.OPERATOR_NAMESPACE
    (pod,) = json.loads(
        node.kubectl(
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            "app.kubernetes.io/component=operator,app.kubernetes.io/instance=mailrelay",
            "-o",
            "json",
        ).stdout
    )["items"]
    name = pod["metadata"]["name"]
    assert pod["spec"]["serviceAccountName"] == incluster.RELEASE
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Running, never restarted: no peering-identity crash, liveness answers.
    time.sleep(5)
    status = json.loads(node.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)
    (state,) = status["status"]["containerStatuses"]
    assert state["ready"] is True and state["restartCount"] == 0, state
    # kopf peering: the operator announces itself under its pod name.
    peering = json.loads(
        node.kubectl("get", "clusterkopfpeering", "mailrelay", "-o", "json").stdout
    )
    assert any(key.startswith(name) for key in (peering.get("status") or {})), peering
    # Least privilege: what it needs, not more.
    account = f"system:serviceaccount:{namespace}:{incluster.RELEASE}"
    allowed = [
        ("create", "statefulsets.apps", "-n", "default"),
        ("patch", "mailrelays.mailrelay.dev/status", "-n", "default"),
        ("create", "secrets", "-n", "default"),  # app credentials (spec.auth.appCredentials)
        ("patch", "pods", "-n", "default"),  # the config-hash note that makes kubelet resync
        ("list", "pods", "-n", "default"),
    ]
    denied = [
        ("create", "pods", "-n", "default"),
        ("delete", "pods", "-n", "default"),
        ("update", "pods", "-n", "default"),
        ("delete", "nodes", "--all-namespaces"),
        ("create", "clusterrolebindings", "--all-namespaces"),
        ("delete", "secrets", "-n", "default"),
        ("patch", "secrets", "-n", "kube-system"),
        ("create", "pods/exec", "-n", "default"),
    ]
    for verb, resource, *scope in allowed:
        answer = node.kubectl("auth", "can-i", verb, resource, *scope, "--as", account, check=False)
        assert answer.stdout.strip() == "yes", (verb, resource)
    for verb, resource, *scope in denied:
        answer = node.kubectl("auth", "can-i", verb, resource, *scope, "--as", account, check=False)
        assert answer.stdout.strip() == "no", (verb, resource)


def _wait_for_greeting(addresses: list[str], within: float) -> None:
    """Until each address answers on 587 at all (refused while kube-proxy catches up)."""
    deadline = time.monotonic() + within
    for address in addresses:
        while True:
            try:
                _greeting(address, 587)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def _greeting(host: str, port: int) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect((host, port))
        return sock.recv(512)


def test_relay_serves_ipv4_and_ipv6_on_the_dual_stack_pod_network(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    apply_relay(node, node_namespace, upstreams)
    service = json.loads(
        node.kubectl("get", "service", incluster.RELAY, "-n", node_namespace, "-o", "json").stdout
    )
    pod = json.loads(
        node.kubectl(
            "get", "pod", f"{incluster.RELAY}-0", "-n", node_namespace, "-o", "json"
        ).stdout
    )
    cluster_ips = service["spec"]["clusterIPs"]
    pod_ips = [entry["ip"] for entry in pod["status"]["podIPs"]]
    # The node's pod network and Service ranges are dual-stack: one address of each family.
    assert sorted(":" in ip for ip in cluster_ips) == [False, True], cluster_ips
    assert sorted(":" in ip for ip in pod_ips) == [False, True], pod_ips
    # kube-proxy programs a Service's rules a moment after its endpoints turn ready (until
    # then the Service IP refuses connections), so give the Service addresses that moment.
    _wait_for_greeting(cluster_ips, within=30)
    for address in (*cluster_ips, *pod_ips):
        for port in (587, 9090):
            if port == 9090:
                with socket.create_connection((address, port), timeout=10) as sock:
                    sock.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                    assert sock.recv(64).startswith(b"HTTP/1.1 200"), address
            else:
                assert _greeting(address, port).startswith(b"220 "), address
    # kubelet's probes reach the pod (it is Ready), whatever its primary family.
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])


def test_helm_uninstall_then_deleting_mailrelays_does_not_hang(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    apply_relay(node, node_namespace, upstreams)
    relay = json.loads(
        node.kubectl("get", "mailrelay", incluster.RELAY, "-n", node_namespace, "-o", "json").stdout
    )
    assert relay["metadata"].get("finalizers"), "kopf holds a finalizer while it runs"
    try:
        node.helm(
            "uninstall", incluster.RELEASE, "-n", incluster.OPERATOR_NAMESPACE, "--wait",
            "--timeout=120s",
        )  # fmt: skip
        # What uninstall leaves: the CRDs (crds.keep), the relay and its pods keep running.
        assert node.kubectl("get", "statefulset", incluster.RELAY, "-n", node_namespace)
        deleted = node.kubectl(
            "delete", "mailrelay", incluster.RELAY, "-n", node_namespace, "--timeout=30s",
            check=False,
        )  # fmt: skip
        assert deleted.returncode == 0, deleted.stderr
        gone = node.kubectl(
            "wait", "--for=delete", f"statefulset/{incluster.RELAY}", "-n", node_namespace,
            "--timeout=60s", check=False,
        )  # fmt: skip
        assert gone.returncode == 0, gone.stderr  # children garbage-collected
    finally:
        incluster.install_operator(node)
