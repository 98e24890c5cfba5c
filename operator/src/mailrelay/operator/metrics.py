"""Operator metrics (``mailrelay_operator_*``) on a registry passed in, never the global one.

Label values are bounded: ``kind`` is MailRelay or MailRoute, ``result`` one of a few words,
``child`` one of the seven child kinds, ``action`` created/updated.
"""

from __future__ import annotations

import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.exposition import ThreadingWSGIServer

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


ALL_ADDRESSES = ""


class _DualStackServer(ThreadingWSGIServer):
    """One IPv6 socket that also accepts IPv4 (IPV6_V6ONLY off), whatever the sysctl says."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log line per scrape."""


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


def serve_metrics(registry: CollectorRegistry, port: int, host: str = ALL_ADDRESSES) -> Any:
    """Serve ``/metrics`` from a daemon thread (port 0: not served); returns the server.

    The default host serves every address of both families (an IPv4-only, IPv6-only or
    dual-stack pod); a machine without IPv6 gets IPv4 only.
    """
    if port == 0:
        return None
    if host == ALL_ADDRESSES and _ipv6_available():
        dual = make_server(
            "::", port, make_wsgi_app(registry), _DualStackServer, handler_class=_QuietHandler
        )
        threading.Thread(target=dual.serve_forever, daemon=True).start()
        return dual
    server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=registry)
    return server
