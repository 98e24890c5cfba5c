"""The hand-off token Secret and the refusal to take over objects, on the real API server.

Each test works in its own ``op-*`` namespace, which the shared operator (least-privilege
user) watches.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, apply, condition, get, wait_for
from tests.operator import manifests as m

pytestmark = pytest.mark.kube


def _events(kube: LocalKube, ns: str, name: str) -> list[dict[str, Any]]:
    result = kube.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
    return items


def _condition_is(kube: LocalKube, ns: str, type_: str, status: str, reason: str) -> bool:
    found = condition(get(kube, "mailrelay", "outbound", ns), type_)
    return bool(found and (found["status"], found["reason"]) == (status, reason))


def _setup(kube: LocalKube, ns: str, **spec: Any) -> None:
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(kube, ns, m.relay(**spec), m.smtp_route("billing"))


def test_handoff_secret_is_generated_once_and_again_only_when_deleted(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns)
    secret = wait_for(lambda: get(kube, "secret", "outbound-handoff", ns), what="the Secret")
    relay = get(kube, "mailrelay", "outbound", ns)
    assert relay is not None
    owner = secret["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "MailRelay",
        "outbound",
        relay["metadata"]["uid"],
    )
    assert secret["metadata"]["labels"]["mailrelay.dev/watch"] == "true"
    token = base64.b64decode(secret["data"]["token"])
    assert len(base64.urlsafe_b64decode(token)) == 32
    # The pods mount it read-only where the config says.
    sts = wait_for(lambda: get(kube, "statefulset", "outbound", ns), what="the StatefulSet")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["handoff"]["secret"]["secretName"] == "outbound-handoff"
    # The API server keeps the PDB's eviction policy for not-ready pods (docs/scaling.md).
    pdb = wait_for(lambda: get(kube, "poddisruptionbudget", "outbound", ns), what="the PDB")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    headless = get(kube, "service", "outbound-headless", ns)
    assert headless is not None
    assert headless["spec"].get("publishNotReadyAddresses", False) is False  # omitted when false
    assert {"name": "handoff", "port": 2526, "targetPort": "handoff", "protocol": "TCP"} in (
        headless["spec"]["ports"]
    )

    # Passes (resync every 2 s, and a spec change) never rotate it.
    apply(kube, ns, m.relay(limits={"maxRecipients": 7}))
    wait_for(
        lambda: (
            "max_recipients: 7"
            in (get(kube, "configmap", "outbound-config", ns) or {})
            .get("data", {})
            .get("relay.yaml", "")
        ),
        what="the new config",
    )
    time.sleep(5)
    again = get(kube, "secret", "outbound-handoff", ns)
    assert again is not None
    assert again["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]

    kube.kubectl("delete", "secret", "outbound-handoff", "-n", ns)
    renewed = wait_for(
        lambda: (
            (s := get(kube, "secret", "outbound-handoff", ns))
            and s["metadata"]["uid"] != secret["metadata"]["uid"]
            and s
        ),
        what="a new Secret",
    )
    assert renewed["data"]["token"] != secret["data"]["token"]


def test_a_foreign_handoff_secret_is_reported_and_not_taken_over(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    foreign = m.secret("outbound-handoff", {"token": "chosen-by-someone-else"})
    apply(kube, ns, foreign)
    _setup(kube, ns)
    wait_for(
        lambda: _condition_is(kube, ns, "SecretsResolved", "False", "HandoffSecretNotReady"),
        what="SecretsResolved=False HandoffSecretNotReady",
    )
    message = condition(get(kube, "mailrelay", "outbound", ns), "SecretsResolved")["message"]  # type: ignore[index]
    assert "outbound-handoff" in message and "not owned" in message
    assert "chosen-by-someone-else" not in message
    live = get(kube, "secret", "outbound-handoff", ns)
    assert live is not None
    assert not live["metadata"].get("ownerReferences")
    assert base64.b64decode(live["data"]["token"]) == b"chosen-by-someone-else"

    kube.kubectl("delete", "secret", "outbound-handoff", "-n", ns)
    wait_for(
        lambda: _condition_is(kube, ns, "SecretsResolved", "True", "ResolvedRefs"),
        what="SecretsResolved back to True",
    )
    owned = get(kube, "secret", "outbound-handoff", ns)
    assert owned is not None and owned["metadata"]["ownerReferences"]


def test_an_object_in_a_childs_place_is_refused_not_taken_over(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    """A ConfigMap named like the relay's config, made by someone else, stays theirs."""
    kube, ns = crds, op_namespace
    theirs = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "outbound-config"},
        "data": {"owner": "another team"},
    }
    apply(kube, ns, theirs)
    _setup(kube, ns)
    wait_for(
        lambda: _condition_is(kube, ns, "ChildrenApplied", "False", "ChildNotOwned"),
        what="ChildrenApplied=False ChildNotOwned",
    )
    message = condition(get(kube, "mailrelay", "outbound", ns), "ChildrenApplied")["message"]  # type: ignore[index]
    assert f"ConfigMap {ns}/outbound-config" in message and "not owned" in message
    wait_for(
        lambda: any(
            e["reason"] == "ChildNotOwned"
            and e["type"] == "Warning"
            and f"ConfigMap {ns}/outbound-config" in e["message"]
            for e in _events(kube, ns, "outbound")
        ),
        what="a ChildNotOwned Event naming the ConfigMap",
    )
    time.sleep(3)  # a few more passes (resync 2 s): still theirs
    live = get(kube, "configmap", "outbound-config", ns)
    assert live is not None
    assert live["data"] == {"owner": "another team"}
    assert not live["metadata"].get("ownerReferences")

    kube.kubectl("delete", "configmap", "outbound-config", "-n", ns)
    wait_for(
        lambda: _condition_is(kube, ns, "ChildrenApplied", "True", "Applied"),
        what="ChildrenApplied=True once the object is gone",
    )
    ours = get(kube, "configmap", "outbound-config", ns)
    assert ours is not None and "relay.yaml" in ours["data"]
