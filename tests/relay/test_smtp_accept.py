"""SMTP acceptance: policy at MAIL/RCPT/DATA, limits, TLS/AUTH matrix, exact spooled bytes.

These tests run the relay in-process without the delivery engine where only acceptance
matters, and read the spool to check what was stored.
"""

from __future__ import annotations

from typing import Any

from mailrelay.relay.spool import Spool
from tests.relay.conftest import USERS, RelayFactory, RelayHandle

ALICE = ("alice", USERS["alice"])
BOB = ("bob", USERS["bob"])


def route(name: str = "default", **extra: Any) -> dict[str, Any]:
    """A route to an upstream nobody listens on (these tests never deliver)."""
    entry: dict[str, Any] = {
        "name": name,
        "upstream": {"type": "smtp", "name": f"{name}-up", "host": "127.0.0.1", "port": 9},
    }
    entry.update(extra)
    return entry


def message(subject: str = "hello", body: bytes = b"Hi there.\r\n", extra: bytes = b"") -> bytes:
    return (
        b"From: a@example.com\r\nTo: b@dest.test\r\nSubject: "
        + subject.encode()
        + b"\r\nMessage-ID: <"
        + subject.encode()
        + b"@example.com>\r\n"
        + extra
        + b"\r\n"
        + body
    )


async def accept_only(relay_factory: RelayFactory, **overrides: Any) -> RelayHandle:
    overrides.setdefault("routes", [route()])
    return await relay_factory(enable_delivery=False, **overrides)


def spooled(handle: RelayHandle) -> list[tuple[Any, bytes]]:
    spool = Spool(handle.spool_dir)
    return [(e, spool.read_message_sync(e.queue_id)) for e in spool.list_queue()]


async def test_authenticated_message_is_spooled_with_only_a_received_header_added(
    relay_factory: RelayFactory,
) -> None:
    relay = await accept_only(relay_factory)
    raw = message(body="Grüße\r\n..dot-stuffed line\r\n".encode())
    async with relay.client(login=ALICE) as smtp:
        errors, reply = await smtp.sendmail("a@example.com", ["b@dest.test"], raw)
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    [(entry, data)] = spooled(relay)
    assert reply.endswith(entry.queue_id)
    first_header_end = data.index(b"\r\nFrom: ")
    received = data[: first_header_end + 2]
    assert received.startswith(
        b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (mailrelay) with ESMTPSA id "
        + entry.queue_id.encode()
    )
    assert b"\r\n\tfor <b@dest.test>; " in received
    # aiosmtplib dot-stuffs ".." -> "..."; the relay must store the original line.
    assert data[first_header_end + 2 :] == raw
    assert entry.mail_from == "a@example.com"
    assert [(r.address, r.route, r.status) for r in entry.recipients] == [
        ("b@dest.test", "default", "pending")
    ]
    assert entry.authenticated_user == "alice"
    assert entry.message_id == "<hello@example.com>"
    assert relay.metric("mailrelay_messages_accepted_total") == 1
