"""The chart's generated files match their one source (operator/rbac.py and crds/)."""

from __future__ import annotations

from typing import Any

import yaml

from mailrelay.operator.rbac import RULES
from mailrelay.support import sync_chart
from mailrelay.support.localkube import REPO_ROOT


def test_generated_chart_files_are_current() -> None:
    stale = [
        str(path.relative_to(REPO_ROOT))
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
    expected = {r for rule in RULES for r in rule.resources}
    assert namespaced | cluster == expected


def _value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Leaf key paths of values.yaml; free-form maps (security contexts, image) count as leaves."""
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in FREE_FORM_VALUES:
            paths.extend(_value_paths(value, f"{path}."))
        else:
            paths.append(path)
    return paths


FREE_FORM_VALUES = {"podSecurityContext", "securityContext", "image"}


def test_every_value_is_documented_in_the_chart_readme() -> None:
    chart = sync_chart.CHART
    values = yaml.safe_load((chart / "values.yaml").read_text())
    readme = (chart / "README.md").read_text()
    missing = [path for path in _value_paths(values) if f"| `{path}` |" not in readme]
    assert not missing, f"Values missing from charts/mailrelay/README.md: {missing}"
    image_keys = [f"image.{key}" for key in values["image"]]
    assert all(f"| `{key}` |" in readme for key in image_keys)
