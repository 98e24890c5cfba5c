"""Client errors are client errors: failed TLS handshakes, floods of bad commands, and the
protocol corners real clients use (Exim's `AUTH=<>`, `RCPT TO:<Postmaster>`).

A failed handshake is the client's fault: one INFO/WARNING line without a traceback and a
`tls_handshake` count, never `internal_error` (a 451 fault of ours that alerts page on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import pytest

from mailrelay.relay.smtp_params import decode_xtext, postmaster_rewrite, split_auth_parameter
from tests.relay.conftest import RelayFactory, RelayHandle
from tests.relay.test_smtp_accept import ALICE, accept_only, cmd, message, route, spooled

LOOPBACK = ["127.0.0.0/8"]


async def smtp_lines(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (multi-line replies included)."""
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 5)
        out += line
        if not line or line[3:4] != b"-":
            return out


async def starttls_then(relay: RelayHandle, payload: bytes, *, close: bool) -> bytes:
    """EHLO, STARTTLS, then `payload` in plain text; what the relay sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    try:
        await smtp_lines(reader)
        writer.write(b"EHLO client.test\r\n")
        await smtp_lines(reader)
        writer.write(b"STARTTLS\r\n")
        assert (await smtp_lines(reader)).startswith(b"220 ")
        writer.write(payload)
        await writer.drain()
        if close:
            await asyncio.sleep(0.05)
            writer.close()
            return b""
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# A TLS record header and the start of a ClientHello: a handshake cut off in the middle.
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `predicate` until it holds or `within` seconds passed."""
    for _ in range(int(within / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)


def handshake_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]


@pytest.mark.parametrize(
    ("case", "payload", "close"),
    [
        ("garbage", b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", False),
        ("dropped", PARTIAL_CLIENT_HELLO, True),
    ],
)
async def test_failed_starttls_handshake_is_a_client_error(
    relay_factory: RelayFactory,
    caplog: pytest.LogCaptureFixture,
    case: str,
    payload: bytes,
    close: bool,
) -> None:
    caplog.set_level(logging.INFO)
    relay = await accept_only(relay_factory, allowed_networks=LOOPBACK)
    assert await starttls_then(relay, payload, close=close) == b""
    rejected = "mailrelay_messages_rejected_total"
    await until(lambda: relay.metric(rejected, {"reason": "tls_handshake"}) == 1)
    assert relay.metric(rejected, {"reason": "tls_handshake"}) == 1
    assert relay.metric(rejected, {"reason": "internal_error"}) == 0
    [record] = handshake_records(caplog)
    assert record.levelno in (logging.INFO, logging.WARNING)
    assert "127.0.0.1" in record.getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    # The relay is fine: the next client is served.
    async with relay.client(starttls=True) as smtp:
        assert (await cmd(smtp, "NOOP"))[0] == 250
    assert relay.metric("mailrelay_smtp_sessions_active") <= 1


@pytest.mark.parametrize(
    ("case", "payload"),
    [
        ("plaintext", b"EHLO client.test\r\n"),
        ("dropped", PARTIAL_CLIENT_HELLO),
        ("silent", b""),
    ],
)
async def test_failed_implicit_tls_handshake_is_a_client_error(
    relay_factory: RelayFactory,
    caplog: pytest.LogCaptureFixture,
    case: str,
    payload: bytes,
) -> None:
    caplog.set_level(logging.INFO)
    relay = await accept_only(
        relay_factory,
        allowed_networks=LOOPBACK,
        listener={"implicit_tls_port": 0},
        limits={"command_timeout_seconds": 0.5},
    )
    assert relay.implicit_tls_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.implicit_tls_port)
    writer.write(payload)
    if case == "dropped":
        await asyncio.sleep(0.05)
        writer.close()
    else:
        # Plain text gets no reply; silence ends with the handshake timeout.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    rejected = "mailrelay_messages_rejected_total"
    await until(lambda: relay.metric(rejected, {"reason": "tls_handshake"}) == 1)
    assert relay.metric(rejected, {"reason": "tls_handshake"}) == 1
    assert relay.metric(rejected, {"reason": "internal_error"}) == 0
    [record] = handshake_records(caplog)
    assert record.levelno in (logging.INFO, logging.WARNING)
    assert not any(r.exc_info for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    await until(lambda: relay.metric("mailrelay_smtp_sessions_active") == 0)
    assert relay.metric("mailrelay_smtp_sessions_active") == 0
    async with relay.client(implicit=True) as smtp:
        assert (await cmd(smtp, "NOOP"))[0] == 250
    assert relay.metric("mailrelay_smtp_tls_sessions_total", {"mode": "implicit"}) == 1


async def test_implicit_tls_sessions_count_from_the_accept(relay_factory: RelayFactory) -> None:
    """Sockets that never finish their handshake hold a slot like any other connection,
    so they cannot pile up unseen."""
    relay = await accept_only(
        relay_factory,
        allowed_networks=LOOPBACK,
        listener={"implicit_tls_port": 0},
        limits={"max_connections": 3},
    )
    assert relay.implicit_tls_port is not None
    idle = [await asyncio.open_connection("127.0.0.1", relay.implicit_tls_port) for _ in range(3)]
    await until(lambda: relay.metric("mailrelay_smtp_sessions_active") == 3)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    assert (await smtp_lines(reader)).startswith(b"421 4.7.0")
    writer.close()
    for _, w in idle:
        w.close()
    await until(lambda: relay.metric("mailrelay_smtp_sessions_active") == 0)
    async with relay.client(implicit=True) as smtp:
        assert (await cmd(smtp, "NOOP"))[0] == 250


async def test_too_many_unknown_commands_answer_421_and_close(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory, allowed_networks=LOOPBACK)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    await smtp_lines(reader)
    replies = []
    for n in range(5):
        writer.write(f"BOGUS{n}\r\n".encode())
        replies.append(await smtp_lines(reader))
    # Pipelined after the last straw: must not run.
    assert all(r.startswith(b"500 ") for r in replies[:4])
    assert replies[4] == b"421 4.7.0 relay.test Error: too many unrecognized commands\r\n"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "too_many_errors"}) == 1


