"""The one mail envelope from the spool's intake to the transports (`relay/envelope.py`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailrelay.relay.envelope import Envelope
from mailrelay.relay.spool import Arrival, Spool

MESSAGE = b"Subject: hi\r\nMessage-ID: <m1@example.org>\r\n\r\nbody\r\n"


def _envelope(**changes: object) -> Envelope:
    fields: dict[str, object] = {
        "queue_id": "Q1",
        "mail_from": "s@example.org",
        "recipients": ("a@example.net", "b@example.com"),
        "smtputf8": True,
        "body_8bitmime": True,
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def test_an_arrival_needs_one_route_per_recipient() -> None:
    with pytest.raises(ValueError, match="one route per recipient"):
        Arrival(_envelope(), routes=("r1",), client_address="192.0.2.1", authenticated_user=None)


async def test_a_streamed_arrival_is_queued_and_sent_with_the_same_envelope(
    tmp_path: Path,
) -> None:
    """What the front hands the spool comes back, per delivery attempt, as an `Envelope`
    with the recipients asked for, in their order, and the same sender and extensions."""
    spool = Spool(tmp_path / "spool")
    await spool.start()
    sent = _envelope(queue_id="0000000000000001aa")
    arrival = Arrival(
        sent, routes=("net", "com"), client_address="192.0.2.1", authenticated_user="alice"
    )
    incoming = await asyncio.to_thread(spool.open_incoming, arrival, MESSAGE)
    await asyncio.to_thread(incoming.write, [MESSAGE])
    held = await spool.enqueue_incoming(incoming)
    if held.claim is not None:
        held.claim.release()
    entry = await spool.read_entry(sent.queue_id)
    assert entry is not None
    assert [(r.address, r.route) for r in entry.recipients] == [
        ("a@example.net", "net"),
        ("b@example.com", "com"),
    ]
    assert (entry.client_address, entry.authenticated_user) == ("192.0.2.1", "alice")
    assert entry.envelope(r.address for r in entry.recipients) == sent
    assert entry.envelope(["b@example.com"]) == _envelope(
        queue_id=sent.queue_id, recipients=("b@example.com",)
    )
