"""Benchmark: the operator on the local API server with N MailRelays and 3 MailRoutes each.

Why: the issue's target is 1,000 relays reconciled in 60 s or less, the operator under
200 MB, and zero writes at steady state. This prints figures; it asserts nothing.

One run per N (default 100 and 1,000), each on a fresh local control plane:

1. start the operator (least-privilege user, standalone, one namespace, resync every
   `--resync` seconds) and let it settle;
2. create the Secrets, N relays and 3N routes with one `kubectl create` (timed apart);
3. watch until every child (ConfigMap, 2 Services, StatefulSet, PodDisruptionBudget per relay)
   exists and every relay and route has a status for its generation: "converged" (watches,
   not polling: listing every object each second loaded the API server being measured);
4. watch for `--steady` seconds (at least two resync periods, so every relay's level-based
   pass runs twice) and count the API server's write requests.

Reported: time to converge (from the first create), the operator's peak RSS (VmHWM), its API
write requests per reconcile pass (from the API server's `apiserver_request_total`: every
operator write is a server-side APPLY, a PATCH or an Event POST; the benchmark itself only
POSTs objects and LISTs; the operator reads nothing but its watches), CPU seconds of the
operator, kube-apiserver and etcd (the machine may be shared: CPU is the steadier figure),
and writes and the operator's CPU seconds during the steady-state window.

Run: `.venv/bin/python bench/operator_bench.py [--relays 100 1000] [--resync 10]`.

`--secrets 10000` instead measures start-up with that many Secrets of other applications
present (unlabelled, `--secret-size` bytes each): the time until every watch cache is loaded,
the operator's peak and settled RSS and CPU seconds, once watching only labelled Secrets
(the default) and once watching every Secret (`MAILRELAY_OPERATOR_SECRET_SELECTOR=""`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightkube import AsyncClient, KubeConfig, codecs
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import on_error_retry

import mailrelay.operator.apply  # noqa: F401  (registers the MailRelay/MailRoute kinds)
from mailrelay.operator.settings import WATCH_LABEL
from mailrelay.support.localkube import LocalKube, ensure_binaries
from mailrelay.support.operator_harness import CRDS, OperatorProcess, bind_operator_role

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "bench"
# Server-side apply requests are counted under their own verb, APPLY.
WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE")


def _secret(name: str, data: dict[str, str], *, labelled: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {WATCH_LABEL: "true"} if labelled else {}},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def objects(relays: int) -> list[dict[str, Any]]:
    """Shared Secrets, `relays` MailRelays and three MailRoutes for each."""
    out = [
        _secret("relay-tls", {"tls.crt": "cert", "tls.key": "key"}),
        _secret("relay-users", {"users.yaml": "users: []\n"}),
        _secret("smarthost", {"username": "u", "password": "p"}),
        _secret("mailgun", {"apiKey": "k"}),
    ]
    for index in range(relays):
        name = f"relay-{index:04d}"
        out.append(
            {
                "apiVersion": "mailrelay.dev/v1alpha1",
                "kind": "MailRelay",
                "metadata": {"name": name},
                "spec": {
                    "replicas": 2,
                    "listener": {"port": 587, "tls": {"secretName": "relay-tls"}},
                    "auth": {
                        "required": True,
                        "usersSecretRef": {"name": "relay-users", "key": "users.yaml"},
                    },
                },
            }
        )
        upstreams = [
            {"smtp": {"host": "smtp.example.net", "credentialsSecretRef": {"name": "smarthost"}}},
            {
                "api": {
                    "provider": "mailgun",
                    "domain": "mg.example.com",
                    "credentialsSecretRef": {"name": "mailgun"},
                }
            },
            {"smtp": {"host": "backup.example.net", "port": 2525}},
        ]
        for route_index, upstream in enumerate(upstreams):
            out.append(
                {
                    "apiVersion": "mailrelay.dev/v1alpha1",
                    "kind": "MailRoute",
                    "metadata": {"name": f"{name}-r{route_index}"},
                    "spec": {
                        "relayRef": {"name": name},
                        "priority": 100 + route_index,
                        "match": {"senderDomains": [f"d{route_index}.example.com"]},
                        "upstream": upstream,
                    },
                }
            )
    return out


class BenchKube(LocalKube):
    """The local control plane with room for 65k Service IPs (the default /24 has 254)."""

    def _spawn(self, name: str, argv: list[str]) -> None:
        wide = "--service-cluster-ip-range=10.0.0.0/16"
        super()._spawn(
            name, [wide if a.startswith("--service-cluster-ip-range=") else a for a in argv]
        )


@contextlib.contextmanager
def bench_cluster(workdir: Path) -> Iterator[LocalKube]:
    cluster = BenchKube(bin_dir=ensure_binaries(), workdir=workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def create_all(kube: LocalKube, items: list[dict[str, Any]], parallel: int = 32) -> None:
    """POST every object, `parallel` at a time, as the admin (like many users applying)."""
    client = AsyncClient(config=KubeConfig.from_file(str(kube.kubeconfig)))
    limit = asyncio.Semaphore(parallel)

    async def create(item: dict[str, Any]) -> None:
        async with limit:
            await client.create(codecs.from_dict(item), namespace=NAMESPACE)  # type: ignore[call-overload]

    # Secrets first: a relay that sees its Secrets from the start needs fewer passes.
    await asyncio.gather(*(create(i) for i in items if i["kind"] == "Secret"))
    await asyncio.gather(*(create(i) for i in items if i["kind"] != "Secret"))
    await client.close()


def request_counts(kube: LocalKube) -> dict[tuple[str, str], float]:
    """apiserver_request_total summed by (verb, resource)."""
    text = kube.kubectl("get", "--raw", "/metrics").stdout
    counts: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        key = (labels.get("verb", ""), labels.get("resource", ""))
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def operator_writes(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> float:
    """Applies, PATCHes (status, finalizers) and Event POSTs: what the operator writes."""
    total = 0.0
    for (verb, resource), value in after.items():
        delta = value - before.get((verb, resource), 0.0)
        if verb in ("PATCH", "APPLY") or (verb == "POST" and resource == "events"):
            total += delta
    return total


OPERATOR_RESOURCES = (
    "mailrelays",
    "mailroutes",
    "configmaps",
    "services",
    "statefulsets",
    "poddisruptionbudgets",
    "networkpolicies",
    "servicemonitors",
    "events",
)


def all_writes(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> float:
    """Writes of any verb to the kinds the operator touches (not the API server's own leases)."""
    return sum(
        value - before.get(key, 0.0)
        for key, value in after.items()
        if key[0] in WRITE_VERBS and key[1] in OPERATOR_RESOURCES
    )


WATCHED = {
    kind: create_namespaced_resource(group, version, kind, plural)
    for group, version, kind, plural in (
        ("", "v1", "ConfigMap", "configmaps"),
        ("", "v1", "Service", "services"),
        ("apps", "v1", "StatefulSet", "statefulsets"),
        ("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets"),
        ("mailrelay.dev", "v1alpha1", "MailRelay", "mailrelays"),
        ("mailrelay.dev", "v1alpha1", "MailRoute", "mailroutes"),
    )
}


class Convergence:
    """Tracks convergence from watch events, so that measuring it costs the API server little.

    Listing ~9,000 objects once a second (as kubectl) cost the API server, kubectl and this
    process more CPU than the operator's own writes, on the same 2 cores: the measurement
    slowed what it measured. A watch costs one serialised event per write instead.
    """

    def __init__(self, relays: int) -> None:
        self.relays = relays
        self.children: dict[str, set[str]] = {kind: set() for kind in WATCHED}
        self.relays_done: set[str] = set()
        self.routes_done: set[str] = set()
        self.done = asyncio.Event()

    def observe(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        present = event != "DELETED"
        if kind == "MailRelay":
            ok = status.get("routes") == 3 and (
                status.get("observedGeneration") == obj["metadata"]["generation"]
            )
            self._mark(self.relays_done, name, present and ok)
        elif kind == "MailRoute":
            ok = status.get("relay") == obj["spec"]["relayRef"]["name"]
            self._mark(self.routes_done, name, present and ok)
        else:
            self._mark(self.children[kind], name, present)
        if self.converged():
            self.done.set()

    @staticmethod
    def _mark(names: set[str], name: str, present: bool) -> None:
        if present:
            names.add(name)
        else:
            names.discard(name)

    def converged(self) -> bool:
        n = self.relays
        return (
            len(self.children["ConfigMap"]) >= n
            and len(self.children["Service"]) >= 2 * n
            and len(self.children["StatefulSet"]) >= n
            and len(self.children["PodDisruptionBudget"]) >= n
            and len(self.relays_done) == n
            and len(self.routes_done) == 3 * n
        )

    def summary(self) -> str:
        counts = {kind: len(names) for kind, names in self.children.items() if names}
        return (
            f"children {counts}, relay statuses {len(self.relays_done)}/{self.relays}, "
            f"route statuses {len(self.routes_done)}/{3 * self.relays}"
        )

    async def watch(self, client: AsyncClient, kind: str) -> None:
        stream = client.watch(WATCHED[kind], namespace=NAMESPACE, on_error=on_error_retry)
        async for event, obj in stream:
            self.observe(kind, event, obj.to_dict())  # type: ignore[no-untyped-call]


async def create_and_converge(
    kube: LocalKube, relays: int, give_up_after: float
) -> tuple[float, float, bool, str]:
    """Create everything, then wait for convergence: (create s, converge s, done, summary)."""
    client = AsyncClient(config=KubeConfig.from_file(str(kube.kubeconfig)))
    tracker = Convergence(relays)
    watches = [asyncio.create_task(tracker.watch(client, kind)) for kind in WATCHED]
    await asyncio.sleep(1)  # let every watch start before the first create
    started = time.monotonic()
    await create_all(kube, objects(relays))
    created = time.monotonic() - started
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(give_up_after - created):
            await tracker.done.wait()
    elapsed = time.monotonic() - started
    for task in watches:
        task.cancel()
    await asyncio.gather(*watches, return_exceptions=True)
    await client.close()
    return created, elapsed, tracker.done.is_set(), tracker.summary()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(
    relays: int, resync: float, steady: float, timeout: float, keep_log: str | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp) / "kube") as kube:
        kube.install_crds(CRDS)
        kubeconfig = bind_operator_role(kube)
        kube.create_namespace(NAMESPACE)
        operator = OperatorProcess(
            kube,
            kubeconfig,
            "--standalone",
            "--namespace",
            NAMESPACE,
            "--resync-seconds",
            str(resync),
            log_path=Path(tmp) / "operator.log",
        )
        try:
            operator.wait_live()
            time.sleep(2)
            before = request_counts(kube)
            created, elapsed, done, summary = asyncio.run(
                create_and_converge(kube, relays, timeout)
            )
            if not done:
                print(f"  not converged after {timeout:.0f}s: {summary}")
            operator_cpu = cpu_seconds(operator.process.pid)
            apiserver_cpu = cpu_seconds(kube.processes["kube-apiserver"].pid)
            etcd_cpu = cpu_seconds(kube.processes["etcd"].pid)
            at_convergence = request_counts(kube)
            converge_by_key = {
                f"{verb} {resource}": value - before.get((verb, resource), 0.0)
                for (verb, resource), value in at_convergence.items()
                if resource in OPERATOR_RESOURCES and value - before.get((verb, resource), 0.0) > 0
            }
            print(f"  requests until converged by verb and resource: {converge_by_key}")
            reconciles_at_convergence = operator.total("mailrelay_operator_reconciles_total")
            time.sleep(steady)
            after = request_counts(kube)
            steady_cpu = cpu_seconds(operator.process.pid) - operator_cpu
            steady_by_key = {
                f"{verb} {resource}": value - at_convergence.get((verb, resource), 0.0)
                for (verb, resource), value in after.items()
                if verb in WRITE_VERBS and value - at_convergence.get((verb, resource), 0.0) > 0
            }
            if steady_by_key:
                print(f"  steady-state writes by verb and resource: {steady_by_key}")
            if keep_log:
                Path(keep_log).write_text(operator.log_path.read_text())
            return {
                "relays": relays,
                "create_seconds": created,
                "converge_seconds": elapsed,
                "converged": done,
                "peak_rss_mb": peak_rss_mb(operator.process.pid),
                "operator_cpu_s": operator_cpu,
                "apiserver_cpu_s": apiserver_cpu,
                "etcd_cpu_s": etcd_cpu,
                "operator_writes": operator_writes(before, at_convergence),
                "reconciles": reconciles_at_convergence,
                "steady_writes": all_writes(at_convergence, after),
                "steady_operator_cpu_s": steady_cpu,
                "steady_reconciles": operator.total("mailrelay_operator_reconciles_total")
                - reconciles_at_convergence,
            }
        finally:
            operator.stop()


def other_secrets(count: int, size: int) -> list[dict[str, Any]]:
    """Secrets of other applications (no label): the bulk of a real cluster's Secrets."""
    payload = base64.b64encode(os.urandom(size)).decode()[:size]
    return [
        _secret(f"other-{index:05d}", {"data": payload}, labelled=False) for index in range(count)
    ]


def wait_started(operator: OperatorProcess, started: float, timeout: float) -> float:
    """Seconds from ``started`` until every watch cache is loaded (``/healthz`` indicesReady)."""
    deadline = started + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if operator.health().get("indicesReady"):
                return time.monotonic() - started
        time.sleep(0.05)
    return float("nan")


def run_secrets(count: int, size: int, timeout: float) -> list[dict[str, Any]]:
    """Start-up cost with ``count`` unrelated Secrets present, watched by label and all of them.

    One relay with its labelled Secrets exists, so the first event handler (which kopf calls
    once every watch cache is loaded) runs at start-up; the operator then reports
    ``indicesReady`` on ``/healthz``.
    """
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp) / "kube") as kube:
        kube.install_crds(CRDS)
        kubeconfig = bind_operator_role(kube)
        kube.create_namespace(NAMESPACE)
        started = time.monotonic()
        asyncio.run(create_all(kube, [*objects(1), *other_secrets(count, size)], parallel=64))
        print(f"  created {count} Secrets of {size} bytes in {time.monotonic() - started:.0f}s")
        for label, selector in (("labelled only", None), ("every Secret", "")):
            env = {} if selector is None else {"MAILRELAY_OPERATOR_SECRET_SELECTOR": selector}
            before = request_counts(kube)
            launched = time.monotonic()
            operator = OperatorProcess(
                kube,
                kubeconfig,
                "--standalone",
                "--namespace",
                NAMESPACE,
                log_path=Path(tmp) / f"operator-{len(results)}.log",
                env=env,
            )
            try:
                ready = wait_started(operator, launched, timeout)
                pid = operator.process.pid
                time.sleep(2)  # kopf's per-object workers exit after their idle time
                rss_now = 0.0
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss_now = int(line.split()[1]) / 1024
                after = request_counts(kube)
                results.append(
                    {
                        "watch": label,
                        "secrets": count,
                        "ready_s": ready,
                        "peak_rss_mb": peak_rss_mb(pid),
                        "rss_mb": rss_now,
                        "cpu_s": cpu_seconds(pid),
                        "secret_lists": after.get(("LIST", "secrets"), 0.0)
                        - before.get(("LIST", "secrets"), 0.0),
                    }
                )
                print(f"  {results[-1]}", flush=True)
            finally:
                operator.stop()
    return results