async def test_too_many_invalid_commands_answer_421_and_close(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory, allowed_networks=LOOPBACK)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    await smtp_lines(reader)
    writer.write(b"EHLO client.test\r\n")
    await smtp_lines(reader)
    # Syntax and sequence errors, each a known command: no unknown-command budget applies.
    writer.write(b"RCPT TO:<b@d.test>\r\n" * 19 + b"MAIL FROM:\r\n" + b"NOOP\r\n" * 3)
    data = await asyncio.wait_for(reader.read(), 5)
    lines = data.splitlines()
    assert len(lines) == 20
    assert all(line.startswith((b"503 ", b"501 ")) for line in lines[:19])
    assert lines[19] == b"421 4.7.0 relay.test Error: too many errors"
    writer.close()
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "too_many_errors"}) == 1


# -- AUTH= on MAIL FROM (RFC 4954 section 5) ----------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("FROM:<a@b.test>", ("FROM:<a@b.test>", None)),
        ("FROM:<a@b.test> AUTH=<>", ("FROM:<a@b.test>", "<>")),
        ("from:<> auth=<> SIZE=10", ("from:<> SIZE=10", "<>")),
        (
            "FROM:<a@b.test> AUTH=e+3Dmc2@x.test BODY=8BITMIME",
            ("FROM:<a@b.test> BODY=8BITMIME", "e=mc2@x.test"),
        ),
        ('FROM:<"x AUTH=y"@b.test>', ('FROM:<"x AUTH=y"@b.test>', None)),
        ("FROM:<a@b.test> AUTH=", None),
        ("FROM:<a@b.test> AUTH=a=b@c", None),  # "=" must be encoded
        ("FROM:<a@b.test> AUTH=a+3d@c", None),  # hex digits are upper case
        ("FROM:<a@b.test> AUTH=nobody", None),  # neither <> nor an address
        ("FROM:<a@b.test> AUTH=+00@c", None),  # a control character
        ("FROM:<a@b.test> AUTH=<> AUTH=<>", None),
    ],
)
def test_split_auth_parameter(arg: str, expected: tuple[str, str | None] | None) -> None:
    assert split_auth_parameter(arg) == expected


def test_decode_xtext() -> None:
    assert decode_xtext("a+2Bb+3Dc@d") == "a+b=c@d"
    assert decode_xtext("a b") is None


