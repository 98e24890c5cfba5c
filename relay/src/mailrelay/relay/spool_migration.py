"""Conversion of spools written by earlier versions, run when the store starts.

Spools before the one-file format kept each message as `<qid>.json` (the envelope) and
`<qid>.eml` (the bytes), claimed with a flock on the `.eml`. `migrate_legacy` turns each
pair into a `<qid>.msg` (`spool_format.py`), one message at a time under the old claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from mailrelay.relay.fileio import fsync_dir
from mailrelay.relay.spool_format import (
    DEAD,
    LEGACY_ENVELOPE,
    LEGACY_MESSAGE,
    MSG,
    QUEUE,
    TMP,
    QueueEntry,
    encode_header,
    message_ids,
    read_all,
    write_message,
)

__all__ = ["legacy_message_count", "migrate_legacy"]

log = logging.getLogger(__name__)


def migrate_legacy(directory: Path) -> int:
    """Convert the spool's messages of the two-file format (`.eml` + `.json`); returns how many.

    Each is claimed the old way (flock on its `.eml`) while it is converted, so a relay
    of the old version still running on the spool and two new processes starting at
    once cannot both act on it. The new `.msg` is complete before the old files go,
    so a crash in between leaves both, and the next start just drops the old pair.
    """
    converted = 0
    for folder in (directory / QUEUE, directory / DEAD):
        moved = 0
        for queue_id in sorted(message_ids(folder, LEGACY_ENVELOPE)):
            if _migrate_one(directory / TMP, folder, queue_id):
                moved += 1
        if moved:
            fsync_dir(folder)
            log.info("Converted %d message(s) in %s to the one-file format", moved, folder)
        converted += moved
    return converted


def legacy_message_count(directory: Path) -> int:
    """How many messages are still in the two-file format (the CLI warns about them)."""
    return sum(
        1
        for folder in (directory / QUEUE, directory / DEAD)
        if folder.is_dir()  # the CLI may look at a spool no relay has started yet
        for _ in message_ids(folder, LEGACY_ENVELOPE)
    )


def _migrate_one(tmp_dir: Path, folder: Path, queue_id: str) -> bool:
    old_json = folder / f"{queue_id}{LEGACY_ENVELOPE}"
    old_eml = folder / f"{queue_id}{LEGACY_MESSAGE}"
    try:
        fd = os.open(old_eml, os.O_RDONLY)
    except FileNotFoundError:
        return False  # converted by someone else meanwhile, or a lone .json: no message
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(
                "Left message %s in the old format: another process holds it"
                " (converting it, or a relay of the old version delivering it)",
                queue_id,
            )
            return False
        target = folder / f"{queue_id}{MSG}"
        if not target.exists():
            try:
                entry = QueueEntry.model_validate_json(old_json.read_bytes())
            except FileNotFoundError:
                return False
            except ValueError:
                log.warning("Left message %s in the old format: unreadable envelope", queue_id)
                return False
            data = read_all(fd)
            entry = entry.model_copy(update={"size": len(data)})
            write_message(tmp_dir, folder, queue_id, encode_header(entry), data)
        for path in (old_json, old_eml):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return True
    finally:
        os.close(fd)
