"""SMTP acceptance: policy at MAIL/RCPT/DATA, limits, TLS/AUTH matrix, exact spooled bytes.

These tests run the relay in-process without the delivery engine where only acceptance
matters, and read the spool to check what was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiosmtplib
import bcrypt
import pytest
import yaml

from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.support.smtp_peers import TlsCerts
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
    admin = SpoolAdmin(handle.spool_dir)
    return [(e, admin.read_message(e.queue_id)) for e in admin.list_queue()]


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


async def cmd(smtp: aiosmtplib.SMTP, line: str) -> tuple[int, str]:
    """Send one raw command; (code, text) whatever the code."""
    response = await smtp.execute_command(line.encode())
    return response.code, response.message


async def transaction(
    smtp: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes | None = None
) -> list[tuple[int, str]]:
    """MAIL, RCPTs and (if any RCPT passed) DATA, returning every reply."""
    replies = [await cmd(smtp, f"MAIL FROM:<{sender}>")]
    if replies[0][0] != 250:
        return replies
    for rcpt in recipients:
        replies.append(await cmd(smtp, f"RCPT TO:<{rcpt}>"))
    if data is not None and any(code == 250 for code, _ in replies[1:]):
        try:
            response = await smtp.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            replies.append((exc.code, exc.message))
        else:
            replies.append((response.code, response.message))
    return replies


LOOPBACK = ["127.0.0.0/8"]


@pytest.mark.parametrize(
    ("starttls", "login", "networks", "expected"),
    [
        (False, None, [], 530),  # plain text, anonymous, untrusted network
        (True, None, [], 530),  # TLS alone is not permission
        (True, ALICE, [], 250),
        (True, BOB, [], 250),  # argon2 hash
        (False, None, LOOPBACK, 250),  # trusted network, no AUTH needed
        (True, None, LOOPBACK, 250),
        (True, None, ["10.0.0.0/8"], 530),  # some other network
        (True, ("alice", "wrong"), [], 530),  # a failed AUTH grants nothing
    ],
)
async def test_no_open_relay_matrix(
    relay_factory: RelayFactory,
    starttls: bool,
    login: tuple[str, str] | None,
    networks: list[str],
    expected: int,
) -> None:
    relay = await accept_only(relay_factory, allowed_networks=networks)
    async with relay.client(starttls=starttls) as smtp:
        if login is not None:
            with contextlib.suppress(aiosmtplib.SMTPAuthenticationError):
                await smtp.auth_plain(*login)
        code, text = await cmd(smtp, "MAIL FROM:<a@example.com>")
    assert code == expected
    if expected == 530:
        assert text.startswith("5.7.0")
        assert relay.metric("mailrelay_messages_rejected_total", {"reason": "auth_required"}) == 1


@pytest.mark.parametrize("networks", [[], ["10.0.0.0/8"]])
async def test_implicit_tls_alone_is_no_permission(
    relay_factory: RelayFactory, networks: list[str]
) -> None:
    relay = await accept_only(
        relay_factory, allowed_networks=networks, listener={"implicit_tls_port": 0}
    )
    async with relay.client(implicit=True) as smtp:
        code, text = await cmd(smtp, "MAIL FROM:<a@example.com>")
    assert (code, text[:5]) == (530, "5.7.0")


async def test_rate_limited_route_with_reject_answers_450_at_rcpt(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(
        routes=[route(rate_limit={"per_second": 0.01, "burst": 2, "on_exceed": "reject"})]
    )
    async with relay.client(login=ALICE) as smtp:
        replies = await transaction(
            smtp, "a@example.com", ["a@d.test", "b@d.test", "c@d.test"], message()
        )
    assert [code for code, _ in replies] == [250, 250, 250, 450, 250]
    assert replies[3][1].startswith("4.7.0")
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "rate_limited"}) == 1


async def test_auth_is_refused_before_tls_and_not_advertised(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory)
    async with relay.client(starttls=False) as smtp:
        assert "auth" not in smtp.esmtp_extensions
        assert "starttls" in smtp.esmtp_extensions
        code, text = await cmd(smtp, "AUTH PLAIN AGFsaWNlAGFsaWNlLXNlY3JldA==")
        assert (code, text.split()[0]) == (538, "5.7.11")
        # The credentials were right; still no permission to send.
        assert (await cmd(smtp, "MAIL FROM:<a@example.com>"))[0] == 530


async def test_implicit_tls_port_offers_auth(
    relay_factory: RelayFactory, tls_certs: TlsCerts
) -> None:
    relay = await accept_only(relay_factory, listener={"implicit_tls_port": 0})
    async with relay.client(implicit=True, login=ALICE) as smtp:
        errors, _ = await smtp.sendmail("a@example.com", ["b@dest.test"], message())
    assert errors == {}
    [(_, data)] = spooled(relay)
    assert b" with ESMTPSA id " in data.split(b"\r\n\tfor")[0]
    assert relay.metric("mailrelay_smtp_tls_sessions_total", {"mode": "implicit"}) == 1


@pytest.mark.parametrize(
    "login", [("alice", "wrong"), ("nobody", "alice-secret"), ("bob", "alice-secret")]
)
async def test_wrong_credentials_get_535_and_no_permission(
    relay_factory: RelayFactory, login: tuple[str, str]
) -> None:
    relay = await accept_only(relay_factory)
    async with relay.client() as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
            await smtp.auth_plain(*login)
        assert failed.value.code == 535
        assert failed.value.message.startswith("5.7.8")
        assert (await cmd(smtp, "MAIL FROM:<a@example.com>"))[0] == 530
    assert relay.metric("mailrelay_smtp_auth_failures_total") == 1


async def test_auth_login_mechanism(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory)
    async with relay.client() as smtp:
        response = await smtp.auth_login(*ALICE)
        assert response.code == 235
        assert (await cmd(smtp, "MAIL FROM:<a@example.com>"))[0] == 250


async def test_password_checks_do_not_block_the_event_loop(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    """A deliberately expensive hash (~0.5 s) must not stall the loop the relay runs on."""
    password = "slow-secret"
    slow_hash = await asyncio.to_thread(
        lambda: bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=13)).decode()
    )
    users = tmp_path / "slow-users.yaml"
    users.write_text(yaml.safe_dump({"users": [{"username": "slow", "password_hash": slow_hash}]}))
    relay = await accept_only(relay_factory, auth={"users_file": str(users)})
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    started = loop.time()
    async with relay.client(login=("slow", password)) as smtp:
        assert (await cmd(smtp, "MAIL FROM:<a@example.com>"))[0] == 250
    elapsed = loop.time() - started
    done.set()
    await task
    assert elapsed > 0.2  # the hash really was expensive ...
    assert max(gaps) < elapsed / 2  # ... and the loop kept ticking meanwhile


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("bob@example.com", 250),
        ("bob@evil.test", 553),
        ("bob@sub.example.com", 553),  # the user's list says example.com exactly
        ("<>", 553),  # a restricted user may not use the null sender
    ],
)
async def test_user_limited_to_sender_domains(
    relay_factory: RelayFactory, sender: str, expected: int
) -> None:
    relay = await accept_only(relay_factory)
    async with relay.client(login=BOB) as smtp:
        line = "MAIL FROM:<>" if sender == "<>" else f"MAIL FROM:<{sender}>"
        code, text = await cmd(smtp, line)
    assert code == expected
    if expected == 553:
        assert text.startswith("5.7.1")


async def test_unroutable_recipient_is_refused_and_others_kept(
    relay_factory: RelayFactory,
) -> None:
    relay = await accept_only(
        relay_factory,
        routes=[route("dest", match={"recipient_domains": ["dest.test", "*.corp.test"]})],
    )
    async with relay.client(login=ALICE) as smtp:
        replies = await transaction(
            smtp,
            "a@example.com",
            ["x@dest.test", "y@elsewhere.test", "z@eu.corp.test", "w@corp.test"],
            message(),
        )
    codes = [code for code, _ in replies]
    assert codes == [250, 250, 550, 250, 550, 250]
    assert replies[2][1].startswith("5.7.1")
    [(entry, _)] = spooled(relay)
    assert [r.address for r in entry.recipients] == ["x@dest.test", "z@eu.corp.test"]


async def test_recipients_get_their_own_route(relay_factory: RelayFactory) -> None:
    relay = await accept_only(
        relay_factory,
        routes=[
            route("catchall"),
            route("vip", priority=10, match={"recipient_domains": ["vip.test"]}),
        ],
    )
    async with relay.client(login=ALICE) as smtp:
        await smtp.sendmail("a@example.com", ["a@vip.test", "b@other.test"], message())
    [(entry, _)] = spooled(relay)
    assert [(r.address, r.route) for r in entry.recipients] == [
        ("a@vip.test", "vip"),
        ("b@other.test", "catchall"),
    ]


async def test_too_many_recipients(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory, limits={"max_recipients": 2})
    async with relay.client(login=ALICE) as smtp:
        replies = await transaction(smtp, "a@example.com", ["a@d.test", "b@d.test", "c@d.test"])
    assert [code for code, _ in replies] == [250, 250, 250, 452]
    assert replies[-1][1].startswith("4.5.3")


async def test_size_is_advertised_and_enforced(relay_factory: RelayFactory) -> None:
    relay = await accept_only(
        relay_factory,
        limits={"max_message_size": 4096},
        routes=[
            route("small", match={"recipient_domains": ["small.test"]}, max_message_size=2048),
            route("big"),
        ],
    )
    async with relay.client(login=ALICE) as smtp:
        assert smtp.esmtp_extensions["size"] == "4096"
        code, text = await cmd(smtp, "MAIL FROM:<a@example.com> SIZE=5000")
        assert (code, text[:5]) == (552, "5.3.4")
        # SIZE under the global limit but over the route's: refused at RCPT.
        assert (await cmd(smtp, "MAIL FROM:<a@example.com> SIZE=3000"))[0] == 250
        code, text = await cmd(smtp, "RCPT TO:<x@small.test>")
        assert (code, text[:5]) == (552, "5.3.4")
        assert (await cmd(smtp, "RCPT TO:<x@big.test>"))[0] == 250
        await cmd(smtp, "RSET")
        # No SIZE declared: the data itself is measured against min(global, route).
        replies = await transaction(
            smtp, "a@example.com", ["x@small.test"], message(body=(b"x" * 70 + b"\r\n") * 40)
        )
        assert replies[-1][0] == 552 and replies[-1][1].startswith("5.3.4")
        replies = await transaction(
            smtp, "a@example.com", ["x@big.test"], message(body=(b"y" * 70 + b"\r\n") * 40)
        )
        assert replies[-1][0] == 250
        replies = await transaction(
            smtp, "a@example.com", ["x@big.test"], message(body=(b"z" * 70 + b"\r\n") * 70)
        )
        assert replies[-1][0] == 552 and replies[-1][1].startswith("5.3.4")
    assert len(spooled(relay)) == 1


@pytest.mark.parametrize(("hops", "expected"), [(50, 250), (51, 554)])
async def test_received_header_hop_limit(
    relay_factory: RelayFactory, hops: int, expected: int
) -> None:
    relay = await accept_only(relay_factory)
    trace = b"".join(b"Received: from hop%d by hop%d; now\r\n" % (i, i + 1) for i in range(hops))
    async with relay.client(login=ALICE) as smtp:
        replies = await transaction(smtp, "a@example.com", ["b@d.test"], trace + message())
    assert replies[-1][0] == expected
    if expected == 554:
        assert replies[-1][1].startswith("5.4.6")


async def test_8bitmime_and_smtputf8_bytes_are_kept(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory)
    raw = (
        "From: Jörg <jörg@exämple.com>\r\nTo: 用户@例子.test\r\nSubject: Grüße\r\n\r\n"
        "Körper mit 8 Bit: ü€\r\n"
    ).encode()
    async with relay.client(login=ALICE) as smtp:
        assert "smtputf8" in smtp.esmtp_extensions and "8bitmime" in smtp.esmtp_extensions
        errors, _ = await smtp.sendmail(
            "jörg@exämple.com", ["用户@例子.test"], raw, mail_options=["BODY=8BITMIME", "SMTPUTF8"]
        )
    assert errors == {}
    [(entry, data)] = spooled(relay)
    assert entry.smtputf8 and entry.body_8bitmime
    assert entry.mail_from == "jörg@exämple.com"
    assert data.endswith(raw)
    received = data[: len(data) - len(raw)]
    assert b" with UTF8SMTPSA id " in received
    assert b"for <" not in received  # a non-ASCII address stays out of the trace header


async def test_smtputf8_without_8bitmime_flags(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory)
    async with relay.client(login=ALICE) as smtp:
        await smtp.sendmail("a@example.com", ["b@d.test"], message())
    [(entry, _)] = spooled(relay)
    assert not entry.smtputf8 and not entry.body_8bitmime


@pytest.mark.parametrize(
    "payload",
    [
        b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<evil@x.test>\r\n",  # bare LF dot bare LF
        b"Subject: a\r\n\r\nbody\n.\r\nMAIL FROM:<evil@x.test>\r\n",  # LF . CRLF
        b"Subject: a\r\n\r\nbody\r\n.\nMAIL FROM:<evil@x.test>\r\n",  # CRLF . LF
        b"Subject: a\r\n\r\nbody\r.\r\nMAIL FROM:<evil@x.test>\r\n",  # CR . CRLF
    ],
)
async def test_smtp_smuggling_never_yields_two_messages(
    relay_factory: RelayFactory, payload: bytes
) -> None:
    relay = await accept_only(relay_factory, allowed_networks=LOOPBACK)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    try:
        await reader.readline()
        smuggled = payload + b"RCPT TO:<victim@d.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n"
        writer.write(
            b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n"
            + smuggled
            + b".\r\nQUIT\r\n"
        )
        await writer.drain()
        transcript = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert transcript.count(b"queued as") == 1
    [(entry, data)] = spooled(relay)
    assert [r.address for r in entry.recipients] == ["b@d.test"]
    # The smuggled commands stay inside the one message as text.
    assert b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@d.test>\r\nDATA\r\n" in data


async def test_low_disk_refuses_at_mail(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory, spool={"min_free_bytes": 2**62})
    async with relay.client(login=ALICE) as smtp:
        code, text = await cmd(smtp, "MAIL FROM:<a@example.com>")
    assert (code, text[:5]) == (452, "4.3.1")
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "low_disk"}) == 1


async def test_spool_write_error_answers_451(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory)
    queue_dir = relay.spool_dir / "queue"
    queue_dir.rmdir()
    queue_dir.write_text("not a directory")  # every rename into queue/ now fails
    async with relay.client(login=ALICE) as smtp:
        replies = await transaction(smtp, "a@example.com", ["b@d.test"], message())
    assert replies[-1][0] == 451 and replies[-1][1].startswith("4.3.0")
    assert list((relay.spool_dir / "tmp").iterdir()) == []  # no half-written files left
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "spool_error"}) == 1


async def test_journal_write_error_answers_451(relay_factory: RelayFactory) -> None:
    """With delivery on, fresh mail goes to the spool's journal: its failure is a 451 too."""
    relay = await relay_factory(routes=[route()])
    journal_dir = relay.spool_dir / "journal"
    journal_dir.rmdir()
    journal_dir.write_text("not a directory")  # no journal segment can be created now
    async with relay.client(login=ALICE) as smtp:
        replies = await transaction(smtp, "a@example.com", ["b@d.test"], message())
    assert replies[-1][0] == 451 and replies[-1][1].startswith("4.3.0")
    assert list((relay.spool_dir / "tmp").iterdir()) == []
    assert list((relay.spool_dir / "queue").iterdir()) == []
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "spool_error"}) == 1


