"""The SMTP DATA body read in bulk instead of line by line.

aiosmtpd reads a DATA body with one `StreamReader.readuntil(b"\\r\\n")` per line plus
per-line Python work (~47 awaits and list appends for a 2 KB message), the largest Python
cost left on the event loop per message. Here the body is taken in whatever chunks the
stream holds and handled with bytes operations (find, split, replace):

* `DataScanner` is pure: fed raw chunks, it finds the end of data (`CRLF.CRLF`, or `.CRLF`
  as the very first line), keeps the complete lines while the body is within the limits,
  and decides the outcome exactly as aiosmtpd 1.4.6 does, including which of "line too
  long" and "too much data" wins when both happen (the first line that trips either, with
  aiosmtpd's stream-limit quirk: a line longer than the limit plus CRLF is refused before
  its bytes count).
* `DataSink` is where a session may stream the body as it arrives instead.

The session side (aiosmtpd's `smtp_DATA` reading through the scanner) is in
`smtp_base.SMTPBase`, with aiosmtpd's other internals.

Only `CRLF.CRLF` ends the data: a bare CR or LF never does (SMTP smuggling).
"""

from __future__ import annotations

import enum
from typing import Protocol

__all__ = ["DataOutcome", "DataScanner", "DataSink", "unstuff"]

_END = b"\r\n.\r\n"


class DataOutcome(enum.Enum):
    """How a DATA body ended, in aiosmtpd's terms."""

    NOMINAL = "nominal"
    TOO_LONG = "too_long"  # 500 Line too long
    TOO_MUCH = "too_much"  # 552 Too much mail data


class DataScanner:
    """Finds the end of a DATA body in raw chunks and checks it as aiosmtpd would.

    Memory stays bounded: once the body fails a limit its lines are dropped, and a partial
    line longer than the line limit is cut to its last byte (enough to see its CRLF)."""

    def __init__(self, *, line_length_limit: int, size_limit: int | None) -> None:
        self._line_limit = line_length_limit
        self._size_limit = size_limit or 0
        self.outcome = DataOutcome.NOMINAL
        self._size = 0
        self._blocks: list[bytes] = []
        self._held = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes | None:
        """Take the next raw bytes; once they hold the end of data, return what follows
        it (pipelined commands, to hand back to the stream), else None."""
        buf = self._tail + chunk if self._tail else chunk
        if buf.startswith(b".\r\n"):
            end = 0
        else:
            found = buf.find(_END)
            end = found + 2 if found >= 0 else -1
        if end >= 0:
            self._take(buf[:end])
            self._tail = b""
            return buf[end + 3 :]
        cut = buf.rfind(b"\r\n") + 2
        if cut >= 2:
            self._take(buf[:cut])
            buf = buf[cut:]
        if len(buf) > self._line_limit + 1:
            # This line will exceed the stream limit plus CRLF whatever follows: aiosmtpd
            # refuses it at its start. Keep a placeholder line ending in the last byte, so a
            # CRLF split across chunks still ends it; it cannot look like the end of data.
            self._fail(DataOutcome.TOO_LONG)
            buf = b"x" + buf[-1:]
        self._tail = buf
        return None

    @property
    def buffered(self) -> int:
        """Bytes of complete lines held and not yet taken (`take_content`)."""
        return self._held

    def content(self) -> bytes:
        """The body with dot-stuffing undone (RFC 5321 4.5.2); only for a NOMINAL body."""
        return b"".join(self.take_content())

    def take_content(self) -> list[bytes]:
        """The complete lines held so far, dot-stuffing undone, and forget them (to stream
        a body somewhere as it arrives); `content` is the same bytes in one piece."""
        blocks = self._blocks
        self._blocks = []
        self._held = 0
        # Each block starts at the start of a line, so each is unstuffed on its own.
        return [unstuff(block) for block in blocks]

    def _take(self, block: bytes) -> None:
        """Account for complete lines (`block` is empty or ends with CRLF)."""
        if not block or self.outcome is not DataOutcome.NOMINAL:
            return
        size = self._size + len(block)
        over_size = bool(self._size_limit) and size > self._size_limit
        if over_size or (
            len(block) > self._line_limit
            and max(map(len, block.split(b"\r\n"))) + 2 > self._line_limit
        ):
            self._fail(self._first_failure(block))
            return
        self._size = size
        self._blocks.append(block)
        self._held += len(block)

    def _first_failure(self, block: bytes) -> DataOutcome:
        """Which limit the first failing line in `block` trips, in aiosmtpd's order: a line
        over the stream limit (line limit + CRLF) fails before its bytes count; otherwise
        its bytes count first, then its length is checked."""
        size = self._size
        for line in block.split(b"\r\n")[:-1]:
            length = len(line) + 2
            if length > self._line_limit + 2:
                return DataOutcome.TOO_LONG
            size += length
            if self._size_limit and size > self._size_limit:
                return DataOutcome.TOO_MUCH
            if length > self._line_limit:
                return DataOutcome.TOO_LONG
        raise AssertionError("no line in the block fails a limit")

    def _fail(self, outcome: DataOutcome) -> None:
        if self.outcome is DataOutcome.NOMINAL:
            self.outcome = outcome
        self._blocks.clear()
        self._held = 0


def unstuff(block: bytes) -> bytes:
    """Complete lines (from the start of a line) with dot-stuffing undone (RFC 5321 4.5.2)."""
    if block.startswith(b"."):
        block = block[1:]
    return block.replace(b"\r\n.", b"\r\n") if b"\r\n." in block else block


class DataSink(Protocol):
    """Where a DATA body goes as it arrives, instead of one bytes object at the end."""

    @property
    def flush_bytes(self) -> int:
        """Hand over the body's lines whenever this many are held."""

    async def take(self, blocks: list[bytes]) -> None:
        """The next complete lines of the body, dot-stuffing undone, in order."""
