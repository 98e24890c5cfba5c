"""The durable spool: nothing the relay acknowledged is ever lost.

Layout under the spool directory::

    tmp/         files being written; renamed into place once fsync'd
    queue/       <qid>.eml (exact bytes to deliver) + <qid>.json (envelope state)
    deadletter/  the same pair for messages that failed for good, with `dead_reason`

The `.json` is the commit record: it is renamed into `queue/` after its `.eml` is
complete, so a `.json` there always has its message, and a lone `.eml` is debris from a
crash (or a message still being written). Each state change rewrites the `.json`
atomically (temp file, fsync, rename).

Durability before `250`: in one worker-thread hop the `.eml` is created directly under
its final name in `queue/` and fsync'd (nothing lists `.eml` files, so it needs no
rename), then the `.json` is written to `tmp/`, fsync'd and renamed into `queue/`; then
the directory is fsync'd. Directory fsyncs are shared between concurrent enqueues (group
commit): a caller waits for the first directory sync that *starts* after its rename, so
one fsync can cover many sessions. Every file syscall costs tens of microseconds or
more where we run (gVisor), so the write path is counted in syscalls.

Several processes (SO_REUSEPORT workers, the queue CLI) may share a spool. A message is
claimed with `flock` on its `.eml` (never rewritten, unlike the `.json`), so two
processes never deliver or edit the same message at once. After claiming, re-read the
entry with `load_entry`: another process may have changed or removed it meanwhile.

`enqueue_held` takes the claim on the `.eml` while writing it, before the `.json` makes
the message visible, and hands back the claim with the entry and bytes (`HeldMessage`):
the SMTP front passes that to its delivery engine, whose first attempt then needs no
claim, no re-read and no thread hop, because nobody else can have seen the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "Claim",
    "HeldMessage",
    "QueueEntry",
    "RecipientState",
    "Spool",
    "SpoolError",
    "new_queue_id",
]

log = logging.getLogger(__name__)

_TMP, _QUEUE, _DEAD = "tmp", "queue", "deadletter"
# Debris (temp files, a lone .eml) older than this is removed on start; younger files may
# belong to a live writer in another process.
_DEBRIS_AGE_SECONDS = 3600.0
_QID_RE = re.compile(r"^[0-9A-F]{24}$")
_MESSAGE_ID_RE = re.compile(
    rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE
)

_counter = itertools.count()


def new_queue_id(now: float | None = None) -> str:
    """A queue id that sorts by time and is unique across processes and hosts.

    14 hex digits of microseconds, then 4 of pid and counter, then 6 random: 24 upper-case
    hex characters, safe as a file name and short enough to read in logs.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    local = ((os.getpid() & 0xFF) << 8) | (next(_counter) & 0xFF)
    # Not secret, just unique: the PRNG (seeded from urandom, reseeded after fork) saves
    # a getrandom syscall per message.
    return f"{micros:014X}{local:04X}{random.getrandbits(24):06X}"


class SpoolError(Exception):
    """A spool operation that cannot be done (unknown queue id, message busy, ...)."""


class RecipientState(BaseModel):
    """Delivery state of one recipient of a queued message."""

    model_config = ConfigDict(extra="ignore")

    address: str
    route: str
    status: Literal["pending", "delivered", "bounced", "deferred"] = "pending"
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: float = 0.0
    upstream: str | None = None


class QueueEntry(BaseModel):
    """The envelope and state of one queued message (`<qid>.json`)."""

    model_config = ConfigDict(extra="ignore")

    queue_id: str
    mail_from: str
    recipients: list[RecipientState]
    received_at: float
    size: int
    smtputf8: bool = False
    body_8bitmime: bool = False
    client_address: str = ""
    authenticated_user: str | None = None
    message_id: str | None = None
    dead_reason: str | None = None


