"""The local control plane is real: versions, RBAC, isolation, and the binary cache check."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mailrelay.support.localkube import BUILD_SCRIPT, LocalKube

pytestmark = pytest.mark.kube

K8S_VERSION = "v1.36.3"
HELM_VERSION = "v3.22.0"


def test_kubectl_reports_the_real_release(kube: LocalKube) -> None:
    versions = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == K8S_VERSION
    assert versions["clientVersion"]["gitVersion"] == K8S_VERSION
    assert kube.k8s_version == K8S_VERSION


def test_helm_reports_the_real_release_and_reaches_the_cluster(kube: LocalKube) -> None:
    assert kube.helm("version", "--short").stdout.startswith(HELM_VERSION)
    listing = kube.helm("list", "--all-namespaces", "-o", "json")
    assert json.loads(listing.stdout) == []


def test_apiserver_listens_on_loopback_only(kube: LocalKube) -> None:
    assert kube.server.startswith("https://127.0.0.1:")


def test_rbac_is_enforced_for_a_user_without_bindings(kube: LocalKube, namespace: str) -> None:
    nobody = kube.kubeconfig_for("nobody@example.test")
    refused = kube.kubectl("get", "configmaps", "-n", namespace, kubeconfig=nobody, check=False)
    assert refused.returncode != 0
    assert 'User "nobody@example.test" cannot list resource "configmaps"' in refused.stderr

    kube.kubectl(
        "create", "role", "reader", "-n", namespace, "--verb=list", "--resource=configmaps"
    )
    kube.kubectl(
        "create",
        "rolebinding",
        "reader",
        "-n",
        namespace,
        "--role=reader",
        "--user=nobody@example.test",
    )
    allowed = kube.kubectl("get", "configmaps", "-n", namespace, kubeconfig=nobody)
    assert allowed.returncode == 0


def test_each_test_gets_its_own_namespace(kube: LocalKube, namespace: str) -> None:
    assert namespace.startswith("t-test-each-test-gets")
    phase = kube.kubectl("get", "namespace", namespace, "-o", "jsonpath={.status.phase}").stdout
    assert phase == "Active"
    kube.kubectl("create", "configmap", "only-here", "-n", namespace)
    everywhere = kube.kubectl(
        "get", "configmaps", "-A", "--field-selector=metadata.name=only-here", "-o", "name"
    )
    assert everywhere.stdout.split() == ["configmap/only-here"]


def test_service_account_tokens_can_be_requested(kube: LocalKube, namespace: str) -> None:
    kube.kubectl("create", "serviceaccount", "robot", "-n", namespace)
    token = kube.kubectl("create", "token", "robot", "-n", namespace).stdout.strip()
    as_robot = kube.kubeconfig_with_token("robot", token)
    whoami = json.loads(kube.kubectl("auth", "whoami", "-o", "json", kubeconfig=as_robot).stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:robot"


def _check_cache(cache_dir: Path) -> int:
    return subprocess.run(
        [str(BUILD_SCRIPT), "--check"],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": "/nonexistent",
            "MAILRELAY_CACHE_DIR": str(cache_dir),
        },
        capture_output=True,
        check=False,
    ).returncode


def test_a_broken_binary_cache_is_detected(kube: LocalKube, tmp_path: Path) -> None:
    copy = tmp_path / "cache" / kube.bin_dir.parent.name
    shutil.copytree(kube.bin_dir.parent, copy)
    assert _check_cache(tmp_path / "cache") == 0

    etcd = copy / "bin" / "etcd"
    etcd.write_bytes(etcd.read_bytes()[: 1024 * 1024])
    assert _check_cache(tmp_path / "cache") == 1


def test_a_partial_binary_cache_is_detected(kube: LocalKube, tmp_path: Path) -> None:
    copy = tmp_path / "cache" / kube.bin_dir.parent.name
    shutil.copytree(kube.bin_dir.parent, copy)
    (copy / "bin" / "helm").unlink()
    assert _check_cache(tmp_path / "cache") == 1