class _FaultyDelivery:
    """A delivery side whose rate check raises: any handler exception must become 451."""

    def notify(self, entry: object, held: object = None) -> None:
        raise AssertionError("not reached")

    def try_acquire_rate(self, route_name: str) -> bool:
        raise RuntimeError("injected fault")


async def test_exception_in_handling_answers_451_not_500(relay_factory: RelayFactory) -> None:
    relay = await accept_only(
        relay_factory,
        routes=[route(rate_limit={"per_second": 1, "burst": 1, "on_exceed": "reject"})],
    )
    assert relay.app is not None and relay.app.front is not None
    relay.app.front.delivery = _FaultyDelivery()
    async with relay.client(login=ALICE) as smtp:
        replies = await transaction(smtp, "a@example.com", ["b@d.test"])
        assert replies[-1][0] == 451 and replies[-1][1].startswith("4.3.0")
        assert (await cmd(smtp, "NOOP"))[0] == 250  # the session survives


class _NotifyFails:
    """A delivery side that refuses every hand-over (the front's notify failure path)."""

    def __init__(self) -> None:
        self.offered = 0

    def notify(self, entry: object, lease: object = None) -> None:
        self.offered += 1
        raise RuntimeError("injected fault")

    def try_acquire_rate(self, route_name: str) -> bool:
        return True


