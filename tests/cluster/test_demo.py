"""`make demo`'s flow as a test: chart, upstream pods, relay, client pod, arrivals, metrics."""

from __future__ import annotations

import pytest

from mailrelay.support import clusterdemo
from mailrelay.support.localnode import LocalNode

pytestmark = [pytest.mark.node, pytest.mark.slow]


def test_demo_delivers_every_message_to_the_upstream_pod_its_route_names(
    node: LocalNode, operator_release: str, node_namespace: str
) -> None:
    result = clusterdemo.run_cluster_demo(node, node_namespace)
    assert result.ok, (result.arrivals, result.send_log)
    assert "sent 'Invoice 42': 2.0.0" in result.send_log
    assert result.metrics["mailrelay_messages_accepted_total"] == 3
    assert result.metrics['mailrelay_smtp_tls_sessions_total{mode="implicit"}'] == 1
    assert "outbound" in result.get_output
