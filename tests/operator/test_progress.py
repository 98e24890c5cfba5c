"""Progress against a real API server: liveness fails when nothing can be reconciled, and an
API outage delays new objects by about a second once the server is back."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mailrelay.operator import rbac
from mailrelay.support.localkube import LocalKube, ensure_binaries
from mailrelay.support.operator_harness import (
    CRDS,
    apply,
    bind_operator_role,
    get,
    running_operator,
    wait_for,
)
from tests.operator import manifests as m

pytestmark = pytest.mark.kube


def _reconciled(kube: LocalKube, name: str, ns: str) -> bool:
    status = (get(kube, "mailrelay", name, ns) or {}).get("status") or {}
    return bool(status.get("conditions"))


def _role_without_listing_statefulsets(kube: LocalKube, user: str) -> Path:
    """The operator's ClusterRole minus list/watch on StatefulSets, bound to ``user``."""
    role = rbac.cluster_role(name=f"no-sts-{user}")
    for rule in role["rules"]:
        if "statefulsets" in rule["resources"]:
            rule["verbs"] = [v for v in rule["verbs"] if v not in ("list", "watch")]
    binding = rbac.cluster_role_binding(
        role=role["metadata"]["name"],
        subject={"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"},
    )
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([role, binding]))
    return kube.kubeconfig_for(user)


def test_liveness_fails_when_the_watch_caches_never_load(crds: LocalKube, tmp_path: Path) -> None:
    """A kind the operator cannot list keeps every event handler waiting: /healthz says so."""
    kube = crds
    ns = kube.create_namespace(f"live-{secrets.token_hex(3)}")
    kubeconfig = _role_without_listing_statefulsets(kube, f"no-sts-{secrets.token_hex(3)}")
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.relay())
    with running_operator(
        kube,
        kubeconfig,
        "--standalone",
        "--namespace",
        ns,
        log_path=tmp_path / "operator.log",
        env={"MAILRELAY_OPERATOR_INDEX_TIMEOUT_SECONDS": "5"},
    ) as operator:
        health = wait_for(
            lambda: (h := operator.health())["status"] == 503 and h,
            timeout=60,
            what="/healthz to fail",
        )
        assert health["indicesReady"] is False
        (problem,) = health["problems"]
        assert "watch caches are not loaded" in problem and "MailRelay" in problem
        assert not _reconciled(kube, "outbound", ns)
    kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_liveness_holds_when_the_operator_makes_progress(
    crds: LocalKube, operator_kubeconfig: Path, tmp_path: Path
) -> None:
    kube = crds
    ns = kube.create_namespace(f"live-{secrets.token_hex(3)}")
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.relay())
    with running_operator(
        kube,
        operator_kubeconfig,
        "--standalone",
        "--namespace",
        ns,
        log_path=tmp_path / "operator.log",
        env={"MAILRELAY_OPERATOR_INDEX_TIMEOUT_SECONDS": "5"},
    ) as operator:
        wait_for(lambda: _reconciled(kube, "outbound", ns), what="the relay's status")
        time.sleep(6)
        health = operator.health()
        assert (health["status"], health["indicesReady"], health["problems"]) == (200, True, [])
    kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@contextlib.contextmanager
def own_cluster(workdir: Path) -> Iterator[LocalKube]:
    """A control plane of this test's own: it stops the API server, which others share."""
    cluster = LocalKube(bin_dir=ensure_binaries(), workdir=workdir)
    try:
        cluster.start()
        cluster.install_crds(CRDS)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_a_new_relay_is_reconciled_soon_after_an_api_outage(tmp_path: Path) -> None:
    with own_cluster(tmp_path / "kube") as kube:
        ns = kube.create_namespace("outage")
        kubeconfig = bind_operator_role(kube)
        apply(kube, ns, m.tls_secret(), m.users_secret(), m.relay("before"))
        with running_operator(
            kube, kubeconfig, "--standalone", "--namespace", ns, log_path=tmp_path / "op.log"
        ) as operator:
            wait_for(lambda: _reconciled(kube, "before", ns), what="the first relay's status")
            kube.stop_apiserver()
            down = time.monotonic()
            # kopf's default backoffs (1, 1, 2, 3, 5, 8, 13, 21 s) try again 33 s and 54 s
            # into the outage, whatever the server does meanwhile: a server ready ~40 s in
            # would wait until 54 s.
            time.sleep(36)
            kube.start_apiserver()
            ready = time.monotonic()
            print(f"The API server was down for {ready - down:.1f}s")
            apply(kube, ns, m.relay("after"))
            wait_for(
                lambda: _reconciled(kube, "after", ns),
                timeout=60,
                interval=0.1,
                what="the relay created after the outage",
            )
            took = time.monotonic() - ready
            print(f"A relay created once the API server was ready had its status after {took:.1f}s")
            assert took < 6, operator.log_tail(40)
            assert operator.process.poll() is None
            assert operator.health()["status"] == 200