@pytest.mark.parametrize("where", ["journal", "queue file"])
async def test_a_message_the_engine_refuses_is_handed_back_to_the_queue(
    relay_factory: RelayFactory, where: str
) -> None:
    """The lease is handed back: the message waits in a queue file nobody holds, where the
    engine's next scan (or another process) finds it, whether it was journaled (small)
    or written to its own queue file as it arrived (bigger than the journal takes)."""
    relay = await accept_only(relay_factory)
    assert relay.app is not None and relay.app.front is not None
    delivery = _NotifyFails()
    relay.app.front.delivery = delivery
    body = b"Hi there.\r\n" if where == "journal" else b"x" * 998 + b"\r\n"
    data = message(body=body * (1 if where == "journal" else 1100))
    async with relay.client(login=ALICE) as smtp:
        replies = await transaction(smtp, "a@example.com", ["b@d.test"], data)
    assert replies[-1][0] == 250, replies
    assert delivery.offered == 1
    admin = SpoolAdmin(relay.spool_dir)
    [entry] = admin.list_queue()
    assert replies[-1][1].endswith(f"queued as {entry.queue_id}")
    assert admin.read_message(entry.queue_id).endswith(body)
    with admin.claim_blocking(entry.queue_id, timeout=0):  # nobody holds it any more
        pass


