"""The spool's journal: fresh messages appended to one open file, group-committed.

Why: where we run, creating, renaming and unlinking one file per message costs more CPU
than anything else the relay does for it (`bench/README.md`). Most messages are delivered
on their first attempt, milliseconds after they arrive, so they never need a file of
their own: the journal makes each durable with one append and a share of one `fdatasync`,
and records a small "done" mark once it is delivered. A message its first attempt does
not finish moves to a queue file (`Spool.save`); so does everything a crash left behind.

Layout: `journal/<writer>-<n>.jnl` under the spool directory. A segment is flocked by its
writer as long as it holds a message not done: it is created in `tmp/` and flocked before
the rename makes it visible, so nobody ever sees a live segment unlocked. A segment whose
flock can be taken belongs to nobody (its writer exited or crashed): recovery
(`Spool.recover_journal_sync`, reading it with `pending_messages`) writes its messages
without a done mark to queue files before unlinking the segment.

A record is a frame (magic, kind, payload length, CRC-32 of the payload) and its payload.
"M" records hold a `.msg` file's content (envelope line, then the bytes); "D" records the
queue id of a message that is done. Done marks go to the segment of their message, so a
segment's own records tell its whole story. Reading stops at the first frame that does
not check out (a crash in the middle of an append): nothing after it was acknowledged,
because a failed append retires its segment for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailrelay.relay.fileio import fsync_dir, write_parts

__all__ = ["Journal", "JournalRecord", "encode_record", "iter_records", "pending_messages"]

log = logging.getLogger(__name__)

SUFFIX = ".jnl"
_MAGIC = b"MRJ1"
_FRAME = struct.Struct(">4scII")  # magic, kind, payload length, CRC-32 of the payload
_MESSAGE, _DONE = b"M", b"D"


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One record read back from a segment."""

    kind: bytes
    payload: bytes


def encode_record(kind: bytes, *parts: bytes) -> list[bytes]:
    """The frame and payload parts of one record, ready for `writev` (the parts not copied)."""
    crc = 0
    length = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
        length += len(part)
    return [_FRAME.pack(_MAGIC, kind, length, crc), *parts]


def iter_records(raw: bytes) -> Iterator[JournalRecord]:
    """The records of a segment, up to the first torn or corrupt one."""
    offset = 0
    view = memoryview(raw)
    while offset + _FRAME.size <= len(raw):
        magic, kind, length, crc = _FRAME.unpack_from(raw, offset)
        start = offset + _FRAME.size
        end = start + length
        if magic != _MAGIC or kind not in (_MESSAGE, _DONE) or end > len(raw):
            break
        payload = view[start:end]
        if zlib.crc32(payload) != crc:
            break
        yield JournalRecord(kind, bytes(payload))
        offset = end
    if offset != len(raw):
        log.warning("Ignored %d torn byte(s) at the end of a journal segment", len(raw) - offset)


def pending_messages(raw: bytes) -> dict[str, bytes]:
    """The `.msg` contents of a segment's messages that have no done mark, by queue id.

    The queue id is read from the envelope line without parsing the JSON: it is the
    first field (`QueueEntry.queue_id`), so the line starts with `{"queue_id":"<id>"`.
    """
    messages: dict[str, bytes] = {}
    for record in iter_records(raw):
        if record.kind == _MESSAGE:
            queue_id = _queue_id_of(record.payload)
            if queue_id is not None:
                messages[queue_id] = record.payload
        else:
            messages.pop(record.payload.decode("ascii", "replace"), None)
    return messages


_QUEUE_ID_PREFIX = b'{"queue_id":"'


def _queue_id_of(content: bytes) -> str | None:
    if not content.startswith(_QUEUE_ID_PREFIX):
        log.warning("Skipped a journal record without a queue id")
        return None
    end = content.find(b'"', len(_QUEUE_ID_PREFIX))
    return content[len(_QUEUE_ID_PREFIX) : end].decode("ascii", "replace")


