"""The operator against the real API server, as its least-privilege user.

Each test works in its own ``op-*`` namespace, which the shared operator watches.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from mailrelay.relay.config import parse_config
from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, apply, condition, get, wait_for
from tests.operator import manifests as m

pytestmark = pytest.mark.kube


def _config(kube: LocalKube, ns: str, relay: str = "outbound") -> dict[str, Any] | None:
    cm = get(kube, "configmap", f"{relay}-config", ns)
    if cm is None:
        return None
    data: dict[str, Any] = yaml.safe_load(cm["data"]["relay.yaml"])
    return data


def _route_names(kube: LocalKube, ns: str) -> list[str]:
    config = _config(kube, ns)
    return [r["name"] for r in (config or {}).get("routes", [])]


def _setup(kube: LocalKube, ns: str, *routes: dict[str, Any]) -> None:
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(kube, ns, m.relay(), *routes)


def test_creates_every_child_with_expected_content(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns, m.smtp_route("billing", senders=["billing.example.com"]))
    wait_for(lambda: "billing" in _route_names(kube, ns), what="the route in the ConfigMap")
    relay = get(kube, "mailrelay", "outbound", ns)
    assert relay is not None
    config = parse_config(get(kube, "configmap", "outbound-config", ns)["data"]["relay.yaml"])  # type: ignore[index]
    assert config.routes[0].upstream.name == "billing"
    assert config.listener.tls is not None
    sts = wait_for(lambda: get(kube, "statefulset", "outbound", ns), what="the StatefulSet")
    owner = sts["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "MailRelay",
        "outbound",
        relay["metadata"]["uid"],
        True,
    )
    assert get(kube, "service", "outbound", ns) is not None
    assert get(kube, "service", "outbound-headless", ns) is not None
    assert get(kube, "poddisruptionbudget", "outbound", ns) is not None


def _status(kube: LocalKube, kind: str, name: str, ns: str) -> dict[str, Any]:
    obj = get(kube, kind, name, ns) or {}
    status: dict[str, Any] = obj.get("status") or {}
    return status


def _events(kube: LocalKube, ns: str, name: str) -> list[dict[str, Any]]:
    result = kube.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
    return items


def _has_condition(kube: LocalKube, kind: str, name: str, ns: str, want: tuple[str, ...]) -> bool:
    """Whether the condition ``want[0]`` has status ``want[1]`` (and reason ``want[2]``)."""
    found = condition(get(kube, kind, name, ns), want[0])
    return bool(found and (found["status"], found["reason"])[: len(want) - 1] == want[1:])


def _pod(name: str, instance: str) -> dict[str, Any]:
    """A pod object made by hand (the bare API server runs no StatefulSet controller)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "mailrelay",
                "app.kubernetes.io/instance": instance,
            },
        },
        "spec": {"containers": [{"name": "relay", "image": "registry.test/mailrelay:1"}]},
    }


def _pods_hashed(kube: LocalKube, ns: str, names: tuple[str, ...], digest: str) -> bool:
    return all(_pod_hash(kube, name, ns) == digest for name in names)


def _pod_hash(kube: LocalKube, name: str, ns: str) -> str | None:
    pod = get(kube, "pod", name, ns) or {}
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get("mailrelay.dev/config-hash")
    return str(value) if value is not None else None


def _pod_secrets_hash(kube: LocalKube, name: str, ns: str) -> str | None:
    pod = get(kube, "pod", name, ns) or {}
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    value = annotations.get("mailrelay.dev/secrets-hash")
    return str(value) if value is not None else None