async def test_max_connections_answers_421(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory, limits={"max_connections": 2})
    async with relay.client(starttls=False), relay.client(starttls=False):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
        greeting = await asyncio.wait_for(reader.readline(), 5)
        assert greeting.startswith(b"421 4.7.0")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    # Once the others left, a new session is welcome again.
    async with relay.client(starttls=False) as smtp:
        assert (await cmd(smtp, "NOOP"))[0] == 250


async def test_command_and_data_timeouts_close_idle_sessions(relay_factory: RelayFactory) -> None:
    relay = await accept_only(
        relay_factory,
        allowed_networks=LOOPBACK,
        limits={"command_timeout_seconds": 0.3, "data_timeout_seconds": 0.6},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    await reader.readline()
    # Closed after ~0.3 s idle, with a 421 first (RFC 5321 4.2, as Postfix words it).
    closing = await asyncio.wait_for(reader.read(), 3)
    assert closing == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    await reader.readline()
    writer.write(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n")
    replies = await asyncio.wait_for(reader.readuntil(b"354 "), 3)
    assert replies.count(b"250 ") == 3
    loop = asyncio.get_running_loop()
    started = loop.time()
    closed_at = None
    with contextlib.suppress(ConnectionError):
        for _ in range(20):  # a trickle faster than the command timeout, slower than DATA's
            writer.write(b"line\r\n")
            await asyncio.sleep(0.1)
            if reader.at_eof() or reader.exception() is not None or writer.is_closing():
                break
        rest = await asyncio.wait_for(reader.read(), 3)
        assert rest.endswith(b"421 4.4.2 relay.test Error: timeout exceeded\r\n")
    closed_at = loop.time() - started
    assert 0.5 < closed_at < 1.5
    assert spooled(relay) == []
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "timeout"}) == 2
    writer.close()


