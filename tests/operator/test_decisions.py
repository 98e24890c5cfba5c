"""Pure decisions: route binding and conflicts, Secret checks, readiness, when to write."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from lightkube import ApiError
from lightkube.models.meta_v1 import Status

from mailrelay.operator import models, rbac
from mailrelay.operator.__main__ import export_flags, parse_args
from mailrelay.operator.apply import (
    ChildState,
    Remembered,
    child_state,
    needs_apply,
    owned_fields_digest,
    with_applied_hash,
)
from mailrelay.operator.relays import (
    apply_problem,
    name_problem,
    ready_condition,
    routes_condition,
)
from mailrelay.operator.routes import ObjectInfo, judge_routes, route_status, selector_matches
from mailrelay.operator.settings import FIELD_MANAGER, load_settings

RELAY_SPEC: dict[str, Any] = {
    "listener": {"tls": {"secretName": "tls"}},
    "auth": {"usersSecretRef": {"name": "users"}},
}
SECRETS = {"smarthost": frozenset({"username", "password"}), "half": frozenset({"username"})}


def route(
    name: str,
    priority: int = 100,
    senders: tuple[str, ...] = (),
    created: str = "2026-12-01T10:00:00Z",
    **extra: Any,
) -> ObjectInfo:
    smtp: dict[str, Any] = {"host": "smtp.example.net"}
    if "secret" in extra:
        smtp["credentialsSecretRef"] = {"name": extra.pop("secret")}
    spec = {
        "relayRef": {"name": "outbound"},
        "priority": priority,
        "match": {"senderDomains": list(senders)},
        "upstream": {"smtp": smtp},
        **extra.pop("spec", {}),
    }
    return ObjectInfo(
        "MailRoute",
        "ns",
        name,
        "uid",
        1,
        labels=extra.pop("labels", {}),
        spec=spec,
        created=created,
    )


RELAY = ObjectInfo("MailRelay", "ns", "outbound", "uid", 1, spec=RELAY_SPEC)


def CLOCK() -> datetime:
    return datetime(2026, 12, 1, tzinfo=UTC)


def judge(
    routes: list[ObjectInfo], relay_spec: dict[str, Any] | None = None
) -> dict[str, tuple[str, str, bool]]:
    spec = models.MailRelaySpec.model_validate(relay_spec or RELAY_SPEC)
    verdicts = judge_routes(RELAY, spec, routes, SECRETS.get)
    return {v.route.name: (v.accepted.reason, v.resolved_refs.reason, v.included) for v in verdicts}


class TestJudgeRoutes:
    @pytest.mark.parametrize(
        ("routes", "expected"),
        [
            ([route("a")], {"a": ("Accepted", "ResolvedRefs", True)}),
            # Left out of the config for a Secret: not accepted either.
            (
                [route("a", secret="missing")],
                {"a": ("SecretNotFound", "SecretNotFound", False)},
            ),
            ([route("a", secret="half")], {"a": ("SecretKeyMissing", "SecretKeyMissing", False)}),
            # Same match and priority: the older route keeps serving.
            (
                [
                    route("a", senders=("x.example",), created="2026-12-02T00:00:00Z"),
                    route("b", senders=("x.example",), created="2026-12-01T00:00:00Z"),
                ],
                {
                    "a": ("Conflicted", "ResolvedRefs", False),
                    "b": ("Accepted", "ResolvedRefs", True),
                },
            ),
            # Created in the same second: the name breaks the tie.
            (
                [route("b", senders=("x.example",)), route("a", senders=("x.example",))],
                {
                    "a": ("Accepted", "ResolvedRefs", True),
                    "b": ("Conflicted", "ResolvedRefs", False),
                },
            ),
            (
                [
                    route("a", senders=("x.example",)),
                    route("b", priority=50, senders=("x.example",)),
                ],
                {"a": ("Accepted", "ResolvedRefs", True), "b": ("Accepted", "ResolvedRefs", True)},
            ),
            (
                [route("a", spec={"upstream": {"smtp": {"host": "h", "tls": "none"}}})],
                {"a": ("InvalidSpec", "NotChecked", False)},
            ),
        ],
        ids=[
            "plain",
            "secret-missing",
            "key-missing",
            "conflict-oldest-wins",
            "conflict-same-second",
            "priorities-differ",
            "invalid",
        ],
    )
    def test_verdicts(self, routes: list[ObjectInfo], expected: dict[str, Any]) -> None:
        assert judge(routes) == expected

    def test_route_selector_must_match(self) -> None:
        spec = {**RELAY_SPEC, "routeSelector": {"matchLabels": {"tier": "gold"}}}
        result = judge(
            [route("a"), route("b", senders=("b.example",), labels={"tier": "gold"})], spec
        )
        assert result == {
            "a": ("NotSelected", "NotChecked", False),
            "b": ("Accepted", "ResolvedRefs", True),
        }

    def test_a_newcomer_never_evicts_the_route_that_serves(self) -> None:
        """Gateway API's rule: the established route keeps the mail, the newcomer is told."""
        established = route("z-team", senders=("x.example",), created="2026-11-01T00:00:00Z")
        newcomer = route("a-intruder", senders=("x.example",), created="2026-12-01T00:00:00Z")
        verdicts = {
            v.route.name: v
            for v in judge_routes(
                RELAY,
                models.MailRelaySpec.model_validate(RELAY_SPEC),
                [established, newcomer],
                SECRETS.get,
            )
        }
        assert verdicts["z-team"].included
        conflicted = verdicts["a-intruder"].accepted
        assert (conflicted.status, conflicted.reason) == ("False", "Conflicted")
        assert "'z-team'" in conflicted.message and "priority (100)" in conflicted.message
        assert not verdicts["a-intruder"].included

    def test_an_invalid_or_unselected_route_holds_no_match(self) -> None:
        """Only routes that would be carried compete: an older broken one blocks nobody."""
        spec = {**RELAY_SPEC, "routeSelector": {"matchLabels": {"tier": "gold"}}}
        older = route("old", senders=("x.example",), created="2026-11-01T00:00:00Z")
        newer = route(
            "new", senders=("x.example",), created="2026-12-01T00:00:00Z", labels={"tier": "gold"}
        )
        assert judge([older, newer], spec) == {
            "old": ("NotSelected", "NotChecked", False),
            "new": ("Accepted", "ResolvedRefs", True),
        }

    def test_a_route_left_out_for_a_secret_is_not_bound(self) -> None:
        (verdict,) = judge_routes(
            RELAY,
            models.MailRelaySpec.model_validate(RELAY_SPEC),
            [route("a", secret="missing")],
            SECRETS.get,
        )
        status = route_status(verdict, relay_name="outbound", relay_ready=True, clock=CLOCK)
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Accepted"]["status"] == "False"
        assert conditions["Accepted"]["reason"] == "SecretNotFound"
        assert "'missing'" in conditions["Accepted"]["message"]
        assert conditions["Ready"]["status"] == "False"
        assert status["relay"] is None

    def test_missing_relay(self) -> None:
        (verdict,) = judge_routes(None, None, [route("a")], SECRETS.get)
        assert (verdict.accepted.reason, verdict.included) == ("RelayNotFound", False)


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]},
            {"a": "2"},
            True,
        ),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "x"}, False),
    ],
)
def test_selector_matches(selector: dict[str, Any], labels: dict[str, str], matches: bool) -> None:
    assert selector_matches(models.LabelSelector.model_validate(selector), labels) is matches


