"""Every kopf registration of the operator, and nothing else (``kopf run -m`` this module).

Handlers only translate kopf's arguments into calls of plain async functions in
``relays.py`` and ``routes.py``. Indices cache what the passes need, so a pass reads no API:

* ``relay_index``: MailRelays by (namespace, name);
* ``route_index``: MailRoutes by (namespace, relayRef.name), so a relay finds its routes;
* ``secret_index``: the key names (never the values) of the Secrets labelled for the operator
  (``settings.secret_selector``, applied by the API server: other Secrets are never read);
* ``secret_version_index``: their resourceVersions, so the pods reload a changed Secret;
* one index per child kind, of the children this operator manages (selected server-side).

``PROGRESS`` records what liveness (``health.py``) decides from: indices and event handlers
note that they ran, the work queue that passes finish. Handlers read the indices only through
``indices_from``, typed by the index functions' return types.

Triggers: a relay's own events, a route's events (its old and new relay), Secret events
(relays in that namespace), child events (their owner), and a per-relay resync timer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import kopf
from prometheus_client import CollectorRegistry

from mailrelay.operator import drain, kopf_patches
from mailrelay.operator.apply import (
    Applier,
    ChildState,
    child_state,
    make_client,
    resource_version_number,
)
from mailrelay.operator.dkim import DnsChecker, KeyFacts, facts_of, key_candidates
from mailrelay.operator.health import Progress, serve_health
from mailrelay.operator.metrics import OperatorMetrics, serve_metrics
from mailrelay.operator.relays import (
    RESYNC,
    Context,
    Indices,
    ObjectKey,
    WorkQueue,
    child_needs_pass,
)
from mailrelay.operator.render import MANAGED_BY
from mailrelay.operator.routes import ObjectInfo, object_info
from mailrelay.operator.settings import configure_kopf, load_settings
from mailrelay.operator.upstream_auth import UpstreamStatusPoller

# Before kopf runs anything: start-up with thousands of objects (kopf_patches.py).
kopf_patches.apply()
# Read once at import: kopf needs the timer interval when the decorators run.
SETTINGS = load_settings()
RELAYS = ("mailrelay.dev", "v1alpha1", "mailrelays")
ROUTES = ("mailrelay.dev", "v1alpha1", "mailroutes")
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
SECRETS = ("", "v1", "secrets")
# The spool PVCs (labelled from the StatefulSet's volume claim template) and the drain Jobs.
CLAIMS = ("", "v1", "persistentvolumeclaims")
JOBS = ("batch", "v1", "jobs")
CHILD_KINDS = (
    "ConfigMap",
    "Service",
    "StatefulSet",
    "PodDisruptionBudget",
    "ServiceAccount",
    "NetworkPolicy",
    "ServiceMonitor",
)
CHILDREN = (
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("apps", "v1", "statefulsets"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("", "v1", "serviceaccounts"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("monitoring.coreos.com", "v1", "servicemonitors"),
)
# Label selectors the API server applies to our lists and watches.
SELECTORS = {
    SECRETS: SETTINGS.secret_selector,
    **{
        child: ",".join(f"{k}={v}" for k, v in MANAGED.items())
        for child in (*CHILDREN, CLAIMS, JOBS)
    },
}
# How long a route naming an unknown relay waits before it is called an orphan.
ORPHAN_GRACE_SECONDS = 2.0
# How long a relay's passes wait after one of its routes was deleted: its relay may follow.
ROUTE_GONE_GRACE_SECONDS = 3.0
PROGRESS = Progress(index_timeout=SETTINGS.index_timeout_seconds, stall=SETTINGS.stall_seconds)
log = logging.getLogger("mailrelay.operator")


def _info(kind: str, body: kopf.Body) -> ObjectInfo:
    return object_info(body, kind)


def _post_event(target: ObjectInfo, type_: str, reason: str, message: str) -> None:
    body = kopf.Body(cast(kopf.RawBody, target.event_target()))
    kopf.event(body, type=type_, reason=reason, message=message)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    configure_kopf(settings, SETTINGS, SELECTORS)
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    memo.metrics_server = serve_metrics(registry, SETTINGS.metrics_port)
    memo.health = (
        await serve_health(PROGRESS, SETTINGS.liveness_port) if SETTINGS.liveness_port else None
    )
    memo.ctx = Context(
        settings=SETTINGS,
        applier=Applier(make_client(), metrics),
        metrics=metrics,
        post_event=_post_event,
        upstream_status=UpstreamStatusPoller(interval=SETTINGS.resync_seconds),
        dns=DnsChecker(SETTINGS.dns_resolver, SETTINGS.dkim_dns_cache_seconds),
    )
    memo.queue = WorkQueue(
        memo.ctx,
        workers=SETTINGS.workers,
        settle_seconds=SETTINGS.settle_seconds,
        progress=PROGRESS,
    )
    memo.ctx.upstream_status.on_change = memo.queue.wake
    PROGRESS.oldest_waiting = memo.queue.oldest_waiting
    log.info("Started the mailrelay operator (relay image %s)", SETTINGS.relay_image)


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    if getattr(memo, "metrics_server", None) is not None:
        memo.metrics_server.shutdown()
    if getattr(memo, "health", None) is not None:
        await memo.health.cleanup()
    queue = getattr(memo, "queue", None)
    if isinstance(queue, WorkQueue):
        await queue.stop()
    ctx = getattr(memo, "ctx", None)
    if isinstance(ctx, Context):
        if ctx.upstream_status is not None:
            await ctx.upstream_status.close()
        await ctx.applier.client.close()


# --- indices ----------------------------------------------------------------------------
# Registered through ``_index`` rather than ``@kopf.index`` (whose type erases the function's):
# each ``IndexRef`` carries the key and value types its function returns, and ``indices_from``
# is the one place that reads kopf's index arguments, so mypy checks every value type the
# passes read against what the index stores. kopf passes ``namespace`` as ``str | None``
# (None for cluster objects); ours are namespaced. Async on purpose: kopf runs a sync handler
# in a thread, a hop per watch event.

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class IndexRef(Generic[K, V]):
    """A registered kopf index: its name, typed with its function's keys and values."""

    name: str

    def of(self, kwargs: Mapping[str, object]) -> kopf.Index[K, V]:
        """This index out of a handler's keyword arguments."""
        index = kwargs.get(self.name)
        if not isinstance(index, kopf.Index):
            raise TypeError(f"kopf passed no index {self.name!r} to the handler")
        return cast("kopf.Index[K, V]", index)