def test_route_update_changes_config_reloads_pods_without_roll_and_delete_removes_it(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    """A route change: a new ConfigMap, each running pod annotated with its hash, no roll."""
    kube, ns = crds, op_namespace
    apply(kube, ns, _pod("outbound-0", "outbound"), _pod("outbound-1", "outbound"))
    apply(kube, ns, _pod("other-0", "other"))
    _setup(
        kube,
        ns,
        m.smtp_route("billing", senders=["billing.example.com"]),
        m.smtp_route("news", senders=["news.example.com"], priority=50),
    )
    wait_for(lambda: _route_names(kube, ns) == ["billing", "news"], what="both routes")
    first_hash = wait_for(lambda: _status(kube, "mailrelay", "outbound", ns).get("configHash"))

    def template() -> tuple[str, int]:
        sts = get(kube, "statefulset", "outbound", ns) or {}
        annotations = sts["spec"]["template"]["metadata"]["annotations"]
        assert "mailrelay.dev/config-hash" not in annotations
        return str(annotations["mailrelay.dev/restart-hash"]), int(sts["metadata"]["generation"])

    pods = ("outbound-0", "outbound-1")
    wait_for(lambda: _pods_hashed(kube, ns, pods, first_hash), what="the pods annotated")
    before = template()

    apply(kube, ns, m.smtp_route("billing", senders=["billing.example.com"], port=2525))
    wait_for(
        lambda: (_config(kube, ns) or {})["routes"][0]["upstream"]["port"] == 2525,
        what="the new port in the config",
    )
    second_hash = wait_for(
        lambda: (
            (h := _status(kube, "mailrelay", "outbound", ns).get("configHash")) != first_hash and h
        )
    )
    wait_for(lambda: _pods_hashed(kube, ns, pods, second_hash), what="the pods re-annotated")
    # Routes reload in the running pods: the pod template (and so the pods) stays as it was.
    assert template() == before
    assert _pod_hash(kube, "other-0", ns) is None

    # A mounted Secret's new content: the pods are touched at once (kubelet refreshes their
    # volumes), the config hash and the pod template stay as they are.
    secrets_marks = {name: _pod_secrets_hash(kube, name, ns) for name in pods}
    assert all(secrets_marks.values())
    apply(kube, ns, m.users_secret(password="rotated-pass"))
    wait_for(
        lambda: all(_pod_secrets_hash(kube, n, ns) not in (None, secrets_marks[n]) for n in pods),
        what="the pods touched for the changed users Secret",
    )
    assert _pods_hashed(kube, ns, pods, second_hash)
    assert template() == before

    # A setting the relay applies only at start (the metrics port) rolls the pods.
    apply(kube, ns, m.relay(metrics={"port": 9191}))
    wait_for(lambda: template()[0] != before[0], what="the pod template to roll")

    kube.kubectl("delete", "mailroute", "news", "-n", ns)
    wait_for(lambda: _route_names(kube, ns) == ["billing"], what="news to leave the config")
    wait_for(lambda: _status(kube, "mailrelay", "outbound", ns).get("routes") == 1)


def test_missing_secret_sets_condition_and_event_then_recovers(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    apply(kube, ns, m.tls_secret(), m.users_secret())
    apply(
        kube,
        ns,
        m.relay(),
        m.smtp_route("billing", senders=["billing.example.com"], credentials="later"),
        m.smtp_route("open", senders=["open.example.com"], credentials=None),
    )
    wait_for(
        lambda: _has_condition(
            kube, "mailroute", "billing", ns, ("ResolvedRefs", "False", "SecretNotFound")
        ),
        what="ResolvedRefs=False SecretNotFound",
    )
    # The relay keeps serving its other routes.
    assert _route_names(kube, ns) == ["open"]
    # Left out of the config is not "accepted": the reason says why.
    accepted = condition(get(kube, "mailroute", "billing", ns), "Accepted")
    assert accepted is not None
    assert (accepted["status"], accepted["reason"]) == ("False", "SecretNotFound")
    assert "'later'" in accepted["message"]
    assert _status(kube, "mailroute", "billing", ns).get("relay") is None
    assert _has_condition(
        kube, "mailrelay", "outbound", ns, ("RoutesResolved", "False", "SecretNotFound")
    )
    wait_for(
        lambda: any(
            e["reason"] == "SecretNotFound" and e["type"] == "Warning"
            for e in _events(kube, ns, "billing")
        ),
        what="a SecretNotFound Event",
    )
    message = condition(get(kube, "mailroute", "billing", ns), "ResolvedRefs")["message"]  # type: ignore[index]
    assert "'later'" in message and "create it" in message

    apply(kube, ns, m.secret("later", {"username": "u"}))
    wait_for(
        lambda: _has_condition(
            kube, "mailroute", "billing", ns, ("ResolvedRefs", "False", "SecretKeyMissing")
        ),
        what="SecretKeyMissing once the Secret exists without the password key",
    )
    apply(kube, ns, m.secret("later", {"username": "u", "password": "p"}))
    wait_for(lambda: _route_names(kube, ns) == ["billing", "open"], what="recovery")
    wait_for(lambda: _has_condition(kube, "mailrelay", "outbound", ns, ("RoutesResolved", "True")))
    assert _has_condition(kube, "mailroute", "billing", ns, ("Accepted", "True"))


def test_statefulset_ready_makes_relay_and_routes_ready(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns, m.smtp_route("billing"))
    # The route may arrive after the relay: wait for the config that carries it.
    wait_for(lambda: _status(kube, "mailrelay", "outbound", ns).get("routes") == 1)
    sts = wait_for(lambda: get(kube, "statefulset", "outbound", ns))
    assert _has_condition(kube, "mailrelay", "outbound", ns, ("Ready", "False"))
    status = {
        "observedGeneration": sts["metadata"]["generation"],
        "replicas": 2,
        "readyReplicas": 2,
        "updatedReplicas": 2,
        "availableReplicas": 2,
    }
    kube.kubectl(
        "patch",
        "statefulset",
        "outbound",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    wait_for(
        lambda: _has_condition(
            kube, "mailrelay", "outbound", ns, ("Ready", "True", "ReplicasReady")
        ),
        what="the relay to turn Ready",
    )
    relay_status = _status(kube, "mailrelay", "outbound", ns)
    assert (relay_status["replicas"], relay_status["readyReplicas"]) == (2, 2)
    assert relay_status["endpoint"] == f"outbound.{ns}.svc.cluster.local:587"
    wait_for(lambda: _has_condition(kube, "mailroute", "billing", ns, ("Ready", "True")))
    assert _status(kube, "mailroute", "billing", ns)["relay"] == "outbound"


def test_deleted_or_edited_children_come_back(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns, m.smtp_route("billing"))
    wait_for(lambda: _route_names(kube, ns) == ["billing"], what="the route in the config")
    original = _config(kube, ns)
    wait_for(lambda: get(kube, "service", "outbound-headless", ns))
    kube.kubectl("delete", "service", "outbound-headless", "-n", ns)
    kube.kubectl("delete", "statefulset", "outbound", "-n", ns)
    wait_for(lambda: get(kube, "service", "outbound-headless", ns), what="the Service back")
    wait_for(lambda: get(kube, "statefulset", "outbound", ns), what="the StatefulSet back")
    kube.kubectl(
        "patch",
        "configmap",
        "outbound-config",
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"data": {"relay.yaml": "hostname: hacked\n"}}),
    )
    wait_for(lambda: _config(kube, ns) == original, what="the ConfigMap put back")


@pytest.mark.slow
def test_steady_state_writes_nothing(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns, m.smtp_route("billing"), m.smtp_route("news", senders=["n.example.com"]))
    wait_for(lambda: _has_condition(kube, "mailroute", "news", ns, ("Accepted", "True")))
    wait_for(lambda: _status(kube, "mailrelay", "outbound", ns).get("configHash"))
    time.sleep(3)  # let the creation echoes settle

    def versions() -> dict[str, str]:
        out = {}
        for kind in (
            "mailrelays",
            "mailroutes",
            "configmaps",
            "services",
            "statefulsets",
            "poddisruptionbudgets",
        ):
            items = json.loads(kube.kubectl("get", kind, "-n", ns, "-o", "json").stdout)["items"]
            for item in items:
                out[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
        return out

    before = versions()
    writes_before = operator.total("mailrelay_operator_status_writes_total") + operator.total(
        "mailrelay_operator_children_total"
    )
    time.sleep(6)  # three resync periods
    assert versions() == before
    writes_after = operator.total("mailrelay_operator_status_writes_total") + operator.total(
        "mailrelay_operator_children_total"
    )
    assert writes_after == writes_before


def test_invalid_spec_is_a_condition_and_event_not_a_crash(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    # Valid for the CRD, refused by the relay: a users file without TLS to protect AUTH.
    spec = {
        "auth": {"required": False, "usersSecretRef": {"name": "relay-users", "key": "users.yaml"}},
        "allowedNetworks": ["10.0.0.0/8"],
        "listener": {"port": 2525},
    }
    apply(kube, ns, m.users_secret(), m.relay("plain", **spec))
    wait_for(
        lambda: _has_condition(
            kube, "mailrelay", "plain", ns, ("ConfigRendered", "False", "ConfigRejected")
        ),
        what="ConfigRendered=False ConfigRejected",
    )
    message = condition(get(kube, "mailrelay", "plain", ns), "ConfigRendered")["message"]  # type: ignore[index]
    assert "listener.tls" in message
    wait_for(lambda: any(e["reason"] == "ConfigRejected" for e in _events(kube, ns, "plain")))
    assert get(kube, "statefulset", "plain", ns) is None
    errors_before = operator.total("mailrelay_operator_errors_total")
    writes_before = operator.total("mailrelay_operator_status_writes_total")
    time.sleep(4)  # two resync periods: no retry storm, no crash, no rewrites
    assert operator.process.poll() is None
    assert operator.total("mailrelay_operator_errors_total") == errors_before
    assert operator.total("mailrelay_operator_status_writes_total") == writes_before


def test_a_conflicting_newcomer_never_evicts_the_established_route(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    """Gateway API's convention: the oldest route keeps serving, the newcomer is told why."""
    kube, ns = crds, op_namespace
    _setup(
        kube,
        ns,
        m.smtp_route("zz-team", senders=["same.example.com"]),
        m.smtp_route("c", senders=["other.example.com"]),
    )
    wait_for(lambda: _route_names(kube, ns) == ["c", "zz-team"], what="both routes serving")
    time.sleep(1.1)  # creationTimestamp has one-second resolution
    # Sorts first by name, so a name-based tie-break would wrongly prefer it.
    apply(kube, ns, m.smtp_route("aa-newcomer", senders=["same.example.com"], port=2525))
    wait_for(
        lambda: _has_condition(
            kube, "mailroute", "aa-newcomer", ns, ("Accepted", "False", "Conflicted")
        ),
        what="the newcomer Accepted=False Conflicted",
    )
    message = condition(get(kube, "mailroute", "aa-newcomer", ns), "Accepted")["message"]  # type: ignore[index]
    assert "'zz-team'" in message and "older" in message
    assert _has_condition(kube, "mailroute", "zz-team", ns, ("Accepted", "True"))
    assert _route_names(kube, ns) == ["c", "zz-team"]
    assert _has_condition(
        kube, "mailrelay", "outbound", ns, ("RoutesResolved", "False", "Conflicted")
    )

    # Once the established route goes, the newcomer takes over.
    kube.kubectl("delete", "mailroute", "zz-team", "-n", ns)
    wait_for(lambda: _route_names(kube, ns) == ["aa-newcomer", "c"], what="the newcomer serving")
    wait_for(lambda: _has_condition(kube, "mailroute", "aa-newcomer", ns, ("Accepted", "True")))


def test_route_selector_and_missing_relay(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(kube, ns, m.smtp_route("early", relay_name="later"))
    wait_for(
        lambda: _has_condition(
            kube, "mailroute", "early", ns, ("Accepted", "False", "RelayNotFound")
        )
    )
    apply(
        kube,
        ns,
        m.relay("later", routeSelector={"matchLabels": {"tier": "gold"}}),
        m.smtp_route(
            "gold", relay_name="later", senders=["g.example.com"], labels={"tier": "gold"}
        ),
    )
    wait_for(
        lambda: _has_condition(kube, "mailroute", "early", ns, ("Accepted", "False", "NotSelected"))
    )
    wait_for(lambda: _has_condition(kube, "mailroute", "gold", ns, ("Accepted", "True")))
    wait_for(
        lambda: (
            [r["name"] for r in (_config(kube, ns, "later") or {}).get("routes", [])] == ["gold"]
        )
    )


def test_network_policy_follows_the_spec(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    policy = {
        "enabled": True,
        "allowedFrom": [
            {"namespaceSelector": {"matchLabels": {"team": "shop"}}},
            {"podSelector": {"matchLabels": {"app": "api"}}},
        ],
    }
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(kube, ns, m.relay(networkPolicy=policy), m.smtp_route("billing"))
    created = wait_for(lambda: get(kube, "networkpolicy", "outbound", ns), what="the NetworkPolicy")
    assert created["metadata"]["ownerReferences"][0]["kind"] == "MailRelay"
    assert created["spec"]["policyTypes"] == ["Ingress"]
    assert created["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "outbound"
    assert created["spec"]["ingress"] == [
        {
            "from": [
                {"namespaceSelector": {"matchLabels": {"team": "shop"}}},
                {"podSelector": {"matchLabels": {"app": "api"}}},
            ],
            "ports": [{"protocol": "TCP", "port": 587}],
        },
        # The queue hand-off: only from the relay's own pods and its drain Jobs' pods.
        {
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "mailrelay",
                            "app.kubernetes.io/instance": "outbound",
                        }
                    }
                },
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "mailrelay-drain",
                            "app.kubernetes.io/instance": "outbound",
                        }
                    }
                },
            ],
            "ports": [{"protocol": "TCP", "port": 2526}],
        },
        {"ports": [{"protocol": "TCP", "port": 9090}]},
    ]

    apply(kube, ns, m.relay(networkPolicy={"enabled": False}))
    wait_for(
        lambda: get(kube, "networkpolicy", "outbound", ns) is None,
        what="the NetworkPolicy deleted once turned off",
    )


