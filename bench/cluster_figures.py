"""Figures of the real single-node cluster (printed, never asserted).

    .venv/bin/python bench/cluster_figures.py

- binaries and images ready (cold: builds; warm: cache checks), cluster start;
- `helm install` of the chart until the operator pod is Ready;
- MailRelay applied -> first 250 through its Service (STARTTLS + AUTH from the node to the
  Service's ClusterIP, retried every 0.2 s);
- MailRoute applied -> the relay routes by it (a sender domain no route matched before; a
  message is sent every 0.5 s until one arrives at the upstream pod);
- relay pod force-deleted -> Ready again.
"""

from __future__ import annotations

import smtplib
import ssl
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import trustme
import yaml

from mailrelay.support import incluster
from mailrelay.support.localnode import running_node

NAMESPACE = "bench"
LATE_DOMAIN = "late.demo.test"


def figure(name: str, seconds: float) -> None:
    print(f"{name:<48} {seconds:7.1f} s", flush=True)


def try_send(address: str, ca_file: Path, sender: str) -> bool:
    """One message over STARTTLS + AUTH; True on 250."""
    context = ssl.create_default_context(cafile=str(ca_file))
    # The chain is verified; the name is the Service's DNS name, not the ClusterIP we dial.
    context.check_hostname = False
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, "x@example.org", "bench"
    message.set_content("bench\n")
    try:
        with smtplib.SMTP(address, 587, timeout=5) as client:
            client.starttls(context=context)
            client.login(incluster.CLIENT_USER, incluster.CLIENT_PASSWORD)
            client.send_message(message)
    except (OSError, smtplib.SMTPException):
        return False
    return True


def main() -> int:
    began = time.monotonic()
    with running_node() as node:
        figure("binaries + images ready, cluster started", time.monotonic() - began)
        for key, value in node.timings.items():
            if key != "network":
                figure(f"  start: {key}", value)
        mark = time.monotonic()
        incluster.install_operator(node)
        figure("helm install -> operator pod Ready", time.monotonic() - mark)

        ca = trustme.CA()
        ca_file = Path(tempfile.mkdtemp()) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        node.create_namespace(NAMESPACE)
        assert node.images is not None
        node.kubectl(
            "apply",
            "-n",
            NAMESPACE,
            "-f",
            "-",
            input=incluster.yaml_stream(
                incluster.upstream_manifests(ca, NAMESPACE, node.images.peers)
            ),
        )
        for name in ("smtp-upstream", "mailgun"):
            incluster.wait_rollout(node, NAMESPACE, f"deployment/{name}")

        objects = incluster.relay_manifests(ca, NAMESPACE)
        users = next(o for o in objects if o["metadata"]["name"].endswith("-users"))
        late_users = incluster.users_yaml(["billing.demo.test", "news.demo.test", LATE_DOMAIN])
        users["data"] = {"users.yaml": incluster.b64(late_users)}
        mark = time.monotonic()
        node.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=incluster.yaml_stream(objects))
        address = ""
        while time.monotonic() - mark < 300:
            address = node.kubectl(
                "get", "svc", incluster.RELAY, "-n", NAMESPACE, "-o", "jsonpath={.spec.clusterIP}",
                check=False,
            ).stdout.strip()  # fmt: skip
            if address and try_send(address, ca_file, "billing@billing.demo.test"):
                break
            time.sleep(0.2)
        figure("MailRelay applied -> first 250 via its Service", time.monotonic() - mark)

        route = {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "MailRoute",
            "metadata": {"name": "late"},
            "spec": {
                "relayRef": {"name": incluster.RELAY},
                "priority": 300,
                "match": {"senderDomains": [LATE_DOMAIN]},
                "upstream": next(o for o in objects if o["kind"] == "MailRoute")["spec"][
                    "upstream"
                ],
            },
        }
        before = len(incluster.received(node, NAMESPACE, "smtp-upstream"))
        mark = time.monotonic()
        node.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(route))
        while time.monotonic() - mark < 300:
            try_send(address, ca_file, f"news@{LATE_DOMAIN}")
            arrived = incluster.received(node, NAMESPACE, "smtp-upstream")[before:]
            if any(LATE_DOMAIN in item["mail_from"] for item in arrived):
                break
            time.sleep(0.5)
        figure("MailRoute applied -> relay routes by it", time.monotonic() - mark)

        mark = time.monotonic()
        pod = f"{incluster.RELAY}-0"
        node.kubectl("delete", "pod", pod, "-n", NAMESPACE, "--force", "--grace-period=0")
        time.sleep(1)
        node.kubectl(
            "wait", "-n", NAMESPACE, "--for=condition=Ready", f"pod/{pod}", "--timeout=180s"
        )
        figure("relay pod force-deleted -> Ready again", time.monotonic() - mark)
    figure("total, including teardown", time.monotonic() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
