"""Scale-down, eviction, rollouts and HPA on real pods: no queued message is stranded or lost.

Mail is put on chosen pods with the SMTP upstream *down* (its listener closed, see
hack/peers.py), so it sits queued on those pods' spools when they leave; then the upstream
comes back and every message that got a 250 must arrive. Arrivals are counted by
Message-ID at the upstream, so duplicates are counted (and printed) too.

What each test forces:
- scale 3 -> 1 through the scale subresource: the removed pods hand their queues to pod 0;
- a leaving pod SIGKILLed in the middle of its hand-off, and the receiving pod SIGKILLed
  too: what was not handed off stays on the removed pod's PVC and the drain Job takes it;
- a leaving pod SIGKILLed before it could hand anything off (the grace period running out):
  the drain Job hands the whole PVC on and the PVC is deleted after;
- evictions through the Eviction API (the PDB refuses the second one) and a rolling update
  on a config change, both under load;
- an autoscaling/v2 HPA driving the MailRelay through its scale subresource.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailrelay.support import incluster
from mailrelay.support.localnode import NODE_IP, LocalNode
from tests.cluster.conftest import apply_relay, load_log, start_load, wait_accepted

pytestmark = [pytest.mark.node, pytest.mark.slow]

RELAY = incluster.RELAY
SENDER = "billing@billing.demo.test"
EXEMPT = [f"{NODE_IP}/32"]  # the test sends from the node straight to pods


# --- helpers ---------------------------------------------------------------------------------


def wait_for(
    what: str, probe: Callable[[], bool], within: float = 180, every: float = 0.5
) -> float:
    """Seconds until `probe()` holds; fail naming `what` after `within` seconds."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        if probe():
            return time.monotonic() - began
        time.sleep(every)
    raise AssertionError(f"{what} did not happen within {within:.0f} s")


