"""The SMTP transport against real aiosmtpd upstreams on 127.0.0.1 (TLS via trustme, AUTH).

Each test starts its own upstream, delivers through `SmtpTransport`, and checks both what
the transport reported and what the upstream actually received, byte for byte.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from mailrelay.relay.address import ascii_form
from mailrelay.relay.config import SmtpUpstream
from mailrelay.relay.upstreams.factory import build_transport
from mailrelay.relay.upstreams.smtp import SmtpTransport, classify_reply
from mailrelay.relay.upstreams.smtp_pipelining import command_group, data_payload, take_replies
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome, RecipientResult
from tests.relay.delivery_fixtures import (
    Certificates,
    ScriptedUpstream,
    Upstream,
    make_certificates,
    start_upstream,
)

MESSAGE = (
    b"Received: from client.test by relay.test; Mon, 30 Nov 2026 23:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b".leading dot stays\r\n"
    b"Trailing spaces   \r\n"
)


class Harness:
    """Collects what a test starts so teardown closes it even when the test fails."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.certs: Certificates = make_certificates(tmp_path)
        self.upstreams: list[Upstream] = []
        self.transports: list[SmtpTransport] = []

    async def upstream(self, **kwargs: Any) -> Upstream:
        kwargs.setdefault("certs", self.certs)
        up = await start_upstream(**kwargs)
        self.upstreams.append(up)
        return up

    def credentials(self, user: str, password: str) -> tuple[Path, Path]:
        user_file = self.tmp_path / "username"
        password_file = self.tmp_path / "password"
        user_file.write_text(user + "\n")
        password_file.write_text(password + "\n")
        return user_file, password_file

    def transport(self, up: Upstream, **fields: Any) -> SmtpTransport:
        idle_timeout = fields.pop("idle_timeout", 30.0)
        check = fields.pop("credential_check_interval", 1.0)
        fields.setdefault("tls", up.tls)
        fields.setdefault("ca_file", self.certs.ca_file)
        fields.setdefault("insecure_allow_plaintext", fields["tls"] == "none")
        config = SmtpUpstream(
            type="smtp",
            name=fields.pop("name", "primary"),
            host=up.host,
            port=up.port,
            connect_timeout_seconds=fields.pop("connect_timeout_seconds", 5),
            timeout_seconds=fields.pop("timeout_seconds", 5),
            **fields,
        )
        transport = SmtpTransport(
            config,
            local_hostname="relay.test",
            idle_timeout=idle_timeout,
            credential_check_interval=check,
        )
        self.transports.append(transport)
        return transport

    async def close(self) -> None:
        for transport in self.transports:
            await transport.close()
        for up in self.upstreams:
            await up.stop()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    yield h
    await h.close()


def envelope(*rcpts: str, mail_from: str = "alice@example.com", **flags: bool) -> Envelope:
    return Envelope(
        queue_id="Q1",
        mail_from=mail_from,
        recipients=rcpts or ("bob@example.net",),
        smtputf8=flags.get("smtputf8", False),
        body_8bitmime=flags.get("body_8bitmime", False),
    )


