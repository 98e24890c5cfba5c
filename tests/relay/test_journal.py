"""The spool's journal: record framing, group commit, done marks, retirement, recovery."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Any

import pytest

from mailrelay.relay import spool_format
from mailrelay.relay.journal import Journal, encode_record, iter_records, pending_messages
from mailrelay.relay.spool import MessageLease, QueueEntry, Spool, encode_header
from mailrelay.relay.spool_admin import SpoolAdmin
from tests.relay.conftest import fresh_entry

ENVELOPE: dict[str, Any] = {
    "smtputf8": False,
    "body_8bitmime": False,
    "client_address": "127.0.0.1",
    "authenticated_user": None,
}


def content(n: int, body: bytes = b"Subject: x\r\n\r\nbody\r\n") -> tuple[str, bytes]:
    """A `.msg` content (envelope line + bytes) with a fresh queue id."""
    entry = fresh_entry(f"r{n}@d.test", "out", body)
    return entry.queue_id, encode_header(entry) + body


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jnl"))


# -- records (pure) ---------------------------------------------------------------------


def test_records_round_trip_and_done_marks_cancel_messages() -> None:
    (a, ca), (b, cb), (c, cc) = content(1), content(2), content(3)
    raw = b"".join(
        b"".join(parts)
        for parts in (
            encode_record(b"M", ca),
            encode_record(b"M", cb[:10], cb[10:]),  # a record may be written in parts
            encode_record(b"D", a.encode()),
            encode_record(b"M", cc),
        )
    )
    assert [r.kind for r in iter_records(raw)] == [b"M", b"M", b"D", b"M"]
    assert pending_messages(raw) == {b: cb, c: cc}


def test_reading_stops_at_a_torn_or_corrupt_record() -> None:
    (a, ca), (_, cb) = content(1), content(2)
    first = b"".join(encode_record(b"M", ca))
    second = b"".join(encode_record(b"M", cb))
    # Cut anywhere inside the second record: only the first is read.
    for cut in range(1, len(second)):
        assert pending_messages(first + second[:cut]) == {a: ca}, cut
    # A flipped payload byte fails the CRC; what follows it is not trusted either.
    flipped = bytearray(second)
    flipped[-1] ^= 0x01
    assert pending_messages(first + bytes(flipped) + first) == {a: ca}
    assert pending_messages(b"garbage" + first) == {}


# -- the writer -------------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "tmp").mkdir()
    return tmp_path / "journal", tmp_path / "tmp"


async def test_concurrent_appends_share_fdatasyncs_and_are_all_on_disk(
    dirs: tuple[Path, Path],
) -> None:
    journal = Journal(*dirs)
    messages = dict(content(n) for n in range(200))
    await asyncio.gather(*(journal.append(qid, [c]) for qid, c in messages.items()))
    assert journal.outstanding == 200
    assert 1 <= journal.syncs < 200  # group commit: one fdatasync covered many appends
    [segment] = segments(dirs[0])
    assert pending_messages(segment.read_bytes()) == messages
    await journal.close()


async def test_a_live_segment_is_locked_and_invisible_to_recovery(tmp_path: Path) -> None:
    writer = Spool(tmp_path / "spool")
    await writer.start()
    held = await writer.enqueue_held(
        "a@example.com", [("b@d.test", "out")], b"x\r\n", journal=True, **ENVELOPE
    )
    assert held.claim is None
    assert list(writer.queue_dir.iterdir()) == []
    [segment] = segments(writer.journal_dir)
    fd = os.open(segment, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    # Another process's start (here: another spool object) leaves it alone.
    other = Spool(tmp_path / "spool")
    assert other.recover_journal_sync() == 0
    assert segments(writer.journal_dir) == [segment]
    assert [e.queue_id for e in SpoolAdmin(other.directory).list_journal()] == [held.entry.queue_id]
    writer.finish_journaled(held.entry.queue_id)
    await writer.aclose()


async def test_done_messages_retire_their_segments(dirs: tuple[Path, Path]) -> None:
    journal = Journal(*dirs, segment_bytes=1000)  # every append of ~300 B fills a third
    ids = []
    for n in range(10):
        qid, c = content(n)
        await journal.append(qid, [c])
        ids.append(qid)
    assert len(segments(dirs[0])) >= 3  # rotated
    for qid in ids[:-1]:
        journal.done(qid)
    await journal.settle()  # the writer retires what is finished
    [left] = segments(dirs[0])  # only the segment of the last message
    assert pending_messages(left.read_bytes()) == {ids[-1]: content_of(left, ids[-1])}
    journal.done(ids[-1])
    await journal.close()
    assert segments(dirs[0]) == []


def content_of(segment: Path, queue_id: str) -> bytes:
    return pending_messages(segment.read_bytes())[queue_id]


async def test_a_failed_flush_fails_the_batch_and_moves_to_a_new_segment(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(*dirs)
    ok_id, ok = content(0)
    await journal.append(ok_id, [ok])
    real = os.fdatasync
    failures = iter([OSError(5, "Input/output error")])

    def failing_fdatasync(fd: int) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    bad_id, bad = content(1)
    with pytest.raises(OSError, match="Input/output"):
        await journal.append(bad_id, [bad])
    assert not journal.owns(bad_id)
    later_id, later = content(2)
    await journal.append(later_id, [later])
    first, second = segments(dirs[0])
    assert pending_messages(second.read_bytes()) == {later_id: later}
    assert ok_id in pending_messages(first.read_bytes())
    for qid in (ok_id, later_id):
        journal.done(qid)
    await journal.close()
    # The broken segment held only failed appends and done messages: both are gone.
    assert segments(dirs[0]) == []


async def test_a_failed_done_mark_never_leaves_later_messages_behind_a_torn_record(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery stops at a torn record, so nothing may be appended after one."""
    journal = Journal(*dirs)
    first_id, first = content(0)
    await journal.append(first_id, [first])
    [old] = segments(dirs[0])
    real = os.writev
    calls: list[bytes] = []

    def writev_tearing_the_first(fd: int, parts: list[bytes]) -> int:
        calls.append(b"".join(parts))
        if len(calls) == 1:  # the done mark: half written, then the disk fails
            os.write(fd, calls[0][:5])
            raise OSError(5, "Input/output error")
        return real(fd, parts)

    monkeypatch.setattr(os, "writev", writev_tearing_the_first)
    later_id, later = content(1)
    journal.done(first_id)  # the mark and the next append share one round
    await journal.append(later_id, [later])
    assert len(calls) == 2
    await journal.settle()
    [new] = segments(dirs[0])  # the torn one held nothing left and was removed
    assert new != old and not old.exists()
    assert pending_messages(new.read_bytes()) == {later_id: later}
    journal.done(later_id)
    await journal.close()


