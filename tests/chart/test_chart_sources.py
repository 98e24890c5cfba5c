"""The chart's generated files match their one source (operator/rbac.py and crds/)."""

from __future__ import annotations

import sync_chart


def test_generated_chart_files_are_current() -> None:
    stale = [
        str(path.relative_to(sync_chart.REPO_ROOT))
        for path, content in sync_chart.generated_files().items()
        if not path.exists() or path.read_text() != content
    ]
    assert not stale, f"Stale chart files {stale}: run `make chart-sync` and commit them."


def test_split_rules_cover_every_rule_once() -> None:
    split = sync_chart.split_rules()
    namespaced = {r for rule in split["namespaced"] for r in rule["resources"]}
    cluster = {r for rule in split["cluster"] for r in rule["resources"]}
    assert not namespaced & cluster
    assert cluster <= sync_chart.CLUSTER_SCOPED
    expected = {r for rule in sync_chart.RULES for r in rule.resources}
    assert namespaced | cluster == expected