def get_json(node: LocalNode, namespace: str, *what: str) -> dict[str, Any]:
    result = node.kubectl("get", *what, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return {}
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def relay_pod(node: LocalNode, namespace: str, ordinal: int) -> dict[str, Any]:
    return get_json(node, namespace, "pod", f"{RELAY}-{ordinal}")


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def claims(node: LocalNode, namespace: str) -> set[str]:
    items = get_json(node, namespace, "pvc").get("items", [])
    return {item["metadata"]["name"] for item in items}


def kill_container(node: LocalNode, pod: dict[str, Any]) -> None:
    """SIGKILL the relay container's process (containerd's task), as kubelet does when the
    grace period runs out."""
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    ctr = [str(node.node_bin / "ctr"), "--address", str(node.containerd_socket), "-n", "k8s.io"]
    subprocess.run([*ctr, "tasks", "kill", "--signal", "SIGKILL", container_id], check=False)


def scale(node: LocalNode, namespace: str, replicas: int) -> None:
    """`kubectl scale` through the MailRelay's scale subresource."""
    node.kubectl("scale", "-n", namespace, f"mailrelay/{RELAY}", f"--replicas={replicas}")


def statefulset_replicas(node: LocalNode, namespace: str) -> int:
    return int(get_json(node, namespace, "statefulset", RELAY).get("spec", {}).get("replicas", -1))


def fill_pods(
    node: LocalNode,
    namespace: str,
    ca_file: str,
    plan: dict[int, int],
    tag: str,
    *,
    size: int = 512,
) -> list[str]:
    """Send `plan[ordinal]` messages of about `size` bytes straight to each relay pod; the
    ids that got a 250."""
    accepted: list[str] = []
    for ordinal, count in plan.items():
        address = relay_pod(node, namespace, ordinal)["status"]["podIP"]
        ids = [f"<{tag}-{ordinal}-{i}@billing.demo.test>" for i in range(count)]
        accepted += incluster.send_to_pod(address, ca_file, ids, size=size)
    return accepted


def wait_queued(address: str, at_least: int) -> None:
    wait_for(
        f"{at_least} messages queued on {address}",
        lambda: incluster.metric_value(address, "mailrelay_queue_depth") >= at_least,
        within=60,
    )


def wait_arrived(
    node: LocalNode, namespace: str, accepted: list[str], within: float = 300
) -> Counter[str]:
    """Until every accepted Message-ID reached the upstream; the arrivals counted by id."""
    wanted = set(accepted)
    arrivals: Counter[str] = Counter()

    def all_there() -> bool:
        nonlocal arrivals
        arrivals = Counter(incluster.received_ids(node, namespace))
        return wanted <= set(arrivals)

    try:
        wait_for("every accepted message arriving", all_there, within=within, every=2)
    except AssertionError:
        missing = sorted(wanted - set(arrivals))
        raise AssertionError(
            f"{len(missing)} of {len(wanted)} accepted messages never arrived, e.g. {missing[:5]}"
        ) from None
    return arrivals


def duplicates(arrivals: Counter[str]) -> int:
    return sum(n - 1 for n in arrivals.values() if n > 1)


def wait_claims_gone(node: LocalNode, namespace: str, names: set[str], within: float) -> float:
    return wait_for(
        f"PVCs {sorted(names)} deleted",
        lambda: not (claims(node, namespace) & names),
        within=within,
        every=1,
    )


def condition(node: LocalNode, namespace: str, kind: str) -> dict[str, Any]:
    relay = get_json(node, namespace, "mailrelay", RELAY)
    found = [c for c in relay.get("status", {}).get("conditions", []) if c["type"] == kind]
    return found[0] if found else {}


class JobWatch:
    """Drain Jobs seen while waiting (they may be gone by the time the wait is over)."""

    def __init__(self, node: LocalNode, namespace: str) -> None:
        self.node, self.namespace = node, namespace
        self.seen: set[str] = set()
        self.draining_seen = False
        self.results: dict[str, str] = {}

    def poll(self) -> None:
        jobs = get_json(self.node, self.namespace, "jobs").get("items", [])
        for job in jobs:
            name = job["metadata"]["name"]
            if not name.startswith(f"{RELAY}-drain-"):
                continue
            self.seen.add(name)
            if job.get("status", {}).get("succeeded") and name not in self.results:
                log = self.node.kubectl(
                    "logs", f"job/{name}", "-n", self.namespace, check=False
                ).stdout
                lines = [line for line in log.splitlines() if line.startswith("{")]
                self.results[name] = lines[-1] if lines else log[-500:]
        if condition(self.node, self.namespace, "Draining").get("status") == "True":
            self.draining_seen = True


@pytest.fixture
def ca_file(upstreams: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    upstreams.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def relay3(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> Iterator[str]:
    """Three relay pods, all Ready (the node may reach them directly: no per-client limits)."""
    apply_relay(node, node_namespace, upstreams, replicas=3, exempt_networks=EXEMPT)
    yield node_namespace


# --- tests -----------------------------------------------------------------------------------


def test_scale_3_to_1_hands_every_queued_message_to_the_remaining_pod(
    node: LocalNode, relay3: str, ca_file: str
) -> None:
    namespace = relay3
    incluster.set_upstream(node, namespace, up=False)
    accepted = fill_pods(node, namespace, ca_file, {0: 20, 1: 150, 2: 150}, "scale")
    assert len(accepted) == 320
    for ordinal, count in ((1, 150), (2, 150)):
        wait_queued(relay_pod(node, namespace, ordinal)["status"]["podIP"], count)
    uid = relay_pod(node, namespace, 0)["metadata"]["uid"]
    removed = {f"spool-{RELAY}-1", f"spool-{RELAY}-2"}
    assert removed <= claims(node, namespace)

    began = time.monotonic()
    scale(node, namespace, 1)
    wait_for("the StatefulSet scaled to 1", lambda: statefulset_replicas(node, namespace) == 1)
    wait_for(
        "pods 1 and 2 gone",
        lambda: not relay_pod(node, namespace, 1) and not relay_pod(node, namespace, 2),
        within=240,
    )
    pods_gone = time.monotonic() - began
    address = relay_pod(node, namespace, 0)["status"]["podIP"]
    print(
        f"\nscale 3 -> 1: pods 1 and 2 gone after {pods_gone:.1f} s; pod 0 holds "
        f"{incluster.metric_value(address, 'mailrelay_queue_depth'):.0f}"
    )
    watch = JobWatch(node, namespace)

    def claims_gone() -> bool:
        watch.poll()
        return not (claims(node, namespace) & removed)

    wait_for("the removed pods' PVCs deleted", claims_gone, within=240, every=1)
    claims_seconds = time.monotonic() - began
    # The upstream is still down: all 320 messages must now sit on pod 0, once each.
    survivor = relay_pod(node, namespace, 0)
    address = survivor["status"]["podIP"]
    received = incluster.metric_value(
        address, "mailrelay_handoff_messages_total", direction="received"
    )
    held = incluster.metric_value(address, "mailrelay_queue_depth")
    restarts = survivor["status"]["containerStatuses"][0]["restartCount"]
    incluster.set_upstream(node, namespace, up=True)
    arrivals = wait_arrived(node, namespace, accepted)
    print(
        f"scale 3 -> 1: pods gone after {pods_gone:.1f} s, last removed PVC gone after "
        f"{claims_seconds:.1f} s; drain Jobs {sorted(watch.seen)} {watch.results}; pod 0 "
        f"received {received:.0f} by hand-off and held {held:.0f}; arrived "
        f"{len(set(arrivals))} of {len(accepted)}, duplicates {duplicates(arrivals)}"
    )
    assert held == len(accepted), "pod 0 should hold every message before the upstream is back"
    assert duplicates(arrivals) == 0
    assert restarts == 0
    assert survivor["metadata"]["uid"] == uid  # scaling did not roll the pod that stays
    assert statefulset_replicas(node, namespace) == 1
    wait_for(
        "Draining False",
        lambda: condition(node, namespace, "Draining").get("status") == "False",
        within=60,
    )


def test_leaving_pod_and_receiving_pod_killed_mid_handoff_lose_nothing(
    node: LocalNode, relay3: str, ca_file: str
) -> None:
    namespace = relay3
    incluster.set_upstream(node, namespace, up=False)
    # 12 MB on each leaving pod: a dozen hand-off batches (about 1 MB each), long enough to
    # be caught in the middle.
    accepted = fill_pods(node, namespace, ca_file, {0: 10, 1: 300, 2: 300}, "kill", size=40_000)
    pods = {i: relay_pod(node, namespace, i) for i in range(3)}
    addresses = {i: pod["status"]["podIP"] for i, pod in pods.items()}
    for ordinal in (1, 2):
        wait_queued(addresses[ordinal], 300)

    scale(node, namespace, 1)

    found: list[int] = []

    def handing_off() -> bool:
        for ordinal in (1, 2):
            if incluster.metric_value(addresses[ordinal], "mailrelay_handoff_in_progress") >= 1:
                found.append(ordinal)
                return True
        return False

    wait_for("a leaving pod handing off", handing_off, within=60, every=0.1)
    leaving = found[0]
    sent_before = incluster.metric_value(
        addresses[leaving], "mailrelay_handoff_messages_total", direction="sent"
    )
    kill_container(node, pods[leaving])
    # Then the receiving pod, while the other leaving pod may still be sending to it.
    kill_container(node, pods[0])
    print(
        f"\nSIGKILLed pod {leaving} after it had handed off {sent_before:.0f} of 300, "
        "then pod 0 (the receiver)"
    )

    watch = JobWatch(node, namespace)
    removed = {f"spool-{RELAY}-1", f"spool-{RELAY}-2"}

    def settled() -> bool:
        watch.poll()
        return not (claims(node, namespace) & removed)

    seconds = wait_for("the removed pods' PVCs drained and deleted", settled, within=300, every=1)
    incluster.set_upstream(node, namespace, up=True)
    arrivals = wait_arrived(node, namespace, accepted)
    print(
        f"kill mid-hand-off -> PVCs gone after {seconds:.1f} s more; drain Jobs "
        f"{sorted(watch.seen)} {watch.results}; arrived {len(set(arrivals))} of "
        f"{len(accepted)}, duplicates {duplicates(arrivals)}"
    )
    restarts = relay_pod(node, namespace, 0)["status"]["containerStatuses"][0]["restartCount"]
    assert restarts >= 1  # the receiver really was killed


def test_pvc_left_behind_by_a_pod_killed_before_handoff_is_drained_then_deleted(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA,
    ca_file: str,
) -> None:  # fmt: skip
    namespace = node_namespace
    apply_relay(node, namespace, upstreams, replicas=2, exempt_networks=EXEMPT)
    incluster.set_upstream(node, namespace, up=False)
    accepted = fill_pods(node, namespace, ca_file, {1: 120}, "drain")
    leaving = relay_pod(node, namespace, 1)
    address = leaving["status"]["podIP"]
    wait_queued(address, 120)

    scale(node, namespace, 1)
    # Killed as soon as it is marked for deletion: during the preStop sleep, before SIGTERM,
    # so it never starts a hand-off (the same as its grace period running out at once).
    wait_for(
        "pod 1 marked for deletion",
        lambda: "deletionTimestamp" in relay_pod(node, namespace, 1).get("metadata", {}),
        within=60,
        every=0.1,
    )
    sent = incluster.metric_value(address, "mailrelay_handoff_messages_total", direction="sent")
    kill_container(node, leaving)
    claim = f"spool-{RELAY}-1"

    watch = JobWatch(node, namespace)

    def drained() -> bool:
        watch.poll()
        return claim not in claims(node, namespace)

    seconds = wait_for("the PVC left behind drained and deleted", drained, within=300, every=1)
    incluster.set_upstream(node, namespace, up=True)
    arrivals = wait_arrived(node, namespace, accepted)
    events = node.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.kind=MailRelay",
        "-o", "jsonpath={range .items[*]}{.reason}: {.message}{'\\n'}{end}",
    ).stdout  # fmt: skip
    print(
        f"\npod killed before hand-off (had sent {sent:.0f}) -> PVC drained and deleted in "
        f"{seconds:.1f} s; Jobs {sorted(watch.seen)} {watch.results}; Draining seen "
        f"{watch.draining_seen}; duplicates {duplicates(arrivals)}\n{events}"
    )
    assert f"{RELAY}-drain-1" in watch.seen, "no drain Job ran for the PVC left behind"
    assert sent < len(accepted), "the pod handed everything off before the kill"


def evict(node: LocalNode, namespace: str, pod: str) -> subprocess.CompletedProcess[str]:
    body = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": namespace},
    }
    return node.kubectl(
        "create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", "-f", "-",
        input=json.dumps(body), check=False,
    )  # fmt: skip


def finish_load(node: LocalNode, namespace: str, count: int) -> list[str]:
    def done() -> bool:
        phase = node.kubectl(
            "get", "pod", "load", "-n", namespace, "-o", "jsonpath={.status.phase}"
        ).stdout
        return phase in ("Succeeded", "Failed")

    wait_for("the load pod finishing", done, within=300, every=1)
    accepted = incluster.accepted_ids(load_log(node, namespace))
    assert len(set(accepted)) == count, load_log(node, namespace)[-2000:]
    return accepted


def test_eviction_respects_the_pdb_and_loses_nothing(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA,
    ca_file: str,
) -> None:  # fmt: skip
    namespace = node_namespace
    apply_relay(node, namespace, upstreams, replicas=2, exempt_networks=EXEMPT)
    pdb = get_json(node, namespace, "pdb", RELAY)
    assert pdb.get("spec", {}).get("unhealthyPodEvictionPolicy"), pdb.get("spec")
    incluster.set_upstream(node, namespace, up=False)
    accepted = fill_pods(node, namespace, ca_file, {0: 100, 1: 100}, "evict")
    start_load(node, namespace, count=100, interval=0.1)
    wait_accepted(node, namespace, 10)
    uid = relay_pod(node, namespace, 0)["metadata"]["uid"]

    first = evict(node, namespace, f"{RELAY}-0")
    assert first.returncode == 0, first.stderr
    refused = evict(node, namespace, f"{RELAY}-1")
    assert refused.returncode != 0
    assert "disruption budget" in refused.stderr or "429" in refused.stderr, refused.stderr

    def replaced_and_ready() -> bool:
        pod = relay_pod(node, namespace, 0)
        return bool(pod) and pod["metadata"]["uid"] != uid and pod_ready(pod)

    wait_for("pod 0 replaced and Ready", replaced_and_ready, within=240)
    # The upstream is down: the evicted pod handed its queue (100 sent to it directly, plus
    # some of the load) to pod 1 rather than leaving it all for its successor.
    peer = relay_pod(node, namespace, 1)["status"]["podIP"]
    handed = incluster.metric_value(peer, "mailrelay_handoff_messages_total", direction="received")
    assert handed >= 100, handed

    def second_eviction() -> bool:
        return evict(node, namespace, f"{RELAY}-1").returncode == 0

    wait_for("the PDB allowing the second eviction", second_eviction, within=120, every=2)
    wait_for(
        "pod 1 replaced and Ready",
        lambda: (
            pod_ready(relay_pod(node, namespace, 1))
            and "deletionTimestamp" not in relay_pod(node, namespace, 1)["metadata"]
        ),
        within=240,
    )
    accepted += finish_load(node, namespace, 100)
    incluster.set_upstream(node, namespace, up=True)
    arrivals = wait_arrived(node, namespace, accepted)
    print(
        f"\ntwo evictions (PDB refused the second until the first pod was back): arrived "
        f"{len(set(arrivals))} of {len(set(accepted))}, duplicates {duplicates(arrivals)}"
    )


def test_rolling_update_on_a_config_change_under_load_loses_nothing(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA,
    ca_file: str,
) -> None:  # fmt: skip
    namespace = node_namespace
    apply_relay(node, namespace, upstreams, replicas=2, exempt_networks=EXEMPT)
    before = get_json(node, namespace, "statefulset", RELAY)["status"]["currentRevision"]
    incluster.set_upstream(node, namespace, up=False)
    accepted = fill_pods(node, namespace, ca_file, {0: 80, 1: 80}, "roll")
    start_load(node, namespace, count=120, interval=0.1)
    wait_accepted(node, namespace, 10)

    # A setting the relay applies only at start (routes, retry and limits reload in place):
    # the operator rolls the pods, one at a time, highest ordinal first.
    patch = {"spec": {"listener": {"implicitTlsPort": 4465}}}
    node.kubectl(
        "patch", f"mailrelay/{RELAY}", "-n", namespace, "--type=merge", "-p", json.dumps(patch)
    )

    def rolled() -> bool:
        status = get_json(node, namespace, "statefulset", RELAY).get("status", {})
        return bool(
            status.get("updateRevision") != before
            and status.get("currentRevision") == status.get("updateRevision")
            and status.get("updatedReplicas") == 2
            and status.get("readyReplicas") == 2
        )

    seconds = wait_for("the rolling update", rolled, within=300, every=1)
    # Pod 1 went first; the new pod 1 was Ready before pod 0 left, and pod 0 (its 80 and some
    # of the load queued, the upstream down) handed its queue to it.
    peer = relay_pod(node, namespace, 1)["status"]["podIP"]
    handed = incluster.metric_value(peer, "mailrelay_handoff_messages_total", direction="received")
    assert handed >= 80, handed
    accepted += finish_load(node, namespace, 120)
    incluster.set_upstream(node, namespace, up=True)
    arrivals = wait_arrived(node, namespace, accepted)
    print(
        f"\nrolling update under load took {seconds:.1f} s: arrived {len(set(arrivals))} of "
        f"{len(set(accepted))}, duplicates {duplicates(arrivals)}"
    )


def test_hpa_drives_the_mailrelay_through_its_scale_subresource(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    namespace = node_namespace
    apply_relay(node, namespace, upstreams, replicas=1)
    scale_object = json.loads(
        node.kubectl(
            "get", "--raw",
            f"/apis/mailrelay.dev/v1alpha1/namespaces/{namespace}/mailrelays/{RELAY}/scale",
        ).stdout
    )  # fmt: skip
    assert scale_object["kind"] == "Scale"
    assert scale_object["spec"]["replicas"] == 1
    assert scale_object["status"].get("selector"), scale_object  # what an HPA needs for metrics

    # No metrics server runs here; an HPA still enforces its bounds through the scale
    # subresource (kube-controller-manager's HPA controller rescales into [min, max] first).
    hpa: dict[str, Any] = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": RELAY},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "mailrelay.dev/v1alpha1",
                "kind": "MailRelay",
                "name": RELAY,
            },
            "minReplicas": 2,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 70},
                    },
                }
            ],
        },
    }
    uid = relay_pod(node, namespace, 0)["metadata"]["uid"]
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(hpa))
    up = wait_for(
        "the HPA scaling the StatefulSet to 2",
        lambda: statefulset_replicas(node, namespace) == 2,
        within=120,
        every=1,
    )
    status = get_json(node, namespace, "hpa", RELAY)["status"]
    able = {c["type"]: c for c in status.get("conditions", [])}["AbleToScale"]
    assert able["status"] == "True", able

    hpa["spec"].update({"minReplicas": 1, "maxReplicas": 1})
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(hpa))
    down = wait_for(
        "the HPA scaling the StatefulSet to 1",
        lambda: statefulset_replicas(node, namespace) == 1,
        within=120,
        every=1,
    )
    relay = get_json(node, namespace, "mailrelay", RELAY)
    assert relay["spec"]["replicas"] == 1
    pod = relay_pod(node, namespace, 0)
    assert pod["metadata"]["uid"] == uid  # scale steps never rolled the pod that stays
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    print(f"\nHPA min 2 -> StatefulSet 2 in {up:.1f} s; max 1 -> StatefulSet 1 in {down:.1f} s")


