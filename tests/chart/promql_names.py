"""Metric names in PromQL, and every PromQL expression the chart's dashboards and alerts hold.

`metric_names(expr)` finds the series names an expression selects, without a PromQL parser:
it blanks out what cannot be a metric name (string literals, Grafana variables, label
matchers, range and subquery brackets, `by`/`on`/... label lists), then keeps every remaining
identifier that is not a function call, a keyword or part of a number or duration.
`{__name__="x"}` counts as `x`; a regex on `__name__` is refused, since no name can be checked.

`dashboard_expressions()` and `alert_expressions()` list `(where, expr)` pairs, `where` naming
the dashboard and panel (or variable) or the alert, so a failing test says where to look.
`known_names(exposition)` turns a scraped /metrics text into every name a query may use:
the sample names it holds plus, per family, the names its type implies even before the first
observation (a labelled histogram has no `_bucket` samples until it observes something).

`label_uses(expr)` finds the label names an expression relies on, per selected metric (its
matchers) and overall (`by`, `without`, `on`, ... lists), so a test can catch a misspelt label
that would leave a panel silently empty. `exposed_labels` reads label names from a scrape;
`declared_labels` reads them from a registry's collectors (a labelled family has no samples,
and so shows no label names, until its first use).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

CHART = Path(__file__).resolve().parents[2] / "charts" / "mailrelay"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
RULES = CHART / "files" / "prometheus-rules.yaml"

# Words that look like identifiers but are PromQL syntax. Functions are recognised by the
# parenthesis that follows them, so they need no list.
KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r"__name__\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
# Labels Prometheus (prometheus-operator's scrape configs) adds to every target's series.
TARGET_LABELS = frozenset(
    {"namespace", "pod", "container", "endpoint", "job", "instance", "service"}
)
# Labels the chart's queries make with label_replace (the relay's name, from its pod name).
DERIVED_LABELS = frozenset({"relay"})
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
    "stateset": ("",),
    "unknown": ("",),
}


class UncheckableQuery(ValueError):
    """The expression selects series by a name pattern, so no name can be checked."""


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects."""
    names: set[str] = set()
    for operator, quoted in _NAME_MATCHER.findall(expr):
        if operator != "=":
            raise UncheckableQuery(f"__name__{operator}{quoted} in {expr!r}")
        names.add(quoted[1:-1])
    text = _STRING.sub(" ", expr)
    text = re.sub(r"#[^\n]*", " ", text)  # comments
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " {} ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " [] ", text)  # ranges and subqueries
    text = _LABEL_LIST.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation call
        if name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def label_uses(expr: str) -> tuple[list[tuple[str | None, str]], set[str]]:
    """(metric or None, label) per matcher, and the labels of grouping/matching lists."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"#[^\n]*", " ", text)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    matchers: list[tuple[str | None, str]] = []
    for selector in _SELECTOR.finditer(text):
        metric = selector.group(1)
        for label in _MATCHER.findall(selector.group(2)):
            if label != "__name__":
                matchers.append((metric, label))
    grouping = {
        label.strip()
        for group in _GROUPING.findall(text)
        for label in group.split(",")
        if label.strip()
    }
    return matchers, grouping


def exposed_labels(exposition: str) -> dict[str, set[str]]:
    """Label names per sample name, as scraped (only families with samples show any)."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def declared_labels(registry: CollectorRegistry, known: dict[str, str]) -> dict[str, set[str]]:
    """Label names per known sample name, from the collectors' declarations.

    prometheus-client keeps them in the private `_labelnames`, the only place they exist
    before a labelled family's first sample; histogram samples add `le`.
    """
    by_family: dict[str, set[str]] = {}
    for collector in list(registry._collector_to_names):
        name = getattr(collector, "_name", None)
        if isinstance(name, str):
            by_family[name] = set(getattr(collector, "_labelnames", ()))
    labels: dict[str, set[str]] = {}
    for sample_name, family in known.items():
        declared = set(by_family.get(family, set()))
        if sample_name.endswith("_bucket"):
            declared.add("le")
        labels[sample_name] = declared
    return labels


def family_of(name: str, known: dict[str, str]) -> str:
    """The family a sample name belongs to (`x_bucket` -> `x`), for messages."""
    return known.get(name, name)


def known_names(exposition: str) -> dict[str, str]:
    """Every name a query may select in this /metrics text, mapped to its family."""
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(exposition):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = family.name
        for sample in family.samples:
            names[sample.name] = family.name
    return names


def _variable_expression(query: Any) -> str | None:
    """The PromQL inside a Grafana Prometheus variable query, or None if it has none."""
    text = query.get("query", "") if isinstance(query, dict) else str(query or "")
    text = text.strip()
    match = re.fullmatch(r"label_values\((.*),\s*\w+\s*\)", text, flags=re.DOTALL)
    if match:
        return match.group(1)
    match = re.fullmatch(r"query_result\((.*)\)", text, flags=re.DOTALL)
    if match:
        return match.group(1)
    if text.startswith(("label_values(", "label_names(")):
        return None  # label_values(label) and label_names() select no metric
    if text.startswith("metrics("):
        raise UncheckableQuery(f"metrics() variable query {text!r}")
    return text or None


def load_dashboard(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, expr) for every panel target and query variable of every dashboard."""
    found: list[tuple[str, str]] = []
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                where = f"{path.name}: panel {panel.get('title')!r} target {target.get('refId')}"
                found.append((where, target["expr"]))
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            expr = _variable_expression(variable.get("query"))
            if expr is not None:
                found.append((f"{path.name}: variable ${variable['name']}", expr))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    """(where, expr) for every rule of the chart's rule file."""
    document = yaml.safe_load(RULES.read_text())
    return [
        (f"prometheus-rules.yaml: {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in document["groups"]
        for rule in group["rules"]
    ]
