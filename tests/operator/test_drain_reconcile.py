"""Scale-down drains against the real API server, as the operator's least-privilege user.

The bare API server runs no controllers, so each test plays them: it creates the spool PVCs
the StatefulSet controller would (``spool-<relay>-<ordinal>``, the template's labels), writes
the StatefulSet's status, marks a drain Job succeeded or failed through its status
subresource, gives the Job a pod with the drain's report as its termination message, and
removes the foreground-deletion finalizer as the garbage collector would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, apply, condition, get, wait_for
from tests.operator import manifests as m

pytestmark = pytest.mark.kube

LABELS = {
    "app.kubernetes.io/name": "mailrelay",
    "app.kubernetes.io/instance": "outbound",
    "app.kubernetes.io/component": "relay",
    "app.kubernetes.io/part-of": "mailrelay",
    "app.kubernetes.io/managed-by": "mailrelay-operator",
}


@pytest.fixture(autouse=True)
def _relay_gone_afterwards(crds: LocalKube, op_namespace: str) -> Iterator[None]:
    """Delete the relay after each test: the bare API server deletes no namespace content,
    and a relay left behind would keep the shared operator retrying its drains (and counting
    errors) in a namespace that refuses new objects."""
    yield
    crds.kubectl(
        "delete", "mailrelay", "outbound", "-n", op_namespace, "--timeout=30s", check=False
    )


def _pvc(ordinal: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"spool-outbound-{ordinal}", "labels": LABELS},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }


def _relay_pod(ordinal: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"outbound-{ordinal}", "labels": LABELS},
        "spec": {"containers": [{"name": "relay", "image": "registry.test/mailrelay:1"}]},
    }


def _events(kube: LocalKube, ns: str) -> list[dict[str, Any]]:
    result = kube.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=outbound", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
    return items


def _event(kube: LocalKube, ns: str, reason: str, *words: str) -> dict[str, Any] | None:
    for event in _events(kube, ns):
        if event["reason"] == reason and all(word in event["message"] for word in words):
            return event
    return None


def _draining(kube: LocalKube, ns: str) -> dict[str, Any] | None:
    return condition(get(kube, "mailrelay", "outbound", ns), "Draining")


def _draining_is(kube: LocalKube, ns: str, status: str, reason: str) -> bool:
    found = _draining(kube, ns)
    return bool(found and (found["status"], found["reason"]) == (status, reason))


def _patch_status(kube: LocalKube, kind: str, name: str, ns: str, status: dict[str, Any]) -> None:
    kube.kubectl(
        "patch",
        kind,
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def _statefulset_caught_up(kube: LocalKube, ns: str, ready: int) -> None:
    """Play the StatefulSet controller: it saw the current spec and ``ready`` pods are ready."""
    sts = get(kube, "statefulset", "outbound", ns)
    assert sts is not None
    _patch_status(
        kube,
        "statefulset",
        "outbound",
        ns,
        {
            "observedGeneration": sts["metadata"]["generation"],
            "replicas": ready,
            "readyReplicas": ready,
            "updatedReplicas": ready,
            "availableReplicas": ready,
        },
    )


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _finish_job(kube: LocalKube, ns: str, name: str, *, ok: bool, ago: float = 0) -> None:
    """Play the Job controller: the Job's terminal conditions, ``ago`` seconds back."""
    end = datetime.now(UTC) - timedelta(seconds=ago)
    start = end - timedelta(seconds=5)
    if ok:
        conditions = [
            {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": _time(end)},
            {"type": "Complete", "status": "True", "lastTransitionTime": _time(end)},
        ]
        status = {"succeeded": 1, "completionTime": _time(end)}
    else:
        conditions = [
            {"type": "FailureTarget", "status": "True", "lastTransitionTime": _time(end)},
            {"type": "Failed", "status": "True", "lastTransitionTime": _time(end)},
        ]
        status = {"failed": 1}
    _patch_status(
        kube,
        "job",
        name,
        ns,
        {"startTime": _time(start), "conditions": conditions, "active": 0, **status},
    )


def _drain_pod(kube: LocalKube, ns: str, job: str, report: dict[str, int], code: int) -> None:
    """Play the Job's pod: finished, its termination message the drain's JSON line."""
    name = f"{job}-x1"
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"batch.kubernetes.io/job-name": job, "job-name": job},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "drain", "image": "registry.test/mailrelay:1"}],
        },
    }
    apply(kube, ns, pod)
    now = _time(datetime.now(UTC))
    terminated = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "message": json.dumps(report) + "\n",
        "startedAt": now,
        "finishedAt": now,
    }
    _patch_status(
        kube,
        "pod",
        name,
        ns,
        {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": "drain",
                    "image": "registry.test/mailrelay:1",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        },
    )


