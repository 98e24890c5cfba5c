"""The chart's Grafana dashboards: shape, variables, valid PromQL, and only real metric names.

The key tests start the real programs and scrape them: a relay subprocess (one message through
an SMTP upstream and one through an HTTP provider stand-in, so the delivery and provider
series exist) and, against the local control plane, the operator process reconciling a
MailRelay. Every metric name any dashboard panel, dashboard variable or alert selects must be
among the names those scrapes expose (`promql_names.known_names`), or be one of the two
documented outside series the alerts need (`EXTERNAL`). Dashboard queries are also checked
for syntax by promtool, by wrapping them, variables filled in, as recording rules.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from mailrelay.operator.metrics import OperatorMetrics
from mailrelay.relay.metrics import RelayMetrics
from mailrelay.relay.upstreams.providers.base import provider_metrics
from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import CRDS, bind_operator_role, running_operator, wait_for
from mailrelay.support.provider_servers import SIGNING_SECRET, start_provider_server
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.chart.promql_names import (
    CHART,
    DASHBOARDS,
    DERIVED_LABELS,
    TARGET_LABELS,
    UncheckableQuery,
    alert_expressions,
    dashboard_expressions,
    declared_labels,
    exposed_labels,
    family_of,
    known_names,
    label_uses,
    load_dashboard,
    metric_names,
    panels,
)
from tests.chart.test_alerts import run_promtool
from tests.operator import manifests

# The relay's own fixtures: a real relay on loopback and recording SMTP upstreams.
from tests.relay.conftest import (  # noqa: F401
    USERS,
    RelayFactory,
    http_get,
    recording_upstream,
    relay_factory,
    smtp_route,
    tls_certs,
    users_file,
)

# Series the alerts need that no mailrelay process can export, and who exports them.
EXTERNAL = {
    "up": "Prometheus itself, per scrape target (MailrelayRelayDown, MailrelayRelayNotReady)",
    "kube_pod_container_status_ready": "kube-state-metrics (MailrelayRelayNotReady)",
}
OPERATOR_PREFIX = "mailrelay_operator_"
# Relay metrics that carry a `route` label: panels on them must honour $route.
ROUTE_LABELLED = {
    "mailrelay_delivery_attempts_total",
    "mailrelay_delivery_latency_seconds_bucket",
    "mailrelay_recipients_accepted_total",
    "mailrelay_dead_letters_total",
    "mailrelay_delivery_rate_limited_total",
}
DASHBOARD_DOC = CHART / "DASHBOARDS.md"
REQUIRED_VARIABLES = {
    "relay-overview.json": ("datasource", "namespace", "relay", "route"),
    "operator.json": ("datasource", "namespace"),
}
DASHBOARD_IDS = [path.name for path in DASHBOARDS]


def referenced() -> dict[str, list[str]]:
    """Metric name -> where it is used, over every dashboard and alert expression."""
    uses: dict[str, list[str]] = {}
    for where, expr in dashboard_expressions() + alert_expressions():
        for name in metric_names(expr):
            uses.setdefault(name, []).append(where)
    return uses


def unknown_names(uses: dict[str, list[str]], known: dict[str, str]) -> list[str]:
    """One line per referenced name the scrape does not expose, naming its users."""
    return [
        f"{name} (used by {'; '.join(sorted(set(where)))})"
        for name, where in sorted(uses.items())
        if name not in known
    ]


def unknown_labels(source: Callable[[str], bool], labels: dict[str, set[str]]) -> list[str]:
    """One line per label a query expects on one source's metrics that they do not carry."""
    problems: list[str] = []
    for where, expr in dashboard_expressions() + alert_expressions():
        names = metric_names(expr)
        mine = {name for name in names if source(name)}
        if not mine:
            continue
        matchers, grouping = label_uses(expr)
        for metric, label in matchers:
            if metric in mine and label not in labels.get(metric, set()) | TARGET_LABELS:
                problems.append(f"{where}: {metric} has no label {label!r}")
        if names == mine:  # grouping labels can only be checked when every metric is ours
            available = set().union(*(labels.get(name, set()) for name in mine))
            for label in sorted(grouping - available - TARGET_LABELS - DERIVED_LABELS):
                problems.append(f"{where}: no metric in it has the label {label!r}")
    return problems


def is_relay_metric(name: str) -> bool:
    return name.startswith("mailrelay_") and not name.startswith(OPERATOR_PREFIX)


def is_operator_metric(name: str) -> bool:
    return name.startswith(OPERATOR_PREFIX)


