"""Renderers as data: one parametrized class per renderer, comparing parsed objects."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from mailrelay.operator import models
from mailrelay.operator.relay_config import BoundRoute, SecretMount, secret_mounts, uses_ambient_aws
from mailrelay.operator.render import (
    RESTART_HASH_ANNOTATION,
    NetworkPeer,
    NetworkPolicyInputs,
    RelayInputs,
    render_configmap,
    render_headless_service,
    render_networkpolicy,
    render_pdb,
    render_service,
    render_serviceaccount,
    render_servicemonitor,
    render_statefulset,
)
from mailrelay.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(relay_image="registry.test/mailrelay:1", drain_seconds=30)
BASE_SPEC: dict[str, Any] = {
    "replicas": 2,
    "listener": {"port": 587, "tls": {"secretName": "relay-tls"}},
    "auth": {"required": True, "usersSecretRef": {"name": "relay-users", "key": "users.yaml"}},
}
LABELS = {
    "app.kubernetes.io/name": "mailrelay",
    "app.kubernetes.io/instance": "outbound",
    "app.kubernetes.io/component": "relay",
    "app.kubernetes.io/part-of": "mailrelay",
    "app.kubernetes.io/managed-by": "mailrelay-operator",
}
SELECTOR = {"app.kubernetes.io/name": "mailrelay", "app.kubernetes.io/instance": "outbound"}
OWNER = {
    "apiVersion": "mailrelay.dev/v1alpha1",
    "kind": "MailRelay",
    "name": "outbound",
    "uid": "uid-1",
    "controller": True,
    "blockOwnerDeletion": True,
}
META = {"namespace": "mail", "labels": LABELS, "ownerReferences": [OWNER]}


def relay(**overrides: Any) -> RelayInputs:
    spec = copy.deepcopy(BASE_SPEC)
    for key, value in overrides.items():
        spec[key] = value
    return RelayInputs("outbound", "mail", "uid-1", models.MailRelaySpec.model_validate(spec))


def route(name: str, upstream: dict[str, Any], **spec: Any) -> BoundRoute:
    body = {"relayRef": {"name": "outbound"}, "upstream": upstream, **spec}
    return BoundRoute(name, models.MailRouteSpec.model_validate(body))


SMTP_PORTS = [
    {"name": "submission", "port": 587, "targetPort": "submission", "protocol": "TCP"},
    {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"},
]
SMTPS = {"name": "submissions", "port": 465, "targetPort": "submissions", "protocol": "TCP"}


class TestRenderService:
    @pytest.mark.parametrize(
        ("overrides", "expected_spec", "annotations"),
        [
            (
                {},
                {
                    "type": "ClusterIP",
                    "ipFamilyPolicy": "PreferDualStack",
                    "selector": SELECTOR,
                    "ports": SMTP_PORTS,
                },
                None,
            ),
            (
                {
                    "listener": {**BASE_SPEC["listener"], "implicitTlsPort": 465},
                    "service": {"type": "LoadBalancer", "annotations": {"lb": "internal"}},
                },
                {
                    "type": "LoadBalancer",
                    "ipFamilyPolicy": "PreferDualStack",
                    "selector": SELECTOR,
                    "ports": [SMTP_PORTS[0], SMTPS, SMTP_PORTS[1]],
                },
                {"lb": "internal"},
            ),
            (
                {
                    "allowedNetworks": ["10.0.0.0/8"],
                    "service": {
                        "type": "LoadBalancer",
                        "externalTrafficPolicy": "Local",
                        "loadBalancerSourceRanges": ["198.51.100.0/24", "10.0.0.0/8"],
                    },
                },
                {
                    "type": "LoadBalancer",
                    "ipFamilyPolicy": "PreferDualStack",
                    "selector": SELECTOR,
                    "ports": SMTP_PORTS,
                    "externalTrafficPolicy": "Local",
                    "loadBalancerSourceRanges": ["198.51.100.0/24", "10.0.0.0/8"],
                },
                None,
            ),
            (
                {
                    "allowedNetworks": ["10.0.0.0/8"],
                    "service": {"type": "NodePort", "externalTrafficPolicy": "Local"},
                },
                {
                    "type": "NodePort",
                    "ipFamilyPolicy": "PreferDualStack",
                    "selector": SELECTOR,
                    "ports": SMTP_PORTS,
                    "externalTrafficPolicy": "Local",
                },
                None,
            ),
        ],
        ids=[
            "defaults",
            "implicit-tls-and-load-balancer",
            "load-balancer-keeps-client-addresses",
            "node-port-keeps-client-addresses",
        ],
    )
    def test_service(
        self, overrides: dict[str, Any], expected_spec: dict[str, Any], annotations: Any
    ) -> None:
        expected_meta: dict[str, Any] = {"name": "outbound", **META}
        if annotations:
            expected_meta["annotations"] = annotations
        assert render_service(relay(**overrides), SETTINGS) == {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": expected_meta,
            "spec": expected_spec,
        }


class TestRenderHeadlessService:
    @pytest.mark.parametrize(
        "overrides", [{}, {"metrics": {"port": 9100}}], ids=["default", "metrics-port"]
    )
    def test_headless(self, overrides: dict[str, Any]) -> None:
        rendered = render_headless_service(relay(**overrides), SETTINGS)
        headless_labels = {**LABELS, "app.kubernetes.io/component": "relay-peers"}
        assert rendered["metadata"] == {
            "name": "outbound-headless",
            **META,
            "labels": headless_labels,
        }
        assert rendered["spec"]["clusterIP"] == "None"
        # The hand-off peers: only ready pods resolve (a leaving pod is never handed mail).
        assert rendered["spec"]["publishNotReadyAddresses"] is False
        assert rendered["spec"]["selector"] == SELECTOR
        metrics_port = overrides.get("metrics", {}).get("port", 9090)
        assert rendered["spec"]["ports"][-2]["port"] == metrics_port
        assert rendered["spec"]["ports"][-1] == {
            "name": "handoff",
            "port": 2526,
            "targetPort": "handoff",
            "protocol": "TCP",
        }

    def test_the_client_service_has_no_handoff_port(self) -> None:
        ports = render_service(relay(), SETTINGS)["spec"]["ports"]
        assert 2526 not in [port["port"] for port in ports]
        assert "handoff" not in [port["name"] for port in ports]


class TestRenderPdb:
    @pytest.mark.parametrize(
        ("overrides", "expected"),
        [
            ({}, {"maxUnavailable": 1}),
            ({"podDisruptionBudget": {"minAvailable": "50%"}}, {"minAvailable": "50%"}),
            ({"podDisruptionBudget": {"maxUnavailable": 2}}, {"maxUnavailable": 2}),
            ({"podDisruptionBudget": {"enabled": False}}, None),
            ({"replicas": 1}, None),
        ],
        ids=["default", "min-available", "max-unavailable", "disabled", "single-replica"],
    )
    def test_pdb(self, overrides: dict[str, Any], expected: dict[str, Any] | None) -> None:
        rendered = render_pdb(relay(**overrides), SETTINGS)
        if expected is None:
            assert rendered is None
            return
        assert rendered == {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "outbound", **META},
            "spec": {
                "selector": {"matchLabels": SELECTOR},
                # A not-ready relay keeps its mail on its volume: never block a node drain.
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
                **expected,
            },
        }


class TestRenderNetworkPolicy:
    @pytest.mark.parametrize(
        ("policy", "expected_ingress"),
        [
            (None, None),
            (
                NetworkPolicyInputs(
                    peers=(
                        NetworkPeer(namespace_selector={"matchLabels": {"team": "billing"}}),
                        NetworkPeer(pod_selector={"matchLabels": {"app": "web"}}),
                    )
                ),
                [
                    {
                        "from": [
                            {"namespaceSelector": {"matchLabels": {"team": "billing"}}},
                            {"podSelector": {"matchLabels": {"app": "web"}}},
                        ],
                        "ports": [{"protocol": "TCP", "port": 587}],
                    },
                    {
                        "from": [
                            {"podSelector": {"matchLabels": SELECTOR}},
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
                ],
            ),
            (
                NetworkPolicyInputs(peers=()),
                [
                    {
                        "from": [
                            {"podSelector": {"matchLabels": SELECTOR}},
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
                ],
            ),
        ],
        ids=["not-asked", "two-peers", "nobody-may-send"],
    )
    def test_networkpolicy(
        self, policy: NetworkPolicyInputs | None, expected_ingress: list[Any] | None
    ) -> None:
        rendered = render_networkpolicy(relay(), policy, SETTINGS)
        if expected_ingress is None:
            assert rendered is None
            return
        assert rendered is not None
        assert rendered["spec"] == {
            "podSelector": {"matchLabels": SELECTOR},
            "policyTypes": ["Ingress"],
            "ingress": expected_ingress,
        }


class TestRenderServiceMonitor:
    @pytest.mark.parametrize(
        ("metrics", "expected_labels"),
        [
            ({"port": 9090}, None),
            ({"enabled": False, "serviceMonitor": {"enabled": True}}, None),
            (
                {
                    "serviceMonitor": {
                        "enabled": True,
                        "interval": "15s",
                        "labels": {"release": "prom"},
                    }
                },
                {"release": "prom", **LABELS},
            ),
        ],
        ids=["off-by-default", "metrics-off", "on"],
    )
    def test_servicemonitor(self, metrics: dict[str, Any], expected_labels: Any) -> None:
        rendered = render_servicemonitor(relay(metrics=metrics), SETTINGS)
        if expected_labels is None:
            assert rendered is None
            return
        assert rendered is not None
        assert rendered["metadata"]["labels"] == expected_labels
        assert rendered["spec"]["endpoints"] == [
            {"port": "metrics", "path": "/metrics", "interval": "15s"}
        ]
        assert rendered["spec"]["selector"] == {"matchLabels": LABELS}

    def test_selects_the_client_service_only(self) -> None:
        """Each pod is scraped once: the headless Service exposes the same metrics port."""
        spec = relay(metrics={"serviceMonitor": {"enabled": True}})
        monitor = render_servicemonitor(spec, SETTINGS)
        assert monitor is not None
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        services = [render_service(spec, SETTINGS), render_headless_service(spec, SETTINGS)]
        selected = [
            s["metadata"]["name"] for s in services if wanted <= s["metadata"]["labels"].items()
        ]
        assert selected == ["outbound"]


class TestRenderConfigMap:
    @pytest.mark.parametrize("text", ["hostname: a\n", "routes: []\n"])
    def test_configmap_holds_the_text_verbatim(self, text: str) -> None:
        assert render_configmap(relay(), text, SETTINGS) == {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "outbound-config", **META},
            "data": {"relay.yaml": text},
        }


def _container(rendered: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = rendered["spec"]["template"]["spec"]["containers"][0]
    return container


class TestRenderStatefulSet:
    ROUTES = (
        route(
            "billing",
            {"smtp": {"host": "smtp.example.net", "credentialsSecretRef": {"name": "smarthost"}}},
        ),
    )

    def render(self, **overrides: Any) -> dict[str, Any]:
        inputs = relay(**overrides)
        mounts = secret_mounts(inputs.spec, self.ROUTES)
        return render_statefulset(inputs, restart_hash="abc123", mounts=mounts, settings=SETTINGS)

    @pytest.mark.parametrize(
        ("overrides", "claim_size", "storage_class"),
        [
            ({}, "1Gi", None),
            ({"queue": {"size": "5Gi", "storageClassName": "fast"}}, "5Gi", "fast"),
            ({"queue": {"size": "0"}}, None, None),
        ],
        ids=["default-spool-claim", "sized-claim", "empty-dir"],
    )
    def test_spool_volume(
        self, overrides: dict[str, Any], claim_size: Any, storage_class: Any
    ) -> None:
        rendered = self.render(**overrides)
        volumes = {v["name"]: v for v in rendered["spec"]["template"]["spec"]["volumes"]}
        if claim_size is None:
            assert "volumeClaimTemplates" not in rendered["spec"]
            assert volumes["spool"] == {"name": "spool", "emptyDir": {}}
            return
        assert "spool" not in volumes
        (claim,) = rendered["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "spool"
        assert claim["spec"]["resources"] == {"requests": {"storage": claim_size}}
        assert claim["spec"].get("storageClassName") == storage_class

    def test_hardened_container_with_probes_and_drain(self) -> None:
        rendered = self.render()
        pod = rendered["spec"]["template"]["spec"]
        container = _container(rendered)
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert "preStop" in container["lifecycle"]
        # preStop sleep + sessions and deliveries in flight + the hand-off deadline + margin.
        assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 60 + 10
        assert {"name": "handoff", "containerPort": 2526, "protocol": "TCP"} in container["ports"]
        assert container["image"] == "registry.test/mailrelay:1"
        assert container["args"] == ["--config", "/etc/mailrelay/config/relay.yaml"]
        assert rendered["spec"]["template"]["metadata"]["annotations"] == {
            RESTART_HASH_ANNOTATION: "abc123"
        }

    @pytest.mark.parametrize(
        ("listener", "metrics_port", "sysctls"),
        [
            (
                {"port": 587, "implicitTlsPort": 465, "tls": {"secretName": "relay-tls"}},
                9090,
                [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "465"}],
            ),
            (
                {"port": 2525, "tls": {"secretName": "relay-tls"}},
                80,
                [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"}],
            ),
            ({"port": 2525, "tls": {"secretName": "relay-tls"}}, 9090, None),
        ],
        ids=["submission-ports", "low-metrics-port", "all-unprivileged"],
    )
    def test_unprivileged_user_may_bind_the_ports_below_1024(
        self, listener: dict[str, Any], metrics_port: int, sysctls: Any
    ) -> None:
        """uid 65532 with every capability dropped binds 587/465 through the pod's own
        (namespaced, safe) sysctl, lowered only as far as the lowest port; no runtime default."""
        pod = self.render(listener=listener, metrics={"port": metrics_port})["spec"]["template"]
        context = pod["spec"]["securityContext"]
        assert context.get("sysctls") == sysctls
        assert (context["runAsUser"], context["runAsGroup"]) == (65532, 65532)

    def test_secrets_are_mounted_never_copied(self) -> None:
        rendered = self.render()
        pod = rendered["spec"]["template"]["spec"]
        secret_volumes = {v["secret"]["secretName"]: v for v in pod["volumes"] if "secret" in v}
        assert set(secret_volumes) == {"relay-tls", "relay-users", "smarthost"}
        assert secret_volumes["smarthost"]["secret"]["items"] == [
            {"key": "password", "path": "password"},
            {"key": "username", "path": "username"},
        ]
        mounts = {vm["name"]: vm for vm in _container(rendered)["volumeMounts"]}
        for volume in secret_volumes.values():
            assert mounts[volume["name"]]["readOnly"] is True
        assert mounts[secret_volumes["smarthost"]["name"]]["mountPath"] == (
            f"/etc/mailrelay/upstreams/{secret_volumes['smarthost']['name'][3:]}"
        )
        assert "env" not in _container(rendered)

    @pytest.mark.parametrize(
        ("overrides", "expected"),
        [
            ({}, {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}),
            (
                {"resources": {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}},
                {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}},
            ),
        ],
        ids=["settings-default", "from-spec"],
    )
    def test_resources(self, overrides: dict[str, Any], expected: dict[str, Any]) -> None:
        assert _container(self.render(**overrides))["resources"] == expected


def test_secret_mounts_keep_ca_from_another_secret_beside_the_credentials() -> None:
    spec = relay().spec
    routes = [
        route(
            "r",
            {
                "smtp": {
                    "host": "h.example",
                    "credentialsSecretRef": {"name": "creds"},
                    "caSecretRef": {"name": "ca"},
                }
            },
        )
    ]
    mounts = {m.secret_name: m for m in secret_mounts(spec, routes)}
    assert mounts["creds"].items == (("password", "password"), ("username", "username"))
    assert mounts["ca"] == SecretMount(
        mounts["ca"].volume,
        "ca",
        f"/etc/mailrelay/upstreams/{mounts['ca'].volume[3:]}",
        (("ca.crt", "ca.crt"),),
    )
    assert mounts["creds"].mount_path != mounts["ca"].mount_path


def test_routes_reading_the_same_secret_files_share_one_volume() -> None:
    """A new route reusing mounted credentials must not change the pod template (no roll)."""
    spec = relay().spec

    def smtp(secret: str, username_key: str = "username") -> dict[str, Any]:
        ref = {"name": secret, "usernameKey": username_key}
        return {"smtp": {"host": "h.example", "credentialsSecretRef": ref}}

    one = secret_mounts(spec, [route("a", smtp("creds"))])
    two = secret_mounts(spec, [route("a", smtp("creds")), route("b", smtp("creds"))])
    assert two == one
    other_key = secret_mounts(spec, [route("a", smtp("creds")), route("b", smtp("creds", "u2"))])
    assert len(other_key) == len(one) + 1
    assert len({m.volume for m in other_key}) == len(other_key)
    assert len({m.mount_path for m in other_key}) == len(other_key)


def _statefulset(inputs: RelayInputs) -> dict[str, Any]:
    return render_statefulset(inputs, restart_hash="h", mounts=[], settings=SETTINGS)


HOST_SPREAD = {
    "maxSkew": 1,
    "topologyKey": "kubernetes.io/hostname",
    "whenUnsatisfiable": "ScheduleAnyway",
    "labelSelector": {"matchLabels": SELECTOR},
}
ZONE = {
    "maxSkew": 2,
    "topologyKey": "topology.kubernetes.io/zone",
    "whenUnsatisfiable": "DoNotSchedule",
}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"replicas": 2}, [HOST_SPREAD]),
        ({"replicas": 5}, [HOST_SPREAD]),
        ({"replicas": 1}, [HOST_SPREAD]),  # the same template at any scale
        ({"replicas": 0}, [HOST_SPREAD]),
        ({"replicas": 3, "topologySpreadConstraints": []}, None),  # the default turned off
        (  # the spec's own replace the default; a constraint without a selector counts our pods
            {"replicas": 3, "topologySpreadConstraints": [ZONE]},
            [{**ZONE, "labelSelector": {"matchLabels": SELECTOR}}],
        ),
        (  # applies with one replica too, and keeps the user's selector
            {
                "replicas": 1,
                "topologySpreadConstraints": [
                    {**ZONE, "labelSelector": {"matchLabels": {"tier": "mail"}}, "minDomains": 2}
                ],
            },
            [
                {
                    **ZONE,
                    "labelSelector": {"matchLabels": {"tier": "mail"}, "matchExpressions": []},
                    "minDomains": 2,
                }
            ],
        ),
    ],
)
def test_pods_spread_over_nodes_by_default(
    overrides: dict[str, Any], expected: list[dict[str, Any]] | None
) -> None:
    pod = _statefulset(relay(**overrides))["spec"]["template"]["spec"]
    assert pod.get("topologySpreadConstraints") == expected


def test_pod_level_fields_reach_the_pod_and_ours_are_kept() -> None:
    rendered = _statefulset(
        relay(
            podLabels={"team": "mail", "app.kubernetes.io/version": "1"},
            podAnnotations={"example.com/note": "x"},
            serviceAccountName="relay-identity",
            imagePullSecrets=[{"name": "registry"}],
            priorityClassName="mail-critical",
            podSecurityContext={
                "runAsUser": 2000,
                "fsGroup": 3000,
                "supplementalGroups": [4000],
                "seccompProfile": {"type": "Localhost", "localhostProfile": "relay.json"},
            },
        )
    )
    template = rendered["spec"]["template"]
    pod = template["spec"]
    assert template["metadata"]["labels"] == {
        **LABELS,
        "team": "mail",
        "app.kubernetes.io/version": "1",
    }
    assert template["metadata"]["annotations"] == {
        "example.com/note": "x",
        RESTART_HASH_ANNOTATION: "h",
    }
    assert pod["serviceAccountName"] == "relay-identity"
    assert pod["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["priorityClassName"] == "mail-critical"
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 2000,
        "runAsGroup": 65532,
        "fsGroup": 3000,
        "supplementalGroups": [4000],
        "seccompProfile": {"type": "Localhost", "localhostProfile": "relay.json"},
        "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "587"}],
    }
    assert _container(rendered)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_the_refused_pod_labels_are_every_label_the_operator_sets() -> None:
    """One list: podLabels may not set any label the operator puts on its pods."""
    pod = _statefulset(relay())["spec"]["template"]["metadata"]
    assert set(pod["labels"]) == set(models.OPERATOR_POD_LABELS)
    assert set(pod["annotations"]) == {models.RESTART_HASH_ANNOTATION}


def test_pods_run_as_their_own_service_account_unless_one_is_named() -> None:
    own = relay()
    assert render_serviceaccount(own) == {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "outbound-relay", **META},
        "automountServiceAccountToken": False,
    }
    pod = _statefulset(own)["spec"]["template"]["spec"]
    assert (pod["serviceAccountName"], pod["automountServiceAccountToken"]) == (
        "outbound-relay",
        False,
    )
    # Never the relay's bare name: a relay called "default" must leave that account alone.
    base = relay()
    account = render_serviceaccount(RelayInputs("default", base.namespace, base.uid, base.spec))
    assert account is not None and account["metadata"]["name"] == "default-relay"
    named = relay(serviceAccountName="relay-identity")
    assert render_serviceaccount(named) is None
    assert _statefulset(named)["spec"]["template"]["spec"]["serviceAccountName"] == (
        "relay-identity"
    )


ROLE = "arn:aws:iam::123456789012:role/mailrelay-ses"
SES_NO_KEYS = {"api": {"provider": "ses", "region": "eu-west-1"}}
SES_KEYS = {**SES_NO_KEYS, "api": {**SES_NO_KEYS["api"], "credentialsSecretRef": {"name": "aws"}}}


@pytest.mark.parametrize(
    ("identity", "upstreams", "projected"),
    [
        (True, [SES_NO_KEYS], True),
        (True, [SES_KEYS, SES_NO_KEYS], True),  # a fallback without keys counts
        (True, [SES_KEYS], False),  # static keys: no token needed
        (False, [SES_NO_KEYS], False),  # not opted in (e.g. the EKS webhook injects it)
    ],
)
def test_aws_web_identity_is_projected_only_when_opted_in_and_used(
    identity: bool, upstreams: list[dict[str, Any]], projected: bool
) -> None:
    overrides: dict[str, Any] = (
        {"awsWebIdentity": {"roleArn": ROLE, "stsEndpoint": "https://sts.eu-west-1.amazonaws.com"}}
        if identity
        else {}
    )
    inputs = relay(**overrides)
    spec = {"relayRef": {"name": "outbound"}, "upstream": upstreams[0], "fallbacks": upstreams[1:]}
    routes = [BoundRoute("ses", models.MailRouteSpec.model_validate(spec))]
    pod = render_statefulset(
        inputs,
        restart_hash="h",
        mounts=[],
        settings=SETTINGS,
        ambient_aws=uses_ambient_aws(routes),
    )["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    container = pod["containers"][0]
    if not projected:
        assert "aws-web-identity" not in volumes and "env" not in container
        return
    assert volumes["aws-web-identity"]["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "sts.amazonaws.com",
                "expirationSeconds": 86400,
                "path": "token",
            }
        }
    ]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "aws-web-identity")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AWS_ROLE_ARN"] == ROLE
    assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == f"{mount['mountPath']}/token"
    assert env["AWS_ENDPOINT_URL_STS"] == "https://sts.eu-west-1.amazonaws.com"
    assert mount["readOnly"] is True
    # The Kubernetes API token stays unmounted: only the STS audience's token is projected.
    assert pod["automountServiceAccountToken"] is False


def test_service_account_annotations_reach_the_relays_own_account() -> None:
    annotations = {"eks.amazonaws.com/role-arn": ROLE}
    account = render_serviceaccount(relay(serviceAccountAnnotations=annotations))
    assert account is not None and account["metadata"]["annotations"] == annotations


@pytest.mark.parametrize(
    "arn",
    [
        "arn:aws:iam::12345:role/x",
        "arn:aws:s3:::bucket",
        "role/x",
        "arn:aws:iam::123456789012:user/x",
    ],
)
def test_aws_role_arn_must_be_a_role(arn: str) -> None:
    with pytest.raises(ValidationError, match="roleArn must be an IAM role ARN"):
        relay(awsWebIdentity={"roleArn": arn})