def test_a_child_the_api_server_refuses_is_a_condition(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    # Valid for the CRD (affinity is copied unchanged), refused in the StatefulSet's pod spec.
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(kube, ns, m.relay(affinity={"nodeAffinity": {"noSuchField": 1}}), m.smtp_route("billing"))
    wait_for(
        lambda: _has_condition(
            kube, "mailrelay", "outbound", ns, ("ChildrenApplied", "False", "ApplyFailed")
        ),
        what="ChildrenApplied=False ApplyFailed",
    )
    message = condition(get(kube, "mailrelay", "outbound", ns), "ChildrenApplied")["message"]  # type: ignore[index]
    assert "StatefulSet outbound" in message and "noSuchField" in message
    assert "fix spec.affinity in the MailRelay" in message
    assert "quota" not in message and "IP range" not in message
    # Ready says why, instead of waiting for a rollout that cannot happen.
    ready = condition(get(kube, "mailrelay", "outbound", ns), "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "StatefulSetInvalid")
    assert "noSuchField" in ready["message"] and "spec.affinity" in ready["message"]
    # The other children and the status are still written.
    assert get(kube, "configmap", "outbound-config", ns) is not None
    assert get(kube, "service", "outbound", ns) is not None
    assert get(kube, "statefulset", "outbound", ns) is None

    # A value the StatefulSet's own validation refuses (422 with causes), not only the schema.
    empty_terms: dict[str, Any] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
        }
    }
    apply(kube, ns, m.relay(affinity=empty_terms))
    wait_for(
        lambda: (
            "nodeSelectorTerms"
            in condition(get(kube, "mailrelay", "outbound", ns), "Ready")[  # type: ignore[index]
                "message"
            ]
        ),
        what="Ready naming the refused nodeSelectorTerms",
    )
    assert _has_condition(
        kube, "mailrelay", "outbound", ns, ("Ready", "False", "StatefulSetInvalid")
    )

    apply(kube, ns, m.relay())
    wait_for(
        lambda: _has_condition(kube, "mailrelay", "outbound", ns, ("ChildrenApplied", "True")),
        what="recovery once the spec is fixed",
    )
    assert get(kube, "statefulset", "outbound", ns) is not None
    wait_for(
        lambda: _has_condition(
            kube, "mailrelay", "outbound", ns, ("Ready", "False", "RolloutPending")
        ),
        what="Ready back to waiting for the rollout",
    )


