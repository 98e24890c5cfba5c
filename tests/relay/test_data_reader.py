"""The bulk DATA reader against aiosmtpd's own, byte for byte.

Each case runs the same client byte stream, cut into the same TCP chunks, through a real
loopback session on aiosmtpd's `SMTP` and on `SMTPBase`, and asserts identical replies
and identical stored content. Small line and size limits make long lines and oversized
bodies common among the generated bodies; dots at line starts, bare CR and LF, and
`CRLF.CRLF` across chunk boundaries come from the token alphabet. A deliberately broken
unstuffing shows the comparison can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.relay.data_reader import DataScanner
from mailrelay.relay.smtp_base import SMTPBase

LINE_LIMIT = 40
SIZE_LIMIT = 300
OPENING = b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
CLOSING = b"\r\n.\r\nNOOP\r\nQUIT\r\n"

TOKENS = [
    b"a",
    b"bc",
    b".",
    b"..",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n.",
    b"\r\n..",
    b".\r\n",
    b"\r\n.\r\n",
    b"\xc3\xa9",
    b"x" * 19,
    b"y" * 37,
    b"z" * 200,
]
bodies = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)


@dataclass
class Recorder:
    """A DATA handler that keeps what each server stored."""

    stored: list[tuple[object, bytes | None]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.stored.append((envelope.content, envelope.original_content))
        return "250 2.0.0 Stored"


class ReferenceSMTP(SMTP):
    """aiosmtpd's own DATA reader, with the small test line limit."""

    line_length_limit = LINE_LIMIT


class BulkSMTP(SMTPBase):
    line_length_limit = LINE_LIMIT


class BrokenUnstuffingScanner(DataScanner):
    """Forgets to undo dot-stuffing after the first line (the comparison must notice)."""

    def content(self) -> bytes:
        body = b"".join(self._blocks)
        return body[1:] if body.startswith(b".") else body


class BrokenSMTP(BulkSMTP):
    data_scanner = BrokenUnstuffingScanner


async def _session(
    server_class: type[SMTP], chunks: list[bytes], decode: bool
) -> tuple[bytes, list[tuple[object, bytes | None]]]:
    """Replies after the 354 and what the handler stored, for one client stream."""
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server = await loop.create_server(
        lambda: server_class(
            recorder, data_size_limit=SIZE_LIMIT, decode_data=decode, enable_SMTPUTF8=True
        ),
        host="127.0.0.1",
        port=0,
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await reader.readline()
        writer.write(OPENING)
        while not (await asyncio.wait_for(reader.readline(), 10)).startswith(b"354"):
            pass
        # Bytes after the end of data are commands; aiosmtpd hangs up after ten bogus ones.
        with contextlib.suppress(ConnectionError):
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                # Give the server a chance to read each chunk on its own.
                await asyncio.sleep(0.001)
        transcript = b""
        with contextlib.suppress(ConnectionError):
            while part := await asyncio.wait_for(reader.read(65536), 10):
                transcript += part
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
    return transcript, recorder.stored


def _chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]


def _compare(
    candidate: type[SMTP], body: bytes, cuts: list[int], decode: bool = False
) -> tuple[tuple[bytes, object], tuple[bytes, object]]:
    chunks = _chunks(body + CLOSING, cuts)

    async def both() -> tuple[tuple[bytes, object], tuple[bytes, object]]:
        return (
            await _session(ReferenceSMTP, chunks, decode),
            await _session(candidate, chunks, decode),
        )

    return asyncio.run(both())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=bodies,
    cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=6),
    decode=st.booleans(),
)
def test_bulk_reader_matches_aiosmtpd(body: bytes, cuts: list[int], decode: bool) -> None:
    reference, bulk = _compare(BulkSMTP, body, cuts, decode)
    assert bulk == reference


def test_end_of_data_split_at_every_byte_matches_aiosmtpd() -> None:
    body = b"..a\r\n.\r\r\n" + b"w" * 45 + b"\r\n.b"
    stream_len = len(body + CLOSING)
    for cut in range(1, stream_len):
        reference, bulk = _compare(BulkSMTP, body, [cut, cut + 2])
        assert bulk == reference, cut


def test_comparison_catches_broken_unstuffing() -> None:
    reference, broken = _compare(BrokenSMTP, b"Subject: x\r\n\r\n..dot", [7])
    assert reference[1] == [(b"Subject: x\r\n\r\n.dot\r\n", b"Subject: x\r\n\r\n.dot\r\n")]
    assert broken != reference


def test_scanner_memory_stays_bounded_past_the_limits() -> None:
    scanner = DataScanner(line_length_limit=1001, size_limit=10_000)
    for _ in range(1000):
        assert scanner.feed(b"y" * 5000) is None
    assert len(scanner._tail) <= 2 and not scanner._blocks
    assert scanner.feed(b"\r\n" + b"ok\r\n" * 10_000 + b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert scanner.outcome.name == "TOO_LONG" and not scanner._blocks