def merged(*maps: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mapping in maps:
        for name, labels in mapping.items():
            out.setdefault(name, set()).update(labels)
    return out


# -- the name extractor ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up == 0", {"up"}),
        ('sum by (le, route) (rate(x_bucket{a="b", le!="+Inf"}[5m]))', {"x_bucket"}),
        ("rate(x_total[$__rate_interval]) / on (pod) group_left (node) y", {"x_total", "y"}),
        ('label_replace(z, "relay", "$1", "pod", "(.+)-[0-9]+") > 0.5e3', {"z"}),
        ("a and b or c unless d offset 5m", {"a", "b", "c", "d"}),
        ("max_over_time(q[1h:5m]) > bool 3", {"q"}),
        (
            '{__name__="named", job="x"} + count without (instance) (m:rule:rate5m)',
            {"named", "m:rule:rate5m"},
        ),
        (
            'histogram_quantile(0.99, sum(rate(h_bucket{pod=~"($relay)-[0-9]+"}[1m])) by (le))',
            {"h_bucket"},
        ),
        ("sum(v) # a trailing comment mentioning fake_metric", {"v"}),
        ("vector(1) + time()", set()),
    ],
)
def test_metric_names_are_extracted(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_label_uses_split_matchers_and_grouping() -> None:
    matchers, grouping = label_uses(
        'sum by (route, upsteam) (rate(a_total{pod=~"($relay)-[0-9]+", reslt!="x"}[5m]))'
        " / on (pod) group_left b"
    )
    assert matchers == [("a_total", "pod"), ("a_total", "reslt")]
    assert grouping == {"route", "upsteam", "pod"}


def test_a_name_pattern_cannot_be_checked() -> None:
    with pytest.raises(UncheckableQuery):
        metric_names('{__name__=~"mailrelay_.+"}')


def test_known_names_include_unobserved_histograms_and_counters() -> None:
    exposition = (
        "# HELP h_seconds Time.\n# TYPE h_seconds histogram\n"
        "# HELP c Things.\n# TYPE c counter\nc_total 1.0\n"
    )
    known = known_names(exposition)
    assert {"h_seconds_bucket", "h_seconds_sum", "h_seconds_count", "c_total"} <= set(known)
    assert family_of("h_seconds_bucket", known) == "h_seconds"
    assert "c" not in known  # a counter is only queried with its _total suffix


# -- dashboard shape ------------------------------------------------------------------------


@pytest.mark.parametrize("path", DASHBOARDS, ids=DASHBOARD_IDS)
def test_dashboard_shape(path: Path) -> None:
    dashboard = load_dashboard(path)
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["title"].startswith("mailrelay / ")
    assert "mailrelay" in dashboard["tags"]
    assert dashboard.get("id") is None  # provisioned dashboards must not carry a database id
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        assert str(panel.get("title", "")).strip(), f"{path.name}: a panel has no title"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{path.name}: {panel['title']!r} is wider than the grid"
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert str(panel.get("description", "")).strip(), f"{panel['title']!r} has no description"
        targets = panel.get("targets") or []
        assert targets, f"{path.name}: panel {panel['title']!r} has no targets"
        for target in targets:
            assert str(target.get("expr", "")).strip(), f"{panel['title']!r}: empty query"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_uids_are_unique() -> None:
    uids = [load_dashboard(path)["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids)) == len(REQUIRED_VARIABLES)


@pytest.mark.parametrize("path", DASHBOARDS, ids=DASHBOARD_IDS)
def test_dashboard_variables(path: Path) -> None:
    variables = {v["name"]: v for v in load_dashboard(path)["templating"]["list"]}
    for name in REQUIRED_VARIABLES[path.name]:
        assert name in variables, f"{path.name} has no ${name} variable"
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}", variable["name"]


def test_relay_panels_honour_namespace_relay_and_route() -> None:
    """A panel ignoring a variable would show every relay while the picker says otherwise."""
    wrong = []
    for where, expr in dashboard_expressions():
        if not where.startswith("relay-overview.json: panel"):
            continue
        names = metric_names(expr)
        if '$namespace"' not in expr or "$relay" not in expr:
            wrong.append(f"{where}: no namespace/relay filter")
        if names & ROUTE_LABELLED and "$route" not in expr:
            wrong.append(f"{where}: no route filter")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", DASHBOARDS, ids=DASHBOARD_IDS)
def test_every_panel_is_described_in_dashboards_md(path: Path) -> None:
    text = DASHBOARD_DOC.read_text()
    missing = [
        panel["title"]
        for panel in panels(load_dashboard(path))
        if (f"### {panel['title']} row" if panel["type"] == "row" else f"**{panel['title']}**")
        not in text
    ]
    assert not missing, f"DASHBOARDS.md does not describe {missing}"


def _fill_grafana_variables(expr: str) -> str:
    """What Grafana would send: variables replaced by values of the right shape."""
    replacements = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "6h",
        "$namespace": "mail",
        "$relay": "(outbound|inbound)",
        "$route": ".*",
    }
    for variable, value in replacements.items():
        expr = expr.replace(variable, value)
    assert "$" not in re.sub(r'"\$[0-9]+"', "", expr), f"unfilled variable in {expr}"
    return expr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{index}", "expr": _fill_grafana_variables(expr)}
        for index, (_, expr) in enumerate(dashboard_expressions())
    ]
    rule_file = tmp_path / "dashboard-queries.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run_promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_documented_series_come_from_outside_mailrelay() -> None:
    outside = {n for n in referenced() if not n.startswith("mailrelay_")}
    assert outside <= set(EXTERNAL), f"unexpected non-mailrelay series: {outside - set(EXTERNAL)}"
    in_dashboards = {
        name
        for _, expr in dashboard_expressions()
        for name in metric_names(expr)
        if name in EXTERNAL
    }
    assert not in_dashboards, f"dashboards must use only mailrelay's own series: {in_dashboards}"