async def test_rejections_are_counted_by_reason(relay_factory: RelayFactory) -> None:
    relay = await accept_only(
        relay_factory, routes=[route(match={"recipient_domains": ["d.test"]})]
    )
    async with relay.client(login=ALICE) as smtp:
        await transaction(smtp, "a@example.com", ["x@nowhere.test"])
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "no_route"}) == 1
    assert relay.metric("mailrelay_messages_accepted_total") == 0
    assert relay.metric("mailrelay_smtp_sessions_total", {"listener": "submission"}) == 1


async def test_null_sender_is_accepted_and_spooled_as_empty(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory)
    async with relay.client(login=ALICE) as smtp:
        assert (await cmd(smtp, "MAIL FROM:<>"))[0] == 250
        assert (await cmd(smtp, "RCPT TO:<b@d.test>"))[0] == 250
        response = await smtp.data(message())
        assert response.code == 250
    [(entry, _)] = spooled(relay)
    assert entry.mail_from == ""


async def test_repeated_auth_failures_close_the_session(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory)
    async with relay.client() as smtp:
        for _ in range(2):
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await smtp.auth_plain("alice", "guess")
        with pytest.raises(aiosmtplib.SMTPResponseException) as third:
            await smtp.auth_plain("alice", "guess")
        assert (third.value.code, third.value.message[:5]) == (421, "4.7.0")
    assert relay.metric("mailrelay_smtp_auth_failures_total") == 3
