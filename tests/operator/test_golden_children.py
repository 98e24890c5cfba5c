"""Golden files: every child the operator renders for each example input, one file per child.

Inputs: the MailRelay, MailRoutes and Secrets of ``examples/`` (as shipped, and with the
NetworkPolicy and ServiceMonitor the example leaves off turned on, so every kind of child
has a golden file), and the manifests the operator tests apply (``manifests.py``). Each case
is rendered through the same pure functions a pass uses (``judge_routes``, ``render_relay``)
into ``golden/children/<case>/<Kind>-<name>.yaml``.

A render that changes fails with a unified diff per file. Regenerate them all with
``UPDATE_GOLDEN=1 pytest tests/operator/test_golden_children.py`` and review the diff.
"""

from __future__ import annotations

import base64
import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailrelay.operator import models
from mailrelay.operator.dkim import KeyFacts, TxtAnswer, key_facts
from mailrelay.operator.drain import render_drain_job
from mailrelay.operator.handoff import render_handoff_secret
from mailrelay.operator.relays import render_relay
from mailrelay.operator.render import RelayInputs
from mailrelay.operator.routes import ObjectInfo, judge_routes
from mailrelay.operator.settings import OperatorSettings
from mailrelay.relay.dkim import record_name
from tests.operator import manifests as m

EXAMPLES = Path(__file__).parents[2] / "examples"
GOLDEN = Path(__file__).parent / "golden" / "children"
NAMESPACE = "mail"
SETTINGS = OperatorSettings(relay_image="registry.test/mailrelay:1")


def _examples() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        objects += [obj for obj in yaml.safe_load_all(path.read_text()) if obj]
    return objects


