"""The Helm chart against the real helm and a real API server of its own.

The chart gets a dedicated local control plane (module scope) so that installing and
uninstalling its cluster-scoped objects (CRDs, ClusterRoles) never touches what other
tests installed in the session cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailrelay.operator import rbac
from mailrelay.support.localkube import REPO_ROOT, LocalKube, running_cluster
from mailrelay.support.operator_harness import get, running_operator, wait_for

pytestmark = pytest.mark.kube

CHART = REPO_ROOT / "charts" / "mailrelay"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
HERE = Path(__file__).parent
RELEASE_NAMESPACE = "mailrelay-system"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKube]:
    with running_cluster(tmp_path_factory.mktemp("chart-kube")) as chart_cluster:
        # kopf's peering CRDs ship in the chart's crds/ folder (installed before templates).
        chart_cluster.install_crds(sorted((CHART / "crds").glob("*.yaml")))
        chart_cluster.install_crds([HERE / "monitoring-crds.yaml"])
        for namespace in (RELEASE_NAMESPACE, "team-a", "team-b"):
            chart_cluster.create_namespace(namespace)
        yield chart_cluster


def render(
    cluster: LocalKube, *args: str, values: Path | None = None, check: bool = True
) -> list[dict[str, Any]]:
    """`helm template` for the cluster's real Kubernetes version, parsed into objects."""
    command = ["template", "r1", str(CHART), "-n", RELEASE_NAMESPACE]
    command += ["--kube-version", cluster.k8s_version.lstrip("v")]
    if values is not None:
        command += ["-f", str(values)]
    result = cluster.helm(*command, *args, check=check)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def test_helm_lint_passes_for_every_scenario(cluster: LocalKube) -> None:
    cluster.helm("lint", "--strict", str(CHART))
    for values in SCENARIOS:
        cluster.helm("lint", "--strict", str(CHART), "-f", str(values))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.watchNamspaces={a}", "additional properties 'watchNamspaces' not allowed"),
        ("operator.logFormat=xml", "/operator/logFormat"),
        ("image.digest=latest", "/image/digest"),
        ("operator.metricsPort=0", "/operator/metricsPort"),
        ("crds.enabeld=false", "additional properties 'enabeld' not allowed"),
    ],
)
def test_values_schema_refuses_typos_and_bad_values(
    cluster: LocalKube, setting: str, message: str
) -> None:
    result = cluster.helm(
        "template", "r1", str(CHART), "--kube-version", "1.36.0", "--set", setting, check=False
    )
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("values", [None, *SCENARIOS], ids=lambda v: v.stem if v else "default")
def test_rendered_chart_passes_server_side_dry_run(cluster: LocalKube, values: Path | None) -> None:
    objects = render(cluster, values=values)
    assert objects
    result = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "--server-side",
        "-f",
        "-",
        input=yaml.safe_dump_all(objects),
    )
    assert result.returncode == 0


