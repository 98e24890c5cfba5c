"""The durable spool: nothing the relay acknowledged is ever lost.

Layout under the spool directory::

    tmp/         files being written; renamed into place once fsync'd
    journal/     <writer>-<n>.jnl: fresh messages on their first attempt (`journal.py`)
    queue/       <qid>.msg: the envelope as one JSON line, then the exact bytes to deliver
                 <qid>.state: the current envelope state, once it changed after enqueue
    deadletter/  the same for messages that failed for good (their state has `dead_reason`)
    handoff/     <qid>: an empty marker per message received from a peer (`adopt`), kept
                 after delivery so a replayed hand-off is recognised; dropped when the
                 message is handed on (`hand_over`), swept after a week

One file per message at enqueue: `<qid>.msg` is written in `tmp/`, fsync'd and renamed into
`queue/`, so a `.msg` there is always complete and a half-written one is only ever debris
in `tmp/` (removed on start once old enough to belong to nobody). Then the queue directory
is fsync'd. Directory fsyncs are shared between concurrent enqueues (group commit): a
caller waits for the first directory sync that *starts* after its rename, so one fsync
can cover many sessions. Creating, renaming and unlinking files costs tens to hundreds
of microseconds each where we measured (`bench/README.md`), so the write path is counted
in syscalls: create, write, fsync, rename, close, and a share of one directory fsync;
the journal (below) avoids all but the write and a share of one fsync for most mail.

The `.msg` is never rewritten. Later state (attempts, next attempt, per-recipient
results, the dead-letter reason) goes to `<qid>.state` (temp file, fsync, rename), which
wins over the header line. Most messages are delivered on their first attempt and never
get one. A lone `.state` (a crash between removing a message's two files) is debris.

Several processes (SO_REUSEPORT workers, the queue CLI) may share a spool. A message is
claimed with `flock` on its `.msg` (never rewritten, unlike the `.state`), so two
processes never deliver or edit the same message at once. After claiming, re-read the
entry (`claim_and_load`, `load_entry`): another process may have changed or removed it.

Whoever works on a message holds a `MessageLease`, and only the lease knows where the
message lives: the SMTP front gets one from `enqueue_held` (or `enqueue_incoming`) and
hands it to its delivery engine; the engine gets one for a retry from `lease`. The holder
reads the bytes, records state (`defer`), and ends the lease with `complete`,
`dead_letter` and `release`, or `release`.

`enqueue_held` takes the claim on the `.msg` while writing it, before the rename makes the
message visible, and the lease keeps the claim with the entry and bytes: the first
attempt then needs no claim, no re-read and no thread hop, because nobody else can have
seen the message.

Fresh messages from the SMTP front go to the journal instead (`enqueue_held` with
`journal=True`): one append to an open file and a shared `fdatasync`, no file of their
own. The spool remembers which messages live in its journal; `save` and
`move_to_dead_letter` (through the lease's `defer`, `dead_letter` and `release`) write such
a message's `.msg` (in queue/ or deadletter/) with its current state, and
`finish_journaled` (the lease's `complete`) marks a delivered one done. On start, and in every
delivery scan, segments nobody holds are recovered into queue files (`recover_journal_sync`).

The file format and the file operations shared with the rest of the storage code are in
`spool_format.py`; spools of earlier versions (`<qid>.eml` + `<qid>.json`) are converted on
start by `spool_migration.py`; the queue CLI's operations (list, retry, delete, dead letters)
are in `spool_admin.py`. This module is the store the running relay uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from mailrelay.relay.budget import Reservation
from mailrelay.relay.envelope import Envelope
from mailrelay.relay.fileio import fsync_dir, write_parts
from mailrelay.relay.journal import SUFFIX as _JOURNAL_SUFFIX
from mailrelay.relay.journal import Journal, pending_messages
from mailrelay.relay.spool_format import (
    DEAD,
    JOURNAL,
    LEGACY_ENVELOPE,
    LEGACY_MESSAGE,
    MSG,
    QID_RE,
    QUEUE,
    STATE,
    TMP,
    Claim,
    QueueEntry,
    RecipientState,
    SpoolError,
    decode_message,
    encode_header,
    extract_message_id,
    message_ids,
    move_message,
    new_queue_id,
    read_all,
    read_header_fd,
    read_message_fd,
    remove_message,
    save_state,
    state_or_none,
    write_file,
    write_message,
)
from mailrelay.relay.spool_format import load_entry as _load_entry
from mailrelay.relay.spool_format import try_claim as _try_claim
from mailrelay.relay.spool_migration import migrate_legacy

__all__ = [
    "JOURNAL_MAX_MESSAGE_BYTES",
    "Arrival",
    "Claim",
    "IncomingFile",
    "Loaded",
    "MessageLease",
    "QueueEntry",
    "RecipientState",
    "Spool",
    "SpoolError",
    "decode_message",
    "encode_header",
    "extract_message_id",
    "is_queue_id",
    "new_queue_id",
]

log = logging.getLogger(__name__)

# What the journal may hold at once per process (each message also stays in memory until
# its first attempt ends); beyond it, fresh messages get queue files as before.
_JOURNAL_MAX_MESSAGES = 256
_JOURNAL_MAX_BYTES = 16 << 20
# Bigger messages always get a queue file: the journal is for the common, small case.
JOURNAL_MAX_MESSAGE_BYTES = 1 << 20
# Room left in an incoming file's envelope line for what is only known at its end: the
# size is reserved at its widest, this covers the receive time's digits.
_HEADER_SLACK = 64
_WIDEST_SIZE = 10**15
# Debris (temp files, a lone .state) older than this is removed on start; younger files
# may belong to a live writer in another process.
_DEBRIS_AGE_SECONDS = 3600.0
# Markers of messages received from peers are kept this long (a replay of a hand-off
# after a lost answer, or a later drain of the sender's spool, is recognised meanwhile).
_SEEN_RETENTION_SECONDS = 7 * 86400.0
HANDOFF = "handoff"
# A batch from a peer is written by up to this many threads, each taking at least
# `_ADOPT_CHUNK_MIN` messages.
_ADOPT_THREADS = 4
_ADOPT_CHUNK_MIN = 8


class MessageLease:
    """One message in the hands of whoever works on it: the only thing that knows where
    it lives (this process's journal, or a queue file whose claim it holds).

    The store hands one out when a message is accepted (`enqueue_held`,
    `enqueue_incoming`: fresh, nobody else has seen it) or claimed for a retry (`lease`).
    The holder reads the bytes (`read`), records state as it goes (`defer`), and ends the
    lease once: `complete` (delivered: the message is gone), `dead_letter` then `release`,
    or `release` (the message stays queued where the next scan finds it). `entry` is the
    message's current state, updated in place by the holder. `reservation` is its share
    of the budget for bytes in flight (`budget.py`), released by whoever ends its pass.
    """

    __slots__ = ("_claim", "_data", "_fresh", "_spool", "entry", "reservation")

    def __init__(
        self,
        spool: Spool,
        entry: QueueEntry,
        data: bytes | None,
        claim: Claim | None,
        *,
        fresh: bool,
        reservation: Reservation | None = None,
    ) -> None:
        self._spool = spool
        self.entry = entry
        self._data = data
        self._claim = claim
        self._fresh = fresh
        self.reservation = reservation

    @property
    def queue_id(self) -> str:
        """The message's queue id."""
        return self.entry.queue_id

    @property
    def claim(self) -> Claim | None:
        """The flock on the message's queue file; None for a message in the journal.
        For the store's own tests and tools: holders never need it."""
        return self._claim

    @property
    def pins_descriptor(self) -> bool:
        """Whether holding this lease keeps a file open (holders bound how many wait)."""
        return self._claim is not None

    def release_reservation(self) -> None:
        """Give the message's bytes back to the budget (idempotent)."""
        if self.reservation is not None:
            self.reservation.release()

    async def read(self) -> bytes:
        """The exact bytes to deliver (from memory, or read through the claim)."""
        if self._data is None:
            claim = self._claim
            assert claim is not None  # a message only memory holds always has its bytes
            return await asyncio.to_thread(Spool.read_claimed, claim)
        return self._data

    async def defer(self) -> int:
        """Record `entry` durably; the message stays queued. Returns the state's version
        (`Spool.queue_versions`). A journaled message gets its queue file now."""
        version = await self._spool.save(self.entry)
        self._fresh = False  # it may have a `.state` now
        return version

    async def dead_letter(self, reason: str) -> None:
        """Park the message in the dead letters with `reason`; `release` the lease after."""
        await self._spool.move_to_dead_letter(self.entry, reason)

    async def complete(self) -> None:
        """Every recipient is done and none failed: forget the message and end the lease."""
        claim, self._claim = self._claim, None
        if claim is None:
            self._spool.finish_journaled(self.queue_id)  # a done mark: no file work
            return
        # Closing the flocked descriptor can take 0.4 ms: in the same thread hop as
        # removing the files. A fresh message was never saved: it has no `.state`.
        await asyncio.to_thread(
            self._spool.remove_and_release, self.queue_id, claim, state_file=not self._fresh
        )

    async def hand_over(self) -> None:
        """A peer holds the message durably now: forget it here and end the lease
        (`Spool.hand_over` does many at once)."""
        await self._spool.hand_over([self])

    def _take_claim(self) -> Claim | None:
        claim, self._claim = self._claim, None
        return claim

    async def release(self) -> int | None:
        """End the lease, the message staying queued where the next scan finds it.

        A journaled message gets its queue file with `entry` as its state (returns that
        state's version); on OSError it is still in the journal and the lease still
        holds it (call again later; a stop or a restart also moves it on). A queue file's
        claim is dropped (returns None).
        """
        claim, self._claim = self._claim, None
        if claim is not None:
            await asyncio.to_thread(claim.release)
            return None
        if not self._spool.is_journaled(self.queue_id):
            return None  # deferred or dead-lettered during the pass: it has its file
        return await asyncio.shield(self._spool.save(self.entry))


@dataclass(frozen=True, slots=True)
class Arrival:
    """A message being received, as its queue file will record it: the envelope, the
    route of each recipient and who sent it."""

    envelope: Envelope
    routes: tuple[str, ...]  # the route name of each of `envelope.recipients`, in order
    client_address: str
    authenticated_user: str | None

    def __post_init__(self) -> None:
        if len(self.routes) != len(self.envelope.recipients):
            raise ValueError("an arrival needs one route per recipient")

    @property
    def queue_id(self) -> str:
        """The queue id the message will have."""
        return self.envelope.queue_id

    def routed_recipients(self) -> list[tuple[str, str]]:
        """(address, route name) per recipient, as the queue file records them."""
        return list(zip(self.envelope.recipients, self.routes, strict=True))


class IncomingFile:
    """A message's queue file written as its body arrives (`Spool.open_incoming`).

    It sits in tmp/ as `<qid>.msg`: first a region reserved for the envelope line (only
    complete once the size is known), then the bytes, appended with `write`.
    `Spool.enqueue_incoming` fills the envelope line in and moves it into the queue;
    `discard` drops it. Blocking methods: call them in a thread.
    """

    def __init__(
        self, arrival: Arrival, path: Path, fd: int, reserve: int, message_id: str | None
    ) -> None:
        self.arrival = arrival
        self.path = path
        self.fd = fd
        self.reserve = reserve
        self.message_id = message_id
        self.size = 0

    def write(self, parts: list[bytes]) -> None:
        """Append message bytes."""
        write_parts(self.fd, parts)
        self.size += sum(len(part) for part in parts)

    def discard(self) -> None:
        """Close and remove the file (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


Loaded: TypeAlias = "tuple[Claim, QueueEntry, bytes] | Literal['busy', 'gone']"
"""What `Spool.claim_and_load` found: the claim with the current state and bytes, or why not."""


class _DirSync:
    """Group commit for directory fsyncs: one fsync serves every rename made before it began.

    The directory stays open between syncs: opening and closing it around each fsync
    cost two more syscalls per sync, each tens of microseconds under load where we run.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fd: int | None = None
        self._started = 0  # generation of the latest sync that has started
        self._done = 0  # generation of the latest sync that has finished
        self._running: asyncio.Future[None] | None = None
        self.syncs = 0  # fsyncs actually made, for benchmarks and tests

    def _fsync(self) -> None:
        if self._fd is None:
            self._fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(self._fd)
        except OSError:
            # Start over from a fresh descriptor next time (the directory may be new).
            self.close()
            raise

    def close(self) -> None:
        """Close the directory descriptor (a later sync opens it again)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    async def sync(self) -> None:
        """Return once a directory fsync that started after this call has finished."""
        need = self._started + 1
        while self._done < need:
            if self._running is not None:
                # A sync is in flight; it may have started before our rename, so wait for
                # it and then, if still needed, for the next one.
                await asyncio.shield(self._running)
                continue
            self._started += 1
            generation = self._started
            loop = asyncio.get_running_loop()
            self._running = loop.create_future()
            try:
                await asyncio.to_thread(self._fsync)
                self.syncs += 1
            except BaseException as exc:
                self._running.set_exception(exc)
                # Everyone waiting sees the error; nobody may believe it was durable.
                self._running.exception()  # mark retrieved for waiters that went away
                raise
            else:
                self._done = generation
                self._running.set_result(None)
            finally:
                self._running = None


class Spool:
    """The on-disk queue; blocking file work runs in threads so the event loop never waits."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.tmp_dir = self.directory / TMP
        self.queue_dir = self.directory / QUEUE
        self.dead_dir = self.directory / DEAD
        self.journal_dir = self.directory / JOURNAL
        self.seen_dir = self.directory / HANDOFF
        self._clock = clock
        self._queue_sync = _DirSync(self.queue_dir)
        self._dead_sync = _DirSync(self.dead_dir)
        self._seen_sync = _DirSync(self.seen_dir)
        self._journal = Journal(self.journal_dir, self.tmp_dir)
        # Messages in our journal: envelope line as enqueued, and bytes (to write a queue
        # file when needed).
        self._journaled: dict[str, tuple[bytes, bytes]] = {}
        self._journaled_bytes = 0

    def close(self) -> None:
        """Release the directory descriptors kept for group commits (the spool stays usable)."""
        self._queue_sync.close()
        self._dead_sync.close()
        self._seen_sync.close()

    async def aclose(self) -> None:
        """`close`, after moving what is left in the journal to queue files.

        What is left never had a delivery attempt (the engine stopped first), so its
        envelope as enqueued is current. After a clean stop the spool is all queue files,
        readable by the queue CLI and by relay versions without a journal.
        """
        if self._journaled:
            left = dict(self._journaled)
            await asyncio.to_thread(self._write_queue_files, left)
            for queue_id in left:
                self.finish_journaled(queue_id)
            log.info("Moved %d message(s) from the journal to queue files", len(left))
        await self._journal.close()
        self.close()

    def _write_queue_files(self, messages: dict[str, tuple[bytes, bytes]]) -> None:
        for queue_id, (head, data) in messages.items():
            write_message(self.tmp_dir, self.queue_dir, queue_id, head, data)
        fsync_dir(self.queue_dir)

    def _folder(self, dead: bool) -> Path:
        return self.dead_dir if dead else self.queue_dir

    # -- setup ------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directories, convert an old spool, clear debris that belongs to nobody."""
        await asyncio.to_thread(self.start_sync)

    def start_sync(self) -> None:
        """Blocking `start`, for the CLI and tests outside an event loop."""
        for path in (self.tmp_dir, self.queue_dir, self.dead_dir, self.journal_dir, self.seen_dir):
            path.mkdir(parents=True, exist_ok=True)
        migrate_legacy(self.directory)
        self.recover_journal_sync()
        self._sweep_seen(time.time() - _SEEN_RETENTION_SECONDS)
        cutoff = time.time() - _DEBRIS_AGE_SECONDS
        for path in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    log.info("Removed stale temp file %s from the spool", path.name)
        for folder in (self.queue_dir, self.dead_dir):
            # A lone .state is left by a crash while removing a message; a lone .eml by a
            # crash of a relay of the two-file format while writing one.
            for lone, partner in ((STATE, MSG), (LEGACY_MESSAGE, LEGACY_ENVELOPE)):
                for path in folder.glob(f"*{lone}"):
                    with contextlib.suppress(FileNotFoundError):
                        if not path.with_suffix(partner).exists() and path.stat().st_mtime < cutoff:
                            path.unlink()
                            log.info("Removed debris %s from the spool", path.name)

    @property
    def directory_syncs(self) -> int:
        """How many queue-directory fsyncs were made (group commit makes this < messages)."""
        return self._queue_sync.syncs

    # -- accepting --------------------------------------------------------------------

    async def enqueue(
        self,
        mail_from: str,
        recipients: list[tuple[str, str]],
        data: bytes,
        *,
        smtputf8: bool,
        body_8bitmime: bool,
        client_address: str,
        authenticated_user: str | None,
        queue_id: str | None = None,
    ) -> QueueEntry:
        """Store a message durably; when this returns, a crash can no longer lose it.

        `queue_id` lets the caller name the message before it is written (the SMTP front
        puts the id in its Received header); by default a new one is made.
        """
        entry = self._new_entry(
            mail_from,
            recipients,
            data,
            smtputf8=smtputf8,
            body_8bitmime=body_8bitmime,
            client_address=client_address,
            authenticated_user=authenticated_user,
            queue_id=queue_id,
        )
        await self._store(entry, data, hold=False)
        return entry

    async def enqueue_held(
        self,
        mail_from: str,
        recipients: list[tuple[str, str]],
        data: bytes,
        *,
        smtputf8: bool,
        body_8bitmime: bool,
        client_address: str,
        authenticated_user: str | None,
        queue_id: str | None = None,
        journal: bool = False,
        reservation: Reservation | None = None,
    ) -> MessageLease:
        """`enqueue`, keeping hold of the message: the caller must finish or release it.

        Why: the first delivery attempt of a fresh message then starts from memory, saving
        a thread hop and several file syscalls (open, flock, reading the file back). With
        `journal` (and room in it), the message goes to the journal and the lease has no
        claim. Either way the caller must end the lease (`MessageLease`).
        """
        entry = self._new_entry(
            mail_from,
            recipients,
            data,
            smtputf8=smtputf8,
            body_8bitmime=body_8bitmime,
            client_address=client_address,
            authenticated_user=authenticated_user,
            queue_id=queue_id,
        )
        if journal and self._journal_has_room(len(data)):
            head = encode_header(entry)
            # Counted before the append, so concurrent sessions cannot overrun the bound.
            self._journaled[entry.queue_id] = head, data
            self._journaled_bytes += len(data)
            try:
                await self._journal.append(entry.queue_id, [head, data])
            except BaseException:
                del self._journaled[entry.queue_id]
                self._journaled_bytes -= len(data)
                raise
            return MessageLease(self, entry, data, None, fresh=True, reservation=reservation)
        claim = await self._store(entry, data, hold=True)
        assert claim is not None
        return MessageLease(self, entry, data, claim, fresh=True, reservation=reservation)

    def _journal_has_room(self, size: int) -> bool:
        return (
            self._journal.accepting
            and size <= JOURNAL_MAX_MESSAGE_BYTES
            and len(self._journaled) < _JOURNAL_MAX_MESSAGES
            and self._journaled_bytes + size <= _JOURNAL_MAX_BYTES
        )

    def _new_entry(
        self,
        mail_from: str,
        recipients: list[tuple[str, str]] | tuple[tuple[str, str], ...],
        data: bytes | None,
        *,
        smtputf8: bool,
        body_8bitmime: bool,
        client_address: str,
        authenticated_user: str | None,
        queue_id: str | None,
        size: int = 0,
        message_id: str | None = None,
    ) -> QueueEntry:
        if data is not None:
            size, message_id = len(data), extract_message_id(data)
        now = self._clock()
        return QueueEntry(
            queue_id=queue_id or new_queue_id(now),
            mail_from=mail_from,
            recipients=[
                RecipientState(address=address, route=route, next_attempt_at=now)
                for address, route in recipients
            ],
            received_at=now,
            size=size,
            smtputf8=smtputf8,
            body_8bitmime=body_8bitmime,
            client_address=client_address,
            authenticated_user=authenticated_user,
            message_id=message_id,
        )

    def _arrival_entry(self, arrival: Arrival, size: int, message_id: str | None) -> QueueEntry:
        return self._new_entry(
            arrival.envelope.mail_from,
            arrival.routed_recipients(),
            None,
            smtputf8=arrival.envelope.smtputf8,
            body_8bitmime=arrival.envelope.body_8bitmime,
            client_address=arrival.client_address,
            authenticated_user=arrival.authenticated_user,
            queue_id=arrival.queue_id,
            size=size,
            message_id=message_id,
        )

    # -- accepting a message streamed as it arrives -------------------------------------

    def open_incoming(self, arrival: Arrival, head: bytes) -> IncomingFile:
        """Start the queue file of a message whose bytes will be appended as they arrive
        (blocking). `head` is its beginning, which holds its header section (for the
        Message-ID); the bytes are appended with `IncomingFile.write`, `head` included."""
        message_id = extract_message_id(head)
        draft = self._arrival_entry(arrival, _WIDEST_SIZE, message_id)
        reserve = len(encode_header(draft)) + _HEADER_SLACK
        path = self.tmp_dir / f"{arrival.queue_id}{MSG}"
        # Read and write: the first delivery attempt reads the bytes back through the claim.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.lseek(fd, reserve, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        return IncomingFile(arrival, path, fd, reserve, message_id)

    async def enqueue_incoming(
        self, incoming: IncomingFile, reservation: Reservation | None = None
    ) -> MessageLease:
        """Store a message written with `open_incoming` durably, held like `enqueue_held`
        (the bytes stay on disk: the lease reads them through its claim). On an error the
        file is gone and nothing was stored."""
        entry = self._arrival_entry(incoming.arrival, incoming.size, incoming.message_id)
        try:
            fd = await asyncio.to_thread(self._finish_incoming, incoming, entry)
        except BaseException:
            await asyncio.to_thread(incoming.discard)
            raise
        claim = Claim(entry.queue_id, fd)
        try:
            await self._queue_sync.sync()
        except BaseException:
            await asyncio.to_thread(claim.release)
            raise
        return MessageLease(self, entry, None, claim, fresh=True, reservation=reservation)

    def _finish_incoming(self, incoming: IncomingFile, entry: QueueEntry) -> int:
        """Write the envelope line, fsync, flock, rename into queue/; returns the held fd."""
        head = encode_header(entry)
        if len(head) > incoming.reserve:
            self._widen_header(incoming, len(head))
        # JSON allows whitespace after the value: the line is padded to the reserved size.
        line = head[:-1] + b" " * (incoming.reserve - len(head)) + b"\n"
        os.pwrite(incoming.fd, line, 0)
        os.fsync(incoming.fd)
        fcntl.flock(incoming.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(incoming.path, self.queue_dir / f"{entry.queue_id}{MSG}")
        fd, incoming.fd = incoming.fd, -1
        return fd

    def _widen_header(self, incoming: IncomingFile, needed: int) -> None:
        """Copy the bytes to a new temp file with room for a longer envelope line than
        reserved (never expected: the reserve assumes the widest size)."""
        path = self.tmp_dir / f"{incoming.arrival.queue_id}.{random.getrandbits(32):08x}{MSG}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            offset, target = incoming.reserve, needed
            end = incoming.reserve + incoming.size
            while offset < end:
                copied = os.copy_file_range(incoming.fd, fd, end - offset, offset, target)
                if copied == 0:
                    raise OSError(f"incoming message {incoming.arrival.queue_id} shrank")
                offset += copied
                target += copied
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        incoming.discard()
        incoming.path, incoming.fd, incoming.reserve = path, fd, needed

    async def _store(self, entry: QueueEntry, data: bytes, *, hold: bool) -> Claim | None:
        """Write the queue file, then wait for the group-committed directory fsync."""
        fd = await asyncio.to_thread(self._write_new, entry, data, hold)
        claim = None if fd is None else Claim(entry.queue_id, fd)
        try:
            await self._queue_sync.sync()
        except BaseException:
            if claim is not None:
                await asyncio.to_thread(claim.release)
            raise
        return claim

    def _write_new(self, entry: QueueEntry, data: bytes, hold: bool) -> int | None:
        """Write the `.msg` in tmp/, fsync, rename into queue/; with `hold`, return it flocked.

        The flock is taken before the rename makes the message visible, so the caller owns
        the claim from the first moment anyone else could see the message.
        """
        qid = entry.queue_id
        return write_file(
            self.tmp_dir / f"{qid}{MSG}",
            encode_header(entry),
            data,
            self.queue_dir / f"{qid}{MSG}",
            hold=hold,
        )

    # -- state ------------------------------------------------------------------------

    async def save(self, entry: QueueEntry) -> int:
        """Record the entry's state atomically; returns its version (see `queue_versions`).

        A message in our journal gets its queue file now, with this state in its envelope
        line (version 0, as for any `.msg` without a `.state`), and leaves the journal.
        """
        if entry.queue_id in self._journaled:
            await self._move_out_of_journal(entry, self.queue_dir)
            return 0
        return await asyncio.to_thread(save_state, self.tmp_dir, entry, self.queue_dir)

    def is_journaled(self, queue_id: str) -> bool:
        """Whether the message lives in this process's journal (no queue file yet)."""
        return queue_id in self._journaled

    @property
    def journaled_count(self) -> int:
        """Messages in this process's journal (fresh, first attempt not ended)."""
        return len(self._journaled)

    def finish_journaled(self, queue_id: str) -> None:
        """A message of our journal is delivered: mark it done (no file work on this path)."""
        message = self._journaled.pop(queue_id, None)
        if message is not None:
            self._journaled_bytes -= len(message[1])
            self._journal.done(queue_id)

    async def _move_out_of_journal(self, entry: QueueEntry, folder: Path) -> None:
        """Write a journaled message's `.msg` into `folder` with `entry` as its state, make
        it durable (file and directory fsync), then mark it done in the journal."""
        qid = entry.queue_id
        _, data = self._journaled[qid]
        await asyncio.to_thread(
            write_message, self.tmp_dir, folder, qid, encode_header(entry), data
        )
        await (self._dead_sync if folder == self.dead_dir else self._queue_sync).sync()
        self.finish_journaled(qid)

    def load_entry(self, queue_id: str, *, dead: bool = False) -> QueueEntry | None:
        """The current state of one message, or None if it is gone (blocking)."""
        return _load_entry(self._folder(dead), queue_id)

    async def read_entry(self, queue_id: str, *, dead: bool = False) -> QueueEntry | None:
        """`load_entry` off the event loop."""
        return await asyncio.to_thread(self.load_entry, queue_id, dead=dead)

    def claim_and_load(self, queue_id: str) -> Loaded:
        """Claim a queued message, then read its current state and bytes (blocking).

        "busy": another holder has it; "gone": it was delivered, deleted or dead-lettered.
        The bytes are read through the claimed descriptor: no second open.
        """
        path = self.queue_dir / f"{queue_id}{MSG}"
        claim = self.try_claim(queue_id)
        if claim is None:
            return "busy" if path.exists() else "gone"
        try:
            # The holder we waited for may have removed or dead-lettered it meanwhile.
            if not path.exists():
                claim.release()
                return "gone"
            entry, data = read_message_fd(claim.fileno())
            state = state_or_none(self.queue_dir, queue_id)
        except BaseException:
            claim.release()
            raise
        return claim, state or entry, data

    def lease(self, queue_id: str) -> MessageLease | Literal["busy", "gone"]:
        """Claim a queued message for a delivery pass and hand it over as a lease (blocking).

        "busy": another holder has it; "gone": it was delivered, deleted or dead-lettered.
        The bytes are not read yet (`MessageLease.read`, once there is room for them).
        """
        peeked = self.claim_entry(queue_id)
        if isinstance(peeked, str):
            return peeked
        claim, entry = peeked
        return MessageLease(self, entry, None, claim, fresh=False)

    def claim_entry(self, queue_id: str) -> tuple[Claim, QueueEntry] | Literal["busy", "gone"]:
        """`claim_and_load` without the bytes (read them with `read_claimed` once there is
        room for them in memory)."""
        path = self.queue_dir / f"{queue_id}{MSG}"
        claim = self.try_claim(queue_id)
        if claim is None:
            return "busy" if path.exists() else "gone"
        try:
            if not path.exists():
                claim.release()
                return "gone"
            os.lseek(claim.fileno(), 0, os.SEEK_SET)
            entry = QueueEntry.model_validate_json(read_header_fd(claim.fileno()))
            state = state_or_none(self.queue_dir, queue_id)
        except BaseException:
            claim.release()
            raise
        return claim, state or entry

    @staticmethod
    def read_claimed(claim: Claim) -> bytes:
        """The bytes of a claimed queued message (blocking)."""
        return read_message_fd(claim.fileno())[1]

    async def remove(self, queue_id: str) -> None:
        """Forget a message whose recipients are all done."""
        await asyncio.to_thread(remove_message, queue_id, self.queue_dir)

    def remove_and_release(self, queue_id: str, claim: Claim, *, state_file: bool = True) -> None:
        """Forget a delivered message, then drop its claim: one thread hop for both.

        `state_file=False` is for a message the caller knows has no `.state` (held since
        it was written, never saved): it skips a failing unlink. Were it wrong, the
        `.state` left would be debris, removed on a later start.
        """
        try:
            remove_message(queue_id, self.queue_dir, state_file=state_file)
        finally:
            claim.release()

    async def enqueue_dead_letter(
        self,
        mail_from: str,
        recipients: list[tuple[str, str]],
        data: bytes,
        reason: str,
        *,
        smtputf8: bool,
        body_8bitmime: bool,
    ) -> QueueEntry:
        """Store a new message straight into deadletter/ with its reason (a bounce no route
        takes): it is never in queue/, so no delivery pass sees it and a crash cannot leave
        it queued for a route that does not exist."""
        entry = self._new_entry(
            mail_from,
            recipients,
            data,
            smtputf8=smtputf8,
            body_8bitmime=body_8bitmime,
            client_address="",
            authenticated_user=None,
            queue_id=None,
        ).model_copy(update={"dead_reason": reason})
        await asyncio.to_thread(
            write_message, self.tmp_dir, self.dead_dir, entry.queue_id, encode_header(entry), data
        )
        await self._dead_sync.sync()
        return entry

    async def move_to_dead_letter(self, entry: QueueEntry, reason: str) -> None:
        """Park a message that failed for good in deadletter/, with its reason."""
        dead = entry.model_copy(update={"dead_reason": reason})
        if entry.queue_id in self._journaled:
            await self._move_out_of_journal(dead, self.dead_dir)
            return
        await asyncio.to_thread(move_message, self.tmp_dir, dead, self.queue_dir, self.dead_dir)
        await self._dead_sync.sync()

    # -- hand-off between relays --------------------------------------------------------

    async def adopt(
        self, messages: list[tuple[QueueEntry, bytes]]
    ) -> list[Literal["stored", "duplicate"]]:
        """Queue messages a peer hands over, each under its own queue id and with its state
        (attempts, per-recipient results, first arrival); durable when this returns.

        A message this spool holds already (queued, dead-lettered, or received from a peer
        before and not handed on since) is a "duplicate" and not stored again, so a
        replayed or retried hand-off keeps one copy. Concurrent adopters of one id (other
        worker processes) are settled by the hard link into queue/, which never replaces.
        """
        # Each message costs a file fsync: a batch is split over a few threads, whose
        # fsyncs the file system commits together.
        size = max(_ADOPT_CHUNK_MIN, -(-len(messages) // _ADOPT_THREADS))
        chunks = [messages[i : i + size] for i in range(0, len(messages), size)]
        done = await asyncio.gather(
            *(asyncio.to_thread(self._adopt_sync, chunk) for chunk in chunks),
            return_exceptions=True,
        )
        outcomes: list[Literal["stored", "duplicate"]] = []
        claims: list[Claim] = []
        failed: BaseException | None = None
        for result in done:
            if isinstance(result, BaseException):
                failed = failed or result
                continue
            outcomes += result[0]
            claims += result[1]
        if failed is not None:
            await asyncio.to_thread(_release_all, claims)
            raise failed
        try:
            if claims:
                await self._queue_sync.sync()
                await self._seen_sync.sync()
        finally:
            # Held until durable, so no engine delivers (and removes) a message whose
            # marker could still be lost.
            if claims:
                await asyncio.to_thread(_release_all, claims)
        return outcomes

    def _adopt_sync(
        self, messages: list[tuple[QueueEntry, bytes]]
    ) -> tuple[list[Literal["stored", "duplicate"]], list[Claim]]:
        outcomes: list[Literal["stored", "duplicate"]] = []
        claims: list[Claim] = []
        try:
            for entry, data in messages:
                qid = entry.queue_id
                if not QID_RE.match(qid) or len(data) != entry.size:
                    raise SpoolError(f"message {qid!r} has a bad queue id or size")
                if self._holds(qid):
                    outcomes.append("duplicate")
                    continue
                tmp = self.tmp_dir / f"{qid}.{random.getrandbits(32):08x}.adopt"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                claim: Claim | None = None
                try:
                    write_parts(fd, [encode_header(entry), data])
                    os.fsync(fd)
                    # Taken before the link makes the message visible to the engines.
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp, self.queue_dir / f"{qid}{MSG}")
                        claim = Claim(qid, fd)
                finally:
                    if claim is None:
                        os.close(fd)
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                if claim is None:
                    outcomes.append("duplicate")
                    continue
                claims.append(claim)
                # The marker outlives delivery: a replay finds it when the message is gone.
                os.close(os.open(self.seen_dir / qid, os.O_WRONLY | os.O_CREAT, 0o640))
                outcomes.append("stored")
        except BaseException:
            _release_all(claims)
            raise
        return outcomes, claims

    def _holds(self, queue_id: str) -> bool:
        name = f"{queue_id}{MSG}"
        return (
            (self.seen_dir / queue_id).exists()
            or (self.queue_dir / name).exists()
            or (self.dead_dir / name).exists()
            or queue_id in self._journaled
        )

    async def hand_over(self, leases: list[MessageLease]) -> None:
        """Peers hold these messages durably now: forget them here and end their leases.

        Markers of messages that came from a peer are dropped (durably) before the files,
        so a message handed back to this relay later is taken again, never answered as a
        duplicate while nobody holds it.
        """
        if any(lease.queue_id in self._journaled for lease in leases):
            raise SpoolError("a message in the journal cannot be handed over; release it first")
        claims = [claim for lease in leases if (claim := lease._take_claim()) is not None]
        await asyncio.to_thread(self._hand_over_sync, claims)

    def _hand_over_sync(self, claims: list[Claim]) -> None:
        try:
            dropped = False
            for claim in claims:
                with contextlib.suppress(FileNotFoundError):
                    (self.seen_dir / claim.queue_id).unlink()
                    dropped = True
            if dropped:
                fsync_dir(self.seen_dir)
            for claim in claims:
                remove_message(claim.queue_id, self.queue_dir)
        finally:
            _release_all(claims)

    def _sweep_seen(self, cutoff: float) -> None:
        with os.scandir(self.seen_dir) as it:
            for item in it:
                with contextlib.suppress(FileNotFoundError):
                    if item.stat().st_mtime < cutoff:
                        os.unlink(item.path)

    # -- claims -----------------------------------------------------------------------

    def try_claim(self, queue_id: str, *, dead: bool = False) -> Claim | None:
        """Claim a message without waiting; None if another holder has it or it is gone."""
        return _try_claim(self._folder(dead), queue_id)

    # -- listing ----------------------------------------------------------------------

    def queue_ids(self) -> list[str]:
        """Queued ids without parsing envelopes (cheap, for metrics)."""
        return sorted(message_ids(self.queue_dir))

    def iter_queue_ids(self) -> Iterator[str]:
        """Queued ids in directory order, for scans that do not need sorting."""
        return message_ids(self.queue_dir)

    def count_dead_letters(self) -> int:
        """How many dead letters there are (for the gauge)."""
        return sum(1 for _ in message_ids(self.dead_dir))

    def queue_versions(self) -> dict[str, int]:
        """Each queued id with the version of its state: 0 as enqueued, else its `.state` mtime.

        A change of version means someone recorded a new state. One directory listing, and
        a stat only for the few messages that have a `.state`.
        """
        messages: list[str] = []
        states: dict[str, int] = {}
        with os.scandir(self.queue_dir) as it:
            for item in it:
                name = item.name
                if name.endswith(MSG):
                    messages.append(name[: -len(MSG)])
                elif name.endswith(STATE):
                    with contextlib.suppress(FileNotFoundError):
                        states[name[: -len(STATE)]] = item.stat().st_mtime_ns
        return {qid: states.get(qid, 0) for qid in messages if QID_RE.match(qid)}

    # -- the journal's leftovers --------------------------------------------------------

    def recover_journal_sync(self) -> int:
        """Write queue files for the messages of journal segments nobody holds; returns how many.

        A segment's writer holds its flock while it has messages not done, so a segment we
        can lock was left by a process that exited or crashed. Its messages without a done
        mark become queue files (unless one exists: a crash after `save` and before the
        mark), the queue directory is fsync'd, and only then is the segment removed.
        """
        if not self.journal_dir.is_dir():
            return 0
        recovered = 0
        for path in sorted(self.journal_dir.glob(f"*{_JOURNAL_SUFFIX}")):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # retired by its writer or recovered by someone else meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer's segment
                if os.fstat(fd).st_nlink == 0:
                    continue  # removed between our open and our lock
                recovered += self._recover_segment(path, read_all(fd))
            finally:
                os.close(fd)
        return recovered

    def _recover_segment(self, path: Path, raw: bytes) -> int:
        written = 0
        for queue_id, content in pending_messages(raw).items():
            if not QID_RE.match(queue_id):
                log.warning("Skipped a journal record with a bad queue id in %s", path.name)
                continue
            name = f"{queue_id}{MSG}"
            if (self.queue_dir / name).exists() or (self.dead_dir / name).exists():
                continue
            try:
                decode_message(content)
            except ValueError as exc:
                log.warning("Skipped unreadable message %s in %s: %s", queue_id, path.name, exc)
                continue
            write_message(self.tmp_dir, self.queue_dir, queue_id, content, b"")
            written += 1
        if written:
            fsync_dir(self.queue_dir)
            log.info("Recovered %d message(s) from journal segment %s", written, path.name)
        path.unlink()
        return written

    # -- health -----------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Free bytes available to us on the spool's file system."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def writable(self) -> bool:
        """Whether a file can be created in tmp/ (for /readyz)."""
        probe = self.tmp_dir / f".probe-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return True


def _release_all(claims: list[Claim]) -> None:
    for claim in claims:
        claim.release()


def is_queue_id(value: str) -> bool:
    """Whether `value` has the form of a queue id (safe as a file name)."""
    return QID_RE.match(value) is not None
