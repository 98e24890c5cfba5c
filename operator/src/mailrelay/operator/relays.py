"""MailRelay logic: one level-based pass that makes every child match the rendered state.

``reconcile_relay`` is called by every trigger in ``main`` (the relay's own watch events, a
bound route's events, Secret events in its namespace, and a per-relay resync timer); it does
not care what changed. One pass:

1. gather from the indices (no API reads): the relay, its routes, Secret key names, the
   cached state of its children;
2. decide with pure functions: ``judge_routes``, ``build_relay_config``, the renderers,
   ``relay_status``;
3. act through the ``Applier``: apply only children that differ, patch statuses only when
   they changed, post an Event only when a condition flips.

An invalid spec (one the CRD schema could not catch) becomes ``ConfigRendered=False`` with the
reason and an Event, and the pass ends without an error, so kopf neither crash-loops nor
retries in a storm. API failures propagate, and a pass that could not apply everything
reports so: the ``WorkQueue`` retries either with per-relay backoff (``state.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, overload

import httpx2
from lightkube import ApiError
from pydantic import ValidationError

from mailrelay.operator import drain, models
from mailrelay.operator.appcredentials import ensure_app_secrets
from mailrelay.operator.apply import (
    CACHE_LAG_SECONDS,
    Applier,
    ChildKey,
    ChildState,
    NotOwned,
    ObjectGone,
    ResourceMissing,
    applied_hash,
    key_of,
)
from mailrelay.operator.conditions import (
    Clock,
    ConditionUpdate,
    find_condition,
    remove_condition,
    set_conditions,
    utc_now,
    worth_an_event,
)
from mailrelay.operator.dkim import DnsChecker, KeyFacts, KeyLookup, TxtAnswer, record_names
from mailrelay.operator.handoff import ensure_handoff_secret
from mailrelay.operator.health import Progress
from mailrelay.operator.metrics import OperatorMetrics
from mailrelay.operator.podsync import reload_marks, touch_pods
from mailrelay.operator.relay_config import (
    RelayConfigError,
    app_credential_mounts,
    build_relay_config,
    config_hash,
    handoff_mount,
    handoff_secret_name,
    headless_service_name,
    render_config_yaml,
    secret_mounts,
    uses_ambient_aws,
)
from mailrelay.operator.render import (
    NetworkPeer,
    NetworkPolicyInputs,
    RelayInputs,
    config_map_name,
    endpoint,
    render_configmap,
    render_headless_service,
    render_networkpolicy,
    render_pdb,
    render_service,
    render_serviceaccount,
    render_servicemonitor,
    render_statefulset,
    selector_labels,
    service_account_name,
)
from mailrelay.operator.routes import (
    ObjectInfo,
    PostEvent,
    RouteVerdict,
    SecretKeys,
    SecretNotWatched,
    bound_routes,
    check_secret_refs,
    judge_routes,
    route_status,
    secret_refs,
    status_differs,
    validation_message,
    write_route_status,
)
from mailrelay.operator.settings import OperatorSettings
from mailrelay.operator.state import (
    FIRST_RETRY_SECONDS,
    RelayKey,
    RelayState,
    RelayStates,
    retry_delay,
)
from mailrelay.operator.upstream_auth import UpstreamStatusPoller, route_auth_update

log = logging.getLogger(__name__)
T = TypeVar("T")

READY = "Ready"
ROUTES_RESOLVED = "RoutesResolved"
CONFIG_RENDERED = "ConfigRendered"
SECRETS_RESOLVED = "SecretsResolved"
SERVICE_MONITOR = "ServiceMonitorReady"
CHILDREN_APPLIED = "ChildrenApplied"
CHILD_NOT_OWNED = "ChildNotOwned"
# A StatefulSet's pods are named <name>-<ordinal> and carry a controller-revision-hash label
# of <name>-<10 chars>, which must fit in 63 characters.
MAX_RELAY_NAME = 52
RELAY_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


ObjectKey = tuple[str, str]  # namespace, name


@dataclass(frozen=True)
class Indices:
    """Read access to the kopf indices (live mappings of key -> collection of values).

    Built in one place (``main.indices_from``) from kopf's typed ``kopf.Index`` arguments.
    """

    relays: Mapping[ObjectKey, Collection[ObjectInfo]]
    # By (namespace, relayRef.name): the routes that name a relay.
    routes: Mapping[ObjectKey, Collection[ObjectInfo]]
    # Key names (never values) of each watched Secret.
    secrets: Mapping[ObjectKey, Collection[frozenset[str]]]
    children: Mapping[str, Mapping[ObjectKey, Collection[ChildState]]]  # by kind
    # resourceVersion of each watched Secret: a content change reaches the pods at once.
    secret_versions: Mapping[ObjectKey, Collection[str]] = field(default_factory=dict)
    # By (namespace, relay): its spool PVCs and its drain Jobs (drain.py).
    claims: Mapping[ObjectKey, Collection[drain.SpoolClaim]] = field(default_factory=dict)
    drain_jobs: Mapping[ObjectKey, Collection[drain.DrainJob]] = field(default_factory=dict)
    # Public facts of the private keys each watched Secret holds (DKIM; operator/dkim.py).
    dkim_keys: Mapping[ObjectKey, Collection[Mapping[str, KeyFacts]]] = field(default_factory=dict)

    @staticmethod
    def _one(index: Mapping[ObjectKey, Collection[T]], key: ObjectKey) -> T | None:
        values = index.get(key)
        return next(iter(values), None) if values else None

    def relay(self, namespace: str, name: str) -> ObjectInfo | None:
        return self._one(self.relays, (namespace, name))

    def relays_in(self, namespace: str) -> list[str]:
        return sorted(name for ns, name in list(self.relays) if ns == namespace)

    def routes_for(self, namespace: str, relay: str) -> list[ObjectInfo]:
        return list(self.routes.get((namespace, relay), ()))

    def secret_keys(self, namespace: str) -> Callable[[str], frozenset[str] | None]:
        def lookup(name: str) -> frozenset[str] | None:
            return self._one(self.secrets, (namespace, name))

        return lookup

    def dkim_key_lookup(self, namespace: str) -> KeyLookup:
        """(Secret, key) -> the key's public facts; a value that is no key at all gets a
        problem, an unknown Secret or key None (ResolvedRefs reports those)."""

        def lookup(secret: str, key: str) -> KeyFacts | None:
            keys = self._one(self.secrets, (namespace, secret))
            if keys is None or key not in keys:
                return None
            facts = self._one(self.dkim_keys, (namespace, secret)) or {}
            return facts.get(key) or KeyFacts(
                problem="is not a private key (PEM RSA or Ed25519, or dkimpy's Ed25519 seed)"
            )

        return lookup

    def secret_version(self, namespace: str, name: str) -> str:
        """The watched Secret's resourceVersion; "" when it is not watched (or absent)."""
        return self._one(self.secret_versions, (namespace, name)) or ""

    def child(self, key: ChildKey) -> ChildState | None:
        index = self.children.get(key[0])
        return self._one(index, key[1:]) if index is not None else None

    def claims_for(self, namespace: str, relay: str) -> tuple[drain.SpoolClaim, ...]:
        return tuple(sorted(self.claims.get((namespace, relay), ()), key=lambda c: c.name))

    def drain_jobs_for(self, namespace: str, relay: str) -> tuple[drain.DrainJob, ...]:
        return tuple(sorted(self.drain_jobs.get((namespace, relay), ()), key=lambda j: j.name))


