"""Drains of the spool volumes left by a scale-down, as data: index entries, decisions, Jobs."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailrelay.operator import models
from mailrelay.operator.drain import (
    DrainInputs,
    DrainJob,
    DrainReport,
    SpoolClaim,
    capped_replicas,
    drain_job,
    parse_report,
    plan_drains,
    render_drain_job,
    report_of_pods,
    spool_claim,
    wants_pod_list,
)
from mailrelay.operator.handoff import handoff_secret_action, new_token, render_handoff_secret
from mailrelay.operator.render import RelayInputs, render_statefulset
from mailrelay.operator.settings import OperatorSettings

NOW = datetime(2026, 12, 8, 0, 0, tzinfo=UTC)
SETTINGS = OperatorSettings(relay_image="registry.test/mailrelay:1")


def claim(ordinal: int, *, deleting: bool = False, relay: str = "outbound") -> SpoolClaim:
    return SpoolClaim(f"spool-{relay}-{ordinal}", f"pvc-{ordinal}", ordinal, deleting)


def job(ordinal: int, state: str = "running", **changes: Any) -> DrainJob:
    finished = NOW - timedelta(seconds=5) if state != "running" else None
    base = DrainJob(
        name=f"outbound-drain-{ordinal}",
        uid=f"job-{ordinal}",
        ordinal=ordinal,
        attempt=1,
        state=state,  # type: ignore[arg-type]
        finished_at=finished,
        pods_may_run=state == "running",
    )
    return replace(base, **changes)


def inputs(**changes: Any) -> DrainInputs:
    base = DrainInputs(
        relay="outbound",
        replicas=1,
        policy="Drain",
        claims=(claim(0),),
        jobs=(),
        pod_ordinals=frozenset({0}),
        statefulset_settled=True,
        ready_pods=1,
        now=NOW,
    )
    return replace(base, **changes)


# --- index entries -------------------------------------------------------------------------


def _pvc(name: str, instance: str | None, **metadata: Any) -> dict[str, Any]:
    labels = {"app.kubernetes.io/instance": instance} if instance else {}
    return {"metadata": {"name": name, "uid": "u", "labels": labels, **metadata}}


@pytest.mark.parametrize(
    ("name", "instance", "expected"),
    [
        ("spool-outbound-3", "outbound", ("outbound", 3)),
        ("spool-outbound-0", "outbound", ("outbound", 0)),
        # relay "a-1" ordinal 2, never relay "a" ordinal "1-2"
        ("spool-a-1-2", "a-1", ("a-1", 2)),
        ("spool-a-1-2", "a", None),
        ("spool-outbound-03", "outbound", None),
        ("spool-outbound-x", "outbound", None),
        ("data-outbound-1", "outbound", None),
        ("spool-outbound-1", None, None),
        ("spool-other-1", "outbound", None),
    ],
)
def test_spool_claims_are_found_by_name_and_instance_label(
    name: str, instance: str | None, expected: tuple[str, int] | None
) -> None:
    found = spool_claim(_pvc(name, instance))
    if expected is None:
        assert found is None
        return
    assert found is not None
    assert (found[0], found[1].ordinal, found[1].name) == (*expected, name)


def test_a_claim_being_deleted_is_marked() -> None:
    found = spool_claim(_pvc("spool-outbound-1", "outbound", deletionTimestamp="2026-12-08T00:00Z"))
    assert found is not None and found[1].deleting


def _job_body(status: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "outbound-drain-2",
            "uid": "j",
            "labels": {
                "app.kubernetes.io/instance": "outbound",
                "app.kubernetes.io/component": "drain",
                "mailrelay.dev/drain-ordinal": "2",
            },
            "annotations": {"mailrelay.dev/drain-attempt": "3"},
            **metadata,
        },
        "status": status,
    }


@pytest.mark.parametrize(
    ("status", "state", "may_run"),
    [
        ({}, "running", True),
        ({"active": 1}, "running", True),
        (
            {
                "conditions": [
                    {
                        "type": "Complete",
                        "status": "True",
                        "lastTransitionTime": "2026-12-08T00:00:00Z",
                    }
                ]
            },
            "succeeded",
            False,
        ),
        (
            {
                "terminating": 1,
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "lastTransitionTime": "2026-12-08T00:00:00Z",
                    }
                ],
            },
            "failed",
            True,
        ),
        ({"conditions": [{"type": "Failed", "status": "False"}]}, "running", True),
    ],
)
def test_drain_jobs_are_read_from_their_status(
    status: dict[str, Any], state: str, may_run: bool
) -> None:
    found = drain_job(_job_body(status))
    assert found is not None
    relay, entry = found
    assert (relay, entry.ordinal, entry.attempt, entry.state, entry.pods_may_run) == (
        "outbound",
        2,
        3,
        state,
        may_run,
    )
    if state != "running":
        assert entry.finished_at == NOW


def test_other_jobs_are_not_drain_jobs() -> None:
    body = _job_body({})
    body["metadata"]["labels"]["app.kubernetes.io/component"] = "relay"
    assert drain_job(body) is None


# --- reports -------------------------------------------------------------------------------


def test_the_report_is_the_last_json_line_with_counts() -> None:
    counts = '{"handed_off": 4, "delivered": 2, "dead_lettered": 1, "remaining": 0}'
    message = f'starting\n{{"x": 1}}\n{counts}\n'
    assert parse_report(message) == DrainReport(4, 2, 1, 0)
    assert parse_report("Traceback ...\nboom") is None
    assert (
        parse_report('{"handed_off": -1, "delivered": 0, "dead_lettered": 0, "remaining": 0}')
        is None
    )


def test_the_report_comes_from_the_latest_drain_container() -> None:
    def pod(finished: str, counts: dict[str, int]) -> dict[str, Any]:
        terminated = {"finishedAt": finished, "message": json.dumps(counts)}
        return {
            "status": {
                "containerStatuses": [{"name": "drain", "state": {"terminated": terminated}}]
            }
        }

    counts = {"handed_off": 0, "delivered": 0, "dead_lettered": 0, "remaining": 5}
    later = {**counts, "remaining": 0, "delivered": 5}
    pods = [pod("2026-12-08T00:01:00Z", later), pod("2026-12-08T00:00:00Z", counts)]
    assert report_of_pods(pods) == DrainReport(0, 5, 0, 0)
    assert report_of_pods([{"status": {}}]) is None


# --- decisions -----------------------------------------------------------------------------


def test_nothing_to_drain_at_steady_state() -> None:
    plan = plan_drains(inputs())
    assert (plan.create, plan.delete_jobs, plan.delete_claims, plan.events) == ((), (), (), ())
    assert plan.condition is not None
    assert (plan.condition.status, plan.condition.reason) == ("False", "NothingToDrain")
    assert not plan.recheck


def test_an_orphan_claim_with_its_pod_gone_gets_a_drain_job() -> None:
    plan = plan_drains(inputs(claims=(claim(0), claim(1), claim(2)), pod_ordinals=frozenset({0})))
    assert plan.create == ((1, 1), (2, 1))
    assert [(e.reason, e.created) for e in plan.events] == [
        ("DrainStarted", 1),
        ("DrainStarted", 2),
    ]
    assert "spool-outbound-1" in plan.events[0].message
    assert plan.condition is not None
    assert (plan.condition.status, plan.condition.reason) == ("True", "DrainJobsRunning")
    assert "2 volume(s) draining" in plan.condition.message


def test_a_pod_still_leaving_is_waited_for() -> None:
    plan = plan_drains(inputs(claims=(claim(0), claim(1)), pod_ordinals=frozenset({0, 1})))
    assert plan.create == ()
    assert plan.condition is not None
    assert (plan.condition.status, plan.condition.reason) == ("True", "PodsLeaving")
    assert "1 removed pod(s) leaving" in plan.condition.message
    assert plan.recheck


@pytest.mark.parametrize(
    "changes",
    [
        {"statefulset_settled": False},
        {"ready_pods": 0},
        {"pod_ordinals": None},
    ],
    ids=["statefulset-not-settled", "no-ready-peer", "pods-not-listed"],
)
def test_no_drain_starts_before_it_is_safe(changes: dict[str, Any]) -> None:
    plan = plan_drains(inputs(**{"claims": (claim(0), claim(1)), **changes}))
    assert plan.create == ()
    assert plan.recheck
    assert plan.condition is not None and plan.condition.reason == "WaitingToDrain"


def test_scale_to_zero_drains_every_volume_without_peers() -> None:
    plan = plan_drains(
        inputs(replicas=0, claims=(claim(0), claim(1)), pod_ordinals=frozenset(), ready_pods=0)
    )
    assert plan.create == ((0, 1), (1, 1))


def test_retain_keeps_orphans_untouched() -> None:
    plan = plan_drains(
        inputs(policy="Retain", claims=(claim(0), claim(1)), pod_ordinals=frozenset({0}))
    )
    assert (plan.create, plan.delete_claims) == ((), ())
    assert plan.condition is not None
    assert (plan.condition.status, plan.condition.reason) == ("False", "VolumesRetained")
    assert "1 spool volume(s)" in plan.condition.message


def test_a_running_drain_is_left_alone() -> None:
    plan = plan_drains(inputs(claims=(claim(0), claim(1)), jobs=(job(1),), pod_ordinals=None))
    assert (plan.create, plan.delete_jobs, plan.delete_claims) == ((), (), ())
    assert plan.condition is not None and plan.condition.reason == "DrainJobsRunning"


def test_success_deletes_the_claim_then_the_job() -> None:
    done = job(1, "succeeded")
    report = DrainReport(handed_off=7)
    first = plan_drains(
        inputs(claims=(claim(0), claim(1)), jobs=(done,), reports={done.uid: report})
    )
    assert first.delete_claims == (("spool-outbound-1", "pvc-1"),)
    # The Job goes too: its finished pod would keep the PVC Terminating (pvc-protection).
    assert first.delete_jobs == ((done.name, done.uid, "Background"),)
    assert [e.reason for e in first.events] == ["DrainSucceeded"]
    assert "7 handed off" in first.events[0].message and "deleted" in first.events[0].message
    assert first.told == (done.uid,)
    # Next pass: the PVC is going, then gone; told once only.
    going = plan_drains(
        inputs(claims=(claim(0), claim(1, deleting=True)), jobs=(done,), told=frozenset(first.told))
    )
    assert going.delete_jobs == ((done.name, done.uid, "Background"),)  # if still there
    assert (going.delete_claims, going.events, going.create) == ((), (), ())
    # The Job gone, the PVC still Terminating: no new drain of it.
    after = plan_drains(inputs(claims=(claim(0), claim(1, deleting=True)), told=frozenset()))
    assert (after.create, after.delete_claims) == ((), ())
    gone = plan_drains(inputs(jobs=(done,), told=frozenset(first.told)))
    assert gone.delete_jobs == ((done.name, done.uid, "Background"),)
    assert gone.events == ()


@pytest.mark.parametrize("policy", ["DrainAndRetain", "Retain"])
def test_a_kept_policy_keeps_the_drained_claim_and_its_record(policy: str) -> None:
    done = job(1, "succeeded")
    plan = plan_drains(inputs(policy=policy, claims=(claim(0), claim(1)), jobs=(done,)))
    assert (plan.delete_claims, plan.delete_jobs, plan.create) == ((), (), ())
    assert plan.condition is not None
    assert plan.condition.status == "False"


def test_a_success_without_a_report_keeps_the_claim() -> None:
    """Whether the drain dead-lettered mail onto the volume is unknown: never delete it."""
    done = job(1, "succeeded")
    plan = plan_drains(inputs(claims=(claim(0), claim(1)), jobs=(done,), reports={}))
    assert plan.delete_claims == ()
    assert "kept" in plan.events[0].message


def test_dead_lettered_mail_keeps_the_claim_and_is_told_at_scale_to_zero() -> None:
    done = job(0, "succeeded")
    plan = plan_drains(
        inputs(
            replicas=0,
            claims=(claim(0),),
            jobs=(done,),
            pod_ordinals=frozenset(),
            ready_pods=0,
            reports={done.uid: DrainReport(delivered=3, dead_lettered=2)},
        )
    )
    assert plan.delete_claims == ()
    assert [(e.type, e.reason) for e in plan.events] == [
        ("Normal", "DrainSucceeded"),
        ("Warning", "MailDeadLettered"),
    ]
    assert "dead-lettered 2 message(s)" in plan.events[1].message
    assert "spec.replicas is 0" in plan.events[1].message


def test_a_failed_drain_is_told_once_and_retried_after_its_backoff() -> None:
    failed = job(1, "failed", attempt=2, finished_at=NOW - timedelta(seconds=10))
    report = DrainReport(remaining=4)
    waiting = plan_drains(
        inputs(claims=(claim(0), claim(1)), jobs=(failed,), reports={failed.uid: report})
    )
    assert [e.reason for e in waiting.events] == ["DrainFailed"]
    assert "attempt 2" in waiting.events[0].message and "4 left" in waiting.events[0].message
    assert (waiting.create, waiting.delete_jobs) == ((), ())
    assert waiting.condition is not None and waiting.condition.reason == "DrainFailed"
    # Attempt 2 waits 60 s: the next try time is in the message.
    assert "2026-12-08T00:00:50Z" in waiting.condition.message
    assert waiting.recheck
    later = NOW + timedelta(seconds=51)
    due = plan_drains(
        inputs(claims=(claim(0), claim(1)), jobs=(failed,), now=later, told=frozenset(waiting.told))
    )
    assert due.events == ()
    assert due.delete_jobs == ((failed.name, failed.uid, "Background"),)
    assert due.attempts == {1: 2}
    # Once the failed Job is gone, attempt 3 starts.
    again = plan_drains(
        inputs(
            claims=(claim(0), claim(1)),
            now=later,
            attempts=due.attempts,
            pod_ordinals=frozenset({0}),
        )
    )
    assert again.create == ((1, 3),)
    assert "attempt 3" in again.events[0].message


def test_a_failed_drain_whose_pod_still_stops_is_not_retried_yet() -> None:
    failed = job(1, "failed", finished_at=NOW - timedelta(hours=1), pods_may_run=True)
    plan = plan_drains(inputs(claims=(claim(0), claim(1)), jobs=(failed,)))
    assert (plan.create, plan.delete_jobs) == ((), ())
    assert plan.recheck


def test_scale_up_over_a_running_drain_stops_it_and_holds_the_statefulset() -> None:
    running = job(2)
    plan = plan_drains(inputs(replicas=3, claims=(claim(0), claim(1), claim(2)), jobs=(running,)))
    assert plan.delete_jobs == ((running.name, running.uid, "Foreground"),)
    assert [e.reason for e in plan.events] == ["DrainStopped"]
    assert plan.condition is not None and plan.condition.reason == "DrainStopping"
    assert capped_replicas(3, (running,), ()) == 2
    # While its deletion waits for its pod, the StatefulSet stays below ordinal 2.
    stopping = replace(running, deleting=True)
    assert plan_drains(inputs(replicas=3, jobs=(stopping,))).delete_jobs == ()
    assert capped_replicas(3, (stopping,), ()) == 2
    assert capped_replicas(5, (job(3), job(2)), ()) == 2
    # Gone: the StatefulSet gets every pod the spec asks for.
    assert capped_replicas(3, (), ()) == 3


def test_scale_up_over_a_finished_drain_deletes_it_at_once() -> None:
    done = job(1, "succeeded")
    plan = plan_drains(inputs(replicas=2, claims=(claim(0), claim(1)), jobs=(done,)))
    assert plan.delete_jobs == ((done.name, done.uid, "Background"),)
    assert plan.delete_claims == ()  # the pod takes its volume back
    assert plan.events == ()


def test_a_claim_being_deleted_holds_its_ordinal_back() -> None:
    assert capped_replicas(3, (), (claim(2, deleting=True),)) == 2
    assert capped_replicas(3, (), (claim(3, deleting=True),)) == 3
    # Jobs of removed ordinals hold nothing back.
    assert capped_replicas(2, (job(2), job(3)), ()) == 2


def test_pods_are_listed_only_when_a_removed_ordinal_is_in_play() -> None:
    assert not wants_pod_list(2, (claim(0), claim(1)), (), 2)
    assert wants_pod_list(2, (claim(0), claim(1), claim(2)), (), 2)
    assert wants_pod_list(1, (claim(0),), (), 2)  # a pod of a removed ordinal still counted
    # A volume already in a drain's hands (or kept as drained) needs no pod list.
    assert not wants_pod_list(2, (claim(0), claim(1), claim(2)), (job(2, "succeeded"),), 2)


# --- the Job -------------------------------------------------------------------------------


def _relay(**spec: Any) -> RelayInputs:
    body = {
        "replicas": 1,
        "auth": {"required": False},
        "allowedNetworks": ["10.0.0.0/8"],
        "podAnnotations": {"sidecar.istio.io/inject": "false"},
        "podLabels": {"team": "mail"},
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}},
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": []},
        },
        **spec,
    }
    return RelayInputs("outbound", "mail", "uid-1", models.MailRelaySpec.model_validate(body))


def test_the_drain_job_runs_the_relay_pod_spec_on_the_orphan_volume() -> None:
    relay = _relay()
    sts = render_statefulset(relay, restart_hash="abc", mounts=(), settings=SETTINGS)
    job_body = render_drain_job(relay, 2, 3, sts, SETTINGS)
    relay_pod = sts["spec"]["template"]["spec"]
    meta = job_body["metadata"]
    assert meta["name"] == "outbound-drain-2"
    assert meta["labels"]["mailrelay.dev/drain-ordinal"] == "2"
    assert meta["labels"]["app.kubernetes.io/component"] == "drain"
    assert meta["annotations"]["mailrelay.dev/drain-attempt"] == "3"
    assert meta["ownerReferences"][0]["uid"] == "uid-1"
    # What the index reads back is what was rendered.
    found = drain_job({**job_body, "status": {}})
    assert found is not None and (found[0], found[1].ordinal, found[1].attempt) == (
        "outbound",
        2,
        3,
    )
    spec = job_body["spec"]
    assert spec["backoffLimit"] == 1
    assert spec["activeDeadlineSeconds"] == 60 + 60 + 120
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    (relay_container,) = relay_pod["containers"]
    assert container["args"] == ["--config", "/etc/mailrelay/config/relay.yaml", "drain"]
    assert container["command"] == relay_container["command"]
    assert container["image"] == relay_container["image"] == "registry.test/mailrelay:1"
    assert container["securityContext"] == relay_container["securityContext"]
    assert container["volumeMounts"] == relay_container["volumeMounts"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert not {"ports", "readinessProbe", "livenessProbe", "lifecycle"} & container.keys()
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == relay_pod["securityContext"]
    assert pod["serviceAccountName"] == relay_pod["serviceAccountName"] == "outbound-relay"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spool"] == {
        "name": "spool",
        "persistentVolumeClaim": {"claimName": "spool-outbound-2"},
    }
    assert volumes["config"] == {"name": "config", "configMap": {"name": "outbound-config"}}
    assert pod["affinity"] == {"nodeAffinity": relay.spec.affinity["nodeAffinity"]}  # type: ignore[index]
    # Its pods are selected by no Service or PDB of the relay.
    pod_labels = spec["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/name"] == "mailrelay-drain"
    assert pod_labels["team"] == "mail"
    selector = sts["spec"]["selector"]["matchLabels"]
    assert not all(pod_labels.get(k) == v for k, v in selector.items())
    assert spec["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [3] and rules[0]["action"] == "FailJob"
    # The StatefulSet it was made from is not changed.
    assert "drain" not in json.dumps(sts["spec"]["template"]["spec"]["containers"][0]["args"])


# --- the hand-off token --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cached", "version", "checked", "expected"),
    [
        (None, "", None, "check"),  # absent from the cache: look (then create)
        (frozenset({"token"}), "41", None, "check"),  # not yet checked: owner and key
        (frozenset({"token"}), "41", "41", "none"),  # checked at this version: no request
        (frozenset({"token"}), "42", "41", "check"),  # changed since
        (frozenset(), "41", None, "check"),
    ],
)
def test_the_handoff_secret_costs_a_request_only_when_the_cache_cannot_tell(
    cached: frozenset[str] | None, version: str, checked: str | None, expected: str
) -> None:
    assert handoff_secret_action(cached, version, checked) == expected


def test_tokens_are_32_random_bytes_and_rendered_into_the_secret() -> None:
    first, second = new_token(), new_token()
    assert first != second
    assert len(base64.urlsafe_b64decode(first)) == 32
    secret = render_handoff_secret(_relay(), first, "mailrelay.dev/watch=true,tier==mail")
    assert secret["metadata"]["name"] == "outbound-handoff"
    assert secret["metadata"]["labels"]["mailrelay.dev/watch"] == "true"
    assert secret["metadata"]["labels"]["tier"] == "mail"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert base64.b64decode(secret["data"]["token"]).decode() == first