def _pvc_deleted(kube: LocalKube, ns: str, name: str) -> bool:
    """Whether the PVC is deleted; plays the pvc-protection controller (no pod uses it)."""
    pvc = get(kube, "pvc", name, ns)
    if pvc is None:
        return True
    if pvc["metadata"].get("deletionTimestamp") and pvc["metadata"].get("finalizers"):
        kube.kubectl(
            "patch", "pvc", name, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
        )
    return False


def _setup(kube: LocalKube, ns: str, **spec: Any) -> None:
    apply(kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials())
    apply(kube, ns, m.relay(**spec), m.smtp_route("billing"))
    wait_for(lambda: get(kube, "statefulset", "outbound", ns), what="the StatefulSet")


def _report(**counts: int) -> dict[str, int]:
    return {"handed_off": 0, "delivered": 0, "dead_lettered": 0, "remaining": 0, **counts}


def test_orphan_volume_is_drained_then_deleted(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns)
    apply(kube, ns, _pvc(0), _pvc(1), _pvc(2), _relay_pod(0), _relay_pod(1), _relay_pod(2))
    _statefulset_caught_up(kube, ns, ready=2)
    # Pod 2 (a removed ordinal) is still there: it hands off first, no Job yet.
    wait_for(lambda: _draining_is(kube, ns, "True", "PodsLeaving"), what="Draining PodsLeaving")
    assert get(kube, "job", "outbound-drain-2", ns) is None
    kube.kubectl("delete", "pod", "outbound-2", "-n", ns)

    job = wait_for(lambda: get(kube, "job", "outbound-drain-2", ns), what="the drain Job")
    relay = get(kube, "mailrelay", "outbound", ns)
    assert relay is not None
    assert job["metadata"]["ownerReferences"][0]["uid"] == relay["metadata"]["uid"]
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][-1] == "drain"
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["spool-outbound-2"]
    wait_for(lambda: _draining_is(kube, ns, "True", "DrainJobsRunning"), what="DrainJobsRunning")
    message = _draining(kube, ns)["message"]  # type: ignore[index]
    assert "1 volume(s) draining" in message
    assert _draining(kube, ns)["observedGeneration"] == relay["metadata"]["generation"]  # type: ignore[index]
    wait_for(lambda: _event(kube, ns, "DrainStarted", "spool-outbound-2"), what="DrainStarted")
    # The volumes the StatefulSet still uses are left alone.
    assert get(kube, "pvc", "spool-outbound-1", ns) is not None

    _drain_pod(kube, ns, "outbound-drain-2", _report(handed_off=5), 0)
    _finish_job(kube, ns, "outbound-drain-2", ok=True)
    wait_for(lambda: _pvc_deleted(kube, ns, "spool-outbound-2"), what="the PVC deleted")
    wait_for(lambda: get(kube, "job", "outbound-drain-2", ns) is None, what="the Job deleted")
    event = wait_for(
        lambda: _event(kube, ns, "DrainSucceeded", "spool-outbound-2", "5 handed off"),
        what="DrainSucceeded with the report",
    )
    assert event["type"] == "Normal"
    wait_for(lambda: _draining_is(kube, ns, "False", "NothingToDrain"), what="Draining False")
    assert get(kube, "pvc", "spool-outbound-0", ns) is not None
    assert get(kube, "pvc", "spool-outbound-1", ns) is not None


def test_a_failed_drain_is_reported_and_retried(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns, replicas=1)
    apply(kube, ns, _pvc(0), _pvc(1))
    _statefulset_caught_up(kube, ns, ready=1)
    first = wait_for(lambda: get(kube, "job", "outbound-drain-1", ns), what="the drain Job")
    assert first["metadata"]["annotations"]["mailrelay.dev/drain-attempt"] == "1"
    _drain_pod(kube, ns, "outbound-drain-1", _report(remaining=4), 3)
    # Failed 10 s ago: the first retry waits 30 s.
    _finish_job(kube, ns, "outbound-drain-1", ok=False, ago=10)
    wait_for(lambda: _draining_is(kube, ns, "True", "DrainFailed"), what="Draining DrainFailed")
    assert "1 failed" in _draining(kube, ns)["message"]  # type: ignore[index]
    event = wait_for(
        lambda: _event(kube, ns, "DrainFailed", "outbound-drain-1", "4 left"), what="DrainFailed"
    )
    assert event["type"] == "Warning"
    assert get(kube, "pvc", "spool-outbound-1", ns) is not None  # the mail stays

    second = wait_for(
        lambda: (
            (j := get(kube, "job", "outbound-drain-1", ns))
            and j["metadata"]["uid"] != first["metadata"]["uid"]
            and j
        ),
        timeout=60,
        what="the retry",
    )
    assert second["metadata"]["annotations"]["mailrelay.dev/drain-attempt"] == "2"
    assert get(kube, "pvc", "spool-outbound-1", ns) is not None
    # Told once: the first failure's Event is not repeated by later passes.
    failed = [e for e in _events(kube, ns) if e["reason"] == "DrainFailed"]
    assert len(failed) == 1 and failed[0].get("count", 1) == 1