@dataclass
class Context:
    """Everything a pass needs besides the indices; built once at startup."""

    settings: OperatorSettings
    applier: Applier
    metrics: OperatorMetrics
    post_event: PostEvent
    clock: Clock = utc_now
    # Per relay: lock, last settled inputs, pods' marks, applies, queue place, backoff.
    states: RelayStates = field(default_factory=RelayStates)
    # Bumped by every Secret event of a namespace (a relay's inputs include Secret keys).
    secret_epochs: dict[str, int] = field(default_factory=dict)
    # What the relay pods report of their upstreams' logins (upstream_auth.py); None: off.
    upstream_status: UpstreamStatusPoller | None = None
    # The DKIMReady check's TXT lookups (cached; operator/dkim.py).
    dns: DnsChecker = field(default_factory=DnsChecker)

    @overload
    def fresh(self, info: ObjectInfo) -> ObjectInfo: ...
    @overload
    def fresh(self, info: None) -> None: ...
    def fresh(self, info: ObjectInfo | None) -> ObjectInfo | None:
        """``info`` with the status our own last write returned, if the cache lags behind."""
        if info is None:
            return None
        status = self.applier.fresh_status(
            info.kind, info.namespace, info.name, info.status, info.resource_version
        )
        return info if status is info.status else replace(info, status=status)

    def forget(self, namespace: str, name: str) -> bool:
        """Drop what is kept about a deleted relay, once nothing waits or runs for it."""
        if not self.states.forget(namespace, name):
            return False
        self.applier.forget_status("MailRelay", namespace, name)
        if self.upstream_status is not None:
            self.upstream_status.forget(namespace, name)
        return True


@dataclass(frozen=True)
class RenderedRelay:
    """The decisions of one pass, before anything is written."""

    children: list[dict[str, Any]]
    absent: list[ChildKey]  # optional children that must not exist
    config_hash: str
    routes: int
    mounted_secrets: tuple[str, ...] = ()  # Secrets the pods mount, sorted


def name_problem(name: str) -> str | None:
    """Why the relay's name cannot name its children, or None."""
    if len(name) > MAX_RELAY_NAME or not RELAY_NAME.match(name):
        return (
            f"The name {name!r} cannot name the relay's StatefulSet and Services: use at "
            f"most {MAX_RELAY_NAME} characters, lowercase letters, digits and '-', starting "
            "with a letter."
        )
    return None


def network_policy_inputs(spec: models.MailRelaySpec) -> NetworkPolicyInputs | None:
    """The NetworkPolicy the spec asks for, or None when it is off."""
    policy = spec.network_policy
    if not policy.enabled:
        return None
    peers = [
        NetworkPeer(
            namespace_selector=_selector_dict(peer.namespace_selector),
            pod_selector=_selector_dict(peer.pod_selector),
        )
        for peer in policy.allowed_from
    ]
    return NetworkPolicyInputs(peers=tuple(peers))


def _selector_dict(selector: models.LabelSelector | None) -> dict[str, Any] | None:
    if selector is None:
        return None
    dumped: dict[str, Any] = selector.model_dump(by_alias=True, exclude_defaults=True)
    return dumped


def render_relay(
    relay: RelayInputs,
    verdicts: list[RouteVerdict],
    settings: OperatorSettings,
    *,
    statefulset_replicas: int | None = None,
) -> RenderedRelay:
    """Every child for this pass (pure); RelayConfigError if the relay would refuse the config.

    ``statefulset_replicas``: fewer pods than ``spec.replicas`` while a drain holds a volume
    the spec asks for again (``drain.capped_replicas``).
    """
    routes = bound_routes(verdicts)
    config = build_relay_config(
        name=relay.name,
        namespace=relay.namespace,
        spec=relay.spec,
        routes=routes,
        log_format=settings.log_format,
        drain_seconds=float(settings.drain_seconds),
        cluster_domain=settings.cluster_domain,
        handoff_seconds=float(settings.handoff_seconds),
    )
    config_yaml = render_config_yaml(config)
    mounts = [
        *secret_mounts(relay.spec, routes),
        *app_credential_mounts(relay.name, relay.spec),
        handoff_mount(relay.name),
    ]
    digest = config_hash(config_yaml)
    restart_digest = config_hash(json.dumps(config.restart_settings(), sort_keys=True))
    absent: list[ChildKey] = []
    children: list[dict[str, Any]] = []
    # Before the StatefulSet, so its pods never wait on a ServiceAccount still to come.
    if (account := render_serviceaccount(relay)) is not None:
        children.append(account)
    else:
        absent.append(("ServiceAccount", relay.namespace, service_account_name(relay.name)))
    children += [
        render_configmap(relay, config_yaml, settings),
        render_service(relay, settings),
        render_headless_service(relay, settings),
        render_statefulset(
            relay,
            restart_hash=restart_digest,
            mounts=mounts,
            settings=settings,
            ambient_aws=uses_ambient_aws(routes),
            replicas=statefulset_replicas,
        ),
    ]
    optional = {
        "PodDisruptionBudget": render_pdb(relay, settings),
        "NetworkPolicy": render_networkpolicy(relay, network_policy_inputs(relay.spec), settings),
        "ServiceMonitor": render_servicemonitor(relay, settings),
    }
    for kind, child in optional.items():
        if child is None:
            absent.append((kind, relay.namespace, relay.name))
        else:
            children.append(child)
    mounted = tuple(sorted({mount.secret_name for mount in mounts}))
    return RenderedRelay(children, absent, digest, len(routes), mounted)


