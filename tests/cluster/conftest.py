"""Fixtures for tests on real pods: the chart installed once, upstream pods per namespace."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import trustme

from mailrelay.support import incluster
from mailrelay.support.localnode import LocalNode


@pytest.fixture(scope="session")
def operator_release(node: LocalNode) -> Iterator[str]:
    """`helm install` of the chart (operator pod from the built image) for the session."""
    incluster.install_operator(node)
    yield incluster.RELEASE


@pytest.fixture
def upstreams(node: LocalNode, node_namespace: str) -> trustme.CA:
    """The SMTP (STARTTLS + AUTH) and Mailgun upstream pods in the test's namespace."""
    assert node.images is not None
    ca = trustme.CA()
    node.kubectl(
        "apply",
        "-n",
        node_namespace,
        "-f",
        "-",
        input=incluster.yaml_stream(
            incluster.upstream_manifests(ca, node_namespace, node.images.peers)
        ),
    )
    for name in ("smtp-upstream", "mailgun"):
        incluster.wait_rollout(node, node_namespace, f"deployment/{name}")
    return ca


def apply_relay(
    node: LocalNode,
    namespace: str,
    ca: trustme.CA,
    *,
    exempt_networks: Sequence[str] = (),
    replicas: int = 1,
    spec: Mapping[str, Any] | None = None,
) -> None:
    """The MailRelay of mailrelay.support.incluster with its Secrets and routes; wait until Ready.

    `exempt_networks` lifts the per-client limits for those clients (a test that probes
    with wrong passwords on purpose would otherwise be locked out, as any client would).
    `spec` is merged over the MailRelay's spec (top-level keys replaced)."""
    manifests = incluster.relay_manifests(ca, namespace, replicas=replicas)
    (relay,) = (m for m in manifests if m["kind"] == "MailRelay")
    if exempt_networks:
        relay["spec"]["limits"] = {"perClient": {"exemptNetworks": list(exempt_networks)}}
    relay["spec"].update(spec or {})
    node.kubectl("apply", "-n", namespace, "-f", "-", input=incluster.yaml_stream(manifests))
    node.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=condition=Ready",
        f"mailrelay/{incluster.RELAY}",
        "--timeout=240s",
    )
    # Ready counts ready pods, not updated ones: the first passes may still roll the pods
    # they just created (a route resolved a moment later); tests that aim at one pod need
    # the pods that will stay.
    incluster.wait_rollout(node, namespace, f"statefulset/{incluster.RELAY}", timeout=300)


def received_smtp(
    node: LocalNode, namespace: str, count: int, within: float = 60
) -> list[dict[str, Any]]:
    """What the SMTP upstream pod accepted, once it has `count` messages (or `within` ends)."""
    deadline = time.monotonic() + within
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = incluster.received(node, namespace, "smtp-upstream")
        if len(found) >= count:
            return found
        time.sleep(0.5)
    return found


LOAD_POD = "load"


def start_load(node: LocalNode, namespace: str, *, count: int, interval: float) -> None:
    """A client pod sending `count` messages to the relay's Service, one every `interval` s."""
    assert node.images is not None
    load = incluster.load_pod(
        LOAD_POD,
        node.images.project,
        incluster.service_host(incluster.RELAY, namespace),
        count=count,
        sender="billing@billing.demo.test",
        interval=interval,
    )
    node.kubectl("apply", "-n", namespace, "-f", "-", input=incluster.yaml_stream(load))


def load_log(node: LocalNode, namespace: str) -> str:
    """The load pod's log so far (empty before it starts)."""
    return node.kubectl("logs", LOAD_POD, "-n", namespace, check=False).stdout


def wait_accepted(node: LocalNode, namespace: str, at_least: int, within: float = 180) -> None:
    """Until the load pod has had `at_least` messages accepted (250) by the relay."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if len(incluster.accepted_ids(load_log(node, namespace))) >= at_least:
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {at_least} messages accepted:\n{load_log(node, namespace)}")