def extract_message_id(data: bytes) -> str | None:
    """The Message-ID header value, looked up in the header section only."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    head = data if end < 0 else data[:end]
    match = _MESSAGE_ID_RE.search(head)
    if match is None:
        return None
    value = re.sub(rb"\s+", b" ", match.group(1)).strip()
    return value.decode("utf-8", "replace") or None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_durably(path: Path, data: bytes) -> None:
    """Create `path` with `data` and fsync it (no rename: the caller decides where it goes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class Claim:
    """An exclusive claim on one queued message (flock on its .eml); release when done."""

    def __init__(self, queue_id: str, fd: int) -> None:
        self.queue_id = queue_id
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock; closing the descriptor releases the flock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


@dataclass(frozen=True, slots=True)
class HeldMessage:
    """A message just enqueued whose writer still holds its claim (see `enqueue_held`)."""

    entry: QueueEntry
    data: bytes
    claim: Claim


class _DirSync:
    """Group commit for directory fsyncs: one fsync serves every rename made before it began."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._started = 0  # generation of the latest sync that has started
        self._done = 0  # generation of the latest sync that has finished
        self._running: asyncio.Future[None] | None = None
        self.syncs = 0  # fsyncs actually made, for benchmarks and tests

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
                await asyncio.to_thread(_fsync_dir, self._directory)
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
        self.tmp_dir = self.directory / _TMP
        self.queue_dir = self.directory / _QUEUE
        self.dead_dir = self.directory / _DEAD
        self._clock = clock
        self._queue_sync = _DirSync(self.queue_dir)
        self._dead_sync = _DirSync(self.dead_dir)

    # -- setup ------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directories and clear crash debris old enough to belong to nobody."""
        await asyncio.to_thread(self.start_sync)

    def start_sync(self) -> None:
        """Blocking `start`, for the CLI and tests outside an event loop."""
        for path in (self.tmp_dir, self.queue_dir, self.dead_dir):
            path.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - _DEBRIS_AGE_SECONDS
        for path in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    log.info("Removed stale temp file %s from the spool", path.name)
        for folder in (self.queue_dir, self.dead_dir):
            for eml in folder.glob("*.eml"):
                with contextlib.suppress(FileNotFoundError):
                    if not eml.with_suffix(".json").exists() and eml.stat().st_mtime < cutoff:
                        eml.unlink()
                        log.info("Removed message %s without envelope from the spool", eml.stem)

    @property
    def directory_syncs(self) -> int:
        """How many queue-directory fsyncs were made (group commit makes this < messages)."""
        return self._queue_sync.syncs

    # -- accepting --------------------------------------------------------------------

    def _new_entry(
        self,
        mail_from: str,
        recipients: list[tuple[str, str]],
        data: bytes,
        *,
        smtputf8: bool,
        body_8bitmime: bool,
        client_address: str,
        authenticated_user: str | None,
        queue_id: str | None,
    ) -> QueueEntry:
        now = self._clock()
        entry = QueueEntry(
            queue_id=queue_id or new_queue_id(now),
            mail_from=mail_from,
            recipients=[
                RecipientState(address=address, route=route, next_attempt_at=now)
                for address, route in recipients
            ],
            received_at=now,
            size=len(data),
            smtputf8=smtputf8,
            body_8bitmime=body_8bitmime,
            client_address=client_address,
            authenticated_user=authenticated_user,
            message_id=extract_message_id(data),
        )
        return entry

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
        fd = await asyncio.to_thread(self._write_new, entry, data, hold=False)
        assert fd is None
        await self._queue_sync.sync()
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
    ) -> HeldMessage:
        """`enqueue`, keeping the claim taken while writing: the caller must release it.

        Why: the first delivery attempt of a fresh message then starts from memory, saving
        a thread hop and about ten file syscalls (open, flock, reading both files back).
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
        fd = await asyncio.to_thread(self._write_new, entry, data, hold=True)
        assert fd is not None
        claim = Claim(entry.queue_id, fd)
        try:
            await self._queue_sync.sync()
        except BaseException:
            await asyncio.to_thread(claim.release)
            raise
        return HeldMessage(entry, data, claim)

    def _write_new(self, entry: QueueEntry, data: bytes, *, hold: bool) -> int | None:
        """Write `.eml` in place, then commit with the `.json` (temp file + rename).

        With `hold`, the `.eml` is flocked before the `.json` exists and its descriptor is
        returned open: the caller owns the claim from the moment the message is visible.
        """
        qid = entry.queue_id
        eml = self.queue_dir / f"{qid}.eml"
        tmp_json = self.tmp_dir / f"{qid}.json"
        fd: int | None = None
        try:
            fd = os.open(eml, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            _write_all(fd, data)
            os.fsync(fd)
            if hold:
                # Nobody else can hold it yet: the .json that makes it visible is not there.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                os.close(fd)
                fd = None
            _write_durably(tmp_json, entry.model_dump_json().encode())
            os.rename(tmp_json, self.queue_dir / f"{qid}.json")
        except BaseException:
            if fd is not None:
                os.close(fd)
            for path in (tmp_json, eml):
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        return fd

    # -- state ------------------------------------------------------------------------

    async def save(self, entry: QueueEntry) -> None:
        """Rewrite the entry's state atomically (the message bytes never change)."""
        await asyncio.to_thread(self._save_sync, entry, self.queue_dir)

    def _save_sync(self, entry: QueueEntry, folder: Path) -> None:
        tmp = self.tmp_dir / f"{entry.queue_id}.{random.getrandbits(32):08x}.json"
        try:
            _write_durably(tmp, entry.model_dump_json().encode())
            os.rename(tmp, folder / f"{entry.queue_id}.json")
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    async def read_message(self, queue_id: str) -> bytes:
        """The exact bytes to deliver."""
        return await asyncio.to_thread((self.queue_dir / f"{queue_id}.eml").read_bytes)

    def load_entry(self, queue_id: str, *, dead: bool = False) -> QueueEntry | None:
        """The current state of one message, or None if it is gone."""
        folder = self.dead_dir if dead else self.queue_dir
        try:
            raw = (folder / f"{queue_id}.json").read_bytes()
        except FileNotFoundError:
            return None
        return QueueEntry.model_validate_json(raw)

    async def read_entry(self, queue_id: str, *, dead: bool = False) -> QueueEntry | None:
        """`load_entry` off the event loop."""
        return await asyncio.to_thread(self.load_entry, queue_id, dead=dead)

    async def remove(self, queue_id: str) -> None:
        """Forget a message whose recipients are all done (json first: it is the record)."""
        await asyncio.to_thread(self._remove_sync, queue_id, self.queue_dir)

    @staticmethod
    def _remove_sync(queue_id: str, folder: Path) -> None:
        for suffix in (".json", ".eml"):
            with contextlib.suppress(FileNotFoundError):
                (folder / f"{queue_id}{suffix}").unlink()

    async def move_to_dead_letter(self, entry: QueueEntry, reason: str) -> None:
        """Park a message that failed for good in deadletter/, with its reason."""
        dead = entry.model_copy(update={"dead_reason": reason})
        await asyncio.to_thread(self._move_dead_sync, dead)
        await self._dead_sync.sync()

    def _move_dead_sync(self, dead: QueueEntry) -> None:
        qid = dead.queue_id
        os.rename(self.queue_dir / f"{qid}.eml", self.dead_dir / f"{qid}.eml")
        self._save_sync(dead, self.dead_dir)
        with contextlib.suppress(FileNotFoundError):
            (self.queue_dir / f"{qid}.json").unlink()

    async def retry_dead_letter(self, queue_id: str) -> QueueEntry:
        """Put a dead letter back in the queue; undelivered recipients start over now."""
        entry = await asyncio.to_thread(self.retry_dead_letter_sync, queue_id)
        await self._queue_sync.sync()
        return entry

    def retry_dead_letter_sync(self, queue_id: str) -> QueueEntry:
        """Blocking `retry_dead_letter` (the CLI); fsyncs the queue directory itself."""
        entry = self.load_entry(queue_id, dead=True)
        if entry is None:
            raise SpoolError(f"no dead letter with queue id {queue_id}")
        now = self._clock()
        recipients = [
            r
            if r.status == "delivered"
            else r.model_copy(update={"status": "pending", "attempts": 0, "next_attempt_at": now})
            for r in entry.recipients
        ]
        # The maximum age counts again from the retry, or the engine would bounce at once.
        revived = entry.model_copy(
            update={"recipients": recipients, "dead_reason": None, "received_at": now}
        )
        os.rename(self.dead_dir / f"{queue_id}.eml", self.queue_dir / f"{queue_id}.eml")
        self._save_sync(revived, self.queue_dir)
        with contextlib.suppress(FileNotFoundError):
            (self.dead_dir / f"{queue_id}.json").unlink()
        _fsync_dir(self.queue_dir)
        return revived

    def retry_now_sync(self, queue_id: str) -> QueueEntry:
        """Make every undelivered recipient due now (the CLI's `queue retry`); claim first."""
        entry = self.load_entry(queue_id)
        if entry is None:
            raise SpoolError(f"no queued message with queue id {queue_id}")
        now = self._clock()
        recipients = [
            r.model_copy(update={"next_attempt_at": now, "status": "pending"})
            if r.status in ("pending", "deferred")
            else r
            for r in entry.recipients
        ]
        updated = entry.model_copy(update={"recipients": recipients})
        self._save_sync(updated, self.queue_dir)
        return updated

    def delete_sync(self, queue_id: str, *, dead: bool = False) -> None:
        """Delete a message for good (the CLI's `queue delete`); claim first."""
        folder = self.dead_dir if dead else self.queue_dir
        if not (folder / f"{queue_id}.json").exists():
            kind = "dead letter" if dead else "queued message"
            raise SpoolError(f"no {kind} with queue id {queue_id}")
        self._remove_sync(queue_id, folder)

    def read_message_sync(self, queue_id: str, *, dead: bool = False) -> bytes:
        """The stored bytes, for the CLI's `show`."""
        folder = self.dead_dir if dead else self.queue_dir
        return (folder / f"{queue_id}.eml").read_bytes()

    # -- claims -----------------------------------------------------------------------

    def try_claim(self, queue_id: str, *, dead: bool = False) -> Claim | None:
        """Claim a message without waiting; None if another holder has it or it is gone."""
        folder = self.dead_dir if dead else self.queue_dir
        try:
            fd = os.open(folder / f"{queue_id}.eml", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return Claim(queue_id, fd)

    def claim_blocking(self, queue_id: str, *, dead: bool = False, timeout: float = 10.0) -> Claim:
        """Claim, waiting up to `timeout` for a delivery in progress (the CLI's way)."""
        folder = self.dead_dir if dead else self.queue_dir
        deadline = time.monotonic() + timeout
        while True:
            claim = self.try_claim(queue_id, dead=dead)
            if claim is not None:
                return claim
            if not (folder / f"{queue_id}.eml").exists():
                kind = "dead letter" if dead else "queued message"
                raise SpoolError(f"no {kind} with queue id {queue_id}")
            if time.monotonic() > deadline:
                raise SpoolError(f"message {queue_id} is busy (being delivered); try again")
            time.sleep(0.05)

    # -- listing ----------------------------------------------------------------------

    def _list(self, folder: Path) -> list[QueueEntry]:
        entries = []
        for path in sorted(folder.glob("*.json")):
            if not _QID_RE.match(path.stem):
                continue
            try:
                entries.append(QueueEntry.model_validate_json(path.read_bytes()))
            except FileNotFoundError:
                continue  # delivered or moved while we listed
            except ValueError:
                log.warning("Skipped unreadable envelope %s in the spool", path.name)
        return entries

    def list_queue(self) -> list[QueueEntry]:
        """Every queued message, oldest first (blocking: for startup and the CLI)."""
        return self._list(self.queue_dir)

    def list_dead_letters(self) -> list[QueueEntry]:
        """Every dead letter, oldest first."""
        return self._list(self.dead_dir)

    def queue_ids(self) -> list[str]:
        """Queued ids without parsing envelopes (cheap, for metrics)."""
        return sorted(p.stem for p in self.queue_dir.glob("*.json") if _QID_RE.match(p.stem))

    def iter_queue_ids(self) -> Iterator[str]:
        """Queued ids in directory order, for scans that do not need sorting."""
        with os.scandir(self.queue_dir) as it:
            for item in it:
                name = item.name
                if name.endswith(".json") and _QID_RE.match(name[:-5]):
                    yield name[:-5]

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
