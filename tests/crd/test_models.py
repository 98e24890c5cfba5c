"""The pydantic models accept what the API should accept and refuse what it refuses.

The same invalid table drives ``test_api``; here it proves the operator's own validation
(``MailRelaySpec.model_validate``) refuses each case with a message that names the problem.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest
from pydantic import BaseModel, ValidationError

from mailrelay.operator.models import (
    Condition,
    MailRelaySpec,
    MailRelayStatus,
    MailRouteSpec,
    MailRouteStatus,
    Upstream,
    parse_duration,
)
from tests.crd.cases import (
    BASE_RELAY_SPEC,
    BASE_ROUTE_SPEC,
    INVALID,
    RELAY_FIELD_RULES,
    ROUTE_FIELD_RULES,
    Invalid,
    edited,
    example_resources,
)

SPEC_MODELS: dict[str, type[BaseModel]] = {"MailRelay": MailRelaySpec, "MailRoute": MailRouteSpec}


def _name(resource: dict[str, Any]) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"


EXAMPLES = example_resources("MailRelay") + example_resources("MailRoute")


def test_examples_cover_a_relay_smtp_and_every_provider() -> None:
    routes = [MailRouteSpec.model_validate(r["spec"]) for r in example_resources("MailRoute")]
    upstreams = [u for route in routes for u in (route.upstream, *route.fallbacks)]
    providers = {u.api.provider for u in upstreams if u.api is not None}
    assert providers == {"mailgun", "ses", "sparkpost", "sendgrid", "postmark", "resend", "webhook"}
    assert any(u.smtp is not None for u in upstreams)
    assert len(example_resources("MailRelay")) == 1


@pytest.mark.parametrize("resource", EXAMPLES, ids=_name)
def test_every_example_spec_validates(resource: dict[str, Any]) -> None:
    SPEC_MODELS[resource["kind"]].model_validate(resource["spec"])


@pytest.mark.parametrize("kind", ["MailRelay", "MailRoute"])
def test_the_base_specs_of_the_invalid_table_are_valid(kind: str) -> None:
    """Each invalid case is one edit away from these, so the edit is what the model refuses."""
    SPEC_MODELS[kind].model_validate(BASE_RELAY_SPEC if kind == "MailRelay" else BASE_ROUTE_SPEC)


MODEL_CASES = [case for case in INVALID if case.model_error is not None]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[case.id for case in MODEL_CASES])
def test_invalid_spec_is_refused_naming_the_problem(case: Invalid) -> None:
    with pytest.raises(ValidationError) as refused:
        SPEC_MODELS[case.kind].model_validate(case.spec)
    assert case.model_error is not None
    assert case.model_error in str(refused.value)


def test_relay_defaults_match_the_issue() -> None:
    spec = MailRelaySpec.model_validate(BASE_RELAY_SPEC)
    assert spec.replicas == 2
    assert spec.listener.port == 587
    assert spec.listener.implicit_tls_port is None
    assert spec.auth.required is True
    assert spec.auth.users_secret_ref is not None
    assert spec.auth.users_secret_ref.key == "users.yaml"
    assert spec.allowed_networks == []  # no network is trusted by default
    assert spec.limits.max_message_size == 25 * 1024 * 1024
    assert parse_duration(spec.queue.retry.max_age) == timedelta(days=5)
    assert spec.route_selector is None
    assert spec.metrics.service_monitor.enabled is False


def test_route_defaults() -> None:
    spec = MailRouteSpec.model_validate(BASE_ROUTE_SPEC)
    assert spec.priority == 100
    assert spec.upstream.smtp is not None
    assert (spec.upstream.smtp.port, spec.upstream.smtp.tls) == (587, "starttls")
    assert spec.upstream.smtp.insecure_allow_plaintext is False
    assert spec.match.sender_domains == spec.match.recipient_domains == []
    assert spec.fallbacks == []
    assert spec.rate_limit is None


def test_snake_case_names_are_accepted_too() -> None:
    """populate_by_name lets Python code build specs without the wire aliases."""
    spec = MailRouteSpec(
        relay_ref={"name": "outbound"},  # type: ignore[arg-type]
        upstream=Upstream.model_validate({"smtp": {"host": "smtp.example.net"}}),
        max_message_size=2048,
    )
    assert spec.model_dump(by_alias=True, exclude_none=True)["maxMessageSize"] == 2048


@pytest.mark.parametrize(("edits", "accepted"), ROUTE_FIELD_RULES)
def test_route_field_rules(edits: dict[str, Any], accepted: bool) -> None:
    spec = edited(BASE_ROUTE_SPEC, edits)
    if accepted:
        MailRouteSpec.model_validate(spec)
    else:
        with pytest.raises(ValidationError):
            MailRouteSpec.model_validate(spec)


@pytest.mark.parametrize(("edits", "accepted"), RELAY_FIELD_RULES)
def test_relay_field_rules(edits: dict[str, Any], accepted: bool) -> None:
    spec = edited(BASE_RELAY_SPEC, edits)
    if accepted:
        MailRelaySpec.model_validate(spec)
    else:
        with pytest.raises(ValidationError):
            MailRelaySpec.model_validate(spec)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(minutes=90)),
        ("250ms", timedelta(milliseconds=250)),
        ("120h", timedelta(days=5)),
    ],
)
def test_parse_duration_reads_go_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "5", "5d", "m5", "1h 30m", "-1s"])
def test_parse_duration_refuses_other_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_upstream_describe_names_host_or_provider() -> None:
    smtp = Upstream.model_validate({"smtp": {"host": "smtp.example.net", "port": 2525}})
    api = Upstream.model_validate({"api": {"provider": "ses", "region": "eu-west-1"}})
    assert (smtp.describe(), api.describe()) == ("smtp://smtp.example.net:2525", "api/ses")


def test_status_round_trips_the_wire_format() -> None:
    """kopf hands the operator strings for timestamps; the model reads and writes them."""
    wire = {
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "RelayAvailable",
                "message": "2/2 replicas ready",
                "observedGeneration": 3,
                "lastTransitionTime": "2026-11-30T23:00:00Z",
            }
        ],
        "replicas": 2,
        "readyReplicas": 2,
        "routes": 8,
        "endpoint": "outbound.mail.svc:587",
        "configHash": "sha256-abc",
        "selector": "app.kubernetes.io/instance=outbound",
    }
    status = MailRelayStatus.model_validate(wire)
    assert status.conditions[0].last_transition_time == datetime(2026, 11, 30, 23, tzinfo=UTC)
    assert status.model_dump(mode="json", by_alias=True, exclude_none=True) == wire
    route = MailRouteStatus.model_validate({"relay": "outbound", "conditions": []})
    assert route.relay == "outbound"


@pytest.mark.parametrize(
    ("field", "value"),
    [("status", "Maybe"), ("reason", "not camel case"), ("type", ""), ("reason", "")],
)
def test_condition_refuses_malformed_fields(field: str, value: str) -> None:
    condition = {
        "type": "Ready",
        "status": "True",
        "reason": "Fine",
        "lastTransitionTime": "2026-11-30T23:00:00Z",
    }
    with pytest.raises(ValidationError):
        Condition.model_validate({**condition, field: value})


def test_specs_validate_straight_from_kopf_bodies() -> None:
    """Handlers get kopf.Spec/kopf.Status views, not dicts; the models must take them as is."""
    body = kopf.Body(
        {
            "metadata": {"name": "outbound", "namespace": "mail"},
            "spec": BASE_RELAY_SPEC,
            "status": {"routes": 2},
        }
    )
    assert MailRelaySpec.model_validate(body.spec).listener.port == 587
    assert MailRelayStatus.model_validate(body.status).routes == 2


def test_models_are_frozen_so_renderers_cannot_mutate_inputs() -> None:
    spec = MailRelaySpec.model_validate(BASE_RELAY_SPEC)
    with pytest.raises(ValidationError):
        spec.replicas = 5  # type: ignore[misc]
