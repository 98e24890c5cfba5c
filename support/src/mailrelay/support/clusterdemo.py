"""`make demo` on a real single-node cluster: the user's whole path, as it ships.

1. Build or reuse the binaries and images; start the node (hack/localnode.py).
2. `helm install` charts/mailrelay: the operator runs as a pod from the image built from
   the Dockerfile, under the chart's ServiceAccount and RBAC.
3. Upstreams as pods: an SMTP server with STARTTLS and AUTH, the Mailgun-compatible API.
4. Apply Secrets, a MailRelay (587 STARTTLS, 465 implicit TLS, AUTH) and a route per upstream;
   `kubectl wait --for=condition=Ready mailrelay/outbound`.
5. A client pod sends real mail over STARTTLS and AUTH to
   outbound.mail.svc.cluster.local:587 (and one message over 465).
6. Show where each message arrived, `kubectl get mailrelays,mailroutes,pods`, key metrics;
   uninstall and stop the cluster.

`run_cluster_demo` is also the end-to-end test (tests/cluster/test_demo.py).
"""

from __future__ import annotations

import base64
import email
import time
from dataclasses import dataclass, field
from email import policy
from typing import Any

import trustme

from mailrelay.support import incluster
from mailrelay.support.localnode import LocalNode

NAMESPACE = "mail"
KEY_METRICS = (
    "mailrelay_smtp_tls_sessions",
    "mailrelay_smtp_auth_attempts",
    "mailrelay_messages_accepted",
    "mailrelay_delivery_attempts",
    "mailrelay_queue_depth",
)
MESSAGES = [
    {
        "from": "billing@billing.demo.test",
        "to": "customer@example.org",
        "subject": "Invoice 42",
        "message_id": "<invoice-42@billing.demo.test>",
    },
    {
        "from": "hello@news.demo.test",
        "to": "reader@example.org",
        "subject": "Newsletter 7",
        "message_id": "<newsletter-7@news.demo.test>",
    },
]
IMPLICIT_TLS_MESSAGE = {
    "from": "billing@billing.demo.test",
    "to": "accounts@example.org",
    "subject": "Receipt 43 (implicit TLS)",
    "message_id": "<receipt-43@billing.demo.test>",
}
EXPECTED = {"Invoice 42": "smtp", "Newsletter 7": "mailgun", "Receipt 43 (implicit TLS)": "smtp"}


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


@dataclass
class Arrival:
    upstream: str
    subject: str
    sender: str
    recipients: list[str]


@dataclass
class ClusterDemoResult:
    arrivals: list[Arrival]
    relay_ready_seconds: float
    send_log: str
    get_output: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        delivered = {a.subject: a.upstream for a in self.arrivals}
        return delivered == EXPECTED


def arrivals(node: LocalNode, namespace: str) -> list[Arrival]:
    found = []
    for item in incluster.received(node, namespace, "smtp-upstream"):
        message = email.message_from_bytes(base64.b64decode(item["data"]), policy=policy.default)
        found.append(Arrival("smtp", str(message["Subject"]), item["mail_from"], item["rcpt_tos"]))
    for item in incluster.received(node, namespace, "mailgun"):
        message = email.message_from_bytes(base64.b64decode(item["message"]), policy=policy.default)
        found.append(
            Arrival("mailgun", str(message["Subject"]), str(message["From"]), item["form"]["to"])
        )
    return found


def run_cluster_demo(node: LocalNode, namespace: str = NAMESPACE) -> ClusterDemoResult:
    assert node.images is not None
    ca = trustme.CA()
    step("Installing the chart with helm (the operator as a pod; usually 15-40 s)")
    began = time.monotonic()
    print(incluster.install_operator(node).strip())
    print(
        node.kubectl("get", "pods", "-n", incluster.OPERATOR_NAMESPACE, "-o", "wide").stdout,
        f"(helm install took {time.monotonic() - began:.0f}s)",
    )

    step(f"Starting the upstreams as pods in namespace {namespace} (usually 5-15 s)")
    node.kubectl("create", "namespace", namespace, check=False)
    node.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=incluster.yaml_stream(incluster.upstream_manifests(ca, namespace, node.images.peers)),
    )
    for name in ("smtp-upstream", "mailgun"):
        incluster.wait_rollout(node, namespace, f"deployment/{name}")
    print(node.kubectl("get", "pods,services", "-n", namespace).stdout)

    step("Applying Secrets, a MailRelay (587 STARTTLS, 465 TLS, AUTH) and two MailRoutes")
    applied = time.monotonic()
    print(
        node.kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            input=incluster.yaml_stream(incluster.relay_manifests(ca, namespace)),
        ).stdout
    )
    step("kubectl wait --for=condition=Ready mailrelay/outbound (pod, PVC, probes; ~10-30 s)")
    print(
        node.kubectl(
            "wait",
            "-n",
            namespace,
            "--for=condition=Ready",
            f"mailrelay/{incluster.RELAY}",
            "--timeout=240s",
        ).stdout
    )
    ready_seconds = time.monotonic() - applied
    print(f"MailRelay Ready {ready_seconds:.1f}s after kubectl apply")

    relay_host = incluster.service_host(incluster.RELAY, namespace)
    step(f"A client pod sends over STARTTLS + AUTH to {relay_host}:587 and over TLS to :465")
    first = incluster.send_from_pod(node, namespace, MESSAGES)
    second = incluster.send_from_pod(
        node, namespace, [IMPLICIT_TLS_MESSAGE], name="mail-client-465", port=465
    )
    send_log = first.log + second.log
    print(send_log.rstrip())

    step("Where each message arrived")
    deadline = time.monotonic() + 60
    found: list[Arrival] = []
    while time.monotonic() < deadline:
        found = arrivals(node, namespace)
        if len(found) >= len(EXPECTED):
            break
        time.sleep(0.5)
    for arrival in found:
        print(
            f"{arrival.subject!r}: {arrival.upstream} upstream pod, from {arrival.sender} "
            f"to {', '.join(arrival.recipients)}"
        )

    step(f"kubectl get mailrelays,mailroutes,pods,pvc -n {namespace}")
    get_output = node.kubectl("get", "mailrelays,mailroutes,pods,pvc", "-n", namespace).stdout
    print(get_output.rstrip())

    step("The relay's key metrics")
    metrics = incluster.relay_metrics(node, namespace)
    for key, value in sorted(metrics.items()):
        if key.startswith(KEY_METRICS) and "_created" not in key:
            print(f"{key} {value:g}")
    return ClusterDemoResult(found, ready_seconds, send_log, get_output, metrics)


def cleanup(node: LocalNode, namespace: str = NAMESPACE) -> None:
    step("Cleaning up: deleting the MailRelay, helm uninstall")
    node.kubectl("delete", "mailrelays,mailroutes", "--all", "-n", namespace, "--timeout=60s")
    print(node.helm("uninstall", incluster.RELEASE, "-n", incluster.OPERATOR_NAMESPACE).stdout)


def describe(result: ClusterDemoResult) -> dict[str, Any]:
    return {"ok": result.ok, "relay_ready_seconds": round(result.relay_ready_seconds, 1)}
