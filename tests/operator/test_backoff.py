"""A failed pass is retried with per-relay backoff, long before the resync timer.

The operator here resyncs every 300 s (its first timer fires after 300 s too), so anything
that happens within the test's minute comes from the work queue's retries, not the timer.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import apply, condition, get, running_operator, wait_for
from tests.operator import manifests as m

pytestmark = pytest.mark.kube

RESYNC_SECONDS = 300
PASSES = 'mailrelay_operator_reconciles_total{kind="MailRelay"'


def _refuse_statefulsets(kube: LocalKube, ns: str) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "mail"},
        "spec": {"hard": {"count/statefulsets.apps": "0"}},
    }
    apply(kube, ns, quota)
    # No controller manager here: write the usage it would have computed.
    used = {"count/statefulsets.apps": "0"}
    kube.kubectl(
        "patch", "resourcequota", "mail", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"hard": used, "used": used}}),
    )  # fmt: skip


def test_a_refused_child_is_retried_with_backoff_before_the_resync(
    crds: LocalKube, operator_kubeconfig: Path, tmp_path: Path
) -> None:
    kube = crds
    ns = kube.create_namespace(f"backoff-{secrets.token_hex(3)}")
    try:
        _refuse_statefulsets(kube, ns)
        with running_operator(
            kube,
            operator_kubeconfig,
            "--standalone",
            "--namespace",
            ns,
            "--resync-seconds",
            str(RESYNC_SECONDS),
            log_path=tmp_path / "operator.log",
        ) as operator:
            started = time.monotonic()
            apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
            apply(kube, ns, m.relay(), m.smtp_route("billing"))

            def refused() -> bool:
                ready = condition(get(kube, "mailrelay", "outbound", ns), "Ready")
                return ready is not None and ready["reason"] == "StatefulSetForbidden"

            wait_for(refused, timeout=60, what="Ready=False StatefulSetForbidden")
            # Nothing the operator watches changes now: only its retries make passes.
            seen = operator.total(PASSES)
            wait_for(
                lambda: operator.total(PASSES) >= seen + 3,
                timeout=60,
                what="three retries of the refused pass",
            )
            # Backing off, not spinning: 1 s, 2 s, 4 s ... make a handful of passes at most
            # in the next seconds (a retry loop without backoff makes hundreds).
            before = operator.total(PASSES)
            time.sleep(4)
            assert operator.total(PASSES) - before <= 4

            # The quota goes: no watched input changes, yet the next retry applies.
            kube.kubectl("delete", "resourcequota", "mail", "-n", ns)
            wait_for(
                lambda: get(kube, "statefulset", "outbound", ns),
                timeout=90,
                what="the StatefulSet once the quota is gone",
            )
            wait_for(
                lambda: (
                    (c := condition(get(kube, "mailrelay", "outbound", ns), "Ready"))
                    and c["reason"] == "RolloutPending"
                ),
                timeout=30,
                what="Ready back to waiting for the rollout",
            )
            assert time.monotonic() - started < RESYNC_SECONDS / 2
            applied = condition(get(kube, "mailrelay", "outbound", ns), "ChildrenApplied")
            if applied is None or applied["status"] != "True":
                # The session's Service IP range (a /24, no garbage collector) used up by
                # earlier tests: the Service's refusal keeps retrying, rightly.
                return
            # Success resets the backoff and ends the retries.
            time.sleep(2)
            settled = operator.total(PASSES)
            time.sleep(4)
            assert operator.total(PASSES) == settled
    finally:
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
