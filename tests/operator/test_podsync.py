"""Pure decisions of podsync and of the pod template's restart hash (no API server)."""

from __future__ import annotations

from typing import Any

import pytest

from mailrelay.operator import models
from mailrelay.operator.podsync import (
    POD_CONFIG_HASH_ANNOTATION,
    POD_SECRETS_HASH_ANNOTATION,
    pods_to_touch,
    reload_marks,
    touch_patch,
)
from mailrelay.operator.relays import render_relay
from mailrelay.operator.render import RESTART_HASH_ANNOTATION, RelayInputs
from mailrelay.operator.routes import ObjectInfo, judge_routes
from mailrelay.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(relay_image="registry.test/mailrelay:1")
SPEC: dict[str, Any] = {
    "listener": {"port": 587},
    "auth": {"required": False},
    "allowedNetworks": ["10.0.0.0/8"],
}


def pod(name: str, config_hash: str | None = None, **extra: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, **extra.pop("metadata", {})}
    if config_hash is not None:
        metadata["annotations"] = {POD_CONFIG_HASH_ANNOTATION: config_hash}
    return {"metadata": metadata, **extra}


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        ([], []),
        ([pod("r-1"), pod("r-0", "old")], ["r-0", "r-1"]),
        ([pod("r-0", "new"), pod("r-1", "old")], ["r-1"]),
        # Going away or finished: its replacement starts with the current ConfigMap.
        ([pod("r-0", "old", metadata={"deletionTimestamp": "2026-12-07T00:00:00Z"})], []),
        ([pod("r-0", "old", status={"phase": "Failed"})], []),
        ([pod("r-0", "old", status={"phase": "Pending"})], ["r-0"]),
        ([pod("r-0", metadata={"annotations": {"other": "x"}})], ["r-0"]),
    ],
    ids=["none", "missing-and-stale", "one-current", "deleting", "failed", "pending", "other-note"],
)
def test_pods_to_touch(pods: list[dict[str, Any]], expected: list[str]) -> None:
    assert pods_to_touch(pods, {POD_CONFIG_HASH_ANNOTATION: "new"}) == expected


def test_a_pod_missing_any_mark_is_touched() -> None:
    marks = {POD_CONFIG_HASH_ANNOTATION: "cfg", POD_SECRETS_HASH_ANNOTATION: "s2"}
    current = pod("r-0", metadata={"annotations": dict(marks)})
    stale = pod("r-1", metadata={"annotations": {**marks, POD_SECRETS_HASH_ANNOTATION: "s1"}})
    assert pods_to_touch([current, stale, pod("r-2", "cfg")], marks) == ["r-1", "r-2"]


def test_touch_patch_is_metadata_only() -> None:
    marks = {POD_CONFIG_HASH_ANNOTATION: "abc"}
    assert touch_patch(marks) == {"metadata": {"annotations": marks}}


def route(name: str, domain: str, port: int = 25) -> ObjectInfo:
    spec = {
        "relayRef": {"name": "outbound"},
        "match": {"senderDomains": [domain]},
        "upstream": {"smtp": {"host": "smtp.example.net", "port": port}},
    }
    return ObjectInfo("MailRoute", "ns", name, f"uid-{name}", 1, spec=spec)


def rendered(routes: list[ObjectInfo], **spec: Any) -> tuple[str, str]:
    """(the config hash, the pod template's restart hash) of one render."""
    body = {**SPEC, **spec}
    relay = ObjectInfo("MailRelay", "ns", "outbound", "uid", 1, spec=body)
    typed = models.MailRelaySpec.model_validate(body)
    verdicts = judge_routes(relay, typed, routes, lambda _name: None)
    result = render_relay(RelayInputs("outbound", "ns", "uid", typed), verdicts, SETTINGS)
    (sts,) = [c for c in result.children if c["kind"] == "StatefulSet"]
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    return result.config_hash, annotations[RESTART_HASH_ANNOTATION]


