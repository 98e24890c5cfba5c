"""`make demo` as a test: operator, upstreams, the relay from the operator's own ConfigMap and
Secrets in kubelet's layout, real mail over STARTTLS with AUTH to each route's upstream."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from mailrelay.support import demo
from mailrelay.support.localkube import LocalKube

pytestmark = [pytest.mark.kube, pytest.mark.slow]


async def test_demo_delivers_each_message_to_its_routes_upstream(
    crds: LocalKube, tmp_path: Path
) -> None:
    result = await demo.run_demo(crds, namespace=f"demo-{secrets.token_hex(3)}", workdir=tmp_path)
    delivered = {arrival.subject: arrival.upstream for arrival in result.arrivals}
    assert delivered == result.expected
    assert "Invoice 42" in result.expected
    assert result.relay_ready
    assert result.relay_metrics["mailrelay_messages_accepted_total"] == len(result.expected)
    starttls = result.relay_metrics['mailrelay_smtp_tls_sessions_total{mode="starttls"}']
    assert starttls == len(result.expected)
    assert result.relay_metrics['mailrelay_smtp_auth_attempts_total{result="success"}'] == len(
        result.expected
    )
    assert "outbound" in result.get_output and "True" in result.get_output
    # The relay read the operator's files through kubelet's ..data symlinks.
    config = tmp_path / "pod" / "etc" / "mailrelay" / "config"
    assert (config / "relay.yaml").is_symlink()
    assert (config / "..data").is_symlink()