def ready_condition(
    spec: models.MailRelaySpec, statefulset: ChildState | None, config_ok: bool
) -> ConditionUpdate:
    """Ready from the StatefulSet's status: every desired pod ready on the current revision."""
    if not config_ok:
        return ConditionUpdate(
            READY, "False", "ConfigNotRendered", "No valid config; see ConfigRendered."
        )
    # Just created (not cached yet) and not yet seen by its controller read the same, so the
    # cache catching up with our own apply is not worth a status write.
    pending = ConditionUpdate(
        READY,
        "False",
        "RolloutPending",
        "Waiting for the StatefulSet controller to pick up the latest spec.",
    )
    if statefulset is None:
        return pending
    status = statefulset.status
    ready = int(status.get("readyReplicas") or 0)
    observed = int(status.get("observedGeneration") or 0)
    if spec.replicas == 0:
        return ConditionUpdate(READY, "False", "ScaledToZero", "spec.replicas is 0: no pod runs.")
    if observed < statefulset.generation:
        return pending
    if ready < spec.replicas:
        return ConditionUpdate(
            READY,
            "False",
            "ReplicasNotReady",
            f"{ready} of {spec.replicas} relay pods are ready; check the pods' events and logs.",
        )
    return ConditionUpdate(
        READY, "True", "ReplicasReady", f"{ready} of {spec.replicas} relay pods are ready."
    )


def routes_condition(verdicts: list[RouteVerdict]) -> ConditionUpdate:
    """RoutesResolved: every route that names this relay is carried, or which are not and why."""
    left_out = [v for v in verdicts if not v.included]
    if not left_out:
        return ConditionUpdate(
            ROUTES_RESOLVED, "True", "AllRoutesResolved", f"{len(verdicts)} route(s) bound."
        )
    first = left_out[0]
    failing = first.accepted if first.accepted.status != "True" else first.resolved_refs
    names = ", ".join(v.route.name for v in left_out)
    return ConditionUpdate(
        ROUTES_RESOLVED,
        "False",
        failing.reason,
        f"Left out of the config: {names}. {first.route.name}: {failing.message}",
    )


def _relay_secret_refs(spec: models.MailRelaySpec) -> list[tuple[str, str, str]]:
    refs: list[tuple[str, str, str]] = []
    if spec.listener.tls is not None:
        name = spec.listener.tls.secret_name
        refs += [
            ("listener.tls.secretName", name, "tls.crt"),
            ("listener.tls.secretName", name, "tls.key"),
        ]
    if spec.auth.users_secret_ref is not None:
        ref = spec.auth.users_secret_ref
        refs.append(("auth.usersSecretRef", ref.name, ref.key))
    return refs


def uncached_secrets(
    spec: models.MailRelaySpec | None, verdicts: Iterable[RouteVerdict], secret_keys: SecretKeys
) -> set[str]:
    """Names of the Secrets the relay and its routes reference that the watch cache lacks."""
    refs = _relay_secret_refs(spec) if spec is not None else []
    for verdict in verdicts:
        if verdict.spec is not None:
            refs += secret_refs(verdict.spec)
    return {name for _, name, _ in refs if secret_keys(name) is None}


def with_looked_up(
    secret_keys: SecretKeys, looked_up: Mapping[str, SecretNotWatched]
) -> SecretKeys:
    """``secret_keys`` that answers for the looked-up Secrets the cache lacks."""

    def lookup(name: str) -> frozenset[str] | SecretNotWatched | None:
        keys = secret_keys(name)
        return looked_up.get(name, keys) if keys is None else keys

    return lookup


async def _look_up_secrets(
    ctx: Context, namespace: str, names: Collection[str]
) -> dict[str, SecretNotWatched]:
    """Whether each Secret exists (outside the watch's label selector): a GET per name."""
    ordered = sorted(names)
    found = await asyncio.gather(
        *(ctx.applier.secret_outside_selector(namespace, name) for name in ordered)
    )
    selector = ctx.settings.secret_selector
    return {
        name: SecretNotWatched(exists, selector)
        for name, exists in zip(ordered, found, strict=True)
    }


APP_CREDENTIALS_NOT_READY = "AppCredentialsNotReady"
HANDOFF_SECRET_NOT_READY = "HandoffSecretNotReady"


def _with_generated_problems(
    refs: ConditionUpdate, app_problems: list[str], handoff_problem: str | None = None
) -> ConditionUpdate:
    """The Secrets condition, made False by generated Secrets (app credentials, the hand-off
    token) that are not in place."""
    texts = []
    if app_problems:
        texts.append("App credentials: " + "; ".join(app_problems) + ".")
    if handoff_problem is not None:
        texts.append(f"Hand-off token: {handoff_problem}.")
    if not texts:
        return refs
    text = " ".join(texts)
    if refs.status != "True":
        return replace(refs, message=f"{refs.message} {text}")
    reason = APP_CREDENTIALS_NOT_READY if app_problems else HANDOFF_SECRET_NOT_READY
    return ConditionUpdate(refs.type, "False", reason, text)


def child_keys(namespace: str, name: str) -> list[ChildKey]:
    """Every child a relay can have."""
    return [
        (kind, namespace, child)
        for kind, child in (
            ("ConfigMap", config_map_name(name)),
            ("Service", name),
            ("Service", headless_service_name(name)),
            ("StatefulSet", name),
            ("PodDisruptionBudget", name),
            ("ServiceAccount", service_account_name(name)),
            ("NetworkPolicy", name),
            ("ServiceMonitor", name),
        )
    ]


def recently_applied(ctx: Context, namespace: str, name: str) -> bool:
    """Whether a child was applied so lately that a pass trusted our apply over the cache."""
    state = ctx.states.peek(namespace, name)
    if state is None:
        return False
    now = time.monotonic()
    return any(now - remembered.at < CACHE_LAG_SECONDS for remembered in state.applied.values())


def pass_inputs(ctx: Context, indices: Indices, namespace: str, name: str) -> tuple[Any, ...]:
    """Everything a pass decides from: the relay, its routes, Secrets, its children's state.

    Two passes that see equal inputs make the same decisions, so the second writes nothing.
    """
    relay = ctx.fresh(indices.relay(namespace, name))
    routes = sorted(
        (r.name, r.resource_version, ctx.fresh(r).status is r.status)
        for r in indices.routes_for(namespace, name)
    )
    children = tuple(indices.child(key) for key in child_keys(namespace, name))
    reports = ctx.upstream_status.reports(namespace, name) if ctx.upstream_status else None
    # DNS is an input no event announces: a relay with signing routes re-checks its
    # selectors' records once per DNS cache period.
    signs = any(r.spec.get("dkim") for r in indices.routes_for(namespace, name))
    return (
        relay.resource_version if relay is not None else None,
        relay.status if relay is not None else None,
        tuple(routes),
        ctx.secret_epochs.get(namespace, 0),
        children,
        indices.claims_for(namespace, name),
        indices.drain_jobs_for(namespace, name),
        reports,
        ctx.dns.period() if signs else None,
    )