@dataclass(eq=False)
class _Segment:
    """One journal file this process writes to, with its lock held through `fd`."""

    path: Path
    fd: int
    size: int = 0
    outstanding: int = 0  # messages appended and not yet done
    sealed: bool = False  # takes no more messages (full, or a write to it failed)
    broken: bool = False  # a write failed: takes no more records at all
    unwritten_done: list[bytes] = field(default_factory=list)


@dataclass(eq=False)
class _Append:
    queue_id: str
    parts: list[bytes]
    future: asyncio.Future[None]


class Journal:
    """This process's appends: group commit, done marks, rotation and retirement.

    All bookkeeping happens on the event loop; the file work of one round (done marks,
    appends, one `fdatasync`, new and retired segments) runs in one executor call, and
    rounds never overlap, so a segment's writes never interleave.
    """

    def __init__(self, directory: Path, tmp_dir: Path, *, segment_bytes: int = 8 << 20) -> None:
        self.directory = directory
        self._tmp_dir = tmp_dir
        self._segment_bytes = segment_bytes
        self._writer = secrets.token_hex(4)
        self._sequence = itertools.count(1)
        self._current: _Segment | None = None
        self._segments: list[_Segment] = []
        self._home: dict[str, _Segment] = {}
        self._appends: list[_Append] = []
        self._retiring: list[_Segment] = []
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.syncs = 0  # fdatasyncs made, for tests and benchmarks

    @property
    def accepting(self) -> bool:
        """False while `close` runs: callers store new messages some other way."""
        return not self._closed

    @property
    def outstanding(self) -> int:
        """Messages appended by this process and not yet done."""
        return len(self._home)

    def owns(self, queue_id: str) -> bool:
        """Whether the message lives in this process's journal (appended, not done)."""
        return queue_id in self._home

    async def append(self, queue_id: str, content: list[bytes]) -> None:
        """Append a message (its `.msg` content); return once it is on disk for good.

        Raises OSError when the write or the flush failed: the message is not stored.
        """
        if self._closed:
            raise OSError("the spool's journal is closed")
        future = asyncio.get_running_loop().create_future()
        self._appends.append(_Append(queue_id, encode_record(_MESSAGE, *content), future))
        self._kick()
        await future

    def done(self, queue_id: str) -> None:
        """The message is delivered or stored elsewhere: mark it done, retire its segment
        once nothing in it is left. The mark needs no flush of its own: lost in a crash,
        it only makes recovery deliver the message again (delivery is at-least-once)."""
        segment = self._home.pop(queue_id, None)
        if segment is None:
            return
        segment.outstanding -= 1
        if segment.sealed and segment.outstanding == 0:
            self._retiring.append(segment)
        elif not segment.broken:
            segment.unwritten_done.extend(encode_record(_DONE, queue_id.encode("ascii")))
        self._kick()

    async def settle(self) -> None:
        """Wait until the writer has nothing left to do (done marks written, finished
        segments removed): for tests, and for `close`."""
        while self._runner is not None and not self._runner.done():
            await asyncio.shield(self._runner)

    def _kick(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="journal-writer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        segment: _Segment | None
        error: OSError | None
        while self._appends or self._retiring or any(s.unwritten_done for s in self._segments):
            appends, self._appends = self._appends, []
            retiring, self._retiring = self._retiring, []
            marks = [(s, s.unwritten_done) for s in self._segments if s.unwritten_done]
            for marked, _ in marks:
                marked.unwritten_done = []
            current = self._current  # never sealed: `_seal` clears it
            try:
                segment, error = await loop.run_in_executor(
                    None, self._round, current, appends, marks, retiring
                )
            except BaseException:
                # The writer itself was interrupted (the loop is shutting down): whatever
                # was written, nobody waiting was told it is stored.
                for append in appends:
                    if not append.future.done():
                        append.future.set_exception(OSError("the journal writer stopped"))
                raise
            self._segments = [s for s in self._segments if s not in retiring]
            if segment is not None and segment is not current:
                self._segments.append(segment)
                self._current = segment
            for append in appends:
                if error is not None:
                    if not append.future.done():
                        append.future.set_exception(error)
                    continue
                assert segment is not None
                self._home[append.queue_id] = segment
                segment.outstanding += 1
                if append.future.done():
                    # The caller was cancelled meanwhile and never answered 250, but the
                    # record is on disk: mark it done so recovery does not deliver it.
                    self.done(append.queue_id)
                else:
                    append.future.set_result(None)
            if error is None and appends:
                self.syncs += 1
            if segment is not None and segment.size >= self._segment_bytes:
                self._seal(segment)
            for written in self._segments:
                # Sealed here or, after a failed write, by the round itself.
                if written.sealed:
                    self._seal(written)

    def _seal(self, segment: _Segment) -> None:
        """Take no more messages into `segment`; retire it now if nothing in it is left."""
        segment.sealed = True
        if segment is self._current:
            self._current = None
        if segment.outstanding == 0 and segment.fd >= 0 and segment not in self._retiring:
            self._retiring.append(segment)

    def _round(
        self,
        current: _Segment | None,
        appends: list[_Append],
        marks: list[tuple[_Segment, list[bytes]]],
        retiring: list[_Segment],
    ) -> tuple[_Segment | None, OSError | None]:
        """One round of file work (in a thread): done marks, appends + fdatasync, retiring.

        Returns the segment the appends went to and the error that failed them, if any.
        A segment a write failed on is marked broken and sealed: a torn record at its end
        would hide whatever came after it from recovery.
        """
        for segment, parts in marks:
            if segment.broken or segment in retiring:
                continue
            try:
                write_parts(segment.fd, parts)
                segment.size += sum(len(p) for p in parts)
            except OSError as exc:
                log.error("Failed to write done marks to journal %s: %s", segment.path.name, exc)
                segment.broken = segment.sealed = True
        for segment in retiring:
            self._retire(segment)
        if not appends:
            return current, None
        if current is not None and current.broken:
            current = None  # a done mark failed on it: the appends go to a new segment
        try:
            if current is None:
                current = self._open_segment()
            parts = [part for append in appends for part in append.parts]
        except OSError as exc:
            log.error("Failed to open a journal segment: %s", exc)
            return None, exc
        try:
            write_parts(current.fd, parts)
            current.size += sum(len(p) for p in parts)
            os.fdatasync(current.fd)
        except OSError as exc:
            log.error("Failed to append to journal %s: %s", current.path.name, exc)
            current.broken = current.sealed = True
            return current, exc
        return current, None

    def _open_segment(self) -> _Segment:
        """A new segment: created and flocked in tmp/, renamed into place, directory fsync'd."""
        self.directory.mkdir(exist_ok=True)
        name = f"{self._writer}-{next(self._sequence):06d}{SUFFIX}"
        tmp = self._tmp_dir / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path = self.directory / name
            os.rename(tmp, path)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return _Segment(path, fd)

    @staticmethod
    def _retire(segment: _Segment) -> None:
        """Remove a segment whose messages are all done (unlink first: the lock guards it)."""
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        os.close(segment.fd)
        segment.fd = -1

    async def close(self) -> None:
        """Write what is pending, remove finished segments and release the rest.

        A segment still holding messages (its owner could not move them to queue files)
        stays on disk, unlocked: the next start, or another worker's scan, recovers it.
        """
        self._closed = True
        await self.settle()
        for segment in list(self._segments):
            if segment.outstanding == 0:
                self._seal(segment)
        self._kick()
        await self.settle()
        left = [s for s in self._segments if s.fd >= 0]
        await asyncio.to_thread(_close_all, left)
        if left:
            log.info(
                "Left %d message(s) in %d journal segment(s) for recovery",
                sum(s.outstanding for s in left),
                len(left),
            )
        self._segments = []
        self._home.clear()
        self._current = None
        self._closed = False  # usable again: a later append starts a new segment


def _close_all(segments: list[_Segment]) -> None:
    for segment in segments:
        os.close(segment.fd)
        segment.fd = -1
