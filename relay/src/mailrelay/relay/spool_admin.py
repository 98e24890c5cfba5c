"""Operator actions on a spool: what the queue CLI lists, shows, retries and deletes.

Blocking, for the CLI and tests outside an event loop; safe beside a running relay on the
same spool because a change is made under the message's claim (`claim_blocking`, the
same flock the delivery engine takes) and every write is atomic. Nothing here is used by
the running relay: its store is `spool.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from mailrelay.relay.fileio import fsync_dir
from mailrelay.relay.journal import SUFFIX as _JOURNAL_SUFFIX
from mailrelay.relay.journal import pending_messages
from mailrelay.relay.spool_format import (
    DEAD,
    JOURNAL,
    MSG,
    QUEUE,
    TMP,
    Claim,
    QueueEntry,
    SpoolError,
    decode_message,
    load_entry,
    message_ids,
    move_message,
    remove_message,
    save_state,
    try_claim,
)
from mailrelay.relay.spool_migration import legacy_message_count

__all__ = ["SpoolAdmin"]

log = logging.getLogger(__name__)


class SpoolAdmin:
    """The queue CLI's view of a spool directory (it need not have been started)."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.tmp_dir = self.directory / TMP
        self.queue_dir = self.directory / QUEUE
        self.dead_dir = self.directory / DEAD
        self.journal_dir = self.directory / JOURNAL
        self._clock = clock

    def _folder(self, dead: bool) -> Path:
        return self.dead_dir if dead else self.queue_dir

    # -- looking ----------------------------------------------------------------------

    def legacy_message_count(self) -> int:
        """How many messages are still in the two-file format (converted on the next start)."""
        return legacy_message_count(self.directory)

    def load_entry(self, queue_id: str, *, dead: bool = False) -> QueueEntry | None:
        """The current state of one message, or None if it is gone."""
        return load_entry(self._folder(dead), queue_id)

    def read_message(self, queue_id: str, *, dead: bool = False) -> bytes:
        """The exact bytes to deliver."""
        raw = (self._folder(dead) / f"{queue_id}{MSG}").read_bytes()
        return decode_message(raw)[1]

    def _list(self, folder: Path) -> list[QueueEntry]:
        entries = []
        for queue_id in sorted(message_ids(folder)):
            try:
                entry = load_entry(folder, queue_id)
            except ValueError:
                log.warning("Skipped unreadable envelope of message %s in the spool", queue_id)
                continue
            if entry is not None:  # else delivered or moved while we listed
                entries.append(entry)
        return entries

    def list_queue(self) -> list[QueueEntry]:
        """Every queued message, oldest first."""
        return self._list(self.queue_dir)

    def list_dead_letters(self) -> list[QueueEntry]:
        """Every dead letter, oldest first."""
        return self._list(self.dead_dir)

    def list_journal(self) -> list[QueueEntry]:
        """Messages in any journal segment without a done mark (read only).

        They are in their first delivery attempt in a live relay, or wait for recovery.
        """
        entries: list[QueueEntry] = []
        if not self.journal_dir.is_dir():
            return entries
        for path in sorted(self.journal_dir.glob(f"*{_JOURNAL_SUFFIX}")):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            for queue_id, content in pending_messages(raw).items():
                try:
                    entries.append(decode_message(content)[0])
                except ValueError:
                    log.warning("Skipped unreadable message %s in %s", queue_id, path.name)
        entries.sort(key=lambda e: e.queue_id)
        return entries

    # -- changing (claim first) -------------------------------------------------------

    def claim_blocking(self, queue_id: str, *, dead: bool = False, timeout: float = 10.0) -> Claim:
        """Claim, waiting up to `timeout` for a delivery in progress."""
        deadline = time.monotonic() + timeout
        while True:
            claim = try_claim(self._folder(dead), queue_id)
            if claim is not None:
                return claim
            if not (self._folder(dead) / f"{queue_id}{MSG}").exists():
                kind = "dead letter" if dead else "queued message"
                raise SpoolError(f"no {kind} with queue id {queue_id}")
            if time.monotonic() > deadline:
                raise SpoolError(f"message {queue_id} is busy (being delivered); try again")
            time.sleep(0.05)

    def retry_dead_letter(self, queue_id: str) -> QueueEntry:
        """Put a dead letter back in the queue; undelivered recipients start over now.

        Fsyncs the queue directory: when this returns, the move is durable.
        """
        entry = load_entry(self.dead_dir, queue_id)
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
        move_message(self.tmp_dir, revived, self.dead_dir, self.queue_dir)
        fsync_dir(self.queue_dir)
        return revived

    def retry_now(self, queue_id: str) -> QueueEntry:
        """Make every undelivered recipient due now (`queue retry`)."""
        entry = load_entry(self.queue_dir, queue_id)
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
        save_state(self.tmp_dir, updated, self.queue_dir)
        return updated

    def delete(self, queue_id: str, *, dead: bool = False) -> None:
        """Delete a message for good (`queue delete`)."""
        folder = self._folder(dead)
        if not (folder / f"{queue_id}{MSG}").exists():
            kind = "dead letter" if dead else "queued message"
            raise SpoolError(f"no {kind} with queue id {queue_id}")
        remove_message(queue_id, folder)