async def reconcile_relay(
    ctx: Context, indices: Indices, namespace: str, name: str, *, resync: bool = False
) -> bool:
    """One level-based pass for a MailRelay (serialised per relay); True if it must be retried.

    A resync pass is skipped when its inputs equal those of the relay's last settled pass
    (one that applied every child, none so lately that it trusted its apply over the
    cache): at 1,000 relays and a 10 s resync, passes that found nothing to do were most
    of the operator's CPU at steady state. Any change of the relay, a route, a Secret or a
    child (a hand edit, a deletion, a status) makes the inputs differ.

    A pass that could not make the relay match (a child refused, pods not told to reload,
    app credentials not in place, an API error raised) is retried by the work queue with
    backoff, since what fixes it may not be an input the operator watches.
    """
    state = ctx.states.get(namespace, name)
    if ctx.upstream_status is not None:
        # In the background: a changed report asks for a pass of its own.
        ctx.upstream_status.poll(ctx.applier.client, namespace, name)
    async with state.lock:
        inputs = pass_inputs(ctx, indices, namespace, name)
        if resync and state.settled == inputs:
            return False
        started = time.perf_counter()
        result = "error"
        state.settled = None
        retry = False
        try:
            result, settled, recheck = await _reconcile(ctx, indices, namespace, name)
            retry = settled is False
            # A drain waiting on time or on leaving pods is not settled: the resync looks again.
            if (
                settled
                and not recheck
                and inputs[0] is not None
                and not recently_applied(ctx, namespace, name)
            ):
                state.settled = inputs
        except ObjectGone:
            # Deleted while the pass ran: its deletion event brings the pass that tells its
            # routes; nothing failed.
            result = "gone"
            log.info("MailRelay %s/%s was deleted during its pass", namespace, name)
        except Exception:
            ctx.metrics.errors.labels("MailRelay").inc()
            raise
        finally:
            ctx.metrics.reconciles.labels("MailRelay", result).inc()
            ctx.metrics.reconcile_duration.labels("MailRelay").observe(
                time.perf_counter() - started
            )
    return retry


async def _reconcile(
    ctx: Context, indices: Indices, namespace: str, name: str
) -> tuple[str, bool | None, bool]:
    """The pass; its outcome, whether every child was applied (False: retry it), and whether
    a drain waits on time or on pods leaving (look again at the next resync).

    None: there was nothing to apply (the relay is gone or going).
    """
    ctx.metrics.relays.set(len(indices.relays))
    relay = ctx.fresh(indices.relay(namespace, name))
    routes = [ctx.fresh(route) for route in indices.routes_for(namespace, name)]
    secret_keys: SecretKeys = indices.secret_keys(namespace)
    if relay is None:
        # Deleted: the children go with their owner; tell the routes they lost their relay.
        # (The work queue drops the relay's state after this pass.)
        for verdict in judge_routes(None, None, routes, secret_keys):
            status = route_status(verdict, relay_name=name, relay_ready=False, clock=ctx.clock)
            await _write_route_status(ctx, verdict, status)
        return "ok", None, False
    if relay.deleting:
        # Going away (kopf's finalizer holds it a moment): rendering it now would only roll
        # its pods; the pass after its deletion tells the routes.
        log.debug("Skipped the pass of MailRelay %s/%s: it is being deleted", namespace, name)
        return "ok", None, False

    problem = name_problem(name)
    try:
        spec = models.MailRelaySpec.model_validate(relay.spec)
    except ValidationError as error:
        spec = None
        problem = problem or (
            f"The spec is invalid: {validation_message(error, relay.spec)}. Fix the MailRelay."
        )
    dkim_keys = indices.dkim_key_lookup(namespace)
    answers = await _dkim_answers(ctx, routes)
    verdicts = judge_routes(
        relay, spec, routes, secret_keys, dkim_keys=dkim_keys, dns_answers=answers
    )
    missing = uncached_secrets(spec, verdicts, secret_keys)
    if missing and ctx.settings.secret_selector:
        # Decide again, telling a Secret outside the label selector from an absent one.
        looked_up = await _look_up_secrets(ctx, namespace, missing)
        secret_keys = with_looked_up(secret_keys, looked_up)
        verdicts = judge_routes(
            relay, spec, routes, secret_keys, dkim_keys=dkim_keys, dns_answers=answers
        )
    updates: list[ConditionUpdate] = []
    extra: dict[str, Any] = {"routes": sum(1 for v in verdicts if v.included)}
    outcome = "ok"
    statefulset: ChildState | None = None
    refused: ApplyProblem | None = None
    pods_synced = True
    config_ok = False
    recheck = False
    drain_ok = True
    if spec is None or problem is not None:
        updates.append(ConditionUpdate(CONFIG_RENDERED, "False", "InvalidSpec", problem or ""))
        outcome = "invalid"
    else:
        inputs = RelayInputs(name, namespace, relay.uid, spec)
        if ctx.upstream_status is not None:
            ctx.upstream_status.target(namespace, name, selector_labels(inputs), spec.metrics.port)
        refs = check_secret_refs(_relay_secret_refs(spec), secret_keys, subject="relay")
        app_problems = await ensure_app_secrets(
            ctx.applier.client,
            inputs,
            secret_keys,
            selector=ctx.settings.secret_selector,
            metrics=ctx.metrics,
        )
        handoff_keys = secret_keys(handoff_secret_name(name))
        handoff = await ensure_handoff_secret(
            ctx.applier.client,
            inputs,
            handoff_keys if isinstance(handoff_keys, frozenset) else None,
            indices.secret_version(namespace, handoff_secret_name(name)),
            ctx.states.get(namespace, name).handoff_secret_version,
            selector=ctx.settings.secret_selector,
            metrics=ctx.metrics,
        )
        ctx.states.get(namespace, name).handoff_secret_version = handoff.checked_version
        updates.append(_with_generated_problems(refs, app_problems, handoff.problem))
        try:
            cap = drain.capped_replicas(
                spec.replicas,
                indices.drain_jobs_for(namespace, name),
                indices.claims_for(namespace, name),
            )
            rendered = render_relay(
                inputs,
                verdicts,
                ctx.settings,
                statefulset_replicas=cap if cap != spec.replicas else None,
            )
        except RelayConfigError as error:
            updates.append(
                ConditionUpdate(
                    CONFIG_RENDERED,
                    "False",
                    "ConfigRejected",
                    f"The relay would refuse this config: {error}. The last good config stays "
                    "in place; fix the MailRelay or its routes.",
                )
            )
            outcome = "invalid"
        else:
            config_ok = True
            applied, problems = await _apply_children(ctx, indices, inputs, rendered)
            updates += applied
            if not any(p.kind == "ConfigMap" for p in problems):
                versions = [
                    (secret, indices.secret_version(namespace, secret))
                    for secret in rendered.mounted_secrets
                ]
                pods_synced = await _sync_pods(
                    ctx, inputs, reload_marks(rendered.config_hash, versions)
                )
            refused = next((p for p in problems if p.kind == "StatefulSet"), None)
            draining = await _drain(
                ctx, indices, relay, inputs, rendered, statefulset_applied=refused is None
            )
            updates.append(draining.condition)
            recheck, drain_ok = draining.recheck, draining.ok
            updates.append(
                ConditionUpdate(
                    CONFIG_RENDERED,
                    "True",
                    "Rendered",
                    f"Config {rendered.config_hash} with {rendered.routes} route(s) rendered.",
                )
            )
            extra.update(
                configHash=rendered.config_hash,
                endpoint=endpoint(inputs, ctx.settings),
                selector=",".join(f"{k}={v}" for k, v in selector_labels(inputs).items()),
            )
            statefulset = indices.child(("StatefulSet", namespace, name))
    # SecretsResolved keeps the route-style reason names but its own type.
    updates = [
        ConditionUpdate(SECRETS_RESOLVED, u.status, u.reason, u.message)
        if u.type == "ResolvedRefs"
        else u
        for u in updates
    ]
    updates.append(routes_condition(verdicts))
    if spec is None:
        ready = ConditionUpdate(
            READY, "False", "InvalidSpec", "The spec is invalid; see ConfigRendered."
        )
    elif refused is not None:
        # The pods cannot follow a StatefulSet the API server refuses: say why, not "pending".
        ready = ConditionUpdate(READY, "False", refused.reason, refused.message)
    else:
        ready = ready_condition(spec, statefulset, config_ok)
    updates.append(ready)
    sts_status = statefulset.status if statefulset is not None else {}
    extra["replicas"] = int(sts_status.get("replicas") or 0)
    extra["readyReplicas"] = int(sts_status.get("readyReplicas") or 0)
    await _write_relay_status(ctx, relay, updates, extra, monitor_wanted=_monitor_wanted(spec))
    relay_ready = ready.status == "True"
    reports = ctx.upstream_status.reports(namespace, name) if ctx.upstream_status else None
    await asyncio.gather(
        *(
            _write_route_status(
                ctx,
                verdict,
                route_status(
                    verdict,
                    relay_name=name,
                    relay_ready=relay_ready,
                    clock=ctx.clock,
                    upstream_auth=route_auth_update(verdict, reports),
                ),
            )
            for verdict in verdicts
        )
    )
    # A refused child or a missing ServiceMonitor CRD can be fixed outside every input.
    settled = (
        pods_synced
        and drain_ok
        and not any(
            (u.type in (CHILDREN_APPLIED, SERVICE_MONITOR) and u.status != "True")
            or u.reason in (APP_CREDENTIALS_NOT_READY, HANDOFF_SECRET_NOT_READY)
            for u in updates
        )
    )
    return outcome, settled, recheck