def _with_policy_and_monitor(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The examples with the options they show but leave off turned on."""
    result = []
    for obj in objects:
        if obj["kind"] != "MailRelay":
            result.append(obj)
            continue
        spec = {**obj["spec"]}
        spec["networkPolicy"] = {**spec["networkPolicy"], "enabled": True}
        metrics = spec["metrics"]
        spec["metrics"] = {**metrics, "serviceMonitor": {**metrics["serviceMonitor"]}}
        spec["metrics"]["serviceMonitor"]["enabled"] = True
        result.append({**obj, "spec": spec})
    return result


def _test_manifests() -> list[dict[str, Any]]:
    return [
        m.tls_secret(),
        m.users_secret(),
        m.smtp_credentials(),
        m.relay(),
        m.smtp_route("billing", senders=["billing.example.com"]),
        m.smtp_route("fallback", priority=10, credentials=None),
    ]


CASES: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "examples": _examples,
    "examples-policy-and-monitor": lambda: _with_policy_and_monitor(_examples()),
    "test-manifests": _test_manifests,
}


def _info(obj: dict[str, Any], index: int) -> ObjectInfo:
    name = obj["metadata"]["name"]
    return ObjectInfo(
        kind=obj["kind"],
        namespace=NAMESPACE,
        name=name,
        uid=f"uid-{obj['kind'].lower()}-{name}",
        generation=1,
        spec=obj["spec"],
        created=f"2026-01-01T00:00:{index:02d}Z",
    )


def render_case(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Every rendered child of the case's relay, as golden file name -> YAML text."""
    secrets = {
        obj["metadata"]["name"]: frozenset(
            {*(obj.get("data") or {}), *(obj.get("stringData") or {})}
        )
        for obj in objects
        if obj["kind"] == "Secret"
    }
    (relay,) = [_info(obj, 0) for obj in objects if obj["kind"] == "MailRelay"]
    routes = [_info(obj, i) for i, obj in enumerate(objects, 1) if obj["kind"] == "MailRoute"]
    spec = models.MailRelaySpec.model_validate(relay.spec)
    # DKIM keys as the key index keeps them, and DNS publishing every selector's record.
    facts = {
        obj["metadata"]["name"]: key_facts(
            {
                **(obj.get("data") or {}),
                **{
                    k: base64.b64encode(v.encode()).decode()
                    for k, v in (obj.get("stringData") or {}).items()
                },
            }
        )
        for obj in objects
        if obj["kind"] == "Secret"
    }
    answers = {
        record_name(selector.selector, domain.domain): TxtAnswer(
            (facts[selector.secret_ref.name][selector.secret_ref.key].record or "",)
        )
        for route in routes
        for domain in models.MailRouteSpec.model_validate(route.spec).dkim
        for _, selector in domain.selectors()
    }

    def dkim_keys(secret: str, key: str) -> KeyFacts | None:
        return facts.get(secret, {}).get(key)

    verdicts = judge_routes(
        relay, spec, routes, secrets.get, dkim_keys=dkim_keys, dns_answers=answers
    )
    assert all(v.included for v in verdicts), [v.route.name for v in verdicts if not v.included]
    inputs = RelayInputs(relay.name, NAMESPACE, relay.uid, spec)
    rendered = render_relay(inputs, verdicts, SETTINGS)
    (statefulset,) = [c for c in rendered.children if c["kind"] == "StatefulSet"]
    # Rendered by a pass too: the hand-off Secret (its token is random: a fixed one here) and
    # the drain Job of the first removed ordinal.
    generated = [
        render_handoff_secret(inputs, "TOKEN", SETTINGS.secret_selector),
        render_drain_job(inputs, spec.replicas, 1, statefulset, SETTINGS),
    ]
    files = {}
    for child in [*rendered.children, *generated]:
        name = f"{child['kind']}-{child['metadata']['name']}.yaml"
        assert name not in files, name
        files[name] = yaml.dump(child, Dumper=_Dumper, sort_keys=False, width=100)
    return files


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the relay config in the ConfigMap), for review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_children_match_their_golden_files(case: str) -> None:
    files = render_case(CASES[case]())
    folder = GOLDEN / case
    if os.environ.get("UPDATE_GOLDEN"):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.yaml"):
            if stale.name not in files:
                stale.unlink()
        for name, text in files.items():
            (folder / name).write_text(text)
    golden = {path.name: path.read_text() for path in sorted(folder.glob("*.yaml"))}
    problems = []
    for name in sorted(golden.keys() - files.keys()):
        problems.append(f"{case}/{name}: has a golden file but is no longer rendered")
    for name in sorted(files.keys() - golden.keys()):
        problems.append(f"{case}/{name}: rendered but has no golden file")
    for name in sorted(files.keys() & golden.keys()):
        if files[name] != golden[name]:
            diff = difflib.unified_diff(
                golden[name].splitlines(keepends=True),
                files[name].splitlines(keepends=True),
                fromfile=f"golden/children/{case}/{name}",
                tofile="rendered",
            )
            problems.append("".join(diff))
    assert not problems, (
        "The rendered children differ from the golden files (if intended, regenerate with "
        "UPDATE_GOLDEN=1 and review the diff):\n" + "\n".join(problems)
    )


def test_every_kind_of_child_has_a_golden_file() -> None:
    kinds = {path.name.split("-")[0] for path in GOLDEN.glob("*/*.yaml")}
    assert kinds == {
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "ServiceAccount",
        "Secret",
        "Job",
    }


def test_golden_files_are_what_the_examples_apply() -> None:
    """The golden StatefulSet of the examples is the example relay's (not a stale copy)."""
    relay = next(obj for obj in _examples() if obj["kind"] == "MailRelay")
    statefulset = yaml.safe_load((GOLDEN / "examples" / "StatefulSet-outbound.yaml").read_text())
    assert statefulset["spec"]["replicas"] == relay["spec"]["replicas"]
    config_map = yaml.safe_load(
        (GOLDEN / "examples" / "ConfigMap-outbound-config.yaml").read_text()
    )
    config = yaml.safe_load(config_map["data"]["relay.yaml"])
    routes = [obj["metadata"]["name"] for obj in _examples() if obj["kind"] == "MailRoute"]
    assert sorted(route["name"] for route in config["routes"]) == sorted(routes)