def print_secrets(results: list[dict[str, Any]]) -> None:
    print()
    header = ("watch", "secrets", "ready s", "peak RSS MB", "RSS MB", "CPU s")
    widths = (14, 8, 8, 12, 7, 6)
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for r in results:
        print(
            f"{r['watch']:>14} {r['secrets']:>8} {r['ready_s']:>8.1f} {r['peak_rss_mb']:>12.1f} "
            f"{r['rss_mb']:>7.1f} {r['cpu_s']:>6.1f}"
        )
    print("(ready s: from the process start until every watch cache is loaded)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--relays", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--resync", type=float, default=10.0, help="operator resync seconds")
    parser.add_argument("--steady", type=float, default=25.0, help="steady-state window, s")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up converging, s")
    parser.add_argument("--keep-log", help="copy the operator's log of the last run here")
    parser.add_argument(
        "--secrets",
        type=int,
        help="instead: start-up cost with this many unrelated Secrets (e.g. 10000)",
    )
    parser.add_argument("--secret-size", type=int, default=2048, help="bytes per Secret")
    args = parser.parse_args(argv)
    if args.secrets:
        print(f"Starting the operator with {args.secrets} Secrets present ...", flush=True)
        print_secrets(run_secrets(args.secrets, args.secret_size, args.timeout))
        return 0
    results = []
    for relays in args.relays:
        print(f"Running {relays} relays x 3 routes ...", flush=True)
        result = run(relays, args.resync, args.steady, args.timeout, args.keep_log)
        results.append(result)
        print(f"  {result}", flush=True)
    print()
    header = (
        f"{'relays':>7} {'create s':>9} {'converge s':>11} {'peak RSS MB':>12} "
        f"{'writes/reconcile':>17} {'writes/relay':>13} {'steady writes':>14} {'steady passes':>14}"
    )
    print(header)
    for r in results:
        per_reconcile = r["operator_writes"] / r["reconciles"] if r["reconciles"] else float("nan")
        print(
            f"{r['relays']:>7} {r['create_seconds']:>9.1f} "
            f"{r['converge_seconds']:>10.1f}{'' if r['converged'] else '!':1} "
            f"{r['peak_rss_mb']:>12.1f} {per_reconcile:>17.2f} "
            f"{r['operator_writes'] / r['relays']:>13.1f} {r['steady_writes']:>14.0f} "
            f"{r['steady_reconciles']:>14.0f}"
        )
    print("(converge s counts from the first create; '!' = did not converge before --timeout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