SPEC = models.MailRelaySpec.model_validate(RELAY_SPEC)  # replicas: 2


@pytest.mark.parametrize(
    ("sts", "config_ok", "expected"),
    [
        (None, False, ("False", "ConfigNotRendered")),
        (None, True, ("False", "RolloutPending")),
        (
            ChildState(None, "", (), 2, {"observedGeneration": 1, "readyReplicas": 2}),
            True,
            ("False", "RolloutPending"),
        ),
        (
            ChildState(None, "", (), 2, {"observedGeneration": 2, "readyReplicas": 1}),
            True,
            ("False", "ReplicasNotReady"),
        ),
        (
            ChildState(None, "", (), 2, {"observedGeneration": 2, "readyReplicas": 2}),
            True,
            ("True", "ReplicasReady"),
        ),
    ],
)
def test_ready_condition(
    sts: ChildState | None, config_ok: bool, expected: tuple[str, str]
) -> None:
    update = ready_condition(SPEC, sts, config_ok)
    assert (update.status, update.reason) == expected


def test_routes_condition_names_what_was_left_out() -> None:
    spec = models.MailRelaySpec.model_validate(RELAY_SPEC)
    verdicts = judge_routes(
        RELAY, spec, [route("a"), route("b", senders=("b.example",), secret="missing")], SECRETS.get
    )
    update = routes_condition(verdicts)
    assert (update.status, update.reason) == ("False", "SecretNotFound")
    assert "Left out of the config: b." in update.message


def test_name_problem() -> None:
    assert name_problem("outbound") is None
    assert name_problem("x" * 53) is not None