@dataclass(frozen=True)
class DrainOutcome:
    """The drain step of a pass: its condition, whether to look again, whether all went."""

    condition: ConditionUpdate
    recheck: bool
    ok: bool


async def _drain(
    ctx: Context,
    indices: Indices,
    info: ObjectInfo,
    relay: RelayInputs,
    rendered: RenderedRelay,
    *,
    statefulset_applied: bool,
) -> DrainOutcome:
    """Gather, decide and act on the spool volumes of removed pods (drain.py)."""
    namespace, name = relay.namespace, relay.name
    state = ctx.states.get(namespace, name)
    claims = indices.claims_for(namespace, name)
    jobs = indices.drain_jobs_for(namespace, name)
    live = indices.child(("StatefulSet", namespace, name))
    (statefulset,) = [c for c in rendered.children if c["kind"] == "StatefulSet"]
    sts_status = live.status if live is not None else {}
    settled = (
        statefulset_applied
        and live is not None
        and live.applied_hash == applied_hash(statefulset)
        and int(sts_status.get("observedGeneration") or 0) >= live.generation
    )
    pods: frozenset[int] | None = None
    if drain.wants_pod_list(
        relay.spec.replicas, claims, jobs, int(sts_status.get("replicas") or 0)
    ):
        pods = await drain.pod_ordinals(ctx.applier.client, relay)
    uids = {job.uid for job in jobs}
    for stale in [uid for uid in state.drain_reports if uid not in uids]:
        del state.drain_reports[stale]
    state.drain_told &= uids
    for job in jobs:
        if job.state != "running" and job.uid not in state.drain_reports:
            state.drain_reports[job.uid] = await drain.read_report(
                ctx.applier.client, namespace, job.name
            )
    plan = drain.plan_drains(
        drain.DrainInputs(
            relay=name,
            replicas=relay.spec.replicas,
            policy=relay.spec.queue.on_scale_down,
            claims=claims,
            jobs=jobs,
            pod_ordinals=pods,
            statefulset_settled=settled,
            ready_pods=int(sts_status.get("readyReplicas") or 0),
            now=ctx.clock(),
            attempts=state.drain_attempts,
            reports=state.drain_reports,
            told=frozenset(state.drain_told),
        )
    )
    outcome = await drain.act(ctx.applier.client, relay, plan, statefulset, ctx.settings)
    state.drain_attempts = dict(plan.attempts)
    state.drain_told |= set(plan.told)
    for event in plan.events:
        if event.created is not None and event.created not in outcome.created:
            continue  # not created after all (the cache lagged): the next pass tells
        ctx.post_event(info, event.type, event.reason, event.message)
    condition = plan.condition
    assert condition is not None
    if outcome.failures:
        ctx.metrics.errors.labels("MailRelay").inc()
        log.warning(
            "Could not carry out every drain step of MailRelay %s/%s: %s",
            namespace,
            name,
            "; ".join(outcome.failures),
        )
        condition = ConditionUpdate(
            drain.DRAINING,
            "True",
            "DrainActionFailed",
            f"{condition.message} The API server refused: {' | '.join(outcome.failures)}",
        )
    return DrainOutcome(condition, plan.recheck, not outcome.failures)