def test_scale_to_zero_drains_the_last_spool_to_the_upstream(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA,
    ca_file: str,
) -> None:  # fmt: skip
    """No peer is left: the drain Job delivers the last pod's queue to the upstream itself."""
    namespace = node_namespace
    apply_relay(node, namespace, upstreams, replicas=1, exempt_networks=EXEMPT)
    incluster.set_upstream(node, namespace, up=False)
    accepted = fill_pods(node, namespace, ca_file, {0: 40}, "zero")
    wait_queued(relay_pod(node, namespace, 0)["status"]["podIP"], 40)

    began = time.monotonic()
    scale(node, namespace, 0)
    watch = JobWatch(node, namespace)

    def job_started() -> bool:
        watch.poll()
        return f"{RELAY}-drain-0" in watch.seen

    wait_for("the drain Job for the last pod's PVC", job_started, within=240, every=1)
    incluster.set_upstream(node, namespace, up=True)  # while the Job retries delivery

    def drained() -> bool:
        watch.poll()
        return f"spool-{RELAY}-0" not in claims(node, namespace)

    wait_for("the last PVC drained and deleted", drained, within=300, every=1)
    seconds = time.monotonic() - began
    arrivals = wait_arrived(node, namespace, accepted)
    print(
        f"\nscale to 0 -> last PVC gone in {seconds:.1f} s; Job {watch.results}; "
        f"duplicates {duplicates(arrivals)}"
    )
    assert statefulset_replicas(node, namespace) == 0