class TestNeedsApply:
    DESIRED, _ = with_applied_hash(
        {"kind": "ConfigMap", "metadata": {"name": "c", "namespace": "n"}}
    )
    HASH = DESIRED["metadata"]["annotations"]["mailrelay.dev/applied-hash"]

    @pytest.mark.parametrize(
        ("live", "remembered", "now", "expected"),
        [
            (None, None, 100.0, True),
            (ChildState("other", "d1", (), 1), None, 100.0, True),
            (ChildState(HASH, "d1", (), 1), None, 100.0, True),  # after a restart: confirm once
            (ChildState(HASH, "d1", (), 1), Remembered(HASH, "d1", 0.0), 100.0, False),
            (ChildState(HASH, "d2", (), 1), Remembered(HASH, "d1", 0.0), 100.0, True),  # hand edit
            (None, Remembered(HASH, "d1", 99.0), 100.0, False),  # the cache has not seen it yet
            (None, Remembered(HASH, "d1", 0.0), 100.0, True),  # deleted by hand
        ],
        ids=["missing", "outdated", "restart", "unchanged", "edited", "cache-lag", "deleted"],
    )
    def test_decision(
        self, live: ChildState | None, remembered: Remembered | None, now: float, expected: bool
    ) -> None:
        assert needs_apply(self.HASH, live, remembered, now) is expected

    def test_digest_only_counts_our_applied_fields(self) -> None:
        ours = {"manager": FIELD_MANAGER, "operation": "Apply", "fieldsV1": {"f:data": {}}}
        theirs = {"manager": "kubectl-edit", "operation": "Update", "fieldsV1": {"f:data": {}}}
        assert owned_fields_digest([ours]) == owned_fields_digest([ours, theirs])
        assert owned_fields_digest([ours]) != owned_fields_digest([])
        state = child_state({"metadata": {"managedFields": [ours], "generation": 3}})
        assert (state.generation, state.fields_digest) == (3, owned_fields_digest([ours]))


def test_flags_become_settings() -> None:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("MAILRELAY_OPERATOR_")]:
            del os.environ[key]
        args = parse_args(
            ["-n", "a", "-n", "b", "--priority", "7", "--standalone", "--resync-seconds", "3"]
        )
        export_flags(args)
        settings = load_settings()
    finally:  # export_flags writes os.environ itself: put it back exactly
        os.environ.clear()
        os.environ.update(saved)
    assert (settings.namespaces, settings.priority, settings.standalone) == (["a", "b"], 7, True)
    assert settings.resync_seconds == 3.0
    assert not settings.watches_all_namespaces()


def test_rbac_module_prints_the_cluster_role() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailrelay.operator.rbac"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": ""},
    )
    role = yaml.safe_load(result.stdout)
    assert role == rbac.cluster_role()
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    # create: the generated app credential Secrets; never update, patch or delete.
    verbs = ["get", "list", "watch", "create"]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": verbs}]


def test_operator_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailrelay.operator", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": ""},
    )
    assert "--namespace" in result.stdout and "--priority" in result.stdout


def _api_error(reason: str, message: str, *fields: str) -> ApiError:
    causes = [{"field": field, "reason": "FieldValueInvalid", "message": "bad"} for field in fields]
    status = Status.from_dict(
        {"reason": reason, "message": message, "code": 422, "details": {"causes": causes}}
    )
    assert isinstance(status, Status)
    return ApiError(status=status)


@pytest.mark.parametrize(
    ("kind", "error", "reason", "hint"),
    [
        (
            "StatefulSet",
            _api_error(
                "Invalid",
                'StatefulSet.apps "outbound" is invalid: spec.template.spec.affinity...',
                "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution",
            ),
            "StatefulSetInvalid",
            "fix spec.affinity in the MailRelay",
        ),
        (
            "StatefulSet",
            _api_error(  # what kube-apiserver 1.36 answers: a 500 without a reason
                "",
                "failed to create typed patch object (ns/outbound; apps/v1, Kind=StatefulSet): "
                ".spec.template.spec.affinity.nodeAffinity.noSuchField: field not declared in "
                "schema",
            ),
            "StatefulSetInvalid",
            "fix spec.affinity in the MailRelay",
        ),
        (
            "StatefulSet",
            _api_error(
                "Forbidden",
                'statefulsets.apps "outbound" is forbidden: exceeded quota: mail, requested: '
                "count/statefulsets.apps=1, used: count/statefulsets.apps=1, limited: "
                "count/statefulsets.apps=1",
            ),
            "StatefulSetForbidden",
            "A ResourceQuota of the namespace is used up",
        ),
        (
            "StatefulSet",
            _api_error("Forbidden", "admission webhook denied the request: no latest tags"),
            "StatefulSetForbidden",
            "An admission policy or webhook refused it",
        ),
        (
            "Service",
            _api_error("Invalid", "Service is invalid", "metadata.annotations"),
            "ServiceInvalid",
            "fix spec.service.annotations in the MailRelay",
        ),
        (
            "Service",
            _api_error("InternalError", "failed to allocate a serviceIP: range is full"),
            "ServiceIPsExhausted",
            "Service IP range is exhausted",
        ),
        (
            "ConfigMap",
            _api_error("Conflict", "the object has been modified"),
            "ApplyFailed",
            "doubling up to every 10s",
        ),
    ],
    ids=["invalid", "not-in-schema", "quota", "admission", "annotations", "ips", "other"],
)
def test_apply_problem_names_the_cause(kind: str, error: ApiError, reason: str, hint: str) -> None:
    problem = apply_problem(kind, "outbound", error, 10.0)
    assert problem.reason == reason
    assert problem.message.startswith(f"{kind} outbound: ")
    assert hint in problem.message
    if reason != "ServiceIPsExhausted":
        assert "IP range" not in problem.message
    if "quota" not in str(error):
        assert "ResourceQuota" not in problem.message