def test_route_changes_keep_the_pod_template() -> None:
    """Routes reload in running pods: a new config hash, the same pod template."""
    base_config, base_restart = rendered([route("a", "a.example")])
    for routes in (
        [],
        [route("a", "a.example", port=2525)],
        [route("a", "a.example"), route("b", "b.example")],
    ):
        config, restart = rendered(routes)
        assert config != base_config
        assert restart == base_restart


def pod_template(replicas: int, **spec: Any) -> dict[str, Any]:
    """The StatefulSet's pod template and the relay config of one render at that scale."""
    body = {**SPEC, **spec, "replicas": replicas}
    relay = ObjectInfo("MailRelay", "ns", "outbound", "uid", 1, spec=body)
    typed = models.MailRelaySpec.model_validate(body)
    verdicts = judge_routes(relay, typed, [route("a", "a.example")], lambda _name: None)
    result = render_relay(RelayInputs("outbound", "ns", "uid", typed), verdicts, SETTINGS)
    (sts,) = [c for c in result.children if c["kind"] == "StatefulSet"]
    (config,) = [c for c in result.children if c["kind"] == "ConfigMap"]
    return {"template": sts["spec"]["template"], "config": config["data"]}


@pytest.mark.parametrize(
    "spec",
    [{}, {"topologySpreadConstraints": []}, {"podDisruptionBudget": {"maxUnavailable": 2}}],
    ids=["defaults", "no-spread", "pdb"],
)
def test_scaling_keeps_the_pod_template_and_the_config(spec: dict[str, Any]) -> None:
    """`kubectl scale` or an HPA step must not roll the pods that stay: they are the ones
    the removed pods hand their queues to."""
    base = pod_template(1, **spec)
    for replicas in (0, 2, 3, 7):
        assert pod_template(replicas, **spec) == base, f"replicas {replicas}"


@pytest.mark.parametrize(
    "spec",
    [{"metrics": {"port": 9191}}, {"listener": {"port": 2587}}],
    ids=["metrics-port", "listener-port"],
)
def test_restart_settings_change_the_pod_template(spec: dict[str, Any]) -> None:
    _, base_restart = rendered([route("a", "a.example")])
    _, restart = rendered([route("a", "a.example")], **spec)
    assert restart != base_restart


def test_a_changed_secret_version_changes_what_the_pods_are_asked_to_load() -> None:
    """A rotated certificate or users file must touch the pods like a config change does."""
    base = reload_marks("cfg", [("tls", "10"), ("users", "11")])
    assert base[POD_CONFIG_HASH_ANNOTATION] == "cfg"  # the relay's status.configHash
    assert reload_marks("cfg", [("users", "11"), ("tls", "10")]) == base  # order-free
    assert reload_marks("cfg", [("tls", "12"), ("users", "11")]) != base
    assert reload_marks("cfg", [("tls", "10"), ("users", "13")]) != base
    assert reload_marks("other", [("tls", "10"), ("users", "11")]) != base
    # Unwatched Secrets (no version known) add no mark.
    assert reload_marks("cfg", [("tls", ""), ("users", "")]) == {POD_CONFIG_HASH_ANNOTATION: "cfg"}
    assert reload_marks("cfg", []) == {POD_CONFIG_HASH_ANNOTATION: "cfg"}


def test_render_names_every_secret_the_pods_mount() -> None:
    body = {
        **SPEC,
        "listener": {"port": 587, "tls": {"secretName": "relay-tls"}},
        "auth": {"required": True, "usersSecretRef": {"name": "relay-users", "key": "users.yaml"}},
    }
    relay = ObjectInfo("MailRelay", "ns", "outbound", "uid", 1, spec=body)
    typed = models.MailRelaySpec.model_validate(body)
    upstream = route("a", "a.example")
    upstream.spec["upstream"]["smtp"]["credentialsSecretRef"] = {"name": "upstream-login"}
    verdicts = judge_routes(relay, typed, [upstream], lambda _: frozenset({"username", "password"}))
    result = render_relay(RelayInputs("outbound", "ns", "uid", typed), verdicts, SETTINGS)
    # The hand-off token too: a regenerated one reaches the running pods at once.
    assert result.mounted_secrets == (
        "outbound-handoff",
        "relay-tls",
        "relay-users",
        "upstream-login",
    )
