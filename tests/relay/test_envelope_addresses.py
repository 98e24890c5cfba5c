"""Envelope addresses the relay refuses at MAIL and RCPT, and the one rule behind it.

A raw socket client sends what aiosmtplib would refuse to (a NUL, an escape sequence,
undecodable bytes), against a relay delivering to a real aiosmtpd upstream on loopback.
The rule itself is checked against the upstream client library: whatever it lets
through goes out on a command line unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from email._header_value_parser import get_angle_addr
from typing import Any

import pytest
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.relay.address import address_refusal
from mailrelay.relay.logging import JsonFormatter, TextFormatter, printable
from mailrelay.relay.spool import RecipientState
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.relay.conftest import (
    RelayFactory,
    RelayHandle,
    fresh_entry,
    smtp_route,
    start_subprocess,
    write_legacy_pair,
)


class RawSession:
    """An SMTP session over a plain socket: bytes out exactly as given, replies back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            assert line, "connection closed"
            lines.append(line[4:].decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    async def send(self, line: bytes) -> tuple[int, str]:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()


@contextlib.asynccontextmanager
async def raw_session(relay: RelayHandle) -> AsyncIterator[RawSession]:
    reader, writer = await asyncio.open_connection(relay.host, relay.smtp_port)
    session = RawSession(reader, writer)
    try:
        assert (await session.reply())[0] == 220
        assert (await session.send(b"EHLO client.test"))[0] == 250
        yield session
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


async def _relay(
    relay_factory: RelayFactory, up: RecordingUpstream, certs: TlsCerts, **extra: Any
) -> RelayHandle:
    return await relay_factory(
        routes=[smtp_route("out", up, certs.ca_file)], allowed_networks=["127.0.0.0/8"], **extra
    )


# -- the rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "smtputf8", "reply"),
    [
        ("a@example.com", False, None),
        ("First.Last+tag@sub.example.org", False, None),
        ('"john doe"@example.com', False, None),
        ('"a@b"@example.com', False, None),
        ("user@[192.0.2.1]", False, None),
        ("user@[IPv6:2001:db8::1]", False, None),
        ("user@my_host.example.com", False, None),
        ("user@example.com.", False, None),
        ("Postmaster", False, None),
        ("<>", False, None),
        ("", False, None),
        ("zoë@exämple.net", True, None),
        ('"zoë smith"@example.net', True, None),
        ("a\x00b@example.com", False, "501 5.1.3"),
        ("a\x00b@example.com", True, "501 5.1.3"),
        ("a@exam\x00ple.com", False, "501 5.1.3"),
        ('"a\x00b"@example.com', False, "501 5.1.3"),
        ("esc\x1b[2J@example.com", False, "501 5.1.3"),
        ("tab\there@example.com", False, "501 5.1.3"),
        ("del\x7f@example.com", False, "501 5.1.3"),
        ("c1\x9b@example.com", True, "501 5.1.3"),
        ("bad\udcffutf8@example.com", True, "501 5.1.3"),
        ("a b@example.com", False, "501 5.1.3"),
        ("a\u00a0b@example.com", True, "501 5.1.3"),
        ("a..b@example.com", False, "501 5.1.3"),
        (".a@example.com", False, "501 5.1.3"),
        ("a@", False, "501 5.1.3"),
        ("@example.com", False, "501 5.1.3"),
        ("a@exa mple.com", False, "501 5.1.3"),
        ("a@b..c", False, "501 5.1.3"),
        ("a@[1.2.3.4<]", False, "501 5.1.3"),
        ('">"', False, "501 5.1.3"),
        ("zoë@example.net", False, "553 5.6.7"),
        ("bob@exämple.net", False, "553 5.6.7"),
        ('"zoë"@example.net', False, "553 5.6.7"),
    ],
)
def test_address_rule(address: str, smtputf8: bool, reply: str | None) -> None:
    refusal = address_refusal(address, smtputf8=smtputf8)
    if reply is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert refusal.reply.startswith(reply + " ")
        assert refusal.reply.isprintable() and address not in refusal.reply


_ALPHABET = st.sampled_from(
    [
        *"ab.@<>  \t()\"[]:,;\\-+=_'Z9!#",
        *("\x00", "\x1b", "\r", "\n", "\x7f", "\x85"),
        # non-ASCII letters, non-ASCII spaces, undecodable bytes, a BOM, a line separator
        *("é", "ü", "漢", "\u00a0", "\u3000", "\u2028", "\udcff", "\ufeff"),
    ]
)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.text(_ALPHABET, max_size=20), smtputf8=st.booleans(), parse=st.booleans())
def test_whatever_the_rule_takes_goes_out_unchanged(raw: str, smtputf8: bool, parse: bool) -> None:
    # What aiosmtpd hands the handler (its parser's addr-spec), or a raw spooled string.
    address = raw
    if parse:
        with contextlib.suppress(Exception):
            address = get_angle_addr(f"<{raw}>")[0].addr_spec
    if address in ("", "<>") or address_refusal(address, smtputf8=smtputf8) is not None:
        return
    # aiosmtplib would put exactly this on the command line, encodable, without a
    # control character: no ValueError after MAIL, no address rewritten on the way.
    quoted = quote_address(address)
    assert quoted == f"<{address}>"
    encoded = quoted.encode("utf-8" if smtputf8 else "ascii")
    assert not COMMAND_INJECTION_REGEX.search(encoded)


