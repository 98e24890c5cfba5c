"""Spool volumes left behind by a scale-down: find them, drain them with a Job, then delete them.

A relay pod that leaves hands its queue to the ready pods (the relay's hand-off); what it
could not hand off within its grace period stays on its spool volume, the PVC
``spool-<relay>-<ordinal>`` of the StatefulSet's volume claim template (kept by
``whenScaled: Retain``). Such a PVC, with an ordinal at or above ``spec.replicas`` and no pod
of that ordinal, is an orphan: the operator runs the Job ``<relay>-drain-<ordinal>`` (the
relay's own pod spec, ``python -m mailrelay.relay ... drain``, that PVC mounted at the spool
path), and once it succeeded deletes the PVC, unless ``spec.queue.onScaleDown`` keeps it.
docs/scaling.md describes what the user sees.

Gather, decide, act:

* gather: the relay's PVCs and drain Jobs from the watch indices (``spool_claim``,
  ``drain_job`` turn a watched object into its entry), the ordinals of its live pods (one
  list, only when a PVC of a removed ordinal exists), the drain reports of finished Jobs
  (their pod's termination message, read once per Job);
* decide (``plan_drains``, pure): which Jobs to create, stop or delete, which PVCs to delete,
  how many pods the StatefulSet may run while a drain is stopped, the ``Draining`` condition
  and the Events;
* act (``act``): the writes, each tolerant of a cache that lags (404, 409).

Two writers never share a spool: a Job starts only when no pod of its ordinal exists and the
StatefulSet controller has seen the scaled-down spec; a scale-up over an ordinal being
drained first stops its Job (foreground deletion: the Job goes only after its pod) and keeps
the StatefulSet below that ordinal until the Job is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from lightkube import ApiError, AsyncClient
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import PersistentVolumeClaim, Pod
from lightkube.types import CascadeType

from mailrelay.operator.conditions import ConditionUpdate, format_time
from mailrelay.operator.relay_config import CONFIG_DIR, CONFIG_KEY
from mailrelay.operator.render import (
    DRAIN_COMPONENT,
    RelayInputs,
    drain_pod_labels,
    labels,
    owner_reference,
    selector_labels,
)
from mailrelay.operator.settings import OperatorSettings
from mailrelay.operator.state import retry_delay

log = logging.getLogger(__name__)

DRAINING = "Draining"
# The StatefulSet's volume claim template (render.py): its PVCs are <template>-<sts>-<n>.
SPOOL_TEMPLATE = "spool"
ORDINAL_LABEL = "mailrelay.dev/drain-ordinal"
ATTEMPT_ANNOTATION = "mailrelay.dev/drain-attempt"
CLAIM_ANNOTATION = "mailrelay.dev/drain-claim"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
DRAIN_CONTAINER = "drain"
# The drain's exit code when mail is left on the volume (the relay's contract).
EXIT_MAIL_REMAINS = 3
# A drain Job's pod is retried once by the Job controller (a crash, a lost node); a drain
# that failed is tried again by the operator after 30 s, doubling, at most every 10 min.
JOB_BACKOFF_LIMIT = 1
RETRY_FIRST_SECONDS = 30.0
RETRY_MAX_SECONDS = 600.0
# Start-up and the dead-letter pass after the drain's own deadline.
JOB_DEADLINE_MARGIN_SECONDS = 120

Propagation = Literal["Foreground", "Background"]
JobState = Literal["running", "succeeded", "failed"]


def spool_claim_name(relay: str, ordinal: int) -> str:
    return f"{SPOOL_TEMPLATE}-{relay}-{ordinal}"


def drain_job_name(relay: str, ordinal: int) -> str:
    return f"{relay}-drain-{ordinal}"


def job_deadline_seconds(settings: OperatorSettings) -> int:
    """A drain Job's activeDeadlineSeconds: the relay's hand-off/delivery deadline, the time
    deliveries in flight get to finish, and a margin for start-up and dead-lettering."""
    return settings.handoff_seconds + settings.drain_seconds + JOB_DEADLINE_MARGIN_SECONDS


# --- gather: index entries ---------------------------------------------------------------


@dataclass(frozen=True)
class SpoolClaim:
    """A spool PVC of a relay, as the watch cache keeps it."""

    name: str
    uid: str
    ordinal: int
    deleting: bool = False


@dataclass(frozen=True)
class DrainJob:
    """A drain Job, as the watch cache keeps it."""

    name: str
    uid: str
    ordinal: int
    attempt: int
    state: JobState
    finished_at: datetime | None = None
    # Its pod may still run (not finished, or pods active or terminating): no second writer.
    pods_may_run: bool = True
    deleting: bool = False


def _ordinal(text: str) -> int | None:
    return int(text) if re.fullmatch(r"0|[1-9][0-9]{0,3}", text) else None


def spool_claim(body: Mapping[str, Any]) -> tuple[str, SpoolClaim] | None:
    """The relay a PVC belongs to and its entry, or None when it is no relay's spool volume.

    The StatefulSet names its PVCs ``spool-<relay>-<ordinal>`` and labels them with the
    template's labels (``app.kubernetes.io/instance: <relay>``): both must agree.
    """
    metadata = body.get("metadata") or {}
    relay = (metadata.get("labels") or {}).get("app.kubernetes.io/instance")
    name = str(metadata.get("name") or "")
    prefix = f"{SPOOL_TEMPLATE}-{relay}-"
    if not relay or not name.startswith(prefix):
        return None
    ordinal = _ordinal(name.removeprefix(prefix))
    if ordinal is None:
        return None
    return str(relay), SpoolClaim(
        name=name,
        uid=str(metadata.get("uid") or ""),
        ordinal=ordinal,
        deleting=metadata.get("deletionTimestamp") is not None,
    )


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def drain_job(body: Mapping[str, Any]) -> tuple[str, DrainJob] | None:
    """The relay a drain Job belongs to and its entry, or None for any other Job."""
    metadata = body.get("metadata") or {}
    job_labels = metadata.get("labels") or {}
    relay = job_labels.get("app.kubernetes.io/instance")
    ordinal = _ordinal(str(job_labels.get(ORDINAL_LABEL, "")))
    if (
        not relay
        or ordinal is None
        or job_labels.get("app.kubernetes.io/component") != (DRAIN_COMPONENT)
    ):
        return None
    status = body.get("status") or {}
    state: JobState = "running"
    finished_at = None
    for cond in status.get("conditions") or ():
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            state, finished_at = "succeeded", _time(cond.get("lastTransitionTime"))
        elif cond.get("type") == "Failed":
            state, finished_at = "failed", _time(cond.get("lastTransitionTime"))
    if state != "running" and finished_at is None:
        finished_at = _time(status.get("completionTime")) or _time(status.get("startTime"))
    busy = int(status.get("active") or 0) + int(status.get("terminating") or 0)
    attempt_text = str((metadata.get("annotations") or {}).get(ATTEMPT_ANNOTATION, "1"))
    return str(relay), DrainJob(
        name=str(metadata.get("name") or ""),
        uid=str(metadata.get("uid") or ""),
        ordinal=ordinal,
        attempt=int(attempt_text) if attempt_text.isdigit() else 1,
        state=state,
        finished_at=finished_at,
        pods_may_run=state == "running" or busy > 0,
        deleting=metadata.get("deletionTimestamp") is not None,
    )


@dataclass(frozen=True)
class DrainReport:
    """What a finished drain said it did (its JSON line, the pod's termination message)."""

    handed_off: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    remaining: int = 0

    def words(self) -> str:
        return (
            f"{self.handed_off} handed off, {self.delivered} delivered, "
            f"{self.dead_lettered} dead-lettered, {self.remaining} left"
        )


def parse_report(message: str) -> DrainReport | None:
    """The last JSON line of a termination message that carries the drain's counts."""
    for line in reversed(message.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "remaining" in data:
            counts = {
                key: data.get(key)
                for key in ("handed_off", "delivered", "dead_lettered", "remaining")
            }
            if all(isinstance(v, int) and v >= 0 for v in counts.values()):
                return DrainReport(**cast(dict[str, int], counts))
    return None


def report_of_pods(pods: Iterable[Mapping[str, Any]]) -> DrainReport | None:
    """The report of the latest finished drain container among a Job's pods."""
    found: list[tuple[str, DrainReport]] = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or ():
            if status.get("name") != DRAIN_CONTAINER:
                continue
            terminated = (status.get("state") or {}).get("terminated") or {}
            report = parse_report(str(terminated.get("message") or ""))
            if report is not None:
                found.append((str(terminated.get("finishedAt") or ""), report))
    return max(found, key=lambda item: item[0])[1] if found else None


# --- decide --------------------------------------------------------------------------------


def capped_replicas(
    replicas: int, jobs: Collection[DrainJob], claims: Collection[SpoolClaim]
) -> int:
    """How many pods the StatefulSet may run: below every ordinal that still has a drain Job
    or whose PVC is being deleted.

    A user who scales back up over an ordinal being drained gets that pod only once the
    drain Job (and its pod) is gone: the pod reuses the PVC, never two writers. A drained PVC
    on its way out is left to go first, so the pod gets a fresh one rather than a volume
    deleted under it.
    """
    blocking = [job.ordinal for job in jobs if job.ordinal < replicas]
    blocking += [claim.ordinal for claim in claims if claim.ordinal < replicas and claim.deleting]
    return min([replicas, *blocking])


def wants_pod_list(
    replicas: int,
    claims: Collection[SpoolClaim],
    jobs: Collection[DrainJob],
    sts_replicas: int,
) -> bool:
    """Whether the pass must know which pods exist: a PVC of a removed ordinal without a
    drain Job, or pods of removed ordinals still counted by the StatefulSet."""
    drained = {job.ordinal for job in jobs}
    return sts_replicas > replicas or any(
        claim.ordinal >= replicas and claim.ordinal not in drained for claim in claims
    )


def pod_ordinal(relay: str, pod_name: str) -> int | None:
    prefix = f"{relay}-"
    return _ordinal(pod_name.removeprefix(prefix)) if pod_name.startswith(prefix) else None


@dataclass(frozen=True)
class DrainInputs:
    """Everything ``plan_drains`` decides from."""

    relay: str
    replicas: int
    policy: Literal["Drain", "DrainAndRetain", "Retain"]
    claims: tuple[SpoolClaim, ...]
    jobs: tuple[DrainJob, ...]
    # Ordinals of the relay's pods that exist (None: not listed, as no PVC needs it).
    pod_ordinals: frozenset[int] | None
    # The StatefulSet controller has seen the spec this pass rendered (replicas included).
    statefulset_settled: bool
    ready_pods: int
    now: datetime
    # The attempt of each ordinal's last drain (operator memory), for the retry backoff.
    attempts: Mapping[int, int] = field(default_factory=dict)
    # Reports of finished Jobs by uid (None: the Job's pod said nothing readable).
    reports: Mapping[str, DrainReport | None] = field(default_factory=dict)
    # Uids of the finished Jobs whose outcome has been told in an Event.
    told: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str
    # The ordinal whose Job this Event announces (told only if the Job was created).
    created: int | None = None


@dataclass(frozen=True)
class DrainPlan:
    """The writes of one pass, and what the status says."""

    create: tuple[tuple[int, int], ...] = ()  # (ordinal, attempt)
    delete_jobs: tuple[tuple[str, str, Propagation], ...] = ()  # (name, uid, propagation)
    delete_claims: tuple[tuple[str, str], ...] = ()  # (name, uid)
    events: tuple[Event, ...] = ()
    # Finished Jobs whose Event this pass posts (so it is told once).
    told: tuple[str, ...] = ()
    attempts: Mapping[int, int] = field(default_factory=dict)
    condition: ConditionUpdate | None = None
    # Something waits on time or on pods leaving: look again at the next resync.
    recheck: bool = False


def plan_drains(inputs: DrainInputs) -> DrainPlan:
    """Decide what to do about the relay's spool volumes of removed ordinals (pure)."""
    replicas = inputs.replicas
    claims = {claim.ordinal: claim for claim in inputs.claims}
    create: list[tuple[int, int]] = []
    delete_jobs: list[tuple[str, str, Propagation]] = []
    delete_claims: list[tuple[str, str]] = []
    events: list[Event] = []
    told: list[str] = []
    attempts = dict(inputs.attempts)
    draining = drained = failed = waiting = stopping = kept = 0
    recheck = False
    retry_at: datetime | None = None
    with_job: set[int] = set()

    for job in sorted(inputs.jobs, key=lambda j: j.ordinal):
        with_job.add(job.ordinal)
        claim = claims.get(job.ordinal)
        if job.deleting:
            if job.pods_may_run:
                stopping += 1
            continue
        if job.ordinal < replicas:
            # Scaled back up over it: the pod takes its volume back once the drain is gone.
            if job.pods_may_run:
                stopping += 1
                delete_jobs.append((job.name, job.uid, "Foreground"))
                events.append(
                    Event(
                        "Normal",
                        "DrainStopped",
                        f"Stopped drain Job {job.name}: spec.replicas is {replicas} again, so "
                        f"pod {inputs.relay}-{job.ordinal} takes its spool volume back once "
                        "the drain's pod is gone.",
                    )
                )
            else:
                delete_jobs.append((job.name, job.uid, "Background"))
            attempts.pop(job.ordinal, None)
            continue
        if job.state == "running":
            draining += 1
            continue
        report = inputs.reports.get(job.uid)
        if job.state == "succeeded":
            attempts.pop(job.ordinal, None)
            dead = report.dead_lettered if report is not None else 0
            # No report read: whether it dead-lettered mail onto the volume is unknown.
            keep = inputs.policy != "Drain" or dead > 0 or report is None
            if job.uid not in inputs.told:
                told.append(job.uid)
                events.append(_succeeded_event(inputs, job, report, keep=keep, dead=dead))
                if dead:
                    events.append(_dead_letter_event(inputs, job, dead))
            if claim is None:
                delete_jobs.append((job.name, job.uid, "Background"))  # its record is moot
            elif claim.deleting:
                # Its finished pod still names the PVC, and the pvc-protection finalizer
                # keeps a PVC any scheduled pod names (Succeeded ones included): the Job
                # and its pod go, or the PVC stays Terminating for ever (and, below the
                # StatefulSet's replicas, would hold its ordinal back).
                drained += 1
                delete_jobs.append((job.name, job.uid, "Background"))
            elif keep:
                drained += 1
                kept += 1  # the Job stays as the record that this volume was drained
            else:
                drained += 1
                delete_claims.append((claim.name, claim.uid))
                delete_jobs.append((job.name, job.uid, "Background"))  # see just above
            continue
        # Failed: told once, retried after a backoff per attempt.
        if job.uid not in inputs.told:
            told.append(job.uid)
            remains = f" ({report.words()})" if report is not None else ""
            events.append(
                Event(
                    "Warning",
                    "DrainFailed",
                    f"Drain Job {job.name} (attempt {job.attempt}) of PVC "
                    f"{spool_claim_name(inputs.relay, job.ordinal)} failed{remains}; the mail "
                    "stays on the volume and the drain is retried. kubectl logs job/"
                    f"{job.name} says why.",
                )
            )
        due = (job.finished_at or inputs.now) + timedelta(
            seconds=retry_delay(job.attempt, RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS)
        )
        if job.pods_may_run:
            # Its pod is still stopping: no second drain on the volume until it is gone.
            waiting += 1
        elif claim is None:
            delete_jobs.append((job.name, job.uid, "Background"))
        elif inputs.now >= due:
            attempts[job.ordinal] = job.attempt
            delete_jobs.append((job.name, job.uid, "Background"))
            waiting += 1
        else:
            failed += 1
            retry_at = due if retry_at is None else min(retry_at, due)
        recheck = True

    leaving = sorted(o for o in inputs.pod_ordinals or () if o >= replicas)
    for ordinal in sorted(claims):
        claim = claims[ordinal]
        if ordinal < replicas or ordinal in with_job or claim.deleting:
            continue
        if inputs.policy == "Retain":
            kept += 1
            continue
        if inputs.pod_ordinals is None:
            waiting += 1  # not known whether its pod is gone
            continue
        if ordinal in inputs.pod_ordinals:
            continue  # its pod is leaving (counted above): it hands off first
        if not inputs.statefulset_settled or (replicas > 0 and inputs.ready_pods == 0):
            # Wait for the StatefulSet controller to see the scale-down, or for a ready pod
            # to hand the mail to (a drain without peers would deliver it or dead-letter it).
            waiting += 1
            continue
        attempt = attempts.get(ordinal, 0) + 1
        create.append((ordinal, attempt))
        draining += 1
        events.append(
            Event(
                "Normal",
                "DrainStarted",
                f"Started drain Job {drain_job_name(inputs.relay, ordinal)} for PVC "
                f"{claim.name} of removed pod {inputs.relay}-{ordinal}"
                + (f" (attempt {attempt})" if attempt > 1 else "")
                + ".",
                created=ordinal,
            )
        )
    recheck = recheck or bool(leaving) or waiting > 0 or stopping > 0
    condition = _condition(
        inputs,
        draining=draining,
        drained=drained,
        failed=failed,
        waiting=waiting,
        leaving=len(leaving),
        stopping=stopping,
        kept=kept,
        retry_at=retry_at,
    )
    return DrainPlan(
        create=tuple(create),
        delete_jobs=tuple(delete_jobs),
        delete_claims=tuple(delete_claims),
        events=tuple(events),
        told=tuple(told),
        attempts=attempts,
        condition=condition,
        recheck=recheck,
    )


def _succeeded_event(
    inputs: DrainInputs, job: DrainJob, report: DrainReport | None, *, keep: bool, dead: int
) -> Event:
    claim = spool_claim_name(inputs.relay, job.ordinal)
    said = f" ({report.words()})" if report is not None else ""
    if dead:
        after = "kept: it holds the dead letters (queue dead show / retry)"
    elif keep:
        after = f"kept (spec.queue.onScaleDown: {inputs.policy})"
    else:
        after = "deleted"
    return Event(
        "Normal", "DrainSucceeded", f"Drained PVC {claim} with Job {job.name}{said}; PVC {after}."
    )


def _dead_letter_event(inputs: DrainInputs, job: DrainJob, dead: int) -> Event:
    why = (
        "spec.replicas is 0, so no relay pod could take them"
        if inputs.replicas == 0
        else "no ready relay pod could take them"
    )
    return Event(
        "Warning",
        "MailDeadLettered",
        f"Drain Job {job.name} dead-lettered {dead} message(s) of PVC "
        f"{spool_claim_name(inputs.relay, job.ordinal)}: {why}, and the upstreams did not "
        "accept them before the drain's deadline. Their senders got a bounce where one could "
        "be sent; the messages stay in the volume's dead letters, which is kept.",
    )


def _condition(
    inputs: DrainInputs,
    *,
    draining: int,
    drained: int,
    failed: int,
    waiting: int,
    leaving: int,
    stopping: int,
    kept: int,
    retry_at: datetime | None,
) -> ConditionUpdate:
    counts = (
        f"{leaving} removed pod(s) leaving, {draining} volume(s) draining, {drained} drained, "
        f"{failed} failed, {waiting} waiting"
    )
    if stopping:
        counts += f", {stopping} drain(s) stopping for a scale-up"
    if failed:
        assert retry_at is not None
        return ConditionUpdate(
            DRAINING,
            "True",
            "DrainFailed",
            f"{counts}. The next try starts at {format_time(retry_at)}; see the DrainFailed "
            "Events.",
        )
    if stopping:
        return ConditionUpdate(DRAINING, "True", "DrainStopping", f"{counts}.")
    if draining:
        return ConditionUpdate(DRAINING, "True", "DrainJobsRunning", f"{counts}.")
    if leaving:
        return ConditionUpdate(
            DRAINING,
            "True",
            "PodsLeaving",
            f"{counts}. Leaving pods hand their queue to the ready pods.",
        )
    if waiting:
        return ConditionUpdate(
            DRAINING,
            "True",
            "WaitingToDrain",
            f"{counts}. A drain starts once the removed pod is gone, the StatefulSet has "
            "scaled down and a relay pod is ready to take the mail.",
        )
    if inputs.policy == "Retain" and kept:
        return ConditionUpdate(
            DRAINING,
            "False",
            "VolumesRetained",
            f"{kept} spool volume(s) of removed pods kept undrained "
            "(spec.queue.onScaleDown: Retain): their mail is sent when the relay scales back "
            "up.",
        )
    if kept:
        return ConditionUpdate(
            DRAINING,
            "False",
            "Drained",
            f"Every volume of a removed pod is drained; {kept} kept (their drain Jobs stay as "
            "the record until the PVCs are deleted).",
        )
    return ConditionUpdate(
        DRAINING, "False", "NothingToDrain", "No spool volume of a removed pod holds mail."
    )


# --- render ----------------------------------------------------------------------------------


def render_drain_job(
    relay: RelayInputs,
    ordinal: int,
    attempt: int,
    statefulset: Mapping[str, Any],
    settings: OperatorSettings,
) -> dict[str, Any]:
    """The drain Job of one ordinal (pure): the relay pod's own spec (image, security
    context, config, Secrets, ServiceAccount) from the rendered StatefulSet, running the
    drain on the PVC ``spool-<relay>-<ordinal>`` mounted at the spool path.

    Its pods carry labels no Service or PDB of the relay selects (``drain_pod_labels``), no
    probes and no ports: they serve nobody. ``FallbackToLogsOnError``: a drain that exits
    with an error and wrote no termination message still reports its JSON line.
    """
    template = json.loads(json.dumps(statefulset["spec"]["template"]))
    pod = template["spec"]
    (relay_container,) = pod["containers"]
    claim = spool_claim_name(relay.name, ordinal)
    container = {
        key: value
        for key, value in relay_container.items()
        if key not in ("ports", "readinessProbe", "livenessProbe", "lifecycle", "args", "name")
    }
    container.update(
        name=DRAIN_CONTAINER,
        args=["--config", f"{CONFIG_DIR}/{CONFIG_KEY}", "drain"],
        terminationMessagePolicy="FallbackToLogsOnError",
    )
    pod.update(containers=[container], restartPolicy="Never")
    pod["volumes"] = [
        *pod["volumes"],
        {"name": SPOOL_TEMPLATE, "persistentVolumeClaim": {"claimName": claim}},
    ]
    pod.pop("topologySpreadConstraints", None)
    affinity = pod.pop("affinity", None)
    if isinstance(affinity, dict) and affinity.get("nodeAffinity"):
        # Only where it may run; the relay pods' (anti-)affinity to each other is not its own.
        pod["affinity"] = {"nodeAffinity": affinity["nodeAffinity"]}
    pod_metadata: dict[str, Any] = {"labels": {**relay.spec.pod_labels, **drain_pod_labels(relay)}}
    if relay.spec.pod_annotations:
        # The user's (sidecar opt-outs, workload identity), never the operator's restart hash.
        pod_metadata["annotations"] = dict(relay.spec.pod_annotations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": drain_job_name(relay.name, ordinal),
            "namespace": relay.namespace,
            "labels": {**labels(relay, DRAIN_COMPONENT), ORDINAL_LABEL: str(ordinal)},
            "annotations": {ATTEMPT_ANNOTATION: str(attempt), CLAIM_ANNOTATION: claim},
            "ownerReferences": [owner_reference(relay)],
        },
        "spec": {
            "backoffLimit": JOB_BACKOFF_LIMIT,
            "activeDeadlineSeconds": job_deadline_seconds(settings),
            "podFailurePolicy": {
                "rules": [
                    # Mail left on the volume: the operator retries with its own backoff.
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": DRAIN_CONTAINER,
                            "operator": "In",
                            "values": [EXIT_MAIL_REMAINS],
                        },
                    },
                    # An eviction (a node drain) is no failure of the drain.
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
            "template": {"metadata": pod_metadata, "spec": pod},
        },
    }


# --- act -------------------------------------------------------------------------------------


async def pod_ordinals(client: AsyncClient, relay: RelayInputs) -> frozenset[int]:
    """Ordinals of the relay's pods that exist (terminating ones too)."""
    found = set()
    selector: dict[str, Any] = dict(selector_labels(relay))
    async for pod in client.list(Pod, namespace=relay.namespace, labels=selector):
        ordinal = pod_ordinal(relay.name, str(pod.metadata.name if pod.metadata else ""))
        if ordinal is not None:
            found.add(ordinal)
    return frozenset(found)


async def read_report(client: AsyncClient, namespace: str, job: str) -> DrainReport | None:
    """The drain report of a finished Job, from its pods' termination messages."""
    pods = [
        pod.to_dict()
        async for pod in client.list(
            Pod, namespace=namespace, labels=cast(dict[str, Any], {JOB_NAME_LABEL: job})
        )
    ]
    return report_of_pods(pods)


@dataclass(frozen=True)
class ActOutcome:
    """What the writes of a plan did; ``failures`` in words (empty: all done)."""

    created: tuple[int, ...]
    failures: tuple[str, ...]


async def act(
    client: AsyncClient,
    relay: RelayInputs,
    plan: DrainPlan,
    statefulset: Mapping[str, Any],
    settings: OperatorSettings,
) -> ActOutcome:
    """Carry out the plan: Job deletions first (a retry re-creates the name), then PVC
    deletions and Job creations. A 404 or 409 means the cache lagged: the next pass sees."""
    failures: list[str] = []
    ns = relay.namespace
    for name, uid, propagation in plan.delete_jobs:
        try:
            await client.delete(
                Job,
                name,
                namespace=ns,
                grace_period=None,
                cascade=_cascade(propagation),
            )
        except ApiError as error:
            if error.status.code not in (404, 409):
                failures.append(f"deleting Job {name}: {error.status.message}")
                continue
        log.info("Deleted drain Job %s/%s (%s, uid %s)", ns, name, propagation, uid)
    for name, uid in plan.delete_claims:
        try:
            await client.delete(PersistentVolumeClaim, name, namespace=ns)
        except ApiError as error:
            if error.status.code not in (404, 409):
                failures.append(f"deleting PVC {name}: {error.status.message}")
                continue
        log.info("Deleted drained PVC %s/%s (uid %s)", ns, name, uid)
    created = []
    for ordinal, attempt in plan.create:
        body = render_drain_job(relay, ordinal, attempt, statefulset, settings)
        try:
            await client.create(cast(Job, Job.from_dict(body)))
        except ApiError as error:
            if error.status.code != 409:
                failures.append(f"creating Job {body['metadata']['name']}: {error.status.message}")
            continue
        created.append(ordinal)
        log.info("Created drain Job %s/%s (attempt %d)", ns, body["metadata"]["name"], attempt)
    return ActOutcome(tuple(created), tuple(failures))


def _cascade(propagation: Propagation) -> CascadeType:
    return CascadeType.FOREGROUND if propagation == "Foreground" else CascadeType.BACKGROUND