def test_a_quota_that_refuses_the_statefulset_says_so(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "mail"},
        "spec": {"hard": {"count/statefulsets.apps": "0"}},
    }
    apply(kube, ns, quota)
    # No controller manager here: write the usage it would have computed.
    kube.kubectl(
        "patch", "resourcequota", "mail", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"hard": {"count/statefulsets.apps": "0"},
                                     "used": {"count/statefulsets.apps": "0"}}}),
    )  # fmt: skip
    _setup(kube, ns, m.smtp_route("billing"))
    wait_for(
        lambda: _has_condition(
            kube, "mailrelay", "outbound", ns, ("Ready", "False", "StatefulSetForbidden")
        ),
        what="Ready=False StatefulSetForbidden",
    )
    ready = condition(get(kube, "mailrelay", "outbound", ns), "Ready")
    assert ready is not None
    assert "exceeded quota" in ready["message"]
    assert "A ResourceQuota of the namespace is used up" in ready["message"]
    assert "spec.affinity" not in ready["message"]


def test_exposed_service_keeps_client_addresses(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    service = {
        "type": "LoadBalancer",
        "externalTrafficPolicy": "Local",
        "loadBalancerSourceRanges": ["10.0.0.0/8", "192.168.0.0/16"],
    }
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(kube, ns, m.relay(allowedNetworks=["10.0.0.0/8"], service=service), m.smtp_route("b"))
    created = wait_for(lambda: get(kube, "service", "outbound", ns), what="the Service")
    assert created["spec"]["type"] == "LoadBalancer"
    assert created["spec"]["externalTrafficPolicy"] == "Local"
    assert created["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8", "192.168.0.0/16"]


def test_kubectl_scale_reaches_the_statefulset_and_the_scale_shows_the_selector(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    """The scale subresource an HPA drives: spec.replicas, the StatefulSet, the selector."""
    kube, ns = crds, op_namespace
    _setup(kube, ns, m.smtp_route("billing"))
    wait_for(lambda: get(kube, "statefulset", "outbound", ns), what="the StatefulSet")
    kube.kubectl("scale", "mailrelay/outbound", "-n", ns, "--replicas=3")

    def replicas() -> int | None:
        sts = get(kube, "statefulset", "outbound", ns) or {}
        value: int | None = sts.get("spec", {}).get("replicas")
        return value

    wait_for(lambda: replicas() == 3, what="the StatefulSet scaled to 3")
    pod = (get(kube, "statefulset", "outbound", ns) or {})["spec"]["template"]["spec"]
    assert [c["topologyKey"] for c in pod["topologySpreadConstraints"]] == [
        "kubernetes.io/hostname"
    ]
    # No controller-manager here: play its part and report three pods on the StatefulSet.
    kube.kubectl(
        "patch", "statefulset", "outbound", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"replicas": 3, "readyReplicas": 3, "availableReplicas": 3}}),
    )  # fmt: skip
    wait_for(
        lambda: _status(kube, "mailrelay", "outbound", ns).get("replicas") == 3,
        what="status.replicas from the StatefulSet",
    )
    scale = json.loads(
        kube.kubectl(
            "get", "mailrelay", "outbound", "-n", ns, "--subresource=scale", "-o", "json"
        ).stdout
    )
    assert scale["kind"] == "Scale"
    assert (scale["spec"]["replicas"], scale["status"]["replicas"]) == (3, 3)
    assert set(scale["status"]["selector"].split(",")) == {
        "app.kubernetes.io/name=mailrelay",
        "app.kubernetes.io/instance=outbound",
    }
    template = (get(kube, "statefulset", "outbound", ns) or {})["spec"]["template"]
    kube.kubectl("scale", "mailrelay/outbound", "-n", ns, "--replicas=1")
    wait_for(lambda: replicas() == 1, what="the StatefulSet scaled to 1")
    # The pod that stays is not rolled by a change of scale alone.
    assert (get(kube, "statefulset", "outbound", ns) or {})["spec"]["template"] == template


def test_own_service_account_until_the_spec_names_one(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns)
    account = wait_for(
        lambda: get(kube, "serviceaccount", "outbound-relay", ns), what="the account"
    )
    assert account["automountServiceAccountToken"] is False
    assert account["metadata"]["ownerReferences"][0]["name"] == "outbound"
    sts = wait_for(lambda: get(kube, "statefulset", "outbound", ns), what="the StatefulSet")
    assert sts["spec"]["template"]["spec"]["serviceAccountName"] == "outbound-relay"
    kube.kubectl(
        "patch", "mailrelay", "outbound", "-n", ns, "--type=merge",
        "-p", json.dumps({"spec": {"serviceAccountName": "relay-identity"}}),
    )  # fmt: skip

    def account_name() -> str | None:
        sts = get(kube, "statefulset", "outbound", ns) or {}
        name: str | None = sts["spec"]["template"]["spec"].get("serviceAccountName")
        return name

    wait_for(lambda: account_name() == "relay-identity", what="the named account on the pods")
    wait_for(
        lambda: get(kube, "serviceaccount", "outbound-relay", ns) is None,
        what="the relay's own account deleted",
    )