# -- the SMTP front -------------------------------------------------------------------


BAD_RCPTS = [
    (b"RCPT TO:<nul\x00byte@dest.test>", 501, "5.1.3"),
    (b"RCPT TO:<esc\x1bc@dest.test>", 501, "5.1.3"),
    (b"RCPT TO:<del\x7f@dest.test>", 501, "5.1.3"),
    (b"RCPT TO:<bell\x07@dest.test>", 501, "5.1.3"),
    (b'RCPT TO:<"nul\x00quoted"@dest.test>', 501, "5.1.3"),
    (b"RCPT TO:<bad\xffutf8@dest.test>", 501, "5.1.3"),
    (b"RCPT TO:<a@dest..test>", 501, "5.1.3"),  # refused by aiosmtpd's parser already
    (b"RCPT TO:<tab\t@dest.test>", 501, "5.1.3"),  # the parser would drop the tab
    (b"RCPT TO:<cmt(\x00)@dest.test>", 501, "5.1.3"),  # ... and the comment
    # ... and a non-ASCII space (Python's whitespace), which left `nbsp@dest.test`.
    ("RCPT TO:<nbsp \u00a0@dest.test>".encode(), 501, "5.1.3"),
    ("RCPT TO:<ideo\u3000@dest.test>".encode(), 501, "5.1.3"),
    ("RCPT TO:<zoë@dest.test>".encode(), 553, "5.6.7"),
    ("RCPT TO:<bob@dëst.test>".encode(), 553, "5.6.7"),
]


async def test_bad_recipients_are_refused_and_the_rest_delivered(
    relay_factory: RelayFactory,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
) -> None:
    up = recording_upstream(tls="starttls")
    relay = await _relay(relay_factory, up, tls_certs)
    async with raw_session(relay) as smtp:
        assert (await smtp.send(b"MAIL FROM:<a@example.com>"))[0] == 250
        assert (await smtp.send(b"RCPT TO:<good@dest.test>"))[0] == 250
        for line, code, status in BAD_RCPTS:
            reply = await smtp.send(line)
            assert reply[0] == code and reply[1].startswith(status), (line, reply)
        assert (await smtp.send(b"RCPT TO:<other@dest.test>"))[0] == 250
        assert (await smtp.send(b"DATA"))[0] == 354
        assert (await smtp.send(MESSAGE + b"."))[0] == 250
    [got] = await up.wait_for(1)
    assert got.rcpt_tos == ("good@dest.test", "other@dest.test")
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "bad_address"}) == len(
        BAD_RCPTS
    )


async def test_bad_senders_are_refused(
    relay_factory: RelayFactory,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
) -> None:
    up = recording_upstream(tls="starttls")
    relay = await _relay(relay_factory, up, tls_certs)
    async with raw_session(relay) as smtp:
        assert (await smtp.send(b"MAIL FROM:<a\x00b@example.com>"))[:1] == (501,)
        assert (await smtp.send(b"MAIL FROM:<a\x1b@example.com>"))[:1] == (501,)
        reply = await smtp.send("MAIL FROM:<zoë@example.com>".encode())
        assert reply[0] == 553 and reply[1].startswith("5.6.7")
        # The session is still usable and a valid transaction goes through.
        assert (await smtp.send(b"MAIL FROM:<a@example.com>"))[0] == 250
        assert (await smtp.send(b"RCPT TO:<b@dest.test>"))[0] == 250
        assert (await smtp.send(b"DATA"))[0] == 354
        assert (await smtp.send(MESSAGE + b"."))[0] == 250
    [got] = await up.wait_for(1)
    assert got.mail_from == "a@example.com"


async def test_utf8_addresses_in_an_smtputf8_transaction_arrive_unchanged(
    relay_factory: RelayFactory,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
) -> None:
    # The relay advertises SMTPUTF8; with it on MAIL, UTF-8 addresses are taken and sent
    # upstream as they came, with SMTPUTF8 on the upstream's MAIL too.
    up = recording_upstream(tls="starttls")
    relay = await _relay(relay_factory, up, tls_certs)
    async with raw_session(relay) as smtp:
        sender = "zoë@exämple.com"
        assert (await smtp.send(f"MAIL FROM:<{sender}> SMTPUTF8".encode()))[0] == 250
        assert (await smtp.send("RCPT TO:<Jürgen@dëst.test>".encode()))[0] == 250
        assert (await smtp.send('RCPT TO:<"漢 字"@dest.test>'.encode()))[0] == 250
        assert (await smtp.send(b"RCPT TO:<bad\xffutf8@dest.test>"))[0] == 501
        assert (await smtp.send(b"DATA"))[0] == 354
        assert (await smtp.send(MESSAGE + b"."))[0] == 250
    [got] = await up.wait_for(1)
    assert got.mail_from == sender
    assert got.rcpt_tos == ("Jürgen@dëst.test", '"漢 字"@dest.test')
    assert "SMTPUTF8" in got.mail_options