def test_scaling_up_over_a_draining_ordinal_stops_the_drain_first(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns)
    apply(kube, ns, _pvc(0), _pvc(1), _pvc(2))
    _statefulset_caught_up(kube, ns, ready=2)
    wait_for(lambda: get(kube, "job", "outbound-drain-2", ns), what="the drain Job")

    apply(kube, ns, m.relay(replicas=3))
    stopping = wait_for(
        lambda: (
            (j := get(kube, "job", "outbound-drain-2", ns))
            and j["metadata"].get("deletionTimestamp")
            and j
        ),
        what="the Job's foreground deletion",
    )
    assert "foregroundDeletion" in stopping["metadata"].get("finalizers", [])
    wait_for(lambda: _draining_is(kube, ns, "True", "DrainStopping"), what="DrainStopping")
    wait_for(lambda: _event(kube, ns, "DrainStopped", "outbound-drain-2"), what="DrainStopped")
    # The StatefulSet keeps ordinal 2 unborn while the drain's pod may still write.
    sts = get(kube, "statefulset", "outbound", ns)
    assert sts is not None and sts["spec"]["replicas"] == 2
    assert get(kube, "pvc", "spool-outbound-2", ns) is not None

    # The garbage collector removes the Job once its pods are gone.
    kube.kubectl(
        "patch",
        "job",
        "outbound-drain-2",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":null}}',
    )
    wait_for(
        lambda: (get(kube, "statefulset", "outbound", ns) or {})["spec"]["replicas"] == 3,
        what="the StatefulSet at 3 once the drain is gone",
    )
    assert get(kube, "pvc", "spool-outbound-2", ns) is not None  # pod 2 takes it back
    assert get(kube, "job", "outbound-drain-2", ns) is None


def test_scale_to_zero_drains_every_volume_and_tells_of_dead_letters(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns, replicas=0)
    apply(kube, ns, _pvc(0), _pvc(1))
    _statefulset_caught_up(kube, ns, ready=0)
    wait_for(
        lambda: all(get(kube, "job", f"outbound-drain-{o}", ns) for o in (0, 1)),
        what="both drain Jobs",
    )
    _drain_pod(kube, ns, "outbound-drain-0", _report(delivered=3, dead_lettered=2), 0)
    _finish_job(kube, ns, "outbound-drain-0", ok=True)
    _drain_pod(kube, ns, "outbound-drain-1", _report(delivered=4), 0)
    _finish_job(kube, ns, "outbound-drain-1", ok=True)

    event = wait_for(
        lambda: _event(
            kube, ns, "MailDeadLettered", "dead-lettered 2 message(s)", "spool-outbound-0"
        ),
        what="MailDeadLettered",
    )
    assert event["type"] == "Warning" and "spec.replicas is 0" in event["message"]
    wait_for(lambda: _pvc_deleted(kube, ns, "spool-outbound-1"), what="PVC 1 deleted")
    # The volume holding dead letters is kept, with its Job as the record that it is drained.
    wait_for(lambda: _draining_is(kube, ns, "False", "Drained"), what="Draining False Drained")
    assert get(kube, "pvc", "spool-outbound-0", ns) is not None
    assert get(kube, "job", "outbound-drain-0", ns) is not None


def test_retain_leaves_the_volumes_of_removed_pods_alone(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    _setup(kube, ns, replicas=1, queue={"onScaleDown": "Retain"})
    apply(kube, ns, _pvc(0), _pvc(1))
    _statefulset_caught_up(kube, ns, ready=1)
    wait_for(lambda: _draining_is(kube, ns, "False", "VolumesRetained"), what="VolumesRetained")
    assert get(kube, "job", "outbound-drain-1", ns) is None
    assert get(kube, "pvc", "spool-outbound-1", ns) is not None
