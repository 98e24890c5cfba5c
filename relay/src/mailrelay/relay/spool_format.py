"""The spool's on-disk format, shared by the store, migration and the admin side.

A queued message is one file, `<qid>.msg`: its envelope as one JSON line (`encode_header`),
then the exact bytes to deliver. Later state goes to `<qid>.state`, which wins over the
header line. A `Claim` is the `flock` on a `.msg` that every process takes before acting on
the message. The functions here do blocking file work; callers run them in threads.

Only `spool.py` (the store), `spool_migration.py` and `spool_admin.py` import this module:
the SMTP front and the delivery engine hold messages through the store's leases.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import random
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Literal

from pydantic import BaseModel, ConfigDict

from mailrelay.relay.envelope import Envelope
from mailrelay.relay.fileio import write_parts

__all__ = [
    "DEAD",
    "JOURNAL",
    "LEGACY_ENVELOPE",
    "LEGACY_MESSAGE",
    "MSG",
    "QID_RE",
    "QUEUE",
    "STATE",
    "TMP",
    "Claim",
    "QueueEntry",
    "RecipientState",
    "SpoolError",
    "decode_message",
    "encode_header",
    "extract_message_id",
    "load_entry",
    "message_ids",
    "move_message",
    "new_queue_id",
    "read_all",
    "read_header_fd",
    "read_message_fd",
    "remove_message",
    "save_state",
    "state_or_none",
    "try_claim",
    "write_durably",
    "write_file",
    "write_message",
]

TMP, QUEUE, DEAD, JOURNAL = "tmp", "queue", "deadletter", "journal"
MSG, STATE = ".msg", ".state"
# The two files of a message in the format before the one-file spool.
LEGACY_ENVELOPE, LEGACY_MESSAGE = ".json", ".eml"
QID_RE = re.compile(r"^[0-9A-F]{24}$")
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
    """The envelope and state of one queued message (`.msg` header line, or `.state`)."""

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

    def envelope(self, recipients: Iterable[str]) -> Envelope:
        """The envelope this message is sent with to `recipients` (a subset of its own)."""
        return Envelope(
            queue_id=self.queue_id,
            mail_from=self.mail_from,
            recipients=tuple(recipients),
            smtputf8=self.smtputf8,
            body_8bitmime=self.body_8bitmime,
        )


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


def write_durably(path: Path, data: bytes) -> int:
    """Create `path` with `data`, fsync it, return its mtime (ns) as the state's version."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        write_parts(fd, [data])
        os.fsync(fd)
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def read_header_fd(fd: int) -> bytes:
    """The `.msg` header line, reading no further into the message than needed."""
    head = b""
    while (end := head.find(b"\n")) < 0:
        chunk = os.read(fd, 16384)
        if not chunk:
            raise ValueError("message file without a complete header line")
        head += chunk
    return head[:end]


def read_message_fd(fd: int) -> tuple[QueueEntry, bytes]:
    """A `.msg` file's envelope and bytes, read with one allocation for the bytes (no
    read-everything-then-slice copy: the bytes of a large message are most of the file)."""
    head = b""
    while (end := head.find(b"\n")) < 0:
        chunk = os.pread(fd, 16384, len(head))
        if not chunk:
            raise ValueError("message file without a complete header line")
        head += chunk
    entry = QueueEntry.model_validate_json(head[:end])
    start = end + 1
    total = os.fstat(fd).st_size
    if total - start != entry.size:
        raise ValueError(f"message file holds {total - start} bytes, its header says {entry.size}")
    data = os.pread(fd, entry.size, start)
    if len(data) < entry.size:  # a read is capped near 2 GiB; finish in pieces
        parts = [data]
        offset = start + len(data)
        while offset < total:
            piece = os.pread(fd, total - offset, offset)
            if not piece:
                raise ValueError("message file shrank while it was read")
            parts.append(piece)
            offset += len(piece)
        data = b"".join(parts)
    return entry, data


def encode_header(entry: QueueEntry) -> bytes:
    """The `.msg` header line (JSON never holds a raw newline: strings escape it)."""
    return entry.model_dump_json().encode() + b"\n"


def decode_message(raw: bytes) -> tuple[QueueEntry, bytes]:
    """Split a `.msg` file into its envelope and message; refuse a truncated one."""
    end = raw.find(b"\n")
    if end < 0:
        raise ValueError("message file without a complete header line")
    entry = QueueEntry.model_validate_json(raw[:end])
    data = raw[end + 1 :]
    if len(data) != entry.size:
        raise ValueError(f"message file holds {len(data)} bytes, its header says {entry.size}")
    return entry, data


