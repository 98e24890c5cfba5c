"""Per-relay state: one ``RelayState`` per relay, dropped when the relay is gone; the backoff rule.

The kube test drives the operator's own work queue in-process against the real API server,
with the indices as plain data (what kopf's watch cache would hold), so it can look at the
memory directly: relays come and go for several rounds and nothing is left behind.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from lightkube import AsyncClient, KubeConfig
from prometheus_client import CollectorRegistry

from mailrelay.operator.apply import Applier
from mailrelay.operator.metrics import OperatorMetrics
from mailrelay.operator.relays import Context, Indices, ObjectKey, WorkQueue
from mailrelay.operator.routes import ObjectInfo, object_info
from mailrelay.operator.settings import FIELD_MANAGER, OperatorSettings
from mailrelay.operator.state import RelayStates, retry_delay
from mailrelay.support.localkube import LocalKube
from tests.operator import manifests as m

CHILD_KINDS = (
    "ConfigMap",
    "Service",
    "StatefulSet",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ServiceMonitor",
)


@pytest.mark.parametrize(
    ("failures", "cap", "expected"),
    [(1, 30, 1.0), (2, 30, 2.0), (3, 30, 4.0), (5, 30, 16.0), (6, 30, 30.0), (500, 30, 30.0)],
)
def test_retry_delay_doubles_from_one_second_up_to_the_resync_period(
    failures: int, cap: float, expected: float
) -> None:
    assert retry_delay(failures, cap) == expected


def test_retry_delay_is_only_for_a_failure() -> None:
    with pytest.raises(ValueError, match="failed"):
        retry_delay(0, 30)


async def test_a_state_is_kept_while_anything_waits_or_runs_for_it() -> None:
    states = RelayStates()
    state = states.get("mail", "outbound")
    assert states.get("mail", "outbound") is state
    for busy in ("pending", "active", "dirty"):
        setattr(state, busy, True if busy == "active" else 0)
        assert not states.forget("mail", "outbound")
        setattr(state, busy, False if busy == "active" else None)
    async with state.lock:
        assert not states.forget("mail", "outbound")
    state.retry = asyncio.get_running_loop().call_later(60, lambda: None)
    assert not states.forget("mail", "outbound")
    state.retry.cancel()
    state.retry = None
    assert states.forget("mail", "outbound")
    assert states.peek("mail", "outbound") is None
    assert len(states) == 0


async def _kubectl(kube: LocalKube, *args: str, input: str | None = None) -> str:
    result = await asyncio.to_thread(kube.kubectl, *args, input=input)
    return str(result.stdout)


async def _wait_idle(queue: WorkQueue) -> None:
    """Until no relay waits, runs or is asked again (the queue has drained)."""

    def idle() -> bool:
        states = queue.states.states.values()
        return queue.queue.empty() and all(s.pending is None and not s.active for s in states)

    await _wait_for(idle)


async def _wait_for(probe: Callable[[], bool]) -> None:
    async with asyncio.timeout(120):
        while True:
            if probe():
                return
            await asyncio.sleep(0.05)


@pytest.mark.kube
async def test_relay_state_does_not_grow_as_relays_come_and_go(
    crds: LocalKube, namespace: str
) -> None:
    kube, ns = crds, namespace
    secrets = [m.tls_secret(), m.users_secret(), m.smtp_credentials()]
    await _kubectl(kube, "apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(secrets))
    secret_keys: dict[ObjectKey, list[frozenset[str]]] = {
        (ns, s["metadata"]["name"]): [frozenset(s["data"])] for s in secrets
    }
    relays: dict[ObjectKey, list[ObjectInfo]] = {}
    routes: dict[ObjectKey, list[ObjectInfo]] = {}
    indices = Indices(
        relays=relays,
        routes=routes,
        secrets=secret_keys,
        children={kind: {} for kind in CHILD_KINDS},
    )
    metrics = OperatorMetrics(CollectorRegistry())
    client = AsyncClient(
        config=KubeConfig.from_file(str(kube.kubeconfig)), field_manager=FIELD_MANAGER
    )
    ctx = Context(
        settings=OperatorSettings(resync_seconds=30),
        applier=Applier(client, metrics),
        metrics=metrics,
        post_event=lambda *_: None,
    )
    queue = WorkQueue(ctx, workers=4)
    count = 12
    try:
        for round_ in range(3):
            names = [f"relay-{round_}-{i}" for i in range(count)]
            manifests = [m.relay(name) for name in names]
            manifests += [m.smtp_route(f"route-{name}", relay_name=name) for name in names]
            # A route naming a relay that never exists gets passes too (it is an orphan).
            manifests.append(m.smtp_route(f"orphan-{round_}", relay_name=f"nobody-{round_}"))
            await _kubectl(kube, "apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(manifests))
            listed = json.loads(
                await _kubectl(kube, "get", "mailrelays,mailroutes", "-n", ns, "-o", "json")
            )
            for obj in listed["items"]:
                info = object_info(obj)
                if info.kind == "MailRelay":
                    relays[(ns, info.name)] = [info]
                else:
                    routes[(ns, info.spec["relayRef"]["name"])] = [info]
            for name in [*names, f"nobody-{round_}"]:
                queue.enqueue(indices, ns, name)
            await _wait_idle(queue)
            # Every relay that exists has its state (and its applies in it); the orphan's
            # relay has none. (A pass may have failed, say on a Service IP range another
            # test used up: its retry waits in the state, and the deletion ends it.)
            assert sorted(queue.states) == sorted((ns, name) for name in names)
            for name in names:
                state = queue.states.peek(ns, name)
                assert state is not None and state.applied

            # Delete them: the watch cache drops them, and their deletion events ask for
            # passes (which tell the routes they lost their relay). With no garbage
            # collector here, the children go by hand (their Service IPs are shared).
            await _kubectl(kube, "delete", "mailrelays,mailroutes", "--all", "-n", ns)
            await _kubectl(
                kube,
                "delete",
                "services,configmaps,statefulsets,poddisruptionbudgets",
                "-l",
                "app.kubernetes.io/managed-by=mailrelay-operator",
                "-n",
                ns,
            )
            relays.clear()
            routes.clear()
            for name in names:
                queue.enqueue(indices, ns, name)
            await _wait_idle(queue)
            assert len(queue.states) == 0, sorted(queue.states)
            assert not [k for k in ctx.applier.written_status if k[0] == "MailRelay"]
    finally:
        await queue.stop()
        await client.close()


@pytest.mark.kube
async def test_an_api_error_is_retried_with_growing_gaps_and_success_resets_it(
    crds: LocalKube, namespace: str, tmp_path: Path
) -> None:
    """The API server unreachable (a closed port), then reachable: retries back off, then stop."""
    kube, ns = crds, namespace
    secrets = [m.tls_secret(), m.users_secret(), m.smtp_credentials()]
    await _kubectl(
        kube, "apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all([*secrets, m.relay()])
    )
    relay = object_info(
        json.loads(await _kubectl(kube, "get", "mailrelay", "outbound", "-n", ns, "-o", "json"))
    )
    indices = Indices(
        relays={(ns, "outbound"): [relay]},
        routes={},
        secrets={(ns, s["metadata"]["name"]): [frozenset(s["data"])] for s in secrets},
        children={kind: {} for kind in CHILD_KINDS},
    )
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    # The same credentials, for an API server that is not there.
    config = yaml.safe_load(kube.kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{dead_port}"
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    unreachable = AsyncClient(
        config=KubeConfig.from_file(str(tmp_path / "kubeconfig")), field_manager=FIELD_MANAGER
    )
    reachable = AsyncClient(
        config=KubeConfig.from_file(str(kube.kubeconfig)), field_manager=FIELD_MANAGER
    )
    metrics = OperatorMetrics(CollectorRegistry())
    ctx = Context(
        settings=OperatorSettings(resync_seconds=1),
        applier=Applier(unreachable, metrics),
        metrics=metrics,
        post_event=lambda *_: None,
    )
    # Scaled down (0.1 s doubling, capped at the 1 s resync) to see several steps quickly.
    queue = WorkQueue(ctx, workers=2, first_retry_seconds=0.1)
    loop = asyncio.get_running_loop()
    failed_at: list[float] = []
    try:
        queue.enqueue(indices, ns, "outbound")
        deadline = loop.time() + 60
        while len(failed_at) < 6 and loop.time() < deadline:
            state = queue.states.peek(ns, "outbound")
            if state is not None and state.failures > len(failed_at):
                failed_at.append(loop.time())
            await asyncio.sleep(0.005)
        assert len(failed_at) == 6, failed_at
        # The retry never comes before its delay (a loaded machine only makes it later).
        gaps = [b - a for a, b in itertools.pairwise(failed_at)]
        for failures, gap in enumerate(gaps, start=1):
            assert gap >= 0.9 * retry_delay(failures, 1.0, 0.1), (failures, gaps)
        # The API server answers again: the next retry succeeds, and that is the last.
        ctx.applier.client = reachable

        def ok_passes() -> float:
            sample = metrics.registry.get_sample_value(
                "mailrelay_operator_reconciles_total", {"kind": "MailRelay", "result": "ok"}
            )
            return sample or 0.0

        await _wait_for(lambda: ok_passes() >= 1)
        errors = metrics.registry.get_sample_value(
            "mailrelay_operator_reconciles_total", {"kind": "MailRelay", "result": "error"}
        )
        assert errors is not None and errors >= 6
        obj = json.loads(
            await _kubectl(kube, "get", "mailrelay", "outbound", "-n", ns, "-o", "json")
        )
        assert obj.get("status", {}).get("configHash")
        applied = next(c for c in obj["status"]["conditions"] if c["type"] == "ChildrenApplied")
        if applied["status"] == "True":
            # Everything applied: the backoff is reset and no retry is left. (Else the
            # session's Service IP range, a /24 with no garbage collector, was used up by
            # earlier tests, and the Service's refusal keeps retrying, rightly.)
            state = queue.states.peek(ns, "outbound")
            assert state is not None and state.failures == 0 and state.retry is None
        else:
            assert "range is full" in applied["message"], applied
    finally:
        await queue.stop()
        await unreachable.close()
        await reachable.close()