def _index(
    fn: Callable[..., Awaitable[dict[K, V]]],
    group: str,
    version: str,
    plural: str,
    *,
    labels: Mapping[str, str] | None = None,
) -> IndexRef[K, V]:
    kopf.index(group, version, plural, id=fn.__name__, labels=labels)(fn)
    return IndexRef(fn.__name__)


async def relay_index(body: kopf.Body, **_: Any) -> dict[ObjectKey, ObjectInfo]:
    PROGRESS.saw_index("MailRelay")
    info = _info("MailRelay", body)
    return {(info.namespace, info.name): info}


async def route_index(body: kopf.Body, **_: Any) -> dict[ObjectKey, ObjectInfo]:
    """Routes by (namespace, relayRef.name), so a relay finds its routes."""
    PROGRESS.saw_index("MailRoute")
    info = _info("MailRoute", body)
    relay = str((info.spec.get("relayRef") or {}).get("name", ""))
    return {(info.namespace, relay): info}


async def secret_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[ObjectKey, frozenset[str]]:
    PROGRESS.saw_index("Secret")
    keys = {*(body.get("data") or {}), *(body.get("stringData") or {})}
    return {(namespace or "", name): frozenset(keys)}


async def dkim_key_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[ObjectKey, Mapping[str, KeyFacts]]:
    """The public facts of each private key a watched Secret holds (operator/dkim.py);
    never the key itself. Parsing a key is CPU work: done in a thread, and only for
    Secrets that hold something key-shaped."""
    candidates = key_candidates(body.get("data") or {})
    if not candidates:
        return {}
    facts = await asyncio.to_thread(facts_of, candidates)
    return {(namespace or "", name): facts}


