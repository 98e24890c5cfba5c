"""Scale-down figures on the real single-node cluster (printed, never asserted).

    PYTHONPATH=hack .venv/bin/python bench/scaling_figures.py [--messages 10000] [--size 2048]

A MailRelay with two pods; the SMTP upstream is stopped (hack/peers.py `/_down`) so that
`--messages` messages of `--size` bytes sent straight to pod 1 stay queued there; then
`kubectl scale mailrelay/outbound --replicas=1` and, polling pod 1's and pod 0's metrics:

- scale -> hand-off started (includes the pod's preStop sleep before SIGTERM);
- hand-off rate: messages per second from the leaving pod to its peer, from its first to its
  last `mailrelay_handoff_messages_total{direction="sent"}` change;
- scale -> pod 1 empty (its queue at 0) and scale -> pod 1 gone;
- scale -> the removed PVC gone (drain Job included);
- the upstream back -> every message delivered; duplicates counted.

The sending rate (one SMTP session from the node, STARTTLS + AUTH) is printed as well: it
bounds how many messages fit a short run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trustme

from mailrelay.support import incluster
from mailrelay.support.localnode import NODE_IP, LocalNode, running_node

NAMESPACE = "bench-scaling"
RELAY = incluster.RELAY


def figure(name: str, value: float, unit: str = "s") -> None:
    print(f"{name:<56} {value:9.1f} {unit}", flush=True)


def get_json(node: LocalNode, *what: str) -> dict[str, Any]:
    result = node.kubectl("get", *what, "-n", NAMESPACE, "-o", "json", check=False)
    data: dict[str, Any] = json.loads(result.stdout) if result.returncode == 0 else {}
    return data


def pod_address(node: LocalNode, ordinal: int) -> str:
    return str(get_json(node, "pod", f"{RELAY}-{ordinal}")["status"]["podIP"])


def setup(node: LocalNode, ca: trustme.CA) -> None:
    incluster.install_operator(node)
    node.create_namespace(NAMESPACE)
    assert node.images is not None
    upstreams = incluster.upstream_manifests(ca, NAMESPACE, node.images.peers)
    node.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=incluster.yaml_stream(upstreams))
    incluster.wait_rollout(node, NAMESPACE, "deployment/smtp-upstream")
    objects = incluster.relay_manifests(ca, NAMESPACE, replicas=2)
    relay = next(o for o in objects if o["kind"] == "MailRelay")
    relay["spec"]["limits"] = {"perClient": {"exemptNetworks": [f"{NODE_IP}/32"]}}
    relay["spec"]["queue"]["size"] = "1Gi"
    node.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=incluster.yaml_stream(objects))
    node.kubectl(
        "wait", "-n", NAMESPACE, "--for=condition=Ready", f"mailrelay/{RELAY}", "--timeout=300s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args(argv)

    ca = trustme.CA()
    ca_file = Path(tempfile.mkdtemp()) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with running_node() as node:
        setup(node, ca)
        incluster.set_upstream(node, NAMESPACE, up=False)
        leaving, staying = pod_address(node, 1), pod_address(node, 0)
        ids = [f"<bench-{i}@billing.demo.test>" for i in range(args.messages)]
        mark = time.monotonic()
        accepted = incluster.send_to_pod(leaving, str(ca_file), ids, size=args.size)
        seconds = time.monotonic() - mark
        figure(f"{len(accepted)} x {args.size} B accepted by pod 1 (one session)", seconds)
        figure("  accept rate", len(accepted) / seconds, "msg/s")
        while incluster.metric_value(leaving, "mailrelay_queue_depth") < len(accepted):
            time.sleep(0.2)

        began = time.monotonic()
        node.kubectl("scale", "-n", NAMESPACE, f"mailrelay/{RELAY}", "--replicas=1")
        first_sent = last_sent = empty = gone = math.nan
        sent = 0.0
        while math.isnan(gone):
            now = time.monotonic() - began
            value = incluster.metric_value(
                leaving, "mailrelay_handoff_messages_total", direction="sent"
            )
            depth = incluster.metric_value(leaving, "mailrelay_queue_depth")
            if not math.isnan(value):
                if value > 0 and math.isnan(first_sent):
                    first_sent = now
                if value > sent:
                    sent, last_sent = value, now
            if depth == 0 and math.isnan(empty):
                empty = now
            if not get_json(node, "pod", f"{RELAY}-1"):
                gone = now
            if now > 900:
                print("pod 1 still there after 900 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        received = incluster.metric_value(
            staying, "mailrelay_handoff_messages_total", direction="received"
        )
        figure("kubectl scale -> hand-off started", first_sent)
        figure(
            f"  handed off by pod 1 (sent counter, last seen) {sent:.0f}", last_sent - first_sent
        )
        if last_sent > first_sent:
            figure("  hand-off rate", sent / (last_sent - first_sent), "msg/s")
        figure("kubectl scale -> pod 1 empty (queue 0; nan: not seen)", empty)
        figure("kubectl scale -> pod 1 gone", gone)
        figure("  received by pod 0 through hand-off", received, "msg")
        claim = f"spool-{RELAY}-1"
        while claim in {i["metadata"]["name"] for i in get_json(node, "pvc").get("items", [])}:
            if time.monotonic() - began > 1200:
                print("the removed PVC is still there after 1200 s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        figure("kubectl scale -> last removed PVC gone", time.monotonic() - began)

        mark = time.monotonic()
        incluster.set_upstream(node, NAMESPACE, up=True)
        wanted = set(accepted)
        arrivals: Counter[str] = Counter()
        while not wanted <= set(arrivals) and time.monotonic() - mark < 900:
            time.sleep(2)
            arrivals = Counter(incluster.received_ids(node, NAMESPACE))
        figure("upstream back -> every message delivered", time.monotonic() - mark)
        figure("  missing", len(wanted - set(arrivals)), "msg")
        figure("  duplicates", sum(n - 1 for n in arrivals.values() if n > 1), "msg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
