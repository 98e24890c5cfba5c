"""The generated CRDs are current, structural, and carry the models' rules and defaults.

Pure tests: no API server. ``test_api`` then proves the API server accepts and enforces them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field

from mailrelay.operator import crdgen, models
from mailrelay.operator.crdgen import CrdSchemaError, build_crds, crd_filename, render_yaml
from tests.crd.cases import CRD_DIR

Schema = dict[str, Any]


def _schema(crd: Schema) -> Schema:
    schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _crd(kind: str) -> Schema:
    return next(crd for crd in build_crds() if crd["spec"]["names"]["kind"] == kind)


def _at(schema: Schema, path: str) -> Schema:
    """The schema node at a dotted path; ``[]`` steps into list items."""
    node = schema
    for step in path.split("."):
        node = node["items"] if step == "[]" else node["properties"][step]
    return node


def _walk(node: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}[*]")


ALL_NODES = [
    pytest.param(node, id=f"{crd['spec']['names']['kind']}{path or '.'}")
    for crd in build_crds()
    for path, node in _walk(_schema(crd))
]


# --- The committed files ---------------------------------------------------------------------


@pytest.mark.parametrize("crd", build_crds(), ids=crd_filename)
def test_committed_crd_matches_the_models(crd: Schema) -> None:
    committed = CRD_DIR / crd_filename(crd)
    assert committed.is_file(), f"{committed} is missing: run `make crds`"
    assert committed.read_text() == render_yaml(crd), f"{committed} is stale: run `make crds`"


def test_no_stale_mailrelay_crd_file_is_left_behind() -> None:
    """A kind dropped from the models must not linger in crds/ (other CRDs may live there)."""
    ours = sorted(path.name for path in CRD_DIR.glob("mailrelay.dev_*.yaml"))
    assert ours == sorted(crd_filename(crd) for crd in build_crds())


def test_rendered_yaml_parses_back_to_the_same_data() -> None:
    for crd in build_crds():
        assert yaml.safe_load(render_yaml(crd)) == crd


def test_main_writes_then_check_passes_and_detects_staleness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert crdgen.main([str(tmp_path)]) == 0
    assert crdgen.main(["--check", str(tmp_path)]) == 0
    stale = tmp_path / "mailrelay.dev_mailroutes.yaml"
    stale.write_text(stale.read_text().replace("mroute", "mrte"))
    assert crdgen.main(["--check", str(tmp_path)]) == 1
    assert "mailrelay.dev_mailroutes.yaml is stale" in capsys.readouterr().err


def test_check_passes_on_the_committed_directory() -> None:
    assert crdgen.main(["--check", str(CRD_DIR)]) == 0


# --- Structural schema -----------------------------------------------------------------------


@pytest.mark.parametrize("node", ALL_NODES)
def test_every_node_is_structural(node: Schema) -> None:
    assert not {"$ref", "$defs", "allOf", "oneOf", "not", "title", "const"} & set(node)
    assert (
        "type" in node
        or node.get("x-kubernetes-int-or-string")
        or node.get("x-kubernetes-preserve-unknown-fields")
    )
    assert node.get("additionalProperties") is not False
    assert not ("properties" in node and "additionalProperties" in node)
    if "anyOf" in node:  # only the int-or-string idiom is allowed
        assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
        assert node["x-kubernetes-int-or-string"] is True
        assert "type" not in node
    if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(
        node.get("exclusiveMinimum"), bool
    ):
        pytest.fail("exclusiveMinimum must be the OpenAPI v3.0 boolean form")


@pytest.mark.parametrize("crd", build_crds(), ids=crd_filename)
def test_every_field_has_a_description(crd: Schema) -> None:
    undocumented = [
        f"{path}.{name}"
        for path, node in _walk(_schema(crd)["properties"]["spec"], ".spec")
        for name, child in node.get("properties", {}).items()
        if not child.get("description")
    ] + [
        f"{path}.{name}"
        for path, node in _walk(_schema(crd)["properties"]["status"], ".status")
        for name, child in node.get("properties", {}).items()
        if not child.get("description")
    ]
    assert undocumented == []


def test_optional_fields_are_plain_and_unset_means_absent() -> None:
    region = _at(_schema(_crd("MailRoute")), "spec.upstream.api.region")
    assert region["type"] == "string"
    assert "default" not in region
    assert "nullable" not in region
    assert "region" not in _at(_schema(_crd("MailRoute")), "spec.upstream.api")["required"]


def test_defaults_bounds_enums_formats_and_patterns_are_carried_over() -> None:
    relay, route = _schema(_crd("MailRelay")), _schema(_crd("MailRoute"))
    assert _at(relay, "spec.listener.port")["default"] == 587
    assert (
        _at(relay, "spec.listener.port")["minimum"],
        _at(relay, "spec.listener.port")["maximum"],
    ) == (
        1,
        65535,
    )
    assert _at(relay, "spec.replicas")["minimum"] == 0
    assert _at(relay, "spec.allowedNetworks")["default"] == []
    assert _at(relay, "spec.allowedNetworks")["maxItems"] == 64
    assert _at(route, "spec.upstream.smtp.tls")["enum"] == ["starttls", "implicit", "none"]
    assert _at(route, "spec.upstream.api.provider")["enum"] == [
        "mailgun",
        "ses",
        "sparkpost",
        "sendgrid",
        "postmark",
        "resend",
        "webhook",
    ]
    assert _at(route, "spec.rateLimit.onExceed")["default"] == "defer"
    per_second = _at(route, "spec.rateLimit.perSecond")
    assert (per_second["type"], per_second["minimum"], per_second["exclusiveMinimum"]) == (
        "number",
        0,
        True,
    )
    # Patterns are CEL rules with a message (a bare OpenAPI pattern prints only the regex).
    domain = _at(route, "spec.match.senderDomains.[]")
    assert "pattern" not in domain
    assert domain["x-kubernetes-validations"] == [
        {
            "rule": f"self.matches(r'{models.DOMAIN_PATTERN}')",
            "message": models.DOMAIN_PATTERN_MESSAGE,
        }
    ]
    condition_time = _at(relay, "status.conditions.[].lastTransitionTime")
    assert condition_time["format"] == "date-time"
    assert _at(relay, "status.conditions")["x-kubernetes-list-map-keys"] == ["type"]


def test_sub_object_defaults_are_what_pydantic_builds() -> None:
    """The API server and the operator must fill in the same values for an omitted section."""
    relay = _schema(_crd("MailRelay"))
    for field, model in [
        ("listener", models.Listener),
        ("limits", models.Limits),
        ("queue", models.Queue),
        ("metrics", models.Metrics),
        ("podDisruptionBudget", models.PodDisruptionBudget),
        ("auth", models.Auth),
    ]:
        default = _at(relay, f"spec.{field}")["default"]
        assert default == model().model_dump(mode="json", by_alias=True, exclude_none=True)
    assert _at(relay, "spec.queue")["default"]["retry"]["maxAge"] == "120h"


def test_quantities_are_int_or_string_and_affinity_is_free_form() -> None:
    relay = _schema(_crd("MailRelay"))
    cpu = _at(relay, "spec.resources.requests")["additionalProperties"]
    assert cpu["x-kubernetes-int-or-string"] is True
    assert _rules(cpu) == [f"type(self) != string || self.matches(r'{models.QUANTITY}')"]
    unavailable = _at(relay, "spec.podDisruptionBudget.maxUnavailable")
    assert unavailable["x-kubernetes-int-or-string"] is True
    assert unavailable["minimum"] == 0
    assert _rules(unavailable) == [f"type(self) != string || self.matches(r'{models.PERCENT}')"]
    affinity = _at(relay, "spec.affinity")
    assert affinity == {
        "description": affinity["description"],
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }


def _rules(node: Schema) -> list[str]:
    return [rule["rule"] for rule in node.get("x-kubernetes-validations", [])]


def test_cel_rules_sit_on_the_node_they_constrain() -> None:
    route, relay = _schema(_crd("MailRoute")), _schema(_crd("MailRelay"))
    exactly_one = "has(self.smtp) != has(self.api)"
    assert exactly_one in _rules(_at(route, "spec.upstream"))
    assert exactly_one in _rules(_at(route, "spec.fallbacks.[]"))
    assert any(
        "insecureAllowPlaintext" in rule for rule in _rules(_at(route, "spec.upstream.smtp"))
    )
    assert any(
        "'mailgun' || has(self.domain)" in rule for rule in _rules(_at(route, "spec.upstream.api"))
    )
    assert _rules(_at(relay, "spec.allowedNetworks.[]")) == ["isCIDR(self)"]
    assert any("isIP(self)" in rule for rule in _rules(_at(route, "spec.upstream.smtp.host")))
    assert any("duration(" in rule for rule in _rules(_at(relay, "spec.queue.retry")))
    assert len(_rules(_at(relay, "spec"))) == 6
    assert models.PRIVATE_NETWORK_RULE in _rules(_at(relay, "spec"))[4]
    assert models.LOCAL_ENDPOINT_RULE in _rules(_at(route, "spec.upstream.api"))


def test_every_cel_message_of_the_models_reaches_the_crds() -> None:
    messages = {
        rule["message"]
        for crd in build_crds()
        for _, node in _walk(_schema(crd))
        for rule in node.get("x-kubernetes-validations", [])
    }
    model_messages = {
        value
        for name, value in vars(models).items()
        if name.endswith("_MESSAGE") and isinstance(value, str)
    }
    assert model_messages <= messages


def test_names_columns_and_subresources() -> None:
    relay, route = _crd("MailRelay"), _crd("MailRoute")
    for crd in (relay, route):
        assert crd["spec"]["group"] == "mailrelay.dev"
        assert crd["spec"]["scope"] == "Namespaced"
        assert crd["spec"]["names"]["categories"] == ["mail"]
        version = crd["spec"]["versions"][0]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert version["subresources"]["status"] == {}
    assert relay["spec"]["names"]["shortNames"] == ["mr", "mrelay"]
    assert route["spec"]["names"]["shortNames"] == ["mroute"]
    relay_columns = [c["name"] for c in relay["spec"]["versions"][0]["additionalPrinterColumns"]]
    route_columns = [
        c["name"]
        for c in route["spec"]["versions"][0]["additionalPrinterColumns"]
        if c.get("priority", 0) == 0
    ]
    assert relay_columns == ["Ready", "Replicas", "Routes", "Endpoint", "Age"]
    assert route_columns == ["Relay", "Upstream", "Accepted", "Age"]
    assert (
        relay["spec"]["versions"][0]["subresources"]["scale"]["specReplicasPath"]
        == ".spec.replicas"
    )


# --- The converter refuses what has no structural form ---------------------------------------


class _Smtp(BaseModel):
    host: str = Field(description="Host.")


class _Api(BaseModel):
    provider: str = Field(description="Provider.")


class _Union(BaseModel):
    upstream: _Smtp | _Api = Field(description="Either kind.")


class _Undocumented(BaseModel):
    name: str


class _Untyped(BaseModel):
    anything: Any = Field(description="Whatever.")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_Union, "is not structural; model it as optional fields"),
        (_Undocumented, ".name: every field needs a description"),
        (_Untyped, ".anything: every node needs a type"),
    ],
)
def test_converter_refuses_non_structural_models(model: type[BaseModel], message: str) -> None:
    with pytest.raises(CrdSchemaError, match=message.replace(".", r"\.", 1)):
        crdgen.to_structural(crdgen.model_schema(model))