async def secret_version_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[ObjectKey, str]:
    """A Secret's resourceVersion, so a change to its content reaches the pods (podsync)."""
    return {(namespace or "", name): str(body.get("metadata", {}).get("resourceVersion", ""))}


async def child_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[ObjectKey, ChildState]:
    kind = str(body.get("kind"))
    PROGRESS.saw_index(kind)
    return {(namespace or "", name): child_state(body, keep_status=kind == "StatefulSet")}


def _child_index(kind: str, plural: str) -> Callable[..., Awaitable[dict[ObjectKey, ChildState]]]:
    """``child_index`` under its own name per kind (kopf names an index after its function)."""

    async def index(**kwargs: Any) -> dict[ObjectKey, ChildState]:
        return await child_index(**kwargs)

    index.__name__ = index.__qualname__ = f"{plural}_index"
    return index


async def claim_index(
    body: kopf.Body, namespace: str | None, **_: Any
) -> dict[ObjectKey, drain.SpoolClaim]:
    """Spool PVCs by (namespace, relay) (drain.py)."""
    PROGRESS.saw_index("PersistentVolumeClaim")
    found = drain.spool_claim(body)
    return {(namespace or "", found[0]): found[1]} if found is not None else {}


async def drain_job_index(
    body: kopf.Body, namespace: str | None, **_: Any
) -> dict[ObjectKey, drain.DrainJob]:
    """Drain Jobs by (namespace, relay) (drain.py)."""
    PROGRESS.saw_index("Job")
    found = drain.drain_job(body)
    return {(namespace or "", found[0]): found[1]} if found is not None else {}


RELAY_INDEX = _index(relay_index, *RELAYS)
CLAIM_INDEX = _index(claim_index, *CLAIMS, labels=MANAGED)
DRAIN_JOB_INDEX = _index(drain_job_index, *JOBS, labels=MANAGED)
ROUTE_INDEX = _index(route_index, *ROUTES)
SECRET_INDEX = _index(secret_index, *SECRETS)
SECRET_VERSION_INDEX = _index(secret_version_index, *SECRETS)
DKIM_KEY_INDEX = _index(dkim_key_index, *SECRETS)
CHILD_INDICES = {
    kind: _index(_child_index(kind, plural), group, version, plural, labels=MANAGED)
    for kind, (group, version, plural) in zip(CHILD_KINDS, CHILDREN, strict=True)
}


def indices_from(kwargs: Mapping[str, object]) -> Indices:
    """The indices kopf passed to a handler, typed (the only reader of kopf's index kwargs)."""
    return Indices(
        relays=RELAY_INDEX.of(kwargs),
        routes=ROUTE_INDEX.of(kwargs),
        secrets=SECRET_INDEX.of(kwargs),
        secret_versions=SECRET_VERSION_INDEX.of(kwargs),
        dkim_keys=DKIM_KEY_INDEX.of(kwargs),
        children={kind: ref.of(kwargs) for kind, ref in CHILD_INDICES.items()},
        claims=CLAIM_INDEX.of(kwargs),
        drain_jobs=DRAIN_JOB_INDEX.of(kwargs),
    )


# --- triggers --------------------------------------------------------------------------------


def _own_status_echo(ctx: Context, kind: str, body: kopf.Body, event_type: str) -> bool:
    """Whether a watch event is our own status write coming back (it needs no pass)."""
    if event_type == "DELETED":
        return False
    metadata = body.get("metadata", {})
    version = resource_version_number(metadata.get("resourceVersion"))
    return ctx.applier.own_status_echo(
        kind, metadata.get("namespace") or "", metadata.get("name", ""), version
    )