async def _dkim_answers(ctx: Context, routes: Sequence[ObjectInfo]) -> dict[str, TxtAnswer]:
    """The TXT records the signing routes' selectors need (gathered before deciding)."""
    names: list[str] = []
    for route in routes:
        if not route.spec.get("dkim"):
            continue
        try:
            spec = models.MailRouteSpec.model_validate(route.spec)
        except ValidationError:
            continue  # judge_routes reports it
        names += record_names(spec)
    return await ctx.dns.lookup_all(names) if names else {}


async def _sync_pods(ctx: Context, relay: RelayInputs, marks: dict[str, str]) -> bool:
    """Make the relay's live pods reload what ``marks`` name now (podsync); False to retry."""
    state = ctx.states.get(relay.namespace, relay.name)
    if state.pods_synced == marks:
        return True
    try:
        await touch_pods(ctx.applier.client, relay.namespace, selector_labels(relay), marks)
    except (ApiError, httpx2.HTTPError) as error:
        log.warning(
            "Could not ask the pods of MailRelay %s/%s to reload: %s",
            relay.namespace,
            relay.name,
            _api_message(error),
        )
        return False
    state.pods_synced = marks
    return True


async def _write_route_status(
    ctx: Context, verdict: RouteVerdict, status: Mapping[str, Any]
) -> None:
    """Write a route's status; a route deleted meanwhile needs none (its event follows)."""
    with contextlib.suppress(ObjectGone):
        await write_route_status(
            verdict, status, patch_status=ctx.applier.patch_status, post_event=ctx.post_event
        )


def _monitor_wanted(spec: models.MailRelaySpec | None) -> bool:
    return bool(spec and spec.metrics.enabled and spec.metrics.service_monitor.enabled)


class _Skipped(Exception):
    """Marks a child not applied because the ConfigMap before it failed."""


_SKIPPED = _Skipped()


def _api_message(error: BaseException) -> str:
    """The API server's message for a failed request, without a traceback."""
    status = getattr(error, "status", None)
    message = getattr(status, "message", None)
    if message:
        return str(message)
    response = getattr(error, "response", None)
    if response is not None:
        with contextlib.suppress(ValueError):
            return str(response.json().get("message") or response.text)[:500]
    return f"{type(error).__name__}: {error}"[:500]


# Where the operator copies MailRelay fields into its children: a refused child field named
# by the API server -> the MailRelay field to fix.
SPEC_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("StatefulSet", "spec.template.spec.affinity", "spec.affinity"),
    ("StatefulSet", "spec.template.spec.nodeSelector", "spec.nodeSelector"),
    ("StatefulSet", "spec.template.spec.tolerations", "spec.tolerations"),
    ("StatefulSet", "spec.template.spec.priorityClassName", "spec.priorityClassName"),
    ("StatefulSet", "spec.template.spec.containers[0].image", "spec.image"),
    ("StatefulSet", "spec.template.spec.containers[0].resources", "spec.resources"),
    ("StatefulSet", "spec.template.metadata.annotations", "spec.podAnnotations"),
    ("StatefulSet", "spec.volumeClaimTemplates", "spec.queue"),
    ("StatefulSet", "spec.replicas", "spec.replicas"),
    ("Service", "metadata.annotations", "spec.service.annotations"),
    ("Service", "spec.loadBalancerSourceRanges", "spec.service.loadBalancerSourceRanges"),
    ("Service", "spec.externalTrafficPolicy", "spec.service.externalTrafficPolicy"),
    ("Service", "spec.type", "spec.service.type"),
)


@dataclass(frozen=True)
class ApplyProblem:
    """Why the API server refused one child: a CamelCase reason and a message with a hint."""

    kind: str
    name: str
    reason: str
    message: str


def apply_problem(
    kind: str, name: str, error: BaseException, resync_seconds: float
) -> ApplyProblem:
    """The refusal of one child, with the hint that fits its cause (pure)."""
    if isinstance(error, NotOwned):
        return ApplyProblem(kind, name, CHILD_NOT_OWNED, f"{error}.")
    status = getattr(error, "status", None)
    api_reason = str(getattr(status, "reason", None) or "")
    text = _api_message(error).rstrip(". ")
    details = getattr(status, "details", None)
    fields = [
        str(getattr(cause, "field", "") or "") for cause in getattr(details, "causes", None) or ()
    ]
    retry = (
        f"The operator retries after 1s, doubling up to every {resync_seconds:g}s, and "
        "recovers on its own once fixed."
    )
    # 422 Invalid names fields in its causes; a field server-side apply cannot type
    # ("field not declared in schema") comes back as a bare 500 naming the path in its text.
    if api_reason in ("Invalid", "BadRequest") or "failed to create typed patch object" in text:
        sources = sorted(
            {
                source
                for child_kind, path, source in SPEC_SOURCES
                if child_kind == kind
                and (any(field.startswith(path) for field in fields) or f"{path}." in text)
            }
        )
        if sources:
            hint = (
                f"The operator copies {', '.join(sources)} of the MailRelay into the {kind} "
                f"unchanged, and the API server refused it there: fix {', '.join(sources)} "
                "in the MailRelay."
            )
        else:
            hint = f"The {kind} the operator rendered is invalid; please report this as a bug."
        return ApplyProblem(kind, name, f"{kind}Invalid", f"{kind} {name}: {text}. {hint} {retry}")
    if api_reason == "Forbidden":
        if "exceeded quota" in text:
            hint = (
                "A ResourceQuota of the namespace is used up: raise the quota, or lower "
                "spec.replicas, spec.resources or spec.queue.size of the MailRelay."
            )
        else:
            hint = (
                "An admission policy or webhook refused it: change the MailRelay to satisfy "
                "the policy (the message says which), or ask for an exception."
            )
        return ApplyProblem(
            kind, name, f"{kind}Forbidden", f"{kind} {name}: {text}. {hint} {retry}"
        )
    if kind == "Service" and ("range is full" in text or "valid IPs" in text):
        hint = "The cluster's Service IP range is exhausted: free addresses or widen the range."
        return ApplyProblem(
            kind, name, "ServiceIPsExhausted", f"{kind} {name}: {text}. {hint} {retry}"
        )
    return ApplyProblem(kind, name, "ApplyFailed", f"{kind} {name}: {text}. {retry}")


