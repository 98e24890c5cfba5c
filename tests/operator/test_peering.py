"""Two operators with kopf peering: only the one with the higher priority acts."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import apply, get, running_operator, wait_for
from tests.operator import manifests as m

pytestmark = [pytest.mark.kube, pytest.mark.slow]


def test_only_the_leader_acts(crds: LocalKube, operator_kubeconfig: Path, tmp_path: Path) -> None:
    kube = crds
    ns = kube.create_namespace(f"peer-{secrets.token_hex(3)}")
    kube.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input="apiVersion: kopf.dev/v1\nkind: KopfPeering\nmetadata:\n  name: mailrelay\n",
    )
    common = ("--namespace", ns, "--peering-name", "mailrelay", "--resync-seconds", "2")
    with (
        running_operator(
            kube, operator_kubeconfig, *common, "--priority", "100", log_path=tmp_path / "a.log"
        ) as leader,
        running_operator(
            kube, operator_kubeconfig, *common, "--priority", "50", log_path=tmp_path / "b.log"
        ) as follower,
    ):
        apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
        apply(kube, ns, m.relay(), m.smtp_route("billing"))
        wait_for(lambda: get(kube, "configmap", "outbound-config", ns), timeout=60)
        wait_for(
            lambda: leader.total('mailrelay_operator_reconciles_total{kind="MailRelay"') > 0,
            what="the leader to reconcile",
        )
        time.sleep(3)  # more than a resync period: a follower that acted would show it
        assert leader.total("mailrelay_operator_children_total") >= 4
        assert follower.total("mailrelay_operator_reconciles_total") == 0
        assert follower.total("mailrelay_operator_children_total") == 0
        assert follower.total("mailrelay_operator_status_writes_total") == 0
    kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
