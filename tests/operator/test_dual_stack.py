"""The operator's liveness and metrics endpoints answer on IPv4 and IPv6.

kubelet probes a pod on its primary address, which is IPv6 in IPv6-only and IPv6-primary
clusters; kopf's own endpoint binds one family only (`0.0.0.0` before).
"""

from __future__ import annotations

import socket
import urllib.request

import pytest

from mailrelay.support.operator_harness import OperatorProcess

pytestmark = [pytest.mark.kube, pytest.mark.slow]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_liveness_and_metrics_answer_on_both_families(operator: OperatorProcess, host: str) -> None:
    operator.wait_live()
    for port, path in ((operator.liveness_port, "/healthz"), (operator.metrics_port, "/metrics")):
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as answer:
            assert answer.status == 200, (host, path)