class Claim:
    """An exclusive claim on one queued message (flock on its .msg); release when done."""

    def __init__(self, queue_id: str, fd: int) -> None:
        self.queue_id = queue_id
        self._fd: int | None = fd

    def fileno(self) -> int:
        """The open, flocked descriptor of the `.msg` (to read it without opening it again)."""
        if self._fd is None:
            raise SpoolError(f"the claim on message {self.queue_id} was released")
        return self._fd

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


def write_file(
    tmp: Path, head: bytes, data: bytes, target: Path, *, hold: bool = False
) -> int | None:
    """Write `head` and `data` to `tmp`, fsync, rename to `target`; with `hold`, return the
    descriptor flocked (taken before the rename makes the file visible), else None."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        write_parts(fd, [head, data])
        os.fsync(fd)
        if hold:
            # Nobody else can hold it yet: it is not in queue/ until the rename.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, target)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if hold:
        return fd
    os.close(fd)
    return None


def write_message(tmp_dir: Path, folder: Path, queue_id: str, head: bytes, data: bytes) -> None:
    """Write `<queue_id>.msg` into `folder` (temp file, fsync, rename), replacing any.

    The temp name is unique per call: several writers may produce the same message.
    """
    tmp = tmp_dir / f"{queue_id}.{random.getrandbits(32):08x}{MSG}"
    write_file(tmp, head, data, folder / f"{queue_id}{MSG}")


def save_state(tmp_dir: Path, entry: QueueEntry, folder: Path) -> int:
    """Write `entry` as the message's `.state` in `folder` atomically; returns its version."""
    tmp = tmp_dir / f"{entry.queue_id}.{random.getrandbits(32):08x}{STATE}"
    try:
        version = write_durably(tmp, entry.model_dump_json().encode())
        os.rename(tmp, folder / f"{entry.queue_id}{STATE}")
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return version


def state_or_none(folder: Path, queue_id: str) -> QueueEntry | None:
    """The message's `.state`, or None if it has none."""
    try:
        raw = (folder / f"{queue_id}{STATE}").read_bytes()
    except FileNotFoundError:
        return None
    return QueueEntry.model_validate_json(raw)


def load_entry(folder: Path, queue_id: str) -> QueueEntry | None:
    """The current state of one message in `folder`, or None if it is gone."""
    try:
        fd = os.open(folder / f"{queue_id}{MSG}", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        state = state_or_none(folder, queue_id)
        if state is not None:
            return state
        return QueueEntry.model_validate_json(read_header_fd(fd))
    finally:
        os.close(fd)


def move_message(tmp_dir: Path, entry: QueueEntry, source: Path, target: Path) -> None:
    """Move a message between queue/ and deadletter/ with `entry` as its state.

    The new state is written first, then the `.msg` renamed (the switch), then the
    old state dropped: a crash leaves the message where it was, or where it goes with
    its new state, plus at most a lone `.state` (debris).
    """
    qid = entry.queue_id
    save_state(tmp_dir, entry, target)
    os.rename(source / f"{qid}{MSG}", target / f"{qid}{MSG}")
    with contextlib.suppress(FileNotFoundError):
        (source / f"{qid}{STATE}").unlink()


def remove_message(queue_id: str, folder: Path, *, state_file: bool = True) -> None:
    """Remove a message's files from `folder`."""
    # The .msg first: it is the record; a .state left by a crash here is debris.
    for suffix in (MSG, STATE) if state_file else (MSG,):
        with contextlib.suppress(FileNotFoundError):
            (folder / f"{queue_id}{suffix}").unlink()


def message_ids(folder: Path, suffix: str = MSG) -> Iterator[str]:
    """Queue ids of the files in `folder` named `<id><suffix>`."""
    with os.scandir(folder) as it:
        for item in it:
            name = item.name
            if name.endswith(suffix) and QID_RE.match(name[: -len(suffix)]):
                yield name[: -len(suffix)]


def try_claim(folder: Path, queue_id: str) -> Claim | None:
    """Claim a message without waiting; None if another holder has it or it is gone."""
    try:
        fd = os.open(folder / f"{queue_id}{MSG}", os.O_RDONLY)
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
