"""The SMTP body sent in pieces (`smtp_pipelining.data_pieces`, `write_data`).

* The pieces, joined, are exactly what aiosmtplib itself would send after a 354 (its own
  line-ending normalisation and dot-stuffing are the oracle), for any piece size.
* `write_data` waits for the transport: against a peer that does not read, the bytes
  buffered in our process stay near one piece plus the transport's high-water mark,
  instead of a whole copy of the message, and everything arrives once the peer reads.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.relay.smtp_pipelining import (
    DATA_PIECE_BYTES,
    ReplyReader,
    data_payload,
    data_pieces,
    write_data,
)


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
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

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
        server.close()
        await server.wait_closed()