async def test_starttls_auth_delivers_exact_bytes(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls", users={"relay": "s3cret"})
    user_file, password_file = harness.credentials("relay", "s3cret")
    transport = harness.transport(up, username_file=user_file, password_file=password_file)

    results = await transport.deliver(envelope("bob@example.net", "carol@example.org"), MESSAGE)

    assert [r.outcome for r in results] == [RecipientOutcome.DELIVERED] * 2
    assert results[0].remote_id is not None and "queued as U1" in results[0].remote_id
    [got] = up.messages
    assert got.data == MESSAGE
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ("bob@example.net", "carol@example.org")
    assert got.tls is True
    assert got.auth_user == "relay"


async def test_implicit_tls_delivers(harness: Harness) -> None:
    up = await harness.upstream(tls="implicit", users={"relay": "pw"})
    user_file, password_file = harness.credentials("relay", "pw")
    transport = harness.transport(up, username_file=user_file, password_file=password_file)

    [result] = await transport.deliver(envelope(), MESSAGE)

    assert result.outcome is RecipientOutcome.DELIVERED
    assert up.messages[0].tls is True
    assert up.messages[0].data == MESSAGE


async def test_plaintext_when_configured_none(harness: Harness) -> None:
    up = await harness.upstream(tls="none", certs=None)
    transport = harness.transport(up, tls="none", ca_file=None)

    [result] = await transport.deliver(envelope(), MESSAGE)

    assert result.outcome is RecipientOutcome.DELIVERED
    assert up.messages[0].tls is False


async def test_starttls_required_never_downgrades(harness: Harness) -> None:
    # The server offers no STARTTLS at all; the transport is configured to require it.
    up = await harness.upstream(tls="none", certs=None, users={"relay": "pw"})
    user_file, password_file = harness.credentials("relay", "pw")
    transport = harness.transport(
        up, tls="starttls", username_file=user_file, password_file=password_file
    )

    [result] = await transport.deliver(envelope(), MESSAGE)

    assert result.outcome is RecipientOutcome.CONFIG_ERROR
    assert "does not offer STARTTLS" in result.detail
    assert up.messages == []
    # No credentials were sent in plain text either.
    assert up.auth_failures == 0
    assert transport.pool.open_connections == 0


async def test_wrong_credentials_are_a_config_error(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls", users={"relay": "right"})
    user_file, password_file = harness.credentials("relay", "wrong")
    transport = harness.transport(up, username_file=user_file, password_file=password_file)

    results = await transport.deliver(envelope("a@example.net", "b@example.net"), MESSAGE)

    assert {r.outcome for r in results} == {RecipientOutcome.CONFIG_ERROR}
    assert results[0].code == 535
    assert up.auth_failures >= 1
    assert up.messages == []


async def test_certificate_from_another_ca_is_refused(harness: Harness, tmp_path: Path) -> None:
    up = await harness.upstream(tls="starttls")
    (tmp_path / "other").mkdir()
    other = make_certificates(tmp_path / "other")
    transport = harness.transport(up, ca_file=other.ca_file)

    [result] = await transport.deliver(envelope(), MESSAGE)

    assert result.outcome is RecipientOutcome.CONFIG_ERROR
    assert "did not verify" in result.detail
    assert up.messages == []


@pytest.mark.parametrize("pipelining", [True, False])
async def test_partial_recipient_failure(harness: Harness, pipelining: bool) -> None:
    up = await harness.upstream(tls="starttls", pipelining=pipelining)
    up.refuse_rcpt["gone@example.net"] = "550 5.1.1 No such user"
    up.refuse_rcpt["busy@example.net"] = "451 4.2.1 Mailbox busy"
    up.refuse_rcpt["full@example.net"] = "450 4.2.2 Mailbox full"
    transport = harness.transport(up)
    rcpts = ("bob@example.net", "gone@example.net", "busy@example.net", "full@example.net")

    results = await transport.deliver(envelope(*rcpts, "carol@example.org"), MESSAGE)

    # Each RCPT reply lands on its own recipient, in order.
    assert [(r.address, r.outcome, r.code) for r in results] == [
        ("bob@example.net", RecipientOutcome.DELIVERED, 250),
        ("gone@example.net", RecipientOutcome.PERMANENT, 550),
        ("busy@example.net", RecipientOutcome.TEMPORARY, 451),
        ("full@example.net", RecipientOutcome.TEMPORARY, 450),
        ("carol@example.org", RecipientOutcome.DELIVERED, 250),
    ]
    assert results[1].detail == "550 5.1.1 No such user (RCPT)"
    assert results[3].detail == "450 4.2.2 Mailbox full (RCPT)"
    assert results[0].remote_id is not None and "queued as U1" in results[0].remote_id
    [got] = up.messages
    assert got.rcpt_tos == ("bob@example.net", "carol@example.org")
    assert got.data == MESSAGE


@pytest.mark.parametrize("pipelining", [True, False])
async def test_all_recipients_refused_are_reported_each(harness: Harness, pipelining: bool) -> None:
    up = await harness.upstream(tls="starttls", pipelining=pipelining)
    up.refuse_rcpt["x@example.net"] = "550 5.1.1 No such user"
    up.refuse_rcpt["y@example.net"] = "452 4.2.2 Over quota"
    transport = harness.transport(up)

    results = await transport.deliver(envelope("x@example.net", "y@example.net"), MESSAGE)

    assert [r.outcome for r in results] == [
        RecipientOutcome.PERMANENT,
        RecipientOutcome.TEMPORARY,
    ]
    assert [r.code for r in results] == [550, 452]
    # The body was never sent (aiosmtpd answered the pipelined DATA with 503).
    assert not any(b"Line one." in chunk for chunk in up.chunks)
    # The connection survives a refused envelope and is reused for the next message.
    [ok] = await transport.deliver(envelope("z@example.net"), MESSAGE)
    assert ok.outcome is RecipientOutcome.DELIVERED
    assert up.connections == 1


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(
    ("where", "reply", "outcome"),
    [
        ("mail", "550 5.7.1 Sender rejected", RecipientOutcome.PERMANENT),
        ("mail", "451 4.3.0 Try later", RecipientOutcome.TEMPORARY),
        ("data", "554 5.6.0 Content rejected", RecipientOutcome.PERMANENT),
        ("data", "452 4.3.1 Out of storage", RecipientOutcome.TEMPORARY),
    ],
)
async def test_mail_and_data_refusals_hit_every_recipient(
    harness: Harness, where: str, reply: str, outcome: RecipientOutcome, pipelining: bool
) -> None:
    up = await harness.upstream(tls="starttls", pipelining=pipelining)
    if where == "mail":
        up.refuse_mail = reply
    else:
        up.refuse_data = reply
    transport = harness.transport(up)

    results = await transport.deliver(envelope("a@example.net", "b@example.net"), MESSAGE)

    assert [r.outcome for r in results] == [outcome, outcome]
    assert results[0].code == int(reply[:3])
    assert reply[4:] in results[0].detail
    assert up.messages == []
    # The refused transaction was reset: the next message goes out on the same connection.
    if where == "mail":
        up.refuse_mail = None
    else:
        up.refuse_data = None
    [ok] = await transport.deliver(envelope("c@example.net"), MESSAGE)
    assert ok.outcome is RecipientOutcome.DELIVERED, ok.detail
    assert up.connections == 1


async def test_upstream_down_is_temporary(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls")
    transport = harness.transport(up, connect_timeout_seconds=2)
    await up.go_down()

    [result] = await transport.deliver(envelope(), MESSAGE)

    assert result.outcome is RecipientOutcome.TEMPORARY
    assert transport.pool.open_connections == 0


async def test_broken_pooled_connection_is_replaced(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls")
    transport = harness.transport(up)
    [first] = await transport.deliver(envelope(), MESSAGE)
    assert first.outcome is RecipientOutcome.DELIVERED
    assert transport.pool.idle_connections == 1

    # The upstream restarts: the idle pooled connection is now dead.
    await up.go_down()
    await up.start()
    [second] = await transport.deliver(envelope(), MESSAGE)

    assert second.outcome is RecipientOutcome.DELIVERED
    assert len(up.messages) == 2
    assert up.connections == 2
    assert transport.pool.open_connections == 1


async def test_pool_reuses_connections_sequentially(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls", users={"relay": "pw"})
    user_file, password_file = harness.credentials("relay", "pw")
    transport = harness.transport(up, username_file=user_file, password_file=password_file)

    for i in range(5):
        [result] = await transport.deliver(envelope(f"r{i}@example.net"), MESSAGE)
        assert result.outcome is RecipientOutcome.DELIVERED

    assert len(up.messages) == 5
    assert up.connections == 1


async def test_per_connection_limit_gets_a_fresh_connection(harness: Harness) -> None:
    # The upstream answers 421 at MAIL after two messages on one connection: the pooled
    # connection is dropped and the message goes out on a new one, not after a backoff.
    up = await harness.upstream(tls="starttls")
    up.max_messages_per_connection = 2
    transport = harness.transport(up, pool_size=1)

    for i in range(5):
        [result] = await transport.deliver(envelope(f"r{i}@example.net"), MESSAGE)
        assert result.outcome is RecipientOutcome.DELIVERED, result.detail

    assert len(up.messages) == 5
    assert up.connections == 3


async def test_421_at_mail_on_a_new_connection_is_temporary(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls")
    up.refuse_mail = "421 4.3.2 Shutting down"
    transport = harness.transport(up)

    [result] = await transport.deliver(envelope(), MESSAGE)

    assert result.outcome is RecipientOutcome.TEMPORARY
    assert result.code == 421
    assert up.connections == 1


async def test_pool_is_bounded_under_concurrency(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls")
    up.data_delay = 0.05
    transport = harness.transport(up, pool_size=2)

    batches = await asyncio.gather(
        *(transport.deliver(envelope(f"r{i}@example.net"), MESSAGE) for i in range(8))
    )

    assert all(r.outcome is RecipientOutcome.DELIVERED for batch in batches for r in batch)
    assert len(up.messages) == 8
    assert up.connections == 2
    assert transport.pool.open_connections == 2


async def test_idle_connections_are_closed(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls")
    transport = harness.transport(up, idle_timeout=0.2)
    await transport.deliver(envelope(), MESSAGE)
    assert transport.pool.open_connections == 1

    for _ in range(50):
        if transport.pool.open_connections == 0:
            break
        await asyncio.sleep(0.05)

    assert transport.pool.open_connections == 0
    [again] = await transport.deliver(envelope(), MESSAGE)
    assert again.outcome is RecipientOutcome.DELIVERED
    assert up.connections == 2


async def test_rotated_credentials_are_used_for_new_connections(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls", users={"relay": "old"})
    user_file, password_file = harness.credentials("relay", "old")
    transport = harness.transport(
        up, username_file=user_file, password_file=password_file, credential_check_interval=0
    )
    [first] = await transport.deliver(envelope(), MESSAGE)
    assert first.outcome is RecipientOutcome.DELIVERED

    # The secret rotates: the upstream accepts only the new password from now on, and
    # the file is replaced the way a Kubernetes Secret volume does it (new inode).
    assert up.users is not None
    up.users["relay"] = "new"
    replacement = password_file.with_suffix(".new")
    replacement.write_text("new\n")
    os.replace(replacement, password_file)
    [second] = await transport.deliver(envelope(), MESSAGE)

    assert second.outcome is RecipientOutcome.DELIVERED
    assert up.connections == 2
    assert up.auth_failures == 0


async def test_smtputf8_message_needs_smtputf8_upstream(harness: Harness) -> None:
    plain = await harness.upstream(tls="starttls", smtputf8=False)
    capable = await harness.upstream(tls="starttls", smtputf8=True)
    message = "From: jürgen@exämple.com\r\nSubject: grüße\r\n\r\nHallo\r\n".encode()
    env = envelope("zoë@example.net", mail_from="jürgen@exämple.com", smtputf8=True)

    [refused] = await harness.transport(plain, name="plain").deliver(env, message)
    [sent] = await harness.transport(capable, name="capable").deliver(env, message)

    assert refused.outcome is RecipientOutcome.PERMANENT
    assert "SMTPUTF8" in refused.detail
    assert plain.messages == []
    assert sent.outcome is RecipientOutcome.DELIVERED
    assert "SMTPUTF8" in capable.messages[0].mail_options
    assert capable.messages[0].data == message
    assert capable.messages[0].rcpt_tos == ("zoë@example.net",)


async def test_8bitmime_body_is_announced(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls")
    message = "Subject: x\r\nContent-Transfer-Encoding: 8bit\r\n\r\nÄpfel\r\n".encode()

    [result] = await harness.transport(up).deliver(envelope(body_8bitmime=True), message)

    assert result.outcome is RecipientOutcome.DELIVERED
    assert "BODY=8BITMIME" in up.messages[0].mail_options
    assert up.messages[0].data == message


async def test_null_sender_is_sent_as_empty_reverse_path(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls")

    [result] = await harness.transport(up).deliver(envelope(mail_from=""), MESSAGE)

    assert result.outcome is RecipientOutcome.DELIVERED
    assert up.messages[0].mail_from == "<>"


def test_build_transport_picks_the_class() -> None:
    smtp = SmtpUpstream(type="smtp", name="s", host="127.0.0.1")
    assert isinstance(build_transport(smtp), SmtpTransport)


def _group(*rcpts: str, size: int) -> bytes:
    lines = [f"MAIL FROM:<alice@example.com> size={size}"]
    lines += [f"RCPT TO:<{rcpt}>" for rcpt in rcpts] + ["DATA"]
    return ("\r\n".join(lines) + "\r\n").encode()


async def test_pipelined_group_goes_out_in_one_write(harness: Harness) -> None:
    up = await harness.upstream(tls="none", certs=None)
    transport = harness.transport(up, tls="none", ca_file=None)
    rcpts = ("bob@example.net", "carol@example.org", "dave@example.org")

    results = await transport.deliver(envelope(*rcpts), MESSAGE)

    assert [r.outcome for r in results] == [RecipientOutcome.DELIVERED] * 3
    [got] = up.messages
    assert got.data == MESSAGE
    assert got.rcpt_tos == rcpts
    # The server read MAIL, every RCPT and DATA as one chunk, then the body as another.
    start = next(i for i, c in enumerate(up.chunks) if c.startswith(b"MAIL"))
    assert up.chunks[start] == _group(*rcpts, size=len(MESSAGE))
    assert b"".join(up.chunks[start + 1 :]) == MESSAGE.replace(b"\n.", b"\n..") + b".\r\n"
    assert len(up.chunks[start + 1 :]) == 1


async def test_without_pipelining_each_command_waits_for_its_reply(harness: Harness) -> None:
    up = await harness.upstream(tls="none", certs=None, pipelining=False)
    transport = harness.transport(up, tls="none", ca_file=None)

    results = await transport.deliver(envelope("bob@example.net", "carol@example.org"), MESSAGE)

    assert [r.outcome for r in results] == [RecipientOutcome.DELIVERED] * 2
    assert up.messages[0].data == MESSAGE
    commands = [c for c in up.chunks if c[:4] in (b"MAIL", b"RCPT", b"DATA")]
    assert commands == [
        f"MAIL FROM:<alice@example.com> size={len(MESSAGE)}\r\n".encode(),
        b"RCPT TO:<bob@example.net>\r\n",
        b"RCPT TO:<carol@example.org>\r\n",
        b"DATA\r\n",
    ]


async def test_pipelined_connection_is_handed_back_to_aiosmtplib(harness: Harness) -> None:
    # The pipelined transaction lends the transport to its own reader (asyncio's public
    # set_protocol); afterwards aiosmtplib's protocol must read again, or the next
    # aiosmtplib command (RSET after idle, QUIT) would hang.
    up = await harness.upstream(tls="starttls")
    transport = harness.transport(up)
    await transport.deliver(envelope(), MESSAGE)

    conn = await transport.pool.acquire()
    try:
        assert conn.smtp.transport is not None
        assert conn.smtp.transport.get_protocol() is conn.smtp.protocol
        assert (await conn.smtp.noop()).code == 250
    finally:
        transport.pool.release(conn, reusable=True)


async def test_354_without_accepted_recipients_gets_a_lone_dot(harness: Harness) -> None:
    # RFC 2920 3.1: a server may accept DATA although every RCPT failed; the client
    # then sends a single "." and no body. The connection stays usable.
    up = ScriptedUpstream(
        rcpt_replies={"x@example.net": "550 5.1.1 No such user", "y@example.net": "450 4.2.0 Later"}
    )
    await up.start()
    try:
        config = SmtpUpstream(
            type="smtp",
            name="s",
            host=up.host,
            port=up.port,
            tls="none",
            insecure_allow_plaintext=True,
        )
        transport = SmtpTransport(config, local_hostname="relay.test")
        try:
            refused = await transport.deliver(envelope("x@example.net", "y@example.net"), MESSAGE)
            [ok] = await transport.deliver(envelope("z@example.net"), MESSAGE)
        finally:
            await transport.close()
    finally:
        await up.stop()

    assert [(r.outcome, r.code) for r in refused] == [
        (RecipientOutcome.PERMANENT, 550),
        (RecipientOutcome.TEMPORARY, 450),
    ]
    assert ok.outcome is RecipientOutcome.DELIVERED, ok.detail
    assert up.connections == 1
    first = up.lines[: up.lines.index(b".\r\n") + 1]
    assert first[-2:] == [b"DATA\r\n", b".\r\n"]
    assert not any(b"Line one." in line for line in first)
    assert b"Line one.\r\n" in up.lines


def test_take_replies_keeps_order_and_partial_tails() -> None:
    buffer = bytearray(b"250 2.1.0 OK\r\n550-5.1.1 No such\r\n550 5.1.1 user\r\n354 go\r\n25")

    replies = take_replies(buffer)

    assert [(r.code, r.message) for r in replies] == [
        (250, "2.1.0 OK"),
        (550, "5.1.1 No such\n5.1.1 user"),
        (354, "go"),
    ]
    assert buffer == b"25"
    buffer.extend(b"0-part\r\n")
    assert take_replies(buffer) == []
    assert buffer == b"250-part\r\n"


@pytest.mark.parametrize(
    ("message", "sent"),
    [
        (b"a\n.b\r\n..c\rd", b"a\r\n..b\r\n...c\r\nd\r\n.\r\n"),
        (b".a\r\nb\r\n", b"..a\r\nb\r\n.\r\n"),
        (b"a\r\nb.\r\n", b"a\r\nb.\r\n.\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
        (b"a\r\r\nb\r\n", b"a\r\n\r\nb\r\n.\r\n"),
    ],
)
def test_data_payload_matches_what_aiosmtplib_sends(message: bytes, sent: bytes) -> None:
    stuffed = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
    assert data_payload(message) == stuffed == sent


@pytest.mark.parametrize(
    "address",
    [
        "bob@example.net",
        "first.last+tag@sub.example.org",
        "o'neil@example.com",
        "Bob <bob@example.net>",
        '"quoted local"@example.net',
        "zoë@example.net",
        "a..b@example.net",
        "",
    ],
)
def test_addresses_are_quoted_as_aiosmtplib_quotes_them(address: str) -> None:
    group = command_group(address, [address], [], "utf-8").decode()
    quoted = quote_address(address)
    assert group == f"MAIL FROM:{quoted}\r\nRCPT TO:{quoted}\r\nDATA\r\n"


@pytest.mark.parametrize(
    "address", ["b@example.net>\r\nRCPT TO:<c@example.net", "b@example.net\r\nRSET"]
)
def test_an_address_cannot_inject_a_command(address: str) -> None:
    # Refused before anything is built: neither sent nor quietly rewritten to another
    # address (aiosmtplib's quoting turns both into <b@example.net>).
    assert quote_address(address) == "<b@example.net>"
    with pytest.raises(ValueError, match="control character"):
        command_group("a@example.com", [address], [], "ascii")
    with pytest.raises(ValueError, match="control character"):
        command_group(address, ["c@example.net"], [], "ascii")


def test_an_option_cannot_inject_a_command() -> None:
    with pytest.raises(ValueError, match="control character"):
        command_group("a@example.com", ["b@example.net"], ["X=1\r\nRSET"], "ascii")


async def test_pipelined_reply_timeout_is_temporary_and_drops_the_connection(
    harness: Harness,
) -> None:
    up = await harness.upstream(tls="starttls")
    up.data_delay = 2.0
    transport = harness.transport(up, timeout_seconds=0.3)

    [result] = await transport.deliver(envelope(), MESSAGE)

    assert result.outcome is RecipientOutcome.TEMPORARY
    assert result.detail.startswith("4.4.2 ") and "timed out" in result.detail
    assert transport.pool.open_connections == 0


# -- addresses the client library cannot send, and connections left mid-transaction ---

# (spooled address, envelope is SMTPUTF8, enhanced status of its permanent failure)
UNSENDABLE = [
    ("nul\x00byte@example.net", False, "5.1.3"),
    ("esc\x1b[31m@example.net", False, "5.1.3"),
    ("del\x7f@example.net", False, "5.1.3"),
    ("c1\x85@example.net", True, "5.1.3"),
    ("bad\udcffutf8@example.net", True, "5.1.3"),
    ("b@example.net\r\nRSET", False, "5.1.3"),
    ("zoë@example.net", False, "5.6.7"),
    ("bob@exämple.net", False, "5.6.7"),
]


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(("bad", "smtputf8", "status"), UNSENDABLE)
async def test_unsendable_recipient_fails_alone_and_never_poisons_the_connection(
    harness: Harness, pipelining: bool, bad: str, smtputf8: bool, status: str
) -> None:
    # A message spooled with an address aiosmtplib refuses (or one our rule refuses):
    # today MAIL went out, aiosmtplib raised, the connection went back to the pool with
    # its transaction open, and the next message got "503 nested MAIL" and bounced.
    up = await harness.upstream(tls="starttls", pipelining=pipelining)
    transport = harness.transport(up, pool_size=1)

    results = await transport.deliver(
        envelope("good@example.net", bad, "other@example.org", smtputf8=smtputf8), MESSAGE
    )

    assert [(r.address, r.outcome) for r in results] == [
        ("good@example.net", RecipientOutcome.DELIVERED),
        (bad, RecipientOutcome.PERMANENT),
        ("other@example.org", RecipientOutcome.DELIVERED),
    ]
    assert results[1].detail.startswith(f"{status} Bad recipient address: ")
    assert [m.rcpt_tos for m in up.messages] == [("good@example.net", "other@example.org")]
    # The next message (another sender's) goes out on the same pooled connection.
    [next_one] = await transport.deliver(envelope("carol@example.org"), MESSAGE)
    assert next_one.outcome is RecipientOutcome.DELIVERED, next_one.detail
    assert len(up.messages) == 2
    assert up.connections == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_unsendable_sender_fails_every_recipient_before_any_command(
    harness: Harness, pipelining: bool
) -> None:
    up = await harness.upstream(tls="starttls", pipelining=pipelining)
    transport = harness.transport(up)

    results = await transport.deliver(
        envelope("a@example.net", "b@example.net", mail_from="x\x00y@example.com"), MESSAGE
    )

    assert [r.outcome for r in results] == [RecipientOutcome.PERMANENT] * 2
    assert all(r.detail.startswith("5.1.7 Bad sender address: ") for r in results)
    assert up.connections == 0
    [ok] = await transport.deliver(envelope("c@example.net"), MESSAGE)
    assert ok.outcome is RecipientOutcome.DELIVERED


@pytest.mark.parametrize("pipelining", [True, False])
async def test_503_at_mail_is_temporary_and_retried_on_a_fresh_connection(
    harness: Harness, pipelining: bool
) -> None:
    # A connection out of step with the server ("503 nested MAIL command") says nothing
    # about the message: never a bounce, and a new connection is tried at once.
    up = await harness.upstream(tls="starttls", pipelining=pipelining)
    transport = harness.transport(up, pool_size=1)
    [first] = await transport.deliver(envelope(), MESSAGE)
    assert first.outcome is RecipientOutcome.DELIVERED
    up.refuse_mail = "503 5.5.1 Error: nested MAIL command"

    results = await transport.deliver(envelope("a@example.net", "b@example.net"), MESSAGE)

    assert [r.outcome for r in results] == [RecipientOutcome.TEMPORARY] * 2
    assert results[0].code == 503
    assert up.connections == 2  # the pooled one was dropped, a fresh one tried
    up.refuse_mail = None
    [ok] = await transport.deliver(envelope("c@example.net"), MESSAGE)
    assert ok.outcome is RecipientOutcome.DELIVERED


@pytest.mark.parametrize("code", [503])
def test_sequence_errors_are_never_permanent(code: int) -> None:
    assert classify_reply(code) is RecipientOutcome.TEMPORARY
    assert classify_reply(550) is RecipientOutcome.PERMANENT


async def test_failure_texts_are_smtp_style_not_python_exceptions(harness: Harness) -> None:
    up = await harness.upstream(tls="starttls")
    transport = harness.transport(up, connect_timeout_seconds=2)
    await up.go_down()
    [down] = await transport.deliver(envelope(), MESSAGE)
    slow = await harness.upstream(tls="starttls")
    slow.data_delay = 2.0
    [timed_out] = await harness.transport(slow, timeout_seconds=0.3).deliver(envelope(), MESSAGE)

    for result in (down, timed_out):
        assert result.outcome is RecipientOutcome.TEMPORARY
        assert re.match(r"4\.4\.[12] upstream 'primary'", result.detail), result.detail
        for python in ("Error(", "Errno", "Exception", "Traceback", "SMTP", "('"):
            assert python not in result.detail, result.detail
    assert down.detail.endswith("connection refused")
    assert timed_out.detail.endswith("timed out during the transaction")


@pytest.mark.parametrize("pipelining", [True, False])
async def test_connection_whose_rset_fails_is_never_reused(
    harness: Harness, pipelining: bool
) -> None:
    # Every RCPT refused (MAIL stays open), then RSET refused with the transaction
    # still open: aiosmtplib (and the pipelined path) ignored the RSET's reply and
    # pooled the connection, so the next message met "503 nested MAIL command" and
    # was bounced.
    up = await harness.upstream(tls="starttls", pipelining=pipelining)
    up.refuse_rcpt["a@example.net"] = "550 5.1.1 No such user"
    up.refuse_rset = "500 5.5.2 RSET not now"
    transport = harness.transport(up, pool_size=1)

    [refused] = await transport.deliver(envelope("a@example.net"), MESSAGE)
    assert refused.outcome is RecipientOutcome.PERMANENT

    [next_one] = await transport.deliver(envelope("b@example.net"), MESSAGE)

    assert next_one.outcome is RecipientOutcome.DELIVERED, next_one.detail
    assert up.connections == 2
    assert [m.rcpt_tos for m in up.messages] == [("b@example.net",)]


async def test_ascii_recipients_of_an_smtputf8_message_go_to_an_upstream_without_it(
    harness: Harness,
) -> None:
    # SMTPUTF8 was needed only for one recipient's address: the upstream without
    # SMTPUTF8 gets the message for the others, without the parameter, and only that
    # recipient bounces (RFC 6531 3.2; Postfix delivers such mail the same way).
    plain = await harness.upstream(tls="starttls", smtputf8=False)
    env = envelope("zoë@example.net", "bob@example.net", "carol@example.org", smtputf8=True)

    results = await harness.transport(plain).deliver(env, MESSAGE)

    assert [(r.address, r.outcome) for r in results] == [
        ("zoë@example.net", RecipientOutcome.PERMANENT),
        ("bob@example.net", RecipientOutcome.DELIVERED),
        ("carol@example.org", RecipientOutcome.DELIVERED),
    ]
    assert results[0].detail.startswith("5.6.7 ")
    [got] = plain.messages
    assert got.rcpt_tos == ("bob@example.net", "carol@example.org")
    assert "SMTPUTF8" not in got.mail_options
    assert got.data == MESSAGE


class _UncheckedTransport(SmtpTransport):
    """The transport without its address check: what happens if the rule ever misses an
    address the client library refuses halfway through a transaction."""

    async def deliver(self, envelope: Envelope, message: bytes) -> list[RecipientResult]:
        return await self._deliver_sendable(envelope, message)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_client_side_error_mid_transaction_is_temporary_and_reset(
    harness: Harness, pipelining: bool
) -> None:
    # aiosmtplib refuses the NUL only at its RCPT, after MAIL and a good RCPT went out:
    # our error, so temporary for the message, and the connection is reset (RSET,
    # checked) before the next message uses it. The pipelined path refuses before
    # sending anything.
    up = await harness.upstream(tls="starttls", pipelining=pipelining)
    config = harness.transport(up, pool_size=1).upstream
    transport = _UncheckedTransport(config, local_hostname="relay.test")
    harness.transports.append(transport)

    results = await transport.deliver(envelope("good@example.net", "nul\x00@example.net"), MESSAGE)

    assert [r.outcome for r in results] == [RecipientOutcome.TEMPORARY] * 2
    assert all(r.detail.startswith("4.3.0 ") for r in results)
    [ok] = await transport.deliver(envelope("next@example.net"), MESSAGE)
    assert ok.outcome is RecipientOutcome.DELIVERED, ok.detail
    assert up.connections == 1
    assert [m.rcpt_tos for m in up.messages] == [("next@example.net",)]
    assert not any(b"\x00" in chunk for chunk in up.chunks)


async def test_idn_domains_go_as_a_labels_to_an_upstream_without_smtputf8(
    harness: Harness,
) -> None:
    # Only the domains were non-ASCII: RFC 6531 lets them go as IDNA A-labels, so the
    # whole message is delivered without SMTPUTF8; a non-ASCII mailbox name still fails.
    plain = await harness.upstream(tls="starttls", smtputf8=False)
    env = envelope(
        "bob@exämple.net",
        "zoë@example.net",
        "carol@example.org",
        mail_from="ann@bücher.example",
        smtputf8=True,
    )

    results = await harness.transport(plain).deliver(env, MESSAGE)

    assert [(r.address, r.outcome) for r in results] == [
        ("bob@exämple.net", RecipientOutcome.DELIVERED),
        ("zoë@example.net", RecipientOutcome.PERMANENT),
        ("carol@example.org", RecipientOutcome.DELIVERED),
    ]
    [got] = plain.messages
    assert got.mail_from == "ann@xn--bcher-kva.example"
    assert got.rcpt_tos == ("bob@xn--exmple-cua.net", "carol@example.org")
    assert "SMTPUTF8" not in got.mail_options
    assert got.data == MESSAGE


def test_ascii_form() -> None:
    assert ascii_form("bob@example.net") == "bob@example.net"
    assert ascii_form("bob@exämple.net") == "bob@xn--exmple-cua.net"
    assert ascii_form("zoë@example.net") is None
    assert ascii_form("bob@" + "ä" * 70 + ".net") is None  # label too long for IDNA