# -- the live programs ----------------------------------------------------------------------


async def _eventually(check: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_relay_exports_every_metric_the_dashboards_and_alerts_use(
    relay_factory: RelayFactory,  # noqa: F811
    recording_upstream: Callable[..., RecordingUpstream],  # noqa: F811
    tls_certs: TlsCerts,  # noqa: F811
    tmp_path: Path,
) -> None:
    upstream = recording_upstream(tls="none")
    provider = await start_provider_server("webhook")
    try:
        credentials = tmp_path / "webhook-secret"
        credentials.mkdir()
        (credentials / "signing_secret").write_text(SIGNING_SECRET)
        routes: list[dict[str, Any]] = [
            smtp_route(
                "smtp-route",
                upstream,
                tls_certs.ca_file,
                match={"recipient_domains": ["smtp.test"]},
            ),
            {
                "name": "api-route",
                "match": {"recipient_domains": ["api.test"]},
                "upstream": {
                    "type": "api",
                    "name": "hook-api",
                    "provider": "webhook",
                    "endpoint": provider.base_url + "/hook",
                    "insecure_allow_local_endpoint": True,
                    "credentials_dir": str(credentials),
                    "connect_timeout_seconds": 2,
                    "timeout_seconds": 5,
                },
            },
        ]
        relay = await relay_factory(routes=routes, subprocess=True)
        message = b"Subject: metrics\r\nMessage-ID: <m1@client.test>\r\n\r\nhello\r\n"
        async with relay.client(login=("alice", USERS["alice"])) as smtp:
            await smtp.sendmail("ann@example.com", ["x@smtp.test", "y@api.test"], message)
        await upstream.wait_for(1)
        await _eventually(lambda: len(provider.sent) == 1, "the webhook delivery")
        status, body = await http_get(relay.host, relay.health_port, "/metrics")
    finally:
        await provider.stop()
    assert status == 200
    known = known_names(body.decode())
    # The scrape is live: both deliveries are in it, so this is the running relay's registry.
    assert 'route="api-route"' in body.decode() and 'route="smtp-route"' in body.decode()
    uses = {n: w for n, w in referenced().items() if is_relay_metric(n)}
    assert len(uses) > 20, "the extractor found suspiciously few relay metrics"
    missing = unknown_names(uses, known)
    assert not missing, "not exported by a live relay:\n" + "\n".join(missing)
    # Labels: as scraped, plus the declared ones of families still without samples.
    registry = CollectorRegistry()
    RelayMetrics(registry)
    provider_metrics(registry)
    labels = merged(exposed_labels(body.decode()), declared_labels(registry, known))
    wrong = unknown_labels(is_relay_metric, labels)
    assert not wrong, "\n".join(wrong)


@pytest.mark.kube
@pytest.mark.slow
def test_operator_exports_every_metric_the_dashboards_and_alerts_use(
    kube: LocalKube, tmp_path: Path
) -> None:
    kube.install_crds(CRDS)
    kubeconfig = bind_operator_role(kube)
    namespace = kube.create_namespace(f"dash-metrics-{int(time.time())}")
    with running_operator(
        kube,
        kubeconfig,
        "--standalone",
        "--namespace",
        "dash-*",
        log_path=tmp_path / "operator.log",
    ) as operator:
        objects = [manifests.tls_secret(), manifests.users_secret(), manifests.relay("metrics")]
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects))
        wait_for(
            lambda: operator.total("mailrelay_operator_reconciles_total") >= 1,
            what="a reconcile counted in the operator's metrics",
        )
        url = f"http://127.0.0.1:{operator.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            exposition = response.read().decode()
    kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    known = known_names(exposition)
    uses = {n: w for n, w in referenced().items() if is_operator_metric(n)}
    assert len(uses) >= 5, "the extractor found suspiciously few operator metrics"
    missing = unknown_names(uses, known)
    assert not missing, "not exported by a live operator:\n" + "\n".join(missing)
    registry = CollectorRegistry()
    OperatorMetrics(registry)
    labels = merged(exposed_labels(exposition), declared_labels(registry, known))
    wrong = unknown_labels(is_operator_metric, labels)
    assert not wrong, "\n".join(wrong)