async def _apply_children(
    ctx: Context, indices: Indices, relay: RelayInputs, rendered: RenderedRelay
) -> tuple[list[ConditionUpdate], list[ApplyProblem]]:
    """Apply what differs, delete what is turned off; conditions for what went wrong.

    A child the API server refuses (an invalid field, quota, admission, a full Service IP
    range) does not stop the others or the status: it becomes ``ChildrenApplied=False`` with
    the server's message and a hint for its cause, and the work queue retries with backoff.
    """

    memory = ctx.states.get(relay.namespace, relay.name).applied

    async def ensure(child: dict[str, Any]) -> None:
        await ctx.applier.ensure(child, indices.child(key_of(child)), memory)

    # The ConfigMap first, so a rolled pod never starts with an older config; the rest at once.
    first, *rest = rendered.children
    outcomes: list[BaseException | None] = [
        *await asyncio.gather(ensure(first), return_exceptions=True)
    ]
    if outcomes[0] is None:
        outcomes += await asyncio.gather(*(ensure(child) for child in rest), return_exceptions=True)
    else:
        outcomes += [_SKIPPED] * len(rest)
    removals = await asyncio.gather(
        *(
            ctx.applier.remove(key, indices.child(key), relay.uid, memory)
            for key in rendered.absent
        ),
        return_exceptions=True,
    )
    updates: list[ConditionUpdate] = []
    problems: list[ApplyProblem] = []
    failures: list[str] = []
    for child, outcome in zip(rendered.children, outcomes, strict=True):
        if outcome is _SKIPPED:
            continue  # not tried: the ConfigMap failed first, and its failure is reported
        kind, _, child_name = key_of(child)
        if kind == "ServiceMonitor":
            if isinstance(outcome, ResourceMissing):
                updates.append(
                    ConditionUpdate(
                        SERVICE_MONITOR,
                        "False",
                        "ServiceMonitorCRDMissing",
                        "metrics.serviceMonitor.enabled is true, but the API server does not "
                        "serve monitoring.coreos.com/v1 ServiceMonitor: install the "
                        "prometheus-operator CRDs, or set metrics.serviceMonitor.enabled to "
                        "false.",
                    )
                )
                continue
            if outcome is None:
                updates.append(
                    ConditionUpdate(
                        SERVICE_MONITOR, "True", "Applied", "The ServiceMonitor is in place."
                    )
                )
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome
        if isinstance(outcome, BaseException):
            problems.append(
                apply_problem(kind, child_name, outcome, float(ctx.settings.resync_seconds))
            )
    for key, removal in zip(rendered.absent, removals, strict=True):
        if isinstance(removal, BaseException):
            failures.append(f"deleting {key[0]} {key[2]}: {_api_message(removal)}")
    failures = [problem.message for problem in problems] + failures
    if failures:
        ctx.metrics.errors.labels("MailRelay").inc()
        log.warning(
            "Could not apply every child of MailRelay %s/%s: %s",
            relay.namespace,
            relay.name,
            "; ".join(failures),
        )
        if any(problem.reason == CHILD_NOT_OWNED for problem in problems):
            # An object in the way is not the API server's refusal: name it (the Event of
            # this condition's flip tells the user which object to move).
            reason, text = CHILD_NOT_OWNED, "Not applied: "
        else:
            reason, text = "ApplyFailed", "The API server refused: "
        updates.append(
            ConditionUpdate(CHILDREN_APPLIED, "False", reason, text + " | ".join(failures))
        )
    else:
        updates.append(
            ConditionUpdate(
                CHILDREN_APPLIED, "True", "Applied", "Every child matches the rendered state."
            )
        )
    return updates, problems


async def _write_relay_status(
    ctx: Context,
    relay: ObjectInfo,
    updates: Iterable[ConditionUpdate],
    extra: Mapping[str, Any],
    *,
    monitor_wanted: bool,
) -> None:
    before = relay.status.get("conditions") or []
    conditions = set_conditions(before, list(updates), generation=relay.generation, clock=ctx.clock)
    if not monitor_wanted:
        conditions = remove_condition(conditions, SERVICE_MONITOR)
    order = [
        READY,
        CONFIG_RENDERED,
        CHILDREN_APPLIED,
        ROUTES_RESOLVED,
        SECRETS_RESOLVED,
        SERVICE_MONITOR,
        drain.DRAINING,
    ]
    conditions.sort(key=lambda c: order.index(c["type"]) if c["type"] in order else len(order))
    status: dict[str, Any] = {
        "observedGeneration": relay.generation,
        "conditions": conditions,
        **extra,
    }
    if not status_differs(relay.status, status):
        return
    await ctx.applier.patch_status("MailRelay", relay.namespace, relay.name, status)
    changed = sorted(k for k, v in status.items() if relay.status.get(k) != v)
    log.info(
        "Wrote status of MailRelay %s/%s (%s)", relay.namespace, relay.name, ", ".join(changed)
    )
    log.debug(
        "Status of MailRelay %s/%s was %s, now %s",
        relay.namespace,
        relay.name,
        dict(relay.status),
        status,
    )
    for condition in conditions:
        if condition["type"] == drain.DRAINING:
            continue  # its own Events (DrainStarted, DrainSucceeded, ...) tell each step
        # A new relay is not Ready yet: that is expected, not news; a later flip is.
        first_ready = condition["type"] == READY and find_condition(before, READY) is None
        if not first_ready and worth_an_event(before, conditions, condition["type"]):
            kind = "Normal" if condition["status"] == "True" else "Warning"
            ctx.post_event(relay, kind, condition["reason"], condition["message"])


def child_needs_pass(
    ctx: Context,
    indices: Indices,
    key: ChildKey,
    owner: str,
    deleted: bool,
) -> bool:
    """Whether a child's watch event can change anything (so our own writes do not echo).

    ``owner`` is the relay the child belongs to (its ``app.kubernetes.io/instance`` label).
    """
    if deleted:
        return True
    live = indices.child(key)
    if live is None:
        return True
    state = ctx.states.peek(key[1], owner)
    remembered = state.applied.get(key) if state is not None else None
    if remembered is not None and (remembered.applied_hash, remembered.fields_digest) != (
        live.applied_hash,
        live.fields_digest,
    ):
        return True
    if key[0] == "StatefulSet":
        relay = indices.relay(key[1], key[2])
        if relay is None:
            return False
        seen = (relay.status.get("replicas"), relay.status.get("readyReplicas"))
        return seen != (
            int(live.status.get("replicas") or 0),
            int(live.status.get("readyReplicas") or 0),
        ) or live.generation != int(live.status.get("observedGeneration") or 0)
    return False


