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
note that they ran, the work queue that passes finish.

Triggers: a relay's own events, a route's events (its old and new relay), Secret events
(relays in that namespace), child events (their owner), and a per-relay resync timer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf
from prometheus_client import CollectorRegistry

from mailrelay.operator import kopf_patches
from mailrelay.operator.apply import (
    Applier,
    ChildState,
    child_state,
    make_client,
    resource_version_number,
)
from mailrelay.operator.health import Progress, serve_health
from mailrelay.operator.metrics import OperatorMetrics, serve_metrics
from mailrelay.operator.relays import RESYNC, Context, Indices, WorkQueue, child_needs_pass
from mailrelay.operator.render import MANAGED_BY
from mailrelay.operator.routes import ObjectInfo
from mailrelay.operator.settings import configure_kopf, load_settings

# Before kopf runs anything: start-up with thousands of objects (kopf_patches.py).
kopf_patches.apply()
# Read once at import: kopf needs the timer interval when the decorators run.
SETTINGS = load_settings()
RELAYS = ("mailrelay.dev", "v1alpha1", "mailrelays")
ROUTES = ("mailrelay.dev", "v1alpha1", "mailroutes")
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
SECRETS = ("", "v1", "secrets")
CHILDREN = (
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("apps", "v1", "statefulsets"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("monitoring.coreos.com", "v1", "servicemonitors"),
)
# Label selectors the API server applies to our lists and watches.
SELECTORS = {
    SECRETS: SETTINGS.secret_selector,
    **{child: ",".join(f"{k}={v}" for k, v in MANAGED.items()) for child in CHILDREN},
}
# How long a route naming an unknown relay waits before it is called an orphan.
ORPHAN_GRACE_SECONDS = 2.0
# How long a relay's passes wait after one of its routes was deleted: its relay may follow.
ROUTE_GONE_GRACE_SECONDS = 3.0
PROGRESS = Progress(index_timeout=SETTINGS.index_timeout_seconds, stall=SETTINGS.stall_seconds)
log = logging.getLogger("mailrelay.operator")


def _info(kind: str, body: kopf.Body) -> ObjectInfo:
    meta = body.get("metadata", {})
    return ObjectInfo(
        kind=kind,
        namespace=str(meta.get("namespace")),
        name=str(meta.get("name")),
        uid=str(meta.get("uid")),
        generation=int(meta.get("generation") or 0),
        labels=dict(meta.get("labels") or {}),
        spec=kopf_to_dict(body.get("spec") or {}),
        status=kopf_to_dict(body.get("status") or {}),
        resource_version=resource_version_number(meta.get("resourceVersion")),
        created=str(meta.get("creationTimestamp") or ""),
        deleting=meta.get("deletionTimestamp") is not None,
    )


def kopf_to_dict(value: Any) -> Any:
    """A plain deep copy of a kopf body part (kopf hands out live views)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: kopf_to_dict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [kopf_to_dict(v) for v in value]
    return value


def _indices(kwargs: dict[str, Any]) -> Indices:
    return Indices(
        relays=kwargs["relay_index"],
        routes=kwargs["route_index"],
        secrets=kwargs["secret_index"],
        secret_versions=kwargs["secret_version_index"],
        children={
            "ConfigMap": kwargs["configmap_index"],
            "Service": kwargs["service_index"],
            "StatefulSet": kwargs["statefulset_index"],
            "PodDisruptionBudget": kwargs["pdb_index"],
            "NetworkPolicy": kwargs["networkpolicy_index"],
            "ServiceMonitor": kwargs["servicemonitor_index"],
        },
    )


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
    )
    memo.queue = WorkQueue(
        memo.ctx,
        workers=SETTINGS.workers,
        settle_seconds=SETTINGS.settle_seconds,
        progress=PROGRESS,
    )
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
        await ctx.applier.client.close()


# --- indices ---------------------------------------------------------------------------------
# kopf passes ``namespace`` as ``str | None`` (None for cluster objects); ours are namespaced.
# Async on purpose: kopf runs a sync handler in a thread, a hop per watch event.


@kopf.index(*RELAYS)
async def relay_index(body: kopf.Body, **_: Any) -> dict[Any, ObjectInfo]:
    PROGRESS.saw_index("MailRelay")
    info = _info("MailRelay", body)
    return {(info.namespace, info.name): info}


@kopf.index(*ROUTES)
async def route_index(body: kopf.Body, **_: Any) -> dict[Any, ObjectInfo]:
    PROGRESS.saw_index("MailRoute")
    info = _info("MailRoute", body)
    relay = str((info.spec.get("relayRef") or {}).get("name", ""))
    return {(info.namespace, relay): info}


@kopf.index(*SECRETS)
async def secret_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[Any, frozenset[str]]:
    PROGRESS.saw_index("Secret")
    keys = {*(body.get("data") or {}), *(body.get("stringData") or {})}
    return {(namespace or "", name): frozenset(keys)}


@kopf.index(*SECRETS)
async def secret_version_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[Any, str]:
    """A Secret's resourceVersion, so a change to its content reaches the pods (podsync)."""
    return {(namespace or "", name): str(body.get("metadata", {}).get("resourceVersion", ""))}


def _child(body: kopf.Body, namespace: str | None, name: str) -> dict[Any, ChildState]:
    PROGRESS.saw_index(str(body.get("kind")))
    return {
        (namespace or "", name): child_state(body, keep_status=body.get("kind") == "StatefulSet")
    }


@kopf.index("", "v1", "configmaps", labels=MANAGED)
async def configmap_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> object:
    return _child(body, namespace, name)


@kopf.index("", "v1", "services", labels=MANAGED)
async def service_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> object:
    return _child(body, namespace, name)


@kopf.index("apps", "v1", "statefulsets", labels=MANAGED)
async def statefulset_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> object:
    PROGRESS.saw_index("StatefulSet")
    return {(namespace or "", name): child_state(body, keep_status=True)}


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=MANAGED)
async def pdb_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> object:
    return _child(body, namespace, name)


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
async def networkpolicy_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> object:
    return _child(body, namespace, name)


@kopf.index("monitoring.coreos.com", "v1", "servicemonitors", labels=MANAGED)
async def servicemonitor_index(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> object:
    return _child(body, namespace, name)


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
    memo.queue.enqueue(_indices(kwargs), namespace or "", name)


@kopf.timer(*RELAYS, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds)
async def relay_resync(namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    memo.queue.enqueue(_indices(kwargs), namespace or "", name, priority=RESYNC)


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
    indices = _indices(kwargs)
    info = ctx.fresh(_info("MailRoute", body))
    relay = str((info.spec.get("relayRef") or {}).get("name", ""))
    previous = info.status.get("relay")
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
    indices = _indices(kwargs)
    for name in indices.relays_in(namespace or ""):
        memo.queue.enqueue(indices, namespace or "", name)


@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("apps", "v1", "statefulsets", labels=MANAGED)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED)
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
    indices = _indices(kwargs)
    key = (str(body.get("kind")), ns, name)
    if (
        owner
        and indices.relay(ns, owner) is not None
        and child_needs_pass(memo.ctx, indices, key, type == "DELETED")
    ):
        memo.queue.enqueue(indices, ns, owner)