async def test_mail_from_with_auth_parameter_is_accepted(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory)
    async with relay.client(login=ALICE) as smtp:
        assert await cmd(smtp, "MAIL FROM:<a@example.com> AUTH=<>") == (250, "2.1.0 Sender OK")
        assert (await cmd(smtp, "RCPT TO:<b@d.test>"))[0] == 250
        assert (await smtp.data(message())).code == 250
        assert (await cmd(smtp, "MAIL FROM:<a@example.com> AUTH=a+2Bb@example.com SIZE=100"))[
            0
        ] == 250
        assert (await cmd(smtp, "RSET"))[0] == 250
        assert (await cmd(smtp, "MAIL FROM:<a@example.com> AUTH=a=b"))[0:1] == (501,)
        assert (await cmd(smtp, "RCPT TO:<b@d.test> AUTH=<>"))[0] == 503  # no MAIL yet
    [(entry, _)] = spooled(relay)
    assert entry.mail_from == "a@example.com"


async def test_auth_parameter_after_helo_is_refused_like_any_parameter(
    relay_factory: RelayFactory,
) -> None:
    # RFC 5321 4.1.1.11: MAIL parameters are service extensions, which only EHLO opens.
    relay = await accept_only(relay_factory, allowed_networks=LOOPBACK)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    await smtp_lines(reader)
    writer.write(b"HELO client.test\r\n")
    await smtp_lines(reader)
    writer.write(b"MAIL FROM:<a@example.com> AUTH=<>\r\n")
    assert (await smtp_lines(reader)).startswith(b"501 ")
    writer.write(b"MAIL FROM:<a@example.com>\r\n")
    assert (await smtp_lines(reader)).startswith(b"250 ")
    writer.close()


async def test_a_long_auth_parameter_fits_the_mail_line(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory)
    submitter = "s" * 60 + "@" + "d" * 60 + ".example.com"
    async with relay.client(login=ALICE) as smtp:
        sender = "a" * 60 + "@" + "example.com"
        line = f"MAIL FROM:<{sender}> SIZE=100 BODY=8BITMIME AUTH={submitter} SMTPUTF8"
        assert len(line) < 512 + 26 + 10 + 500
        assert (await cmd(smtp, line + " " * (520 - len(line))))[0] == 250


# -- RCPT TO:<Postmaster> (RFC 5321 section 4.5.1) ------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("TO:<Postmaster>", "TO:<pm@ops.test>"),
        ("to: <POSTMASTER> NOTIFY=NEVER", "to: <pm@ops.test> NOTIFY=NEVER"),
        ("TO:<postmaster@x.test>", "TO:<postmaster@x.test>"),
        ("TO:<postmasters>", "TO:<postmasters>"),
    ],
)
def test_postmaster_rewrite(arg: str, expected: str) -> None:
    assert postmaster_rewrite(arg, "pm@ops.test") == expected


@pytest.mark.parametrize(
    ("postmaster", "address", "route_name"),
    [
        ("admins@ops.test", "admins@ops.test", "ops"),
        (None, "postmaster@relay.test", "own"),
    ],
)
async def test_rcpt_to_postmaster_goes_to_the_configured_address(
    relay_factory: RelayFactory, postmaster: str | None, address: str, route_name: str
) -> None:
    overrides = {} if postmaster is None else {"postmaster": postmaster}
    relay = await accept_only(
        relay_factory,
        routes=[
            route("ops", match={"recipient_domains": ["ops.test"]}),
            route("own", match={"recipient_domains": ["relay.test"]}),
        ],
        **overrides,
    )
    async with relay.client(login=ALICE) as smtp:
        assert (await cmd(smtp, "MAIL FROM:<a@example.com>"))[0] == 250
        assert (await cmd(smtp, "RCPT TO:<PostMaster>"))[0] == 250
        assert (await smtp.data(message())).code == 250
    [(entry, _)] = spooled(relay)
    assert [(r.address, r.route) for r in entry.recipients] == [(address, route_name)]


async def test_shutdown_does_not_wait_for_pending_tls_handshakes(
    relay_factory: RelayFactory,
) -> None:
    relay = await accept_only(
        relay_factory, allowed_networks=LOOPBACK, listener={"implicit_tls_port": 0}
    )
    assert relay.implicit_tls_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.implicit_tls_port)
    await until(lambda: relay.metric("mailrelay_smtp_sessions_active") == 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await relay.stop()  # shutdown_grace_seconds is 5 in these tests
    assert loop.time() - started < 2.5
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