@kopf.on.event(*RELAYS)
async def relay_event(
    body: kopf.Body, namespace: str | None, name: str, memo: Any, type: str, **kwargs: Any
) -> None:
    PROGRESS.saw_event()
    if _own_status_echo(memo.ctx, "MailRelay", body, type):
        return
    memo.queue.enqueue(indices_from(kwargs), namespace or "", name)


@kopf.timer(*RELAYS, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds)
async def relay_resync(namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    memo.queue.enqueue(indices_from(kwargs), namespace or "", name, priority=RESYNC)


@kopf.on.event(*ROUTES)
async def route_event(body: kopf.Body, memo: Any, type: str, **kwargs: Any) -> None:
    """Queue a pass of the route's relay, and of the relay it was bound to before.

    The pass writes the statuses of every route naming the relay, and of orphans when the
    relay does not exist. It is queued even when the relay is not in the cache yet: a relay
    and its routes applied together arrive on separate watches, and a route seen first is
    not an orphan worth a Warning (and three status writes) but a relay a moment late.
    """
    PROGRESS.saw_event()
    ctx: Context = memo.ctx
    if _own_status_echo(ctx, "MailRoute", body, type):
        return
    indices = indices_from(kwargs)
    info = ctx.fresh(_info("MailRoute", body))
    relay = str((info.spec.get("relayRef") or {}).get("name", ""))
    previous = info.status.get("relay")
    if type == "DELETED":
        ctx.applier.forget_status("MailRoute", info.namespace, info.name)
    for relay_name in {relay, *([previous] if isinstance(previous, str) else [])}:
        if type == "DELETED":
            memo.queue.hold(info.namespace, relay_name, ROUTE_GONE_GRACE_SECONDS)
        known = indices.relay(info.namespace, relay_name) is not None
        memo.queue.enqueue(
            indices,
            info.namespace,
            relay_name,
            delay=0.0 if known else ORPHAN_GRACE_SECONDS,
        )


@kopf.on.event(*SECRETS)
async def secret_event(namespace: str | None, memo: Any, **kwargs: Any) -> None:
    PROGRESS.saw_event()
    ctx: Context = memo.ctx
    ctx.secret_epochs[namespace or ""] = ctx.secret_epochs.get(namespace or "", 0) + 1
    indices = indices_from(kwargs)
    for name in indices.relays_in(namespace or ""):
        memo.queue.enqueue(indices, namespace or "", name)


@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("apps", "v1", "statefulsets", labels=MANAGED)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED)
@kopf.on.event("", "v1", "serviceaccounts", labels=MANAGED)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
@kopf.on.event("monitoring.coreos.com", "v1", "servicemonitors", labels=MANAGED)
async def child_event(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    labels: Mapping[str, str],
    memo: Any,
    type: str,
    **kwargs: Any,
) -> None:
    PROGRESS.saw_event()
    ns = namespace or ""
    owner = labels.get("app.kubernetes.io/instance")
    indices = indices_from(kwargs)
    key = (str(body.get("kind")), ns, name)
    if (
        owner
        and indices.relay(ns, owner) is not None
        and child_needs_pass(memo.ctx, indices, key, owner, type == "DELETED")
    ):
        memo.queue.enqueue(indices, ns, owner)


@kopf.on.event(*CLAIMS, labels=MANAGED)
@kopf.on.event(*JOBS, labels=MANAGED)
async def drain_event(
    *, namespace: str | None, labels: Mapping[str, str], memo: Any, **kwargs: Any
) -> None:
    """A spool PVC or a drain Job changed: its relay's pass decides what to drain (drain.py)."""
    PROGRESS.saw_event()
    ns = namespace or ""
    owner = labels.get("app.kubernetes.io/instance")
    indices = indices_from(kwargs)
    if owner and indices.relay(ns, owner) is not None:
        memo.queue.enqueue(indices, ns, owner)
