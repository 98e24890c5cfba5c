"""MailRoute logic: which routes a relay carries, and each route's status.

Gather, decide, act:

* gather: the kopf indices in ``main`` keep every route by ``(namespace, relayRef.name)`` and
  the key names (never values) of every Secret; ``ObjectInfo`` is what an index keeps;
* decide: ``judge_routes`` (pure) validates each route, checks its relay, the relay's
  ``routeSelector``, its Secret references and conflicts, and says which routes go into the
  relay's config; ``route_status`` (pure) turns a verdict into the status to write;
* act: ``write_route_status`` patches a route's status only when it differs, and posts an
  Event when a condition flips.

Binding: a route names its relay with ``relayRef``; when the relay sets ``routeSelector`` the
route must also match it. The relay's reconcile (``relays.py``) writes the statuses of the
routes that name it, and of the routes naming a relay that does not exist.

Conflicts follow Gateway API: of the routes with the same match and priority, the oldest
(``creationTimestamp``, then name) keeps serving and each newer one gets ``Accepted=False``,
reason ``Conflicted``, naming it; a newcomer never evicts an established route. A route
whose Secret references do not resolve is left out of the config, so it is not accepted
either: ``Accepted=False`` with the reason of ``ResolvedRefs``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from mailrelay.operator import models
from mailrelay.operator.apply import resource_version_number
from mailrelay.operator.conditions import (
    Clock,
    ConditionUpdate,
    find_condition,
    remove_condition,
    set_conditions,
    worth_an_event,
)
from mailrelay.operator.dkim import DKIM_READY, DkimVerdict, KeyLookup, TxtAnswer, judge_dkim
from mailrelay.operator.relay_config import BoundRoute, api_secret_files
from mailrelay.relay.problems import validation_problems

log = logging.getLogger(__name__)

ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
READY = "Ready"
# Set from the relay pods' reports (upstream_auth.py), kept while the route is in the config.
UPSTREAM_AUTHENTICATED = "UpstreamAuthenticated"

PostEvent = Callable[["ObjectInfo", str, str, str], None]  # object, type, reason, message


@dataclass(frozen=True)
class SecretNotWatched:
    """A referenced Secret the watch cache lacks, looked up: absent, or outside the selector."""

    exists: bool
    selector: str  # the operator's Secret label selector

    def label_hint(self, name: str) -> str:
        """How to put a Secret inside the selector."""
        terms = [t.strip().replace("==", "=") for t in self.selector.split(",")]
        if all(t.count("=") == 1 and "!" not in t and " " not in t for t in terms):
            return f"kubectl label secret {name} {' '.join(terms)}"
        return f"give Secret {name!r} labels matching {self.selector!r}"


# Secret name -> its keys; None (or SecretNotWatched, once looked up) if the cache lacks it.
SecretKeys = Callable[[str], frozenset[str] | SecretNotWatched | None]


@dataclass(frozen=True)
class ObjectInfo:
    """What an index keeps of a MailRelay or MailRoute (specs are small; no Secrets here)."""

    kind: str
    namespace: str
    name: str
    uid: str
    generation: int
    labels: Mapping[str, str] = field(default_factory=dict)
    spec: Mapping[str, Any] = field(default_factory=dict)
    status: Mapping[str, Any] = field(default_factory=dict)
    resource_version: int = 0
    created: str = ""  # metadata.creationTimestamp (RFC 3339 in UTC, so it sorts as text)
    deleting: bool = False  # metadata.deletionTimestamp is set

    def event_target(self) -> dict[str, Any]:
        """The minimal body kopf needs to post an Event about this object."""
        return {
            "apiVersion": models.API_VERSION,
            "kind": self.kind,
            "metadata": {"namespace": self.namespace, "name": self.name, "uid": self.uid},
        }


def object_info(body: Mapping[str, Any], kind: str | None = None) -> ObjectInfo:
    """What the indices keep of a MailRelay or MailRoute body (kopf's, or a plain dict)."""
    meta = body.get("metadata", {})
    return ObjectInfo(
        kind=kind or str(body.get("kind")),
        namespace=str(meta.get("namespace")),
        name=str(meta.get("name")),
        uid=str(meta.get("uid")),
        generation=int(meta.get("generation") or 0),
        labels=dict(meta.get("labels") or {}),
        spec=plain_copy(body.get("spec") or {}),
        status=plain_copy(body.get("status") or {}),
        resource_version=resource_version_number(meta.get("resourceVersion")),
        created=str(meta.get("creationTimestamp") or ""),
        deleting=meta.get("deletionTimestamp") is not None,
    )


def plain_copy(value: Any) -> Any:
    """A plain deep copy of a body part (kopf hands out live views)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: plain_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_copy(v) for v in value]
    return value


@dataclass(frozen=True)
class RouteVerdict:
    """The decision about one route for one pass."""

    route: ObjectInfo
    spec: models.MailRouteSpec | None
    accepted: ConditionUpdate
    resolved_refs: ConditionUpdate
    dkim: DkimVerdict | None = None  # None: the route does not sign (or was not judged)
    # Set for a signing route that cannot sign yet: rendered held (RouteConfig.held), so its
    # mail waits instead of going out unsigned or through another route.
    held: str | None = None

    @property
    def included(self) -> bool:
        """Whether the route goes into the relay's config."""
        return (
            self.accepted.status == "True"
            and self.resolved_refs.status == "True"
            and (self.dkim is None or self.dkim.usable)
        )


def validation_message(error: ValidationError, data: object) -> str:
    """A one-line summary of a spec's problems (camelCase paths, never the input values)."""
    return "; ".join(validation_problems(error, data))


def secret_refs(spec: models.MailRouteSpec) -> list[tuple[str, str, str]]:
    """(field path, Secret name, key) of every Secret key a route's upstreams need."""
    refs: list[tuple[str, str, str]] = []
    for index, upstream in enumerate((spec.upstream, *spec.fallbacks)):
        where = "upstream" if index == 0 else f"fallbacks[{index - 1}]"
        if upstream.smtp is not None:
            creds = upstream.smtp.credentials_secret_ref
            if creds is not None:
                path = f"{where}.smtp.credentialsSecretRef"
                refs += [
                    (path, creds.name, creds.username_key),
                    (path, creds.name, creds.password_key),
                ]
            if upstream.smtp.ca_secret_ref is not None:
                ca = upstream.smtp.ca_secret_ref
                refs.append((f"{where}.smtp.caSecretRef", ca.name, ca.key))
            oauth = upstream.smtp.oauth2
            if oauth is not None:
                path = f"{where}.smtp.oauth2.secretRef"
                keys = [oauth.secret_ref.username_key, oauth.secret_ref.client_id_key]
                keys.append(oauth.secret_ref.client_secret_key)
                if oauth.grant == "refresh_token":
                    keys.append(oauth.secret_ref.refresh_token_key)
                refs += [(path, oauth.secret_ref.name, key) for key in keys]
        elif upstream.api is not None and upstream.api.credentials_secret_ref is not None:
            ref = upstream.api.credentials_secret_ref
            path = f"{where}.api.credentialsSecretRef"
            refs += [(path, ref.name, key) for key, _ in api_secret_files(upstream.api)]
    for index, domain in enumerate(spec.dkim):
        for role, selector in domain.selectors():
            key_ref = selector.secret_ref
            refs.append((f"dkim[{index}].{role}.secretRef", key_ref.name, key_ref.key))
    return refs


def check_secret_refs(
    refs: Sequence[tuple[str, str, str]], secret_keys: SecretKeys, *, subject: str
) -> ConditionUpdate:
    """ResolvedRefs for a list of references: the first missing Secret or key, or True."""
    for path, name, key in refs:
        keys = secret_keys(name)
        if isinstance(keys, SecretNotWatched) and keys.exists:
            return ConditionUpdate(
                RESOLVED_REFS,
                "False",
                "SecretNotLabelled",
                f"{path} names Secret {name!r}, which exists but lacks the label the operator "
                f"watches Secrets by ({keys.selector}), so its keys cannot be checked; "
                f"label it ({keys.label_hint(name)}) and the {subject} recovers on its own.",
            )
        if keys is None or isinstance(keys, SecretNotWatched):
            label = f" and the label {keys.selector}" if isinstance(keys, SecretNotWatched) else ""
            return ConditionUpdate(
                RESOLVED_REFS,
                "False",
                "SecretNotFound",
                f"{path} names Secret {name!r}, which does not exist in this namespace; "
                f"create it (with key {key!r}{label}) and the {subject} recovers on its own.",
            )
        if key not in keys:
            return ConditionUpdate(
                RESOLVED_REFS,
                "False",
                "SecretKeyMissing",
                f"{path}: Secret {name!r} has no key {key!r} (it has: "
                f"{', '.join(sorted(keys)) or 'no keys'}); add the key or point the "
                "reference at the right one.",
            )
    return ConditionUpdate(
        RESOLVED_REFS, "True", "ResolvedRefs", "Every referenced Secret key exists."
    )


def selector_matches(selector: models.LabelSelector, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics: every term must hold."""
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    for term in selector.match_expressions:
        present = term.key in labels
        value = labels.get(term.key)
        if term.operator == "In" and value not in term.values:
            return False
        if term.operator == "NotIn" and present and value in term.values:
            return False
        if term.operator == "Exists" and not present:
            return False
        if term.operator == "DoesNotExist" and present:
            return False
    return True


def _match_key(spec: models.MailRouteSpec) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
    return (
        spec.priority,
        tuple(sorted(spec.match.sender_domains)),
        tuple(sorted(spec.match.recipient_domains)),
    )


def _refs_pending() -> ConditionUpdate:
    return ConditionUpdate(RESOLVED_REFS, "Unknown", "NotChecked", "The route is not accepted.")


def judge_routes(
    relay: ObjectInfo | None,
    relay_spec: models.MailRelaySpec | None,
    routes: Sequence[ObjectInfo],
    secret_keys: SecretKeys,
    *,
    dkim_keys: KeyLookup | None = None,
    dns_answers: Mapping[str, TxtAnswer] | None = None,
) -> list[RouteVerdict]:
    """Decide, for every route naming ``relay``, whether and why it is (not) carried.

    ``dkim_keys`` and ``dns_answers`` (gathered by the caller) judge signing routes; a
    signing route that cannot sign with a published key is left out (``dkim.py``).
    """
    verdicts: dict[str, RouteVerdict] = {}
    candidates: dict[str, models.MailRouteSpec] = {}
    for route in sorted(routes, key=lambda r: r.name):
        try:
            spec = models.MailRouteSpec.model_validate(route.spec)
        except ValidationError as error:
            verdicts[route.name] = RouteVerdict(
                route,
                None,
                ConditionUpdate(
                    ACCEPTED,
                    "False",
                    "InvalidSpec",
                    f"The spec is invalid: {validation_message(error, route.spec)}. "
                    "Fix the MailRoute.",
                ),
                _refs_pending(),
            )
            continue
        relay_name = spec.relay_ref.name
        if relay is None:
            accepted = ConditionUpdate(
                ACCEPTED,
                "False",
                "RelayNotFound",
                f"MailRelay {relay_name!r} does not exist in namespace {route.namespace}; "
                "create it or fix spec.relayRef.name.",
            )
        elif relay_spec is None:
            accepted = ConditionUpdate(
                ACCEPTED,
                "False",
                "RelayInvalid",
                f"MailRelay {relay_name!r} has an invalid spec; see its conditions.",
            )
        elif relay_spec.route_selector is not None and not selector_matches(
            relay_spec.route_selector, route.labels
        ):
            accepted = ConditionUpdate(
                ACCEPTED,
                "False",
                "NotSelected",
                f"MailRelay {relay_name!r} has a routeSelector this route's labels do not "
                "match; add the labels it selects.",
            )
        else:
            candidates[route.name] = spec
            continue
        verdicts[route.name] = RouteVerdict(route, spec, accepted, _refs_pending())

    # The oldest route of each (match, priority) holds it; the newer ones are conflicted.
    holders: dict[tuple[int, tuple[str, ...], tuple[str, ...]], ObjectInfo] = {}
    for route in sorted(routes, key=lambda r: (r.created, r.name)):
        if route.name in candidates:
            holders.setdefault(_match_key(candidates[route.name]), route)
    for route in routes:
        if route.name not in candidates:
            continue
        spec = candidates[route.name]
        holder = holders[_match_key(spec)]
        refs = check_secret_refs(secret_refs(spec), secret_keys, subject="route")
        if holder.name != route.name:
            accepted = ConditionUpdate(
                ACCEPTED,
                "False",
                "Conflicted",
                f"MailRoute {holder.name!r} has the same match and priority ({spec.priority}) "
                "and is older, so it keeps carrying that mail and this route is left out; "
                "change this route's priority or match (or delete one of the two).",
            )
        elif refs.status != "True":
            accepted = ConditionUpdate(
                ACCEPTED,
                "False",
                refs.reason,
                f"Left out of MailRelay {spec.relay_ref.name!r}'s config until its Secret "
                f"references resolve: {refs.message}",
            )
        else:
            accepted = ConditionUpdate(
                ACCEPTED, "True", "Accepted", f"Bound to MailRelay {spec.relay_ref.name!r}."
            )
        signing = judge_dkim(spec, dkim_keys or _no_keys, dns_answers or {})
        if signing is not None and not signing.usable and accepted.status == "True":
            accepted = ConditionUpdate(
                ACCEPTED,
                "False",
                signing.condition.reason,
                f"Held in MailRelay {spec.relay_ref.name!r}'s config until it can sign: "
                f"{signing.condition.message}",
            )
        held = None
        if spec.dkim and holder.name == route.name and accepted.status != "True":
            # Not left out: a broader route would take its mail and send it unsigned.
            accepted = replace(
                accepted,
                message=f"{accepted.message} Meanwhile its mail is held: new mail gets "
                "451 4.7.5 and queued mail waits; none goes out unsigned or another way.",
            )
            domains = ", ".join(d.domain for d in spec.dkim)
            held = (
                f"DKIM signing for {domains} is not ready (MailRoute {route.name}, "
                f"{accepted.reason}); try again later"
            )
        verdicts[route.name] = RouteVerdict(route, spec, accepted, refs, signing, held)
    return [verdicts[name] for name in sorted(verdicts)]


def _no_keys(secret: str, key: str) -> None:
    return None


def bound_routes(verdicts: Sequence[RouteVerdict]) -> list[BoundRoute]:
    """The routes that go into the relay's config (held signing routes too)."""
    bound = []
    for v in verdicts:
        if v.spec is None:
            continue
        if v.included:
            bound.append(BoundRoute(v.route.name, v.spec, v.dkim.choices if v.dkim else ()))
        elif v.held is not None:
            bound.append(BoundRoute(v.route.name, v.spec, held=v.held))
    return bound


def route_status(
    verdict: RouteVerdict,
    *,
    relay_name: str,
    relay_ready: bool,
    clock: Clock,
    upstream_auth: ConditionUpdate | None = None,
) -> dict[str, Any]:
    """The status a route should have after this pass (``upstream_auth``: how the relay
    pods' logins to its upstreams stand, None to leave that condition as it is)."""
    if not verdict.included:
        failing = verdict.accepted if verdict.accepted.status != "True" else verdict.resolved_refs
        ready = ConditionUpdate(READY, "False", failing.reason, failing.message)
    elif relay_ready:
        ready = ConditionUpdate(
            READY, "True", "Ready", f"MailRelay {relay_name!r} carries this route."
        )
    else:
        ready = ConditionUpdate(
            READY,
            "False",
            "RelayNotReady",
            f"The route is in MailRelay {relay_name!r}'s config, but the relay is not Ready yet.",
        )
    current = verdict.route.status.get("conditions") or []
    if not verdict.included:
        current = remove_condition(current, UPSTREAM_AUTHENTICATED)
    updates = [verdict.accepted, verdict.resolved_refs, ready]
    if upstream_auth is not None:
        updates.append(upstream_auth)
    if verdict.dkim is not None:
        updates.append(verdict.dkim.condition)
    conditions = set_conditions(
        [c for c in current if verdict.dkim is not None or c.get("type") != DKIM_READY],
        updates,
        generation=verdict.route.generation,
        clock=clock,
    )
    return {
        "observedGeneration": verdict.route.generation,
        "conditions": conditions,
        "relay": relay_name if verdict.accepted.status == "True" else None,
        # [] rather than absent: the API server defaults it so (a None would differ forever).
        "dkim": [dict(r) for r in verdict.dkim.records] if verdict.dkim is not None else [],
    }


def status_differs(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether writing ``desired`` would change anything (None means the field is absent)."""
    return any(current.get(key) != value for key, value in desired.items())


async def write_route_status(
    verdict: RouteVerdict,
    status: Mapping[str, Any],
    *,
    patch_status: Callable[[str, str, str, Mapping[str, Any]], Awaitable[None]],
    post_event: PostEvent,
) -> bool:
    """Patch the route's status if it changed; an Event for each condition that flipped."""
    route = verdict.route
    if not status_differs(route.status, status):
        return False
    await patch_status("MailRoute", route.namespace, route.name, status)
    before = route.status.get("conditions") or []
    posted: set[str] = set()  # Accepted=False repeats ResolvedRefs' reason: one Event is enough
    for type_ in (ACCEPTED, RESOLVED_REFS, UPSTREAM_AUTHENTICATED, DKIM_READY):
        after = status["conditions"]
        condition = find_condition(after, type_)
        if condition is not None and worth_an_event(before, after, type_):
            kind = "Normal" if condition["status"] == "True" else "Warning"
            if condition["status"] != "Unknown" and condition["reason"] not in posted:
                post_event(route, kind, condition["reason"], condition["message"])
                posted.add(condition["reason"])
    log.info("Wrote status of MailRoute %s/%s", route.namespace, route.name)
    return True
