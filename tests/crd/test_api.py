"""The CRDs against a real kube-apiserver: examples, defaults, columns, refusals, subresources.

Everything goes through the real kubectl, as a user would type it: ``kubectl apply`` asks for
strict field validation by default, so unknown fields are refused rather than pruned.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from mailrelay.operator.crdgen import build_crds, crd_filename
from mailrelay.operator.models import MailRelaySpec, MailRouteSpec
from mailrelay.support.localkube import LocalKube
from tests.crd.cases import (
    BASE_RELAY_SPEC,
    BASE_ROUTE_SPEC,
    CRD_DIR,
    INVALID,
    INVALID_IDS,
    RELAY_FIELD_RULES,
    REMOVE,
    ROUTE_FIELD_RULES,
    Invalid,
    edited,
    example_files,
    example_resources,
)

pytestmark = pytest.mark.kube


@pytest.fixture(scope="module")
def crds(kube: LocalKube) -> LocalKube:
    """The cluster with our committed CRDs installed and Established (only ours: crds/ also
    holds files other parts own)."""
    kube.install_crds([CRD_DIR / crd_filename(crd) for crd in build_crds()])
    return kube


@pytest.fixture(scope="module")
def refusal_namespace(crds: LocalKube) -> Iterator[str]:
    """One namespace shared by the refusal and dry-run tables: they never store an object,
    so sharing loses no isolation and saves two kubectl calls per case."""
    name = crds.create_namespace(f"t-crd-refusals-{secrets.token_hex(3)}")
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _manifest(kind: str, name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def _get(kube: LocalKube, namespace: str, resource: str) -> dict[str, Any]:
    stored: dict[str, Any] = json.loads(
        kube.kubectl("get", resource, "-n", namespace, "-o", "json").stdout
    )
    return stored


def _table(output: str) -> list[dict[str, str]]:
    """Parses kubectl's table output by the header's column offsets (cells may be empty)."""
    header, *rows = output.rstrip("\n").splitlines()
    names = header.split()
    starts = [header.index(f"{name}") for name in names]
    # Header names are unique words here, so index() finds each column's start.
    bounds = [*starts[1:], None]
    return [
        {
            name: row[start:end].strip()
            for name, start, end in zip(names, starts, bounds, strict=True)
        }
        for row in rows
    ]


def _apply_examples(kube: LocalKube, namespace: str) -> None:
    for path in example_files():
        applied = kube.kubectl("apply", "-n", namespace, "-f", str(path))
        assert "Warning" not in applied.stderr, f"{path.name}: {applied.stderr}"


def test_every_example_applies_cleanly(crds: LocalKube, namespace: str) -> None:
    _apply_examples(crds, namespace)
    stored = crds.kubectl(
        "get", "mailrelays,mailroutes", "-n", namespace, "-o", "name"
    ).stdout.split()
    expected = [
        f"mailrelay.mailrelay.dev/{r['metadata']['name']}" for r in example_resources("MailRelay")
    ]
    expected += [
        f"mailroute.mailrelay.dev/{r['metadata']['name']}" for r in example_resources("MailRoute")
    ]
    assert sorted(stored) == sorted(expected)
    secrets = crds.kubectl("get", "secrets", "-n", namespace, "-o", "name").stdout
    assert "secret/relay-tls" in secrets and "secret/mailgun-credentials" in secrets


def test_examples_apply_server_side_and_reapplying_changes_nothing(
    crds: LocalKube, namespace: str
) -> None:
    """GitOps tools (Flux, Argo CD) apply server-side; defaults must not make them drift."""
    for path in example_files():
        crds.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    before = crds.kubectl("get", "mail", "-n", namespace, "-o", "json").stdout
    for path in example_files():
        crds.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    after = crds.kubectl("get", "mail", "-n", namespace, "-o", "json").stdout
    versions = [
        (
            item["metadata"]["name"],
            item["metadata"]["resourceVersion"],
            item["metadata"]["generation"],
        )
        for item in json.loads(after)["items"]
    ]
    assert versions == [
        (item["metadata"]["name"], item["metadata"]["resourceVersion"], 1)
        for item in json.loads(before)["items"]
    ]


def test_get_prints_the_printer_columns(crds: LocalKube, namespace: str) -> None:
    _apply_examples(crds, namespace)
    endpoint = f"outbound.{namespace}.svc:587"
    crds.kubectl(
        "patch", "mailrelay", "outbound", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"routes": 8, "endpoint": endpoint, "conditions": [
            {"type": "Ready", "status": "True", "reason": "RelayAvailable", "message": "",
             "lastTransitionTime": "2026-11-30T23:00:00Z"}]}}),
    )  # fmt: skip
    crds.kubectl(
        "patch", "mailroute", "news-mailgun", "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": {"relay": "outbound", "conditions": [
            {"type": "Accepted", "status": "True", "reason": "RelayFound", "message": "",
             "lastTransitionTime": "2026-11-30T23:00:00Z"}]}}),
    )  # fmt: skip

    relays = crds.kubectl("get", "mailrelays", "-n", namespace).stdout
    assert relays.splitlines()[0].split() == [
        "NAME",
        "READY",
        "REPLICAS",
        "ROUTES",
        "ENDPOINT",
        "AGE",
    ]
    (relay,) = _table(relays)
    assert (
        relay["NAME"],
        relay["READY"],
        relay["REPLICAS"],
        relay["ROUTES"],
        relay["ENDPOINT"],
    ) == (
        "outbound",
        "True",
        "2",
        "8",
        endpoint,
    )

    routes = crds.kubectl("get", "mailroutes", "-n", namespace).stdout
    assert routes.splitlines()[0].split() == ["NAME", "RELAY", "UPSTREAM", "ACCEPTED", "AGE"]
    by_name = {row["NAME"]: row for row in _table(routes)}
    assert by_name["news-mailgun"] == {
        **by_name["news-mailgun"],
        "RELAY": "outbound",
        "UPSTREAM": "mailgun",
        "ACCEPTED": "True",
    }
    assert by_name["billing-smarthost"]["UPSTREAM"] == "smtp.example.net"
    assert by_name["billing-smarthost"]["ACCEPTED"] == ""
    assert {by_name[name]["UPSTREAM"] for name in by_name} == {
        "smtp.example.net", "mailgun", "ses", "sparkpost", "sendgrid", "postmark", "webhook",
        "resend",
    }  # fmt: skip

    wide = crds.kubectl("get", "mailroutes", "-n", namespace, "-o", "wide").stdout
    assert {row["NAME"]: row["PRIORITY"] for row in _table(wide)}["billing-smarthost"] == "200"


def test_short_names_and_the_mail_category(crds: LocalKube, namespace: str) -> None:
    _apply_examples(crds, namespace)
    for short_name in ("mr", "mrelay"):
        named = crds.kubectl("get", short_name, "-n", namespace, "-o", "name").stdout.split()
        assert named == ["mailrelay.mailrelay.dev/outbound"]
    by_short_name = crds.kubectl("get", "mroute", "-n", namespace, "-o", "name").stdout.split()
    assert "mailroute.mailrelay.dev/news-mailgun" in by_short_name
    category = crds.kubectl("get", "mail", "-n", namespace, "-o", "name").stdout.split()
    assert "mailrelay.mailrelay.dev/outbound" in category
    assert len([name for name in category if name.startswith("mailroute.")]) == len(
        example_resources("MailRoute")
    )


def test_defaults_appear_on_the_stored_object(crds: LocalKube, namespace: str) -> None:
    route_spec = edited(BASE_ROUTE_SPEC, {"fallbacks": [{"smtp": {"host": "backup.example.net"}}],
                                          "rateLimit": {"perSecond": 5}})  # fmt: skip
    crds.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=_manifest("MailRelay", "outbound", BASE_RELAY_SPEC),
    )
    crds.kubectl(
        "apply", "-n", namespace, "-f", "-", input=_manifest("MailRoute", "default", route_spec)
    )
    relay = _get(crds, namespace, "mailrelay/outbound")["spec"]
    route = _get(crds, namespace, "mailroute/default")["spec"]

    assert relay["replicas"] == 2
    assert relay["listener"] == {
        "port": 587,
        "tls": {"secretName": "relay-tls", "minVersion": "TLSv1.2"},
    }
    assert relay["auth"] == {
        "required": True,
        "mechanisms": ["PLAIN", "LOGIN"],
        "usersSecretRef": {"name": "relay-users", "key": "users.yaml"},
        "cache": {"enabled": True, "ttl": "1h", "maxEntries": 10000},
        "appCredentials": [],
    }
    assert relay["allowedNetworks"] == []
    assert relay["queue"]["retry"] == {"initialBackoff": "5m", "maxBackoff": "1h", "maxAge": "120h"}
    assert relay["limits"]["maxMessageSize"] == 26214400
    assert route["priority"] == 100
    assert route["upstream"]["smtp"] == {"host": "smtp.example.net", "port": 587, "tls": "starttls",
                                         "insecureAllowPlaintext": False}  # fmt: skip
    assert route["fallbacks"][0]["smtp"]["port"] == 587
    assert route["rateLimit"] == {"perSecond": 5, "onExceed": "defer"}

    # One source of truth: the API server's defaults are exactly the models' defaults.
    assert relay == MailRelaySpec.model_validate(BASE_RELAY_SPEC).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    assert route == MailRouteSpec.model_validate(route_spec).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )


@pytest.mark.parametrize("case", INVALID, ids=INVALID_IDS)
def test_invalid_manifest_is_refused_naming_the_problem(
    crds: LocalKube, refusal_namespace: str, case: Invalid
) -> None:
    refused = crds.kubectl(
        "apply", "-n", refusal_namespace, "-f", "-", input=json.dumps(case.manifest()), check=False
    )
    assert refused.returncode != 0
    for expected in case.api_error:
        assert expected in refused.stderr


@pytest.mark.parametrize(
    ("kind", "edits", "accepted"),
    [("MailRoute", edits, accepted) for edits, accepted in ROUTE_FIELD_RULES]
    + [("MailRelay", edits, accepted) for edits, accepted in RELAY_FIELD_RULES],
)
def test_api_server_and_models_agree_on_edge_cases(
    crds: LocalKube, refusal_namespace: str, kind: str, edits: dict[str, Any], accepted: bool
) -> None:
    """The same table as test_models: the CEL rules and the pydantic validators agree."""
    spec = edited(BASE_RELAY_SPEC if kind == "MailRelay" else BASE_ROUTE_SPEC, edits)
    result = crds.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        refusal_namespace,
        "-f",
        "-",
        input=_manifest(kind, "edge", spec),
        check=False,
    )
    assert (result.returncode == 0) is accepted, result.stderr


STATUS = {
    "observedGeneration": 1,
    "replicas": 2,
    "readyReplicas": 1,
    "routes": 3,
    "endpoint": "outbound.mail.svc:587",
    "conditions": [
        {"type": "Ready", "status": "False", "reason": "ReplicasUnavailable",
         "message": "1/2 ready", "observedGeneration": 1,
         "lastTransitionTime": "2026-11-30T23:00:00Z"},
    ],
}  # fmt: skip


def test_status_patch_leaves_spec_alone(crds: LocalKube, namespace: str) -> None:
    crds.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=_manifest("MailRelay", "outbound", BASE_RELAY_SPEC),
    )
    before = _get(crds, namespace, "mailrelay/outbound")
    crds.kubectl(
        "patch", "mailrelay", "outbound", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": STATUS, "spec": {"replicas": 7}}),
    )  # fmt: skip
    after = _get(crds, namespace, "mailrelay/outbound")
    assert after["status"] == STATUS
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"] == 1


def test_spec_update_leaves_status_alone(crds: LocalKube, namespace: str) -> None:
    crds.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=_manifest("MailRelay", "outbound", BASE_RELAY_SPEC),
    )
    crds.kubectl(
        "patch", "mailrelay", "outbound", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": STATUS}),
    )  # fmt: skip
    updated = json.loads(_manifest("MailRelay", "outbound", {**BASE_RELAY_SPEC, "replicas": 3}))
    updated["status"] = {**STATUS, "routes": 99}
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(updated))
    crds.kubectl("patch", "mailrelay", "outbound", "-n", namespace, "--type=merge",
                 "-p", json.dumps({"status": {"readyReplicas": 2}}))  # fmt: skip
    after = _get(crds, namespace, "mailrelay/outbound")
    assert after["spec"]["replicas"] == 3
    assert after["metadata"]["generation"] == 2
    assert after["status"] == STATUS


def test_spool_storage_class_is_fixed_at_creation(crds: LocalKube, namespace: str) -> None:
    spec = edited(BASE_RELAY_SPEC, {"queue": {"storageClassName": "fast"}})
    crds.kubectl(
        "apply", "-n", namespace, "-f", "-", input=_manifest("MailRelay", "outbound", spec)
    )
    grown = edited(spec, {"replicas": 3, "queue.size": "2Gi"})
    crds.kubectl(
        "apply", "-n", namespace, "-f", "-", input=_manifest("MailRelay", "outbound", grown)
    )
    moved = edited(grown, {"queue.storageClassName": "slow"})
    refused = crds.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=_manifest("MailRelay", "outbound", moved),
        check=False,
    )
    assert refused.returncode != 0
    assert (
        "spec.queue.storageClassName: Forbidden: storageClassName cannot change" in refused.stderr
    )
    dropped = edited(grown, {"queue.storageClassName": REMOVE})
    refused = crds.kubectl(
        "replace",
        "-n",
        namespace,
        "-f",
        "-",
        input=_manifest("MailRelay", "outbound", dropped),
        check=False,
    )
    assert "storageClassName cannot change" in refused.stderr
    assert (
        _get(crds, namespace, "mailrelay/outbound")["spec"]["queue"]["storageClassName"] == "fast"
    )


def test_status_is_validated_too(crds: LocalKube, namespace: str) -> None:
    crds.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=_manifest("MailRelay", "outbound", BASE_RELAY_SPEC),
    )
    bad = {"conditions": [{**STATUS["conditions"][0], "status": "Maybe"}]}  # type: ignore[index]
    refused = crds.kubectl(
        "patch", "mailrelay", "outbound", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": bad}), check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert 'status.conditions[0].status: Unsupported value: "Maybe"' in refused.stderr


def test_scale_subresource_sets_spec_replicas(crds: LocalKube, namespace: str) -> None:
    crds.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=_manifest("MailRelay", "outbound", BASE_RELAY_SPEC),
    )
    crds.kubectl("scale", "mailrelay/outbound", "-n", namespace, "--replicas=4")
    assert _get(crds, namespace, "mailrelay/outbound")["spec"]["replicas"] == 4
    refused = crds.kubectl(
        "scale", "mailrelay/outbound", "-n", namespace, "--replicas=101", check=False
    )
    assert refused.returncode != 0
    assert "spec.replicas" in refused.stderr


def test_unknown_fields_are_pruned_when_validation_is_not_strict(
    crds: LocalKube, namespace: str
) -> None:
    """Without strict field validation the API server drops unknown fields, never stores them."""
    spec = edited(BASE_ROUTE_SPEC, {"upstream.smtp.hostname": "typo.example.net"})
    applied = crds.kubectl(
        "apply",
        "--validate=false",
        "-n",
        namespace,
        "-f",
        "-",
        input=_manifest("MailRoute", "lenient", spec),
    )
    assert applied.returncode == 0
    assert "hostname" not in _get(crds, namespace, "mailroute/lenient")["spec"]["upstream"]["smtp"]


def test_kubectl_explain_shows_the_model_descriptions(crds: LocalKube) -> None:
    explained = crds.kubectl(
        "explain", "mailroute.spec.upstream.smtp.insecureAllowPlaintext"
    ).stdout
    assert "Explicit opt-in to tls: none" in explained
    relay = crds.kubectl("explain", "mailrelay.spec.allowedNetworks").stdout
    assert "Empty by default" in relay