def test_defaults_follow_the_operator_conventions(cluster: LocalKube) -> None:
    objects = render(cluster)
    (deployment,) = by_kind(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert "resources" not in container
    assert container["command"] == ["python", "-m", "mailrelay.operator"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["image"] == "ghcr.io/mailrelay/mailrelay:0.1.0"
    # kopf's peering identity is the pod's name: no passwd lookup for an arbitrary runAsUser.
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in (
        container["env"]
    )
    assert pod["securityContext"]["runAsGroup"] == 65532
    # Off by default: monitoring objects, dashboards, NetworkPolicy.
    kinds = {obj["kind"] for obj in objects}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy"}
    assert not by_kind(objects, "ConfigMap")
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "mailrelay", obj["metadata"]["name"]


def test_no_chart_version_in_any_selector(cluster: LocalKube) -> None:
    for values in [None, *SCENARIOS]:
        for obj in render(cluster, values=values):
            spec = obj.get("spec") or {}
            selector = spec.get("selector") or {}
            selector = selector.get("matchLabels", selector)
            pod_selector = (spec.get("podSelector") or {}).get("matchLabels", {})
            for labels in (selector, pod_selector):
                assert "helm.sh/chart" not in labels, obj["metadata"]["name"]
                assert "app.kubernetes.io/version" not in labels, obj["metadata"]["name"]


def test_image_digest_wins_over_the_tag(cluster: LocalKube) -> None:
    objects = render(cluster, values=CHART / "ci" / "pinned-values.yaml")
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == (
        "registry.example.com/mail/mailrelay@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "256Mi"}


def test_crds_are_gated_and_kept(cluster: LocalKube) -> None:
    crds = by_kind(render(cluster), "CustomResourceDefinition")
    assert sorted(crd["metadata"]["name"] for crd in crds) == [
        "mailrelays.mailrelay.dev",
        "mailroutes.mailrelay.dev",
    ]
    for crd in crds:
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    unkept = by_kind(render(cluster, "--set", "crds.keep=false"), "CustomResourceDefinition")
    assert all(
        "helm.sh/resource-policy" not in (c["metadata"].get("annotations") or {}) for c in unkept
    )
    assert not by_kind(render(cluster, "--set", "crds.enabled=false"), "CustomResourceDefinition")


def _rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("values", [None, CHART / "ci" / "namespaced-values.yaml"])
def test_rbac_is_exactly_the_operators_rules(cluster: LocalKube, values: Path | None) -> None:
    objects = render(cluster, values=values)
    granted = set()
    for role in by_kind(objects, "ClusterRole"):
        granted |= _rule_set(role["rules"])
    assert granted == _rule_set([rule.as_dict() for rule in rbac.RULES])


def test_watched_namespaces_get_role_bindings_and_peerings(cluster: LocalKube) -> None:
    objects = render(cluster, values=CHART / "ci" / "namespaced-values.yaml")
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["roleRef"]["name"] == "r1-mailrelay-namespaced" for b in bindings)
    cluster_bindings = [
        binding
        for binding in by_kind(objects, "ClusterRoleBinding")
        if "helm.sh/hook" not in binding["metadata"].get("annotations", {})
    ]
    assert [b["roleRef"]["name"] for b in cluster_bindings] == ["r1-mailrelay-cluster"]
    peerings = by_kind(objects, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert not by_kind(objects, "ClusterKopfPeering")
    (deployment,) = by_kind(objects, "Deployment")
    env = {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }
    assert env["MAILRELAY_OPERATOR_NAMESPACES"] == "team-a,team-b"


def test_dashboards_become_one_labelled_configmap_each(cluster: LocalKube) -> None:
    objects = render(cluster, values=CHART / "ci" / "monitoring-values.yaml")
    dashboards = sorted((CHART / "dashboards").glob("*.json"))
    configmaps = by_kind(objects, "ConfigMap")
    assert len(configmaps) == len(dashboards) > 0
    for configmap, path in zip(
        sorted(configmaps, key=lambda c: c["metadata"]["name"]), dashboards, strict=True
    ):
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(configmap["data"][path.name]) == json.loads(path.read_text())
    relabelled = render(
        cluster,
        "--set",
        "dashboards.enabled=true",
        "--set",
        "dashboards.label=my_dashboards",
        "--set",
        "dashboards.labelValue=yes",
    )
    for configmap in by_kind(relabelled, "ConfigMap"):
        assert configmap["metadata"]["labels"]["my_dashboards"] == "yes"


def test_prometheus_rule_carries_the_rules_file(cluster: LocalKube) -> None:
    objects = render(cluster, values=CHART / "ci" / "monitoring-values.yaml")
    (rule,) = by_kind(objects, "PrometheusRule")
    expected = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"] == expected
    assert rule["spec"]["groups"]


def _operator_env(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {entry["name"]: entry["value"] for entry in container["env"] if "value" in entry}


def test_install_run_as_its_service_account_upgrade_and_uninstall(
    cluster: LocalKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.helm("install", "r1", str(CHART), "-n", RELEASE_NAMESPACE, "--no-hooks")
    deployment = get(cluster, "deployment", "r1-mailrelay", RELEASE_NAMESPACE)
    assert deployment is not None
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    cluster.kubectl("get", "clusterkopfpeering", "mailrelay")

    # No kubelet runs the pod: run the operator here, as the chart's ServiceAccount, with the
    # chart's settings (only the ports are moved to free ones), so the chart's RBAC is tested.
    token = cluster.kubectl(
        "create", "token", "r1-mailrelay", "-n", RELEASE_NAMESPACE, "--duration=1h"
    ).stdout.strip()
    as_service_account = cluster.kubeconfig_with_token("r1-mailrelay", token)
    for name, value in _operator_env(deployment).items():
        monkeypatch.setenv(name, value)
    apps = cluster.create_namespace("apps")
    for manifest in sorted((REPO_ROOT / "examples").glob("*.yaml")):
        cluster.kubectl("apply", "-n", apps, "-f", str(manifest))

    with running_operator(cluster, as_service_account, log_path=tmp_path / "operator.log") as op:
        wait_for(
            lambda: get(cluster, "statefulset", "outbound", apps),
            timeout=60,
            what="the example relay's StatefulSet",
        )

        def relay_with_status() -> dict[str, Any] | None:
            relay = get(cluster, "mailrelay", "outbound", apps)
            return relay if (relay or {}).get("status", {}).get("configHash") else None

        relay = wait_for(relay_with_status, timeout=60, what="the example relay's status")
        assert relay["status"]["observedGeneration"] == relay["metadata"]["generation"]
        assert "Forbidden" not in op.log_tail(400)
        assert " 403" not in op.log_tail(400)

    cluster.helm(
        "upgrade", "r1", str(CHART), "-n", RELEASE_NAMESPACE, "--no-hooks",
        "--set", "operator.logFormat=json",
    )  # fmt: skip
    upgraded = get(cluster, "deployment", "r1-mailrelay", RELEASE_NAMESPACE)
    assert _operator_env(upgraded or {})["MAILRELAY_OPERATOR_LOG_FORMAT"] == "json"

    cluster.helm("uninstall", "r1", "-n", RELEASE_NAMESPACE, "--no-hooks")
    assert get(cluster, "deployment", "r1-mailrelay", RELEASE_NAMESPACE) is None
    assert cluster.kubectl("get", "clusterrole", "r1-mailrelay-namespaced", check=False).returncode
    # crds.keep (the default): the CRDs and so every relay and route survive the uninstall.
    cluster.kubectl("get", "crd", "mailrelays.mailrelay.dev", "mailroutes.mailrelay.dev")
    assert get(cluster, "mailrelay", "outbound", apps) is not None