async def test_no_control_character_reaches_the_log_raw(
    relay_factory: RelayFactory,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
) -> None:
    # The relay as it ships (a subprocess with its own logging), refused addresses with
    # a NUL, a bell and a terminal escape, then its log file byte for byte.
    up = recording_upstream(tls="starttls")
    relay = await _relay(
        relay_factory,
        up,
        tls_certs,
        subprocess=True,
    )
    async with raw_session(relay) as smtp:
        assert (await smtp.send(b"MAIL FROM:<a\x00b@example.com>"))[0] == 501
        assert (await smtp.send(b"MAIL FROM:<a@example.com>"))[0] == 250
        assert (await smtp.send(b"RCPT TO:<x\x07y\x1b[2J@dest.test>"))[0] == 501
        assert (await smtp.send(b"RCPT TO:<cr\rhere@dest.test>"))[0] == 501
    await relay.stop()
    log = relay.log_path.read_bytes()
    assert b"Refused sender" in log and b"Refused recipient" in log
    for raw in (b"\x00", b"\x07", b"\x1b", b"\r"):
        assert raw not in log
    assert b"a\\x00b@example.com" in log


def test_log_formatters_escape_control_characters() -> None:
    record = logging.LogRecord(
        "mailrelay.test", logging.INFO, __file__, 1, "Refused <%s>", ("a\x00\r\nb\x1b",), None
    )
    record.recipient = "c\x00d"
    text = TextFormatter().format(record)
    assert text.endswith("Refused <a\\x00\\x0d\\x0ab\\x1b>")
    payload = json.loads(JsonFormatter().format(record))
    assert payload["message"] == "Refused <a\\x00\\x0d\\x0ab\\x1b>"
    assert payload["recipient"] == "c\\x00d"
    assert printable("plain text") == "plain text"
    # A traceback formatted before the handler saw it (relay/redact.py does that) keeps
    # its line breaks and loses its control characters, in both formats.
    record.exc_text = "Traceback (most recent call last):\nValueError: a\x00b\x1b[2J"
    text = TextFormatter().format(record)
    assert "\nValueError: a\\x00b\\x1b[2J" in text and "\x00" not in text
    payload = json.loads(JsonFormatter().format(record))
    assert payload["exception"].endswith("\nValueError: a\\x00b\\x1b[2J")


# -- a message spooled before the front refused such addresses ------------------------


async def test_spooled_bad_address_bounces_alone_with_an_smtp_style_reason(
    relay_factory: RelayFactory,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
) -> None:
    # An older version accepted `nul\x00@dest.test` next to a valid recipient: the valid
    # one is delivered, the other bounces alone, and the bounce and the dead letter say
    # why in SMTP terms, not with a Python exception's text.
    up = recording_upstream(tls="starttls")
    relay = await relay_factory(
        routes=[smtp_route("out", up, tls_certs.ca_file)], subprocess=True, start=False
    )
    queue = relay.spool_dir / "queue"
    queue.mkdir(parents=True)
    data = b"From: a@example.com\r\nSubject: old\r\nMessage-ID: <old@example.com>\r\n\r\nHi\r\n"
    entry = fresh_entry("good@dest.test", "out", data, mail_from="a@example.com")
    entry.recipients.append(RecipientState(address="nul\x00@dest.test", route="out"))
    write_legacy_pair(queue, entry, data)
    await start_subprocess(relay)

    got = await up.wait_for(2)
    original = next(m for m in got if m.mail_from == "a@example.com")
    dsn = next(m for m in got if m.mail_from in ("", "<>"))
    assert original.rcpt_tos == ("good@dest.test",) and original.data == data
    assert dsn.rcpt_tos == ("a@example.com",)
    assert b"Status: 5.1.3" in dsn.data
    assert b"5.1.3 Bad recipient address: address contains a control character" in dsn.data
    await relay.stop()
    [dead] = SpoolAdmin(relay.spool_dir).list_dead_letters()
    assert dead.dead_reason is not None
    assert "5.1.3 Bad recipient address" in dead.dead_reason
    for python in ("Error", "Errno", "Traceback", "'ascii' codec", "('"):
        assert python not in dead.dead_reason and python.encode() not in dsn.data
    assert b"\x00" not in relay.log_path.read_bytes()
