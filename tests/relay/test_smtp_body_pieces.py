"""The SMTP body sent in pieces (`smtp_pipelining.data_pieces`, `write_data`).

* The pieces, joined, are exactly what aiosmtplib itself would send after a 354 (its own
  line-ending normalisation and dot-stuffing are the oracle), for any piece size.
* `sendmail_in_pieces` (upstreams without PIPELINING) does what aiosmtplib's `sendmail`
  does: the same bytes upstream, results, exceptions, and a usable connection after.
* `write_data` waits for the transport: against a peer that does not read, the bytes
  buffered in our process stay near one piece plus the transport's high-water mark,
  instead of a whole copy of the message, and everything arrives once the peer reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiosmtplib
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.relay.upstreams.smtp_pipelining import (
    DATA_PIECE_BYTES,
    ReplyReader,
    data_payload,
    data_pieces,
    sendmail_in_pieces,
    write_data,
)
from mailrelay.support.smtp_peers import RecordingUpstream


def aiosmtplib_payload(message: bytes) -> bytes:
    """What aiosmtplib's `execute_data_command` writes after the 354."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


@settings(max_examples=400, deadline=None)
@given(
    message=st.lists(
        st.sampled_from([b"a", b"bc", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"x" * 9]),
        max_size=60,
    ).map(b"".join),
    piece=st.integers(min_value=1, max_value=40),
)
def test_pieces_join_to_what_aiosmtplib_sends(message: bytes, piece: int) -> None:
    expected = aiosmtplib_payload(message)
    assert b"".join([*data_pieces(message, piece), b".\r\n"]) == expected
    assert data_payload(message) == expected


def test_pieces_of_a_large_message_end_at_line_ends_and_stay_near_the_piece_size() -> None:
    line = b"." + b"y" * 75 + b"\r\n"
    message = line * 40_000  # ~3 MB, every line dot-stuffed
    pieces = list(data_pieces(message))
    assert len(pieces) > 10
    assert all(p.endswith(b"\r\n") for p in pieces)
    # A piece ends at the first line end past its size; stuffing adds a byte per line.
    assert max(len(p) for p in pieces) <= (DATA_PIECE_BYTES + len(line)) * 79 // 78 + 2
    assert b"".join(pieces) == aiosmtplib_payload(message)[:-3]


class _Inner(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol behind the ReplyReader."""

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


async def test_write_data_waits_for_a_slow_peer_instead_of_buffering_the_message() -> None:
    received = bytearray()
    reading = asyncio.Event()
    done = asyncio.Event()
    message = (b"z" * 998 + b"\r\n") * 8000  # 8 MB

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reading.wait()
        while not received.endswith(b"\r\n.\r\n"):
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            received.extend(chunk)
        done.set()
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, inner = await loop.create_connection(_Inner, "127.0.0.1", port)
    transport.set_write_buffer_limits(high=64 << 10)
    reader = ReplyReader(inner, transport)
    transport.set_protocol(reader)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, transport.get_write_buffer_size())
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    sending = asyncio.create_task(write_data(reader, message, 30))
    await asyncio.sleep(0.3)  # the peer reads nothing yet: the sender must be waiting
    assert not sending.done()
    assert transport.get_write_buffer_size() <= (64 << 10) + DATA_PIECE_BYTES + 4096
    reading.set()
    await asyncio.wait_for(sending, 30)
    await asyncio.wait_for(done.wait(), 30)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert bytes(received) == aiosmtplib_payload(message)
    assert peak <= (64 << 10) + DATA_PIECE_BYTES + 4096
    transport.close()
    server.close()
    await server.wait_closed()


async def test_write_data_gives_up_when_the_peer_never_reads() -> None:
    finished = asyncio.Event()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await finished.wait()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, inner = await asyncio.get_running_loop().create_connection(_Inner, "127.0.0.1", port)
    transport.set_write_buffer_limits(high=64 << 10)
    reader = ReplyReader(inner, transport)
    transport.set_protocol(reader)
    try:
        try:
            await write_data(reader, (b"q" * 998 + b"\r\n") * 20_000, 0.5)
        except aiosmtplib.SMTPTimeoutError:
            pass
        else:
            raise AssertionError("write_data returned although the peer never read")
    finally:
        transport.abort()
        finished.set()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the peer close its side


async def _outcome(
    send: Callable[..., Awaitable[tuple[dict[str, aiosmtplib.SMTPResponse], str]]],
    port: int,
    message: bytes,
) -> tuple[object, bool]:
    """What one send did (its result, or its exception's type and codes), and whether the
    connection still takes a command afterwards (the RSET after a refusal)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
    await smtp.connect()
    try:
        try:
            refused, reply = await send(smtp, message)
            outcome: object = (
                {r: (e.code, e.message) for r, e in refused.items()},
                reply.split()[0],
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            outcome = ("refused", sorted((e.recipient, e.code) for e in exc.recipients))
        except aiosmtplib.SMTPResponseException as exc:
            outcome = (type(exc).__name__, exc.code)
        usable = (await smtp.noop()).code == 250
    finally:
        smtp.close()
    return outcome, usable


@pytest.mark.parametrize("case", ["delivered", "one_refused", "all_refused", "data_refused"])
async def test_sendmail_in_pieces_does_what_aiosmtplib_sendmail_does(
    recording_upstream: Callable[..., RecordingUpstream], case: str
) -> None:
    upstream = recording_upstream(tls="none")  # aiosmtpd: no PIPELINING
    refuse = {"one_refused": {"c@x.test"}, "all_refused": {"b@x.test", "c@x.test"}}
    upstream.rcpt_reply = lambda address: (
        "550 5.1.1 No such user" if address in refuse.get(case, set()) else None
    )
    upstream.data_reply = lambda envelope: (
        "554 5.6.0 Content refused" if case == "data_refused" else None
    )
    # Past one piece, dot-led lines throughout, and a lone LF to normalise.
    message = b"Subject: big\r\n\r\n" + b".dot line\r\nplain\n" * 40_000
    recipients = ["b@x.test", "c@x.test"]

    async def theirs(
        smtp: aiosmtplib.SMTP, data: bytes
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        return await smtp.sendmail("a@x.test", recipients, data)

    async def ours(
        smtp: aiosmtplib.SMTP, data: bytes
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        await smtp.ehlo()
        return await sendmail_in_pieces(
            smtp, "a@x.test", recipients, data, mail_options=[], reply_timeout=30
        )

    expected = await _outcome(theirs, upstream.port, message)
    reference = upstream.snapshot()
    upstream.messages.clear()
    assert await _outcome(ours, upstream.port, message) == expected
    got = upstream.snapshot()
    assert [(m.mail_from, m.rcpt_tos, m.data, m.mail_options) for m in got] == [
        (m.mail_from, m.rcpt_tos, m.data, m.mail_options) for m in reference
    ]
    if case in ("delivered", "one_refused"):
        assert got[0].data == message.replace(b"plain\n", b"plain\r\n")