# Queue priorities: a pass something asked for goes before a resync pass.
URGENT, RESYNC = 0, 1


@dataclass
class WorkQueue:
    """Relays waiting for a pass, served by a few worker tasks; triggers only enqueue.

    Many triggers for one relay (its own events, each child's, each route's, the timer)
    collapse into one pending entry, served after ``settle_seconds`` so a burst makes one
    pass; a relay is never reconciled twice at once: a trigger during its pass marks it
    dirty and it runs once more afterwards. kopf's per-object workers stay free, so the
    watch cache (indices) keeps up while passes run.

    Passes triggered by a change go first; resync passes wait until none is left. At 1,000
    relays the timers ask for ~100 passes a second (resync 10 s): served in arrival order,
    they made new relays wait behind relays that needed nothing, and while the queue is
    busy a relay's resync entries merge into one.

    A pass that failed (an exception, or a child or pod update the API server refused) is
    retried after ``first_retry_seconds``, doubling per failure in a row, at most the resync
    period; a pass that succeeds resets it (cert-manager's rate-limited workqueue). Its place
    in the queue is part of the relay's ``RelayState``; after a pass that found the relay
    gone, with nothing else waiting for it, the state is dropped.
    """

    ctx: Context
    workers: int = 8
    settle_seconds: float = 0.0
    indices: Indices | None = None
    queue: asyncio.PriorityQueue[tuple[int, int, RelayKey]] = field(
        default_factory=asyncio.PriorityQueue
    )
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    progress: Progress | None = None
    # A failed pass is retried after this, doubling per failure, at most the resync period.
    first_retry_seconds: float = FIRST_RETRY_SECONDS
    _order: Iterator[int] = field(default_factory=itertools.count)

    @property
    def states(self) -> RelayStates:
        """Where each relay's place in the queue is kept (with the rest of its state)."""
        return self.ctx.states

    def hold(self, namespace: str, name: str, seconds: float) -> None:
        """Start no pass of this relay for ``seconds`` (a pass due meanwhile waits).

        A route deleted just before its relay (``kubectl delete -f`` of a folder) would
        otherwise make a pass that renders the relay without it, updating the ConfigMap and
        rolling the StatefulSet of a relay that is about to go.
        """
        state = self.states.get(namespace, name)
        state.held_until = max(time.monotonic() + seconds, state.held_until)

    def oldest_waiting(self) -> float | None:
        """When the entry waiting longest became due (None: none waits)."""
        due = [state.due for state in self.states.states.values() if state.due is not None]
        return min(due, default=None)

    def _put(self, entry: tuple[int, int, RelayKey]) -> None:
        state = self.states.peek(*entry[2])
        if state is None or state.pending != entry[0]:
            return  # superseded meanwhile
        if state.due is None:
            state.due = time.monotonic()
        self.queue.put_nowait(entry)

    def enqueue(
        self,
        indices: Indices,
        namespace: str,
        name: str,
        *,
        delay: float = 0.0,
        priority: int = URGENT,
    ) -> None:
        """Ask for a pass over this relay (no-op if one is already waiting).

        ``delay`` waits longer than ``settle_seconds`` (a route whose relay is not cached yet).
        """
        self.indices = indices
        if not self.tasks:
            # Started from a handler, so the tasks inherit kopf's context (Event posting).
            self.tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        state = self.states.get(namespace, name)
        if state.active:
            state.dirty = priority if state.dirty is None else min(priority, state.dirty)
            return
        if state.pending is not None and state.pending <= priority:
            return  # already waiting, at this priority or a higher one
        state.pending = priority
        entry = (priority, next(self._order), (namespace, name))
        wait = max(self.settle_seconds, delay, state.held_until - time.monotonic())
        if wait > 0:
            # A burst (a relay and its routes applied together) becomes one pass.
            asyncio.get_running_loop().call_later(wait, self._put, entry)
        else:
            self._put(entry)

    def wake(self, namespace: str, name: str) -> None:
        """Ask for a pass over a relay the queue has seen, for news from outside the
        indices (the relay pods' upstream status)."""
        if self.indices is not None:
            self.enqueue(self.indices, namespace, name)

    def _retry(self, key: RelayKey) -> None:
        state = self.states.peek(*key)
        if state is None:
            return
        state.retry = None
        if self.indices is not None:
            self.enqueue(self.indices, *key, priority=URGENT)

    async def _work(self) -> None:
        while True:
            priority, order, key = await self.queue.get()
            state = self.states.peek(*key)
            if state is None or state.pending != priority:
                continue  # superseded by an entry of higher priority, or served already
            held = state.held_until - time.monotonic()
            if held > 0:
                state.due = None
                asyncio.get_running_loop().call_later(held, self._put, (priority, order, key))
                continue
            state.held_until = 0.0
            state.due = None
            state.pending = None
            state.active = True
            if state.retry is not None:
                state.retry.cancel()  # this pass is the retry
                state.retry = None
            retry = False
            try:
                assert self.indices is not None
                retry = await reconcile_relay(
                    self.ctx, self.indices, *key, resync=priority == RESYNC
                )
            except Exception:
                retry = True
                log.exception(
                    "Reconciling MailRelay %s/%s failed; it is retried with backoff", *key
                )
            finally:
                state.active = False
                if self.progress is not None:
                    self.progress.passed()
                self._after_pass(key, state, retry)

    def _after_pass(self, key: RelayKey, state: RelayState, retry: bool) -> None:
        """Schedule what follows a pass: the retry of a failure, a pass asked for meanwhile,
        or nothing, and then drop the state of a relay that is gone."""
        if retry:
            state.failures += 1
            delay = retry_delay(
                state.failures, float(self.ctx.settings.resync_seconds), self.first_retry_seconds
            )
            log.debug(
                "Retrying the pass of MailRelay %s/%s in %gs (%d failed in a row)",
                *key,
                delay,
                state.failures,
            )
            state.retry = asyncio.get_running_loop().call_later(delay, self._retry, key)
        else:
            state.failures = 0
        again, state.dirty = state.dirty, None
        if again is not None and self.indices is not None:
            # Something changed during the pass: look again now, backoff or not.
            self.enqueue(self.indices, *key, priority=again)
        elif self.indices is None or self.indices.relay(*key) is None:
            self.ctx.forget(*key)

    async def stop(self) -> None:
        """Cancel the workers and the retries (operator shutdown)."""
        for key in self.states:
            state = self.states.peek(*key)
            if state is not None and state.retry is not None:
                state.retry.cancel()
                state.retry = None
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
