"""Crash safety: SIGKILL the relay under load, restart it, and prove that every message
that got a 250 reaches the upstream (Message-ID sets compared).

The upstream is throttled so a backlog is in the spool when the relay dies: the restart
must resume it. Duplicates are allowed (delivery is at-least-once); losses are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiosmtplib
import pytest

from mailrelay.relay.spool import Spool
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.relay.conftest import (
    RelayFactory,
    fresh_entry,
    smtp_route,
    start_subprocess,
    write_legacy_pair,
)


def msg(client: int, n: int) -> tuple[str, bytes]:
    mid = f"<crash-{client}-{n}@example.com>"
    head = f"From: a@example.com\r\nSubject: {client}/{n}\r\nMessage-ID: {mid}\r\n\r\n"
    return mid, head.encode() + (b"x" * 76 + b"\r\n") * 25


@pytest.mark.slow
async def test_sigkill_under_load_loses_no_acknowledged_message(
    relay_factory: RelayFactory, recording_upstream: Any, tls_certs: TlsCerts
) -> None:
    upstream: RecordingUpstream = recording_upstream(tls="starttls")

    def slow_upstream(_envelope: object) -> None:
        time.sleep(0.004)  # throttles delivery so a backlog builds up in the spool

    upstream.data_reply = slow_upstream
    relay = await relay_factory(
        routes=[smtp_route("out", upstream, tls_certs.ca_file)],
        subprocess=True,
        allowed_networks=["127.0.0.0/8"],
    )
    assert relay.process is not None
    acked: set[str] = set()
    attempted: set[str] = set()
    stop = asyncio.Event()

    async def client(number: int) -> None:
        n = 0
        while not stop.is_set():
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=relay.smtp_port, start_tls=False, timeout=5
            )
            try:
                await smtp.connect()
                while not stop.is_set():
                    mid, data = msg(number, n)
                    n += 1
                    attempted.add(mid)
                    errors, reply = await smtp.sendmail("a@example.com", ["b@dest.test"], data)
                    if not errors and "queued as" in reply:
                        acked.add(mid)
            except (aiosmtplib.SMTPException, OSError):
                await asyncio.sleep(0.05)  # the relay is gone; try again until told to stop
            finally:
                smtp.close()

    clients = [asyncio.create_task(client(i)) for i in range(8)]
    await asyncio.sleep(2.0)
    relay.kill()  # SIGKILL: no drain, no cleanup
    acked_at_kill = set(acked)
    stop.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 10)
    spool = Spool(relay.spool_dir)
    # Queue files (deferred or beyond the journal's bound) and journal records without a
    # done mark (first attempts cut short): the restart must resume both.
    queued = {e.message_id for e in SpoolAdmin(spool.directory).list_queue()}
    journaled = {e.message_id for e in SpoolAdmin(spool.directory).list_journal()}
    assert len(acked_at_kill) > 50, "the load did not get going"
    assert journaled, "nothing was in the journal at the crash; the test proves too little"
    await start_subprocess(relay)  # same config, ports and spool
    upstream.data_reply = None
    for _ in range(600):
        if acked <= upstream.message_ids():
            break
        await asyncio.sleep(0.1)
    received = upstream.message_ids()
    missing = acked - received
    assert not missing, f"{len(missing)} acknowledged message(s) never arrived"
    assert received <= attempted  # nothing appears that no client sent
    assert len(received) >= len(acked)
    print(
        f"acked {len(acked)} ({len(acked_at_kill)} before the kill), spooled at the crash "
        f"{len(queued)} in queue files + {len(journaled)} in the journal, "
        f"received {len(received)} distinct, {len(upstream.snapshot())} total"
    )
    await relay.stop()
    assert relay.process is not None and relay.process.returncode == 0


@pytest.mark.slow
async def test_upgrade_in_place_delivers_a_two_file_spool(
    relay_factory: RelayFactory, recording_upstream: Any, tls_certs: TlsCerts
) -> None:
    """A spool left by the previous version (`.eml` + `.json`) is converted and delivered."""
    upstream: RecordingUpstream = recording_upstream(tls="starttls")
    relay = await relay_factory(
        routes=[smtp_route("out", upstream, tls_certs.ca_file)], subprocess=True, start=False
    )
    queue = relay.spool_dir / "queue"
    queue.mkdir(parents=True)
    sent: dict[str, bytes] = {}
    for n in range(5):
        mid, data = msg(99, n)
        entry = fresh_entry(f"b{n}@dest.test", "out", data, message_id=mid)
        write_legacy_pair(queue, entry, data)
        sent[mid] = data
    await start_subprocess(relay)
    got = await upstream.wait_for(5)
    assert sorted(r.data for r in got) == sorted(sent.values())
    assert upstream.message_ids() == set(sent)
    await relay.stop()
    assert list(queue.iterdir()) == []
