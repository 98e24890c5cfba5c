"""The chart's alert rules, checked and unit-tested by the real promtool.

`files/prometheus-rules.yaml` goes through `promtool check rules` (syntax, PromQL, templates)
and `promtool test rules` with the cases in `tests/chart/promtool/*.yaml`. A structural test
then makes sure that suite covers every alert both ways (an evaluation where it fires and one
where it must not), and that every alert carries the annotations and severity the runbook
and Alertmanager routing rely on. promtool comes from `hack/build-control-plane.sh promtool`,
built once from the Go module proxy and cached.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mailrelay"
RULES = CHART / "files" / "prometheus-rules.yaml"
RUNBOOK = CHART / "RUNBOOK.md"
PROMTOOL_TESTS = sorted((Path(__file__).parent / "promtool").glob("*.yaml"))
REQUIRED_ANNOTATIONS = ("summary", "description", "runbook")
SEVERITIES = ("warning", "critical")


@functools.cache
def promtool() -> Path:
    """The cached promtool binary (built on first use; the script prints its bin dir last)."""
    result = subprocess.run(
        [str(REPO / "hack" / "build-control-plane.sh"), "promtool"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(result.stdout.strip().splitlines()[-1]) / "promtool"


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool()), *args], check=False, capture_output=True, text=True, cwd=REPO, timeout=120
    )


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the file, in order."""
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_rule_file_is_a_prometheusrule_spec() -> None:
    """The chart embeds the file as the PrometheusRule's spec: only `groups` at the top."""
    document = yaml.safe_load(RULES.read_text())
    assert list(document) == ["groups"]
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names)), names


def test_promtool_checks_the_rules_with_every_linter() -> None:
    result = run_promtool("check", "rules", "--lint=all", "--lint-fatal", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert PROMTOOL_TESTS, "no promtool test files"
    result = run_promtool("test", "rules", *map(str, PROMTOOL_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A rule file with one threshold changed must fail the suite (the cases are not vacuous)."""
    mutated = RULES.read_text().replace(
        "mailrelay_queue_oldest_message_age_seconds > 3600",
        "mailrelay_queue_oldest_message_age_seconds > 7200",
    )
    assert mutated != RULES.read_text()
    rules_copy = tmp_path / "prometheus-rules.yaml"
    rules_copy.write_text(mutated)
    case = tmp_path / "case.yaml"
    case_doc = yaml.safe_load(
        (Path(__file__).parent / "promtool" / "oldest-message.yaml").read_text()
    )
    case_doc["rule_files"] = [str(rules_copy)]
    case.write_text(yaml.safe_dump(case_doc))
    result = run_promtool("test", "rules", str(case))
    assert result.returncode != 0
    assert "MailrelayOldestMessageTooOld" in result.stdout + result.stderr


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_has_annotations_and_severity(rule: dict[str, Any]) -> None:
    annotations = rule.get("annotations") or {}
    for key in REQUIRED_ANNOTATIONS:
        assert str(annotations.get(key, "")).strip(), f"{rule['alert']} has no {key} annotation"
    assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
    assert re.fullmatch(r"Mailrelay[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]


def test_every_alert_has_a_runbook_section() -> None:
    headings = set(re.findall(r"^## (\S+)", RUNBOOK.read_text(), flags=re.MULTILINE))
    missing = [rule["alert"] for rule in alert_rules() if rule["alert"] not in headings]
    assert not missing, f"RUNBOOK.md has no section for {missing}"


def _cases() -> dict[str, dict[str, int]]:
    """Per alert name: how many evaluations expect it firing, and how many expect silence."""
    seen: dict[str, dict[str, int]] = {}
    for path in PROMTOOL_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test") or []:
                counts = seen.setdefault(case["alertname"], {"firing": 0, "silent": 0})
                counts["firing" if case.get("exp_alerts") else "silent"] += 1
    return seen


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_is_unit_tested_firing_and_not_firing(rule: dict[str, Any]) -> None:
    counts = _cases().get(rule["alert"], {"firing": 0, "silent": 0})
    assert counts["firing"] >= 1, f"no promtool case where {rule['alert']} fires"
    assert counts["silent"] >= 1, f"no promtool case where {rule['alert']} must stay silent"


def test_promtool_cases_name_only_existing_alerts() -> None:
    known = {rule["alert"] for rule in alert_rules()}
    assert set(_cases()) <= known, set(_cases()) - known
