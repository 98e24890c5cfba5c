"""Operator metrics (``mailrelay_operator_*``) on a registry passed in, never the global one.

Label values are bounded: ``kind`` is MailRelay or MailRoute, ``result`` one of a few words,
``child`` one of the seven child kinds, ``action`` created/updated.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RESULTS = ("ok", "invalid", "error", "gone")  # gone: deleted during its pass
CHILD_ACTIONS = ("created", "updated")


class OperatorMetrics:
    """The operator's counters, histograms and gauges."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reconciles = Counter(
            "mailrelay_operator_reconciles",
            "Reconcile passes by kind and result (ok, invalid spec, error, gone: deleted).",
            ["kind", "result"],
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "mailrelay_operator_reconcile_duration_seconds",
            "Time one reconcile pass took, by kind.",
            ["kind"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.children = Counter(
            "mailrelay_operator_children",
            "Child objects the operator wrote, by child kind and action (created, updated).",
            ["child", "action"],
            registry=registry,
        )
        self.status_writes = Counter(
            "mailrelay_operator_status_writes",
            "Status subresource patches, by kind; zero growth at steady state.",
            ["kind"],
            registry=registry,
        )
        self.errors = Counter(
            "mailrelay_operator_errors",
            "Errors while reconciling (API failures), by kind.",
            ["kind"],
            registry=registry,
        )
        self.relays = Gauge(
            "mailrelay_operator_relays",
            "MailRelays the operator currently knows about.",
            registry=registry,
        )


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` from a daemon thread (port 0: not served); returns the server."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