# -- the spool around it ----------------------------------------------------------------


async def test_journaled_message_lives_in_memory_until_saved_dead_or_done(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.start()

    async def fresh(n: int) -> QueueEntry:
        held = await spool.enqueue_held(
            "a@example.com",
            [(f"r{n}@d.test", "out")],
            b"Subject: %d\r\n\r\n" % n,
            journal=True,
            **ENVELOPE,
        )
        assert held.claim is None and spool.is_journaled(held.entry.queue_id)
        return held.entry

    delivered, deferred, dead = await fresh(1), await fresh(2), await fresh(3)
    assert list(spool.queue_dir.iterdir()) == [] and spool.journaled_count == 3

    spool.finish_journaled(delivered.queue_id)
    deferred.recipients[0].status = "deferred"
    deferred.recipients[0].attempts = 1
    assert await spool.save(deferred) == 0
    await spool.move_to_dead_letter(dead, "550 no such user")

    assert spool.journaled_count == 0
    assert spool.load_entry(deferred.queue_id) == deferred
    assert SpoolAdmin(spool.directory).read_message(deferred.queue_id) == b"Subject: 2\r\n\r\n"
    [dead_letter] = SpoolAdmin(spool.directory).list_dead_letters()
    assert dead_letter.dead_reason == "550 no such user"
    assert spool.load_entry(delivered.queue_id) is None
    await spool.aclose()
    assert segments(spool.journal_dir) == []
    assert list(spool.tmp_dir.iterdir()) == []


async def test_close_moves_unattempted_messages_to_queue_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.start()
    held = await spool.enqueue_held(
        "a@example.com", [("b@d.test", "out")], b"x\r\n", journal=True, **ENVELOPE
    )
    await spool.aclose()
    assert SpoolAdmin(spool.directory).list_queue() == [held.entry]
    assert SpoolAdmin(spool.directory).read_message(held.entry.queue_id) == b"x\r\n"
    assert segments(spool.journal_dir) == []


async def test_journal_is_bounded_then_messages_get_queue_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mailrelay.relay.spool._JOURNAL_MAX_MESSAGES", 2)
    spool = Spool(tmp_path / "spool")
    await spool.start()
    held = [
        await spool.enqueue_held(
            "a@example.com", [("b@d.test", "out")], b"x\r\n", journal=True, **ENVELOPE
        )
        for _ in range(3)
    ]
    assert [h.claim is None for h in held] == [True, True, False]
    assert [e.queue_id for e in SpoolAdmin(spool.directory).list_queue()] == [
        held[2].entry.queue_id
    ]
    assert held[2].claim is not None
    held[2].claim.release()
    for h in held[:2]:
        spool.finish_journaled(h.entry.queue_id)
    await spool.aclose()


async def test_recovery_turns_a_dead_writers_segment_into_queue_files(tmp_path: Path) -> None:
    """A segment as a SIGKILLed relay leaves it: unlocked, some messages done, a torn tail."""
    spool = Spool(tmp_path / "spool")
    spool.start_sync()
    (a, ca), (b, cb), (c, cc), (_, cd) = (content(n) for n in range(4))
    # b was already moved to a queue file (saved) but its done mark was lost in the crash.
    (spool.queue_dir / f"{b}.msg").write_bytes(cb)
    records = [
        encode_record(b"M", ca),
        encode_record(b"M", cb),
        encode_record(b"M", cc),
        encode_record(b"D", c.encode()),
    ]
    torn = b"".join(encode_record(b"M", cd))[:-5]  # d never got its 250
    (spool.journal_dir / "dead0001-000001.jnl").write_bytes(
        b"".join(b"".join(r) for r in records) + torn
    )

    assert Spool(tmp_path / "spool").recover_journal_sync() == 1
    assert sorted(p.name for p in spool.queue_dir.iterdir()) == sorted([f"{a}.msg", f"{b}.msg"])
    assert (spool.queue_dir / f"{a}.msg").read_bytes() == ca
    assert segments(spool.journal_dir) == []
    assert list(spool.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("journal", [True, False], ids=["journaled", "queue file"])
async def test_a_lease_ends_the_same_way_wherever_the_message_lives(
    tmp_path: Path, journal: bool
) -> None:
    """`complete`, `defer` + `release`, `dead_letter` + `release`, plain `release`: the
    holder never knows whether the message is journaled or in a claimed queue file."""
    spool = Spool(tmp_path / "spool")
    await spool.start()
    admin = SpoolAdmin(spool.directory)

    async def lease(n: int) -> MessageLease:
        held = await spool.enqueue_held(
            "a@example.com",
            [(f"r{n}@d.test", "out")],
            b"Subject: %d\r\n\r\n" % n,
            journal=journal,
            **ENVELOPE,
        )
        assert (held.claim is None) == journal
        assert await held.read() == b"Subject: %d\r\n\r\n" % n
        return held

    delivered, deferred, dead, untouched = [await lease(n) for n in range(4)]
    await delivered.complete()
    deferred.entry.recipients[0].status = "deferred"
    deferred.entry.recipients[0].attempts = 1
    assert await deferred.defer() >= 0
    assert await deferred.release() is None  # already in its queue file
    await dead.dead_letter("550 no such user")
    assert await dead.release() is None
    version = await untouched.release()
    assert (version is None) != journal  # a journaled one got its queue file just now

    assert admin.load_entry(delivered.queue_id) is None
    assert admin.load_entry(deferred.queue_id) == deferred.entry
    assert [e.queue_id for e in admin.list_dead_letters()] == [dead.queue_id]
    assert admin.load_entry(untouched.queue_id) == untouched.entry
    assert spool.journaled_count == 0  # (done marks reach the segments soon after)
    for queue_id in (deferred.queue_id, untouched.queue_id):
        with admin.claim_blocking(queue_id, timeout=0):  # nobody holds them any more
            pass
    await spool.aclose()
    assert segments(spool.journal_dir) == []
    assert list(spool.tmp_dir.iterdir()) == []


async def test_a_journaled_lease_that_cannot_be_handed_back_still_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the queue file fails: the message stays in the journal and the lease stays
    good for another try (the engine keeps it for its next pass)."""
    spool = Spool(tmp_path / "spool")
    await spool.start()
    held = await spool.enqueue_held(
        "a@example.com", [("b@d.test", "out")], b"x\r\n", journal=True, **ENVELOPE
    )
    real = spool_format.write_message
    failures = iter([OSError(28, "No space left on device")])

    def write_message(*args: Any) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real(*args)

    monkeypatch.setattr("mailrelay.relay.spool.write_message", write_message)
    with pytest.raises(OSError, match="No space"):
        await held.release()
    assert spool.is_journaled(held.queue_id)
    assert SpoolAdmin(spool.directory).list_queue() == []
    assert await held.release() == 0
    assert SpoolAdmin(spool.directory).list_queue() == [held.entry]
    assert not spool.is_journaled(held.queue_id)
    await spool.aclose()
