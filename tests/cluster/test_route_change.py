"""A route change under load: nothing lost, the running pod reloads it (no roll), quickly."""

from __future__ import annotations

import base64
import email
import json
import time
from email import policy
from typing import Any

import pytest
import trustme
import yaml

from mailrelay.support import incluster
from mailrelay.support.localnode import LocalNode
from tests.cluster.conftest import apply_relay, load_log, received_smtp, start_load, wait_accepted

pytestmark = [pytest.mark.node, pytest.mark.slow]

COUNT = 60


def _message_id(raw_b64: str) -> str:
    message = email.message_from_bytes(base64.b64decode(raw_b64), policy=policy.default)
    return str(message["Message-ID"])


def _mailgun_ids(node: LocalNode, namespace: str) -> set[str]:
    return {_message_id(item["message"]) for item in incluster.received(node, namespace, "mailgun")}


def _smtp_ids(arrivals: list[dict[str, Any]]) -> set[str]:
    return {_message_id(item["data"]) for item in arrivals}


def _relay_pod(node: LocalNode, namespace: str) -> tuple[str, int]:
    pod: dict[str, Any] = json.loads(
        node.kubectl("get", "pod", f"{incluster.RELAY}-0", "-n", namespace, "-o", "json").stdout
    )
    return pod["metadata"]["uid"], pod["status"]["containerStatuses"][0]["restartCount"]


def test_route_change_under_load_is_used_at_once_and_loses_nothing(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    ns = node_namespace
    apply_relay(node, ns, upstreams)
    pod_before = _relay_pod(node, ns)
    start_load(node, ns, count=COUNT, interval=0.2)
    wait_accepted(node, ns, 10)

    # The Mailgun route takes the billing domain too, above the SMTP route: billing mail moves
    # to the Mailgun API. Both routes stay, so the pods mount the same Secrets (no new volume).
    manifests = incluster.relay_manifests(upstreams, ns)
    news = next(o for o in manifests if o["metadata"]["name"].endswith("-news-mailgun"))
    news["spec"]["match"]["senderDomains"] = ["news.demo.test", "billing.demo.test"]
    news["spec"]["priority"] = 300
    assert not _mailgun_ids(node, ns)
    mark = time.monotonic()
    node.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(news))
    while not _mailgun_ids(node, ns):
        assert time.monotonic() - mark < 120, "the relay never used the changed route"
        time.sleep(0.1)
    used_after = time.monotonic() - mark
    print(f"\nMailRoute applied -> the relay routes by it: {used_after:.1f} s")

    deadline = time.monotonic() + 300
    phase = ""
    while time.monotonic() < deadline:
        phase = node.kubectl(
            "get", "pod", "load", "-n", ns, "-o", "jsonpath={.status.phase}"
        ).stdout
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    log = load_log(node, ns)
    assert phase == "Succeeded", log
    accepted = set(incluster.accepted_ids(log))
    assert len(accepted) == COUNT

    def arrived() -> set[str]:
        return _smtp_ids(received_smtp(node, ns, 0, within=1)) | _mailgun_ids(node, ns)

    deadline = time.monotonic() + 120
    while not accepted <= arrived() and time.monotonic() < deadline:
        time.sleep(1)
    assert accepted <= arrived(), sorted(accepted - arrived())
    # Both upstreams got mail: the change took effect while the load ran.
    assert _mailgun_ids(node, ns) and _smtp_ids(received_smtp(node, ns, 0, within=1))
    # The running pod reloaded the route: no roll, no restart.
    assert _relay_pod(node, ns) == pod_before
