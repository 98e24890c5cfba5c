"""The drain command when no peer resolves at its start and one comes back before its
deadline (on a cluster: the last ready pod restarting while the drain Job starts).

The mail must go to that peer, never to the dead letters; and the report must reach the
file Kubernetes takes a container's termination message from, where the operator reads it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mailrelay.relay.budget import ByteBudget
from mailrelay.relay.config import load_config
from mailrelay.relay.drain import _deliver_then_give_up
from mailrelay.relay.metrics import RelayMetrics
from mailrelay.relay.spool import Spool
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.relay.conftest import RelayFactory, smtp_route
from tests.relay.test_handoff import fill, handoff_block, queued, run_drain


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "handoff-token"
    path.write_text(secrets.token_urlsafe(32) + "\n")
    return path


async def test_delivery_stops_for_a_peer_that_comes_back_and_nothing_is_dead_lettered(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()  # the drain cannot deliver either
    orphan = await relay_factory(
        routes=[route], handoff=handoff_block(token_file, ["no-such-peer.invalid"])
    )
    await fill(orphan, 6, "p")
    await orphan.stop()
    config = load_config(orphan.config_path)
    spool = Spool(config.spool.directory)
    await spool.start()
    loop = asyncio.get_running_loop()
    back_at = loop.time() + 3

    async def peers_back() -> bool:
        return loop.time() >= back_at

    try:
        came_back = await _deliver_then_give_up(
            config,
            spool,
            RelayMetrics(CollectorRegistry()),
            ByteBudget(64 << 20),
            loop.time() + 8,  # the peer is back well before the dead-letter point
            peers_back=peers_back,
        )
    finally:
        await spool.aclose()
    assert came_back
    assert len(queued(orphan.spool_dir)) == 6  # all still queued, for the hand-off
    assert SpoolAdmin(orphan.spool_dir).list_dead_letters() == []


async def test_drain_writes_its_report_where_the_termination_message_is_read(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    orphan = await relay_factory(
        routes=[route], handoff=handoff_block(token_file, ["no-such-peer.invalid"])
    )
    await fill(orphan, 2, "t")
    await orphan.stop()
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("")  # kubelet creates the file; the drain fills it

    code, report, _ = await asyncio.to_thread(
        run_drain,
        orphan.config_path,
        "--deadline",
        "2",
        "--report-file",
        str(termination_log),
    )

    assert code == 0
    assert report["dead_lettered"] == 4  # two messages and their two DSNs
    assert json.loads(termination_log.read_text()) == report
