"""One DATA body on its way into the spool, with memory bounded near a chunk per session.

`IncomingMessage` is the `DataSink` the SMTP front hands to the DATA reader
(`smtp_base.SMTPBase`): it gets the body's lines as they arrive (dot-stuffing
undone), after our Received header (its `preamble`). While the message is small it
keeps the lines in memory, so small mail still goes to the journal in one append
(`Spool.enqueue_held`). Once it outgrows `spill_bytes` (the journal's largest message:
a bigger one gets a queue file anyway) it opens the message's queue file in the spool's
tmp/ (`Spool.open_incoming`) and appends every further chunk there as it arrives, the way
Postfix's cleanup writes its queue file: nothing but the current chunk is in memory,
however large the message.

Every byte is charged to the message's `Reservation` on the relay's budget for bytes in
flight first (`budget.py`; times its routes' cost factor, for HTTP providers). When the
budget cannot take more, or the spool cannot write, the rest of the body is read and
dropped and `failure` says why; the front then answers 452 4.3.1 or 451 4.3.0 after the
final dot. A sink never raises into the DATA reader:
an exception there would leave the body's remaining lines to be read as commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from mailrelay.relay.budget import Reservation, charge
from mailrelay.relay.spool import (
    JOURNAL_MAX_MESSAGE_BYTES,
    Arrival,
    IncomingFile,
    MessageLease,
    Spool,
)

__all__ = ["FLUSH_BYTES", "HEAD_BYTES", "IncomingMessage"]

log = logging.getLogger(__name__)

# Lines are handed over (and, for a large message, written) in pieces of about this size.
FLUSH_BYTES = 256 << 10
# How much of the message's beginning stays in memory for the header checks (Received
# count, Message-ID). A mail loop adds its Received headers at the top, a few hundred
# bytes per hop, so a loop shows long before this.
HEAD_BYTES = 256 << 10

Failure = Literal["over_budget", "spool_error"]


class IncomingMessage:
    """See the module docstring. Owns its reservation and file until `enqueue` hands
    them to the spool and the delivery engine; `close` drops whatever it still owns."""

    flush_bytes = FLUSH_BYTES

    def __init__(
        self,
        spool: Spool,
        arrival: Arrival,
        preamble: bytes,
        reservation: Reservation,
        *,
        cost_factor: float = 1.0,
        spill_bytes: int = JOURNAL_MAX_MESSAGE_BYTES,
    ) -> None:
        self.arrival = arrival
        self.preamble = preamble
        self.failure: Failure | None = None
        self.size = len(preamble)  # our Received header included
        self._spool = spool
        self._reservation: Reservation | None = reservation
        self._spill_bytes = spill_bytes
        self._cost_factor = cost_factor  # see `budget.cost_factor`
        self._blocks: list[bytes] = [preamble]
        self._head = bytearray()
        self._file: IncomingFile | None = None
        self._io: asyncio.Future[None] | None = None  # the latest file work (`_file_work`)

    @property
    def queue_id(self) -> str:
        """The queue id the message will have (it is in our Received header already)."""
        return self.arrival.queue_id

    @property
    def body_size(self) -> int:
        """Bytes the client sent (without our Received header)."""
        return self.size - len(self.preamble)

    @property
    def head(self) -> bytes:
        """The beginning of the message as the client sent it (up to HEAD_BYTES)."""
        return bytes(self._head)

    @property
    def spilled(self) -> bool:
        """Whether the bytes went to a queue file as they arrived."""
        return self._file is not None

    async def take(self, blocks: list[bytes]) -> None:
        """The next lines of the body; see the module docstring."""
        size = sum(len(block) for block in blocks)
        if self.failure is not None:
            self.size += size  # still counted: a message too large is told so (552)
            return
        reservation = self._reservation
        assert reservation is not None, "take after the message was handed over"
        if not reservation.grow(charge(self.size + size, self._cost_factor) - reservation.size):
            self.failure = "over_budget"
            self.size += size
            await self._drop()
            return
        self.size += size
        if len(self._head) < HEAD_BYTES:
            for block in blocks:
                self._head += block[: HEAD_BYTES - len(self._head)]
        if self._file is None:
            self._blocks.extend(blocks)
            if self.size <= self._spill_bytes:
                return
            blocks, self._blocks = self._blocks, []
            await self._file_work(self._open_file)
        await self._file_work(functools.partial(self._write, blocks))

    async def _file_work(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run file work after the work before it, to its end even when the session is
        cancelled meanwhile: a write still running in its thread must never meet a
        closed (and maybe reused) descriptor, nor an open leave a file nobody removes."""
        previous = self._io

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await work()

        task = self._io = asyncio.ensure_future(run())
        await asyncio.shield(task)

    async def _open_file(self) -> None:
        if self.failure is not None:
            return
        try:
            self._file = await asyncio.to_thread(
                self._spool.open_incoming, self.arrival, bytes(self._head)
            )
        except Exception as exc:  # never into the DATA reader (module docstring)
            self._fail_write(exc)

    async def _write(self, blocks: list[bytes]) -> None:
        file = self._file
        if file is None or self.failure is not None:
            return
        try:
            await asyncio.to_thread(file.write, blocks)
        except Exception as exc:  # never into the DATA reader (module docstring)
            self._fail_write(exc)
            await self._discard_file()

    async def _discard_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(file.discard)

    def _fail_write(self, exc: Exception) -> None:
        log.error(
            "Failed to write incoming message %s to the spool: %s",
            self.queue_id,
            exc,
            exc_info=not isinstance(exc, OSError),
        )
        self.failure = "spool_error"
        self._blocks = []

    def content(self) -> bytes:
        """The whole message, our Received header first (only for one not spilled)."""
        assert self._file is None and self.failure is None
        return b"".join(self._blocks)

    async def enqueue(self, *, journal: bool) -> MessageLease:
        """Store the message durably and hand over its bytes and reservation (raises
        OSError when it could not be stored; nothing is then stored)."""
        assert self.failure is None
        reservation, self._reservation = self._reservation, None
        try:
            if self._file is not None:
                incoming, self._file = self._file, None
                return await self._spool.enqueue_incoming(incoming, reservation)
            data, self._blocks = self.content(), []
            arrival = self.arrival
            return await self._spool.enqueue_held(
                arrival.envelope.mail_from,
                arrival.routed_recipients(),
                data,
                smtputf8=arrival.envelope.smtputf8,
                body_8bitmime=arrival.envelope.body_8bitmime,
                client_address=arrival.client_address,
                authenticated_user=arrival.authenticated_user,
                queue_id=arrival.queue_id,
                journal=journal,
                reservation=reservation,
            )
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise

    async def _drop(self) -> None:
        self._blocks = []
        await self._file_work(self._discard_file)

    async def close(self) -> None:
        """Drop what was not handed over: the reservation, the bytes, the temp file."""
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            reservation.release()
        await self._drop()
