"""The spool: one-file layout, atomic state, group commit, claims, crashes, old spools."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from mailrelay.relay.spool import (
    QueueEntry,
    RecipientState,
    Spool,
    SpoolError,
    encode_header,
    extract_message_id,
    new_queue_id,
)
from mailrelay.relay.spool_admin import SpoolAdmin
from tests.relay.conftest import write_legacy_pair


async def enqueue(
    spool: Spool, data: bytes = b"Subject: x\r\n\r\nbody\r\n", rcpts: int = 1
) -> QueueEntry:
    return await spool.enqueue(
        "s@example.com",
        [(f"r{i}@d.test", "route") for i in range(rcpts)],
        data,
        smtputf8=False,
        body_8bitmime=True,
        client_address="127.0.0.1",
        authenticated_user="alice",
    )


@pytest.fixture
async def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", clock=lambda: 1000.0)
    await s.start()
    return s


async def test_enqueue_writes_one_file_and_nothing_in_tmp(spool: Spool) -> None:
    data = b"Message-ID: <m1@x>\r\nSubject: x\r\n\r\n\x00\xff binary\n\r\n"
    entry = await enqueue(spool, data, rcpts=2)
    assert sorted(p.name for p in spool.queue_dir.iterdir()) == [f"{entry.queue_id}.msg"]
    head, _, body = (spool.queue_dir / f"{entry.queue_id}.msg").read_bytes().partition(b"\n")
    assert body == data
    assert QueueEntry.model_validate_json(head) == entry
    assert entry.message_id == "<m1@x>"
    assert entry.size == len(data)
    assert [r.next_attempt_at for r in entry.recipients] == [1000.0, 1000.0]
    assert list(spool.tmp_dir.iterdir()) == []
    assert SpoolAdmin(spool.directory).read_message(entry.queue_id) == data
    assert spool.load_entry(entry.queue_id) == entry


async def test_held_enqueue_keeps_the_claim_until_released(spool: Spool) -> None:
    held = await spool.enqueue_held(
        "s@example.com",
        [("r@d.test", "route")],
        b"x\r\n",
        smtputf8=True,
        body_8bitmime=False,
        client_address="::1",
        authenticated_user=None,
    )
    assert held.entry.smtputf8 and held.entry.client_address == "::1"
    assert spool.claim_and_load(held.entry.queue_id) == "busy"
    assert held.claim is not None  # no journal asked for: a claimed queue file
    held.claim.release()
    loaded = spool.claim_and_load(held.entry.queue_id)
    assert not isinstance(loaded, str)
    claim, entry, data = loaded
    assert (entry, data) == (held.entry, b"x\r\n")
    spool.remove_and_release(entry.queue_id, claim)
    assert spool.claim_and_load(entry.queue_id) == "gone"
    assert list(spool.queue_dir.iterdir()) == []


async def test_state_file_only_after_a_change_and_it_wins(spool: Spool) -> None:
    entry = await enqueue(spool)
    assert spool.queue_versions() == {entry.queue_id: 0}
    entry.recipients[0].status = "deferred"
    entry.recipients[0].last_error = "451 line one\nline two"  # a newline inside the JSON
    version = await spool.save(entry)
    assert version > 0
    assert spool.queue_versions() == {entry.queue_id: version}
    assert (spool.queue_dir / f"{entry.queue_id}.state").exists()
    loaded = spool.claim_and_load(entry.queue_id)
    assert not isinstance(loaded, str)
    claim, state, _ = loaded
    assert state == entry == spool.load_entry(entry.queue_id)
    spool.remove_and_release(entry.queue_id, claim)
    assert list(spool.queue_dir.iterdir()) == []


def test_queue_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_queue_id(1_700_000_000 + i / 1000) for i in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000
    same_instant = {new_queue_id(1_700_000_000.0) for _ in range(1000)}
    assert len(same_instant) == 1000


async def test_concurrent_enqueues_share_directory_fsyncs(spool: Spool) -> None:
    entries = await asyncio.gather(*(enqueue(spool) for _ in range(64)))
    assert len({e.queue_id for e in entries}) == 64
    assert len(SpoolAdmin(spool.directory).list_queue()) == 64
    assert 1 <= spool.directory_syncs < 64


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_group_commits_reuse_one_directory_descriptor(spool: Spool) -> None:
    await enqueue(spool)  # opens the queue directory for its fsync, once
    before = _open_descriptors()
    for _ in range(3):
        await asyncio.gather(*(enqueue(spool) for _ in range(8)))
    assert spool.directory_syncs >= 4
    assert _open_descriptors() == before
    spool.close()
    assert _open_descriptors() == before - 1
    # Still usable after close: the next group commit opens the directory again.
    await enqueue(spool)
    assert len(SpoolAdmin(spool.directory).list_queue()) == 26


async def test_save_is_atomic_and_listing_sees_the_new_state(spool: Spool) -> None:
    entry = await enqueue(spool)
    entry.recipients[0].status = "deferred"
    entry.recipients[0].attempts = 3
    entry.recipients[0].last_error = "451 try later"
    await spool.save(entry)
    [listed] = SpoolAdmin(spool.directory).list_queue()
    assert listed.recipients[0].attempts == 3
    assert list(spool.tmp_dir.iterdir()) == []


async def test_dead_letter_round_trip(spool: Spool) -> None:
    entry = await enqueue(spool, rcpts=2)
    entry.recipients[0].status = "delivered"
    entry.recipients[1].status = "bounced"
    entry.recipients[1].attempts = 7
    await spool.move_to_dead_letter(entry, "550 5.1.1 no such user")
    assert SpoolAdmin(spool.directory).list_queue() == []
    [dead] = SpoolAdmin(spool.directory).list_dead_letters()
    assert dead.dead_reason == "550 5.1.1 no such user"
    revived = await asyncio.to_thread(SpoolAdmin(spool.directory).retry_dead_letter, entry.queue_id)
    assert SpoolAdmin(spool.directory).list_dead_letters() == []
    assert [(r.status, r.attempts) for r in revived.recipients] == [
        ("delivered", 0),
        ("pending", 0),
    ]
    assert revived.dead_reason is None
    assert spool.load_entry(entry.queue_id) == revived
    with pytest.raises(SpoolError):
        await asyncio.to_thread(SpoolAdmin(spool.directory).retry_dead_letter, entry.queue_id)


async def test_a_new_dead_letter_is_never_in_the_queue(spool: Spool) -> None:
    """A bounce no route takes goes straight to deadletter/: no file of it ever appears in
    queue/ (a delivery scan there would try a route that does not exist), it is durable
    with its reason, and it can be retried once a route exists."""
    seen_in_queue: list[str] = []

    async def watch_queue() -> None:
        while True:
            seen_in_queue.extend(p.name for p in spool.queue_dir.iterdir())
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch_queue())
    data = b"Subject: bounce\r\n\r\nreport\r\n"
    entry = await spool.enqueue_dead_letter(
        "",
        [("s@example.com", "")],
        data,
        "unroutable_bounce: x",
        smtputf8=False,
        body_8bitmime=False,
    )
    watcher.cancel()
    assert seen_in_queue == []
    assert SpoolAdmin(spool.directory).list_queue() == []
    reopened = Spool(spool.directory)
    await reopened.start()
    [dead] = SpoolAdmin(spool.directory).list_dead_letters()
    assert (dead.queue_id, dead.dead_reason, dead.mail_from) == (
        entry.queue_id,
        "unroutable_bounce: x",
        "",
    )
    assert SpoolAdmin(spool.directory).read_message(entry.queue_id, dead=True) == data


async def test_remove_and_delete(spool: Spool) -> None:
    a, b = await enqueue(spool), await enqueue(spool)
    await spool.remove(a.queue_id)
    assert [e.queue_id for e in SpoolAdmin(spool.directory).list_queue()] == [b.queue_id]
    SpoolAdmin(spool.directory).delete(b.queue_id)
    assert SpoolAdmin(spool.directory).list_queue() == []
    with pytest.raises(SpoolError):
        SpoolAdmin(spool.directory).delete(b.queue_id)


async def test_retry_now_makes_undelivered_recipients_due(tmp_path: Path) -> None:
    now = [1000.0]
    spool = Spool(tmp_path, clock=lambda: now[0])
    await spool.start()
    entry = await enqueue(spool, rcpts=2)
    entry.recipients[0].status = "delivered"
    entry.recipients[1].status = "deferred"
    entry.recipients[1].next_attempt_at = 9999.0
    await spool.save(entry)
    now[0] = 1500.0
    updated = SpoolAdmin(spool.directory, clock=lambda: now[0]).retry_now(entry.queue_id)
    assert [(r.status, r.next_attempt_at) for r in updated.recipients] == [
        ("delivered", 1000.0),
        ("pending", 1500.0),
    ]


async def test_claims_exclude_each_other_in_one_process(spool: Spool) -> None:
    entry = await enqueue(spool)
    claim = spool.try_claim(entry.queue_id)
    assert claim is not None
    assert spool.try_claim(entry.queue_id) is None
    claim.release()
    again = spool.try_claim(entry.queue_id)
    assert again is not None
    again.release()
    assert spool.try_claim("0" * 24) is None  # unknown id


def _hold_claim(directory: str, queue_id: str, ready: Any, done: Any) -> None:
    claim = Spool(Path(directory)).try_claim(queue_id)
    assert claim is not None
    ready.set()
    done.wait(10)
    claim.release()


async def test_claims_exclude_other_processes(spool: Spool) -> None:
    entry = await enqueue(spool)
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_claim, args=(str(spool.directory), entry.queue_id, ready, done))
    proc.start()
    try:
        assert await asyncio.to_thread(ready.wait, 20)
        assert spool.try_claim(entry.queue_id) is None
        with pytest.raises(SpoolError, match="busy"):
            SpoolAdmin(spool.directory).claim_blocking(entry.queue_id, timeout=0.2)
    finally:
        done.set()
        await asyncio.to_thread(proc.join, 20)
    claim = SpoolAdmin(spool.directory).claim_blocking(entry.queue_id, timeout=5)
    claim.release()


async def test_start_removes_only_old_debris(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.start()
    old_tmp, new_tmp = spool.tmp_dir / "A.msg", spool.tmp_dir / "B.msg"
    lone_state = spool.queue_dir / ("0" * 24 + ".state")
    young_state = spool.dead_dir / ("1" * 24 + ".state")
    lone_old_eml = spool.queue_dir / ("2" * 24 + ".eml")
    for path in (old_tmp, new_tmp, lone_state, young_state, lone_old_eml):
        path.write_bytes(b"x")
    for path in (old_tmp, lone_state, lone_old_eml):
        os.utime(path, (0, 0))
    await spool.start()
    assert not old_tmp.exists() and not lone_state.exists() and not lone_old_eml.exists()
    assert new_tmp.exists() and young_state.exists()


def _crash_while_writing(directory: str, ready: Any) -> None:
    """Enqueue a large message and get killed while writing it (SIGKILL from the parent)."""
    spool = Spool(Path(directory))

    def slow_writev(fd: int, parts: list[bytes]) -> int:
        written = os.write(fd, parts[0] + parts[1][:1000])
        ready.set()
        time.sleep(60)
        return written

    os.writev = slow_writev  # type: ignore[assignment]
    asyncio.run(enqueue(spool, b"y" * 100_000))


async def test_a_message_half_written_at_a_crash_is_never_a_message(spool: Spool) -> None:
    good = await enqueue(spool)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_crash_while_writing, args=(str(spool.directory), ready))
    proc.start()
    try:
        assert await asyncio.to_thread(ready.wait, 20)
        [partial] = spool.tmp_dir.iterdir()
        assert partial.stat().st_size > 1000
    finally:
        proc.kill()
        await asyncio.to_thread(proc.join, 20)
    assert [e.queue_id for e in SpoolAdmin(spool.directory).list_queue()] == [good.queue_id]
    assert spool.queue_versions() == {good.queue_id: 0}
    os.utime(partial, (0, 0))  # an hour later: the next start clears it
    await spool.start()
    assert list(spool.tmp_dir.iterdir()) == []
    assert [e.queue_id for e in SpoolAdmin(spool.directory).list_queue()] == [good.queue_id]


async def test_truncated_or_unreadable_message_is_skipped_not_fatal(spool: Spool) -> None:
    good = await enqueue(spool)
    truncated = await enqueue(spool, b"z" * 500)
    path = spool.queue_dir / f"{truncated.queue_id}.msg"
    path.write_bytes(path.read_bytes()[:-10])
    (spool.queue_dir / ("F" * 24 + ".msg")).write_text("{not json\n")
    (spool.queue_dir / ("E" * 24 + ".msg")).write_text("no header line at all")
    assert [e.queue_id for e in SpoolAdmin(spool.directory).list_queue()] == sorted(
        [good.queue_id, truncated.queue_id]
    )
    with pytest.raises(ValueError, match="header says 500"):
        spool.claim_and_load(truncated.queue_id)
    assert spool.try_claim(truncated.queue_id) is not None  # the failed load let go


def _legacy_entry(queue_id: str, data: bytes, **update: Any) -> QueueEntry:
    return QueueEntry(
        queue_id=queue_id,
        mail_from="old@example.com",
        recipients=[
            RecipientState(address="a@d.test", route="r", status="delivered"),
            RecipientState(address="b@d.test", route="r", status="deferred", attempts=2),
        ],
        received_at=500.0,
        size=len(data),
        **update,
    )


async def test_start_converts_a_two_file_spool(tmp_path: Path) -> None:
    queue, dead = tmp_path / "queue", tmp_path / "deadletter"
    for path in (tmp_path / "tmp", queue, dead):
        path.mkdir(parents=True)
    queued = _legacy_entry(new_queue_id(500.0), b"queued\r\n")
    held = _legacy_entry(new_queue_id(501.0), b"held\r\n")
    done = _legacy_entry(new_queue_id(502.0), b"half converted\r\n")
    dead_letter = _legacy_entry(new_queue_id(503.0), b"dead\r\n", dead_reason="550 gone")
    write_legacy_pair(queue, queued, b"queued\r\n")
    write_legacy_pair(queue, held, b"held\r\n")
    write_legacy_pair(queue, done, b"half converted\r\n")
    write_legacy_pair(dead, dead_letter, b"dead\r\n")
    # A crash after writing the new file but before removing the old pair:
    (queue / f"{done.queue_id}.msg").write_bytes(encode_header(done) + b"half converted\r\n")
    lock = os.open(queue / f"{held.queue_id}.eml", os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # an old relay still delivering it
    spool = Spool(tmp_path, clock=lambda: 1000.0)
    try:
        await spool.start()
        assert SpoolAdmin(spool.directory).legacy_message_count() == 1
        assert [e.queue_id for e in SpoolAdmin(spool.directory).list_queue()] == [
            queued.queue_id,
            done.queue_id,
        ]
    finally:
        os.close(lock)
    await spool.start()
    assert SpoolAdmin(spool.directory).legacy_message_count() == 0
    assert SpoolAdmin(spool.directory).list_queue() == [queued, held, done]
    assert SpoolAdmin(spool.directory).list_dead_letters() == [dead_letter]
    assert SpoolAdmin(spool.directory).read_message(held.queue_id) == b"held\r\n"
    assert SpoolAdmin(spool.directory).read_message(dead_letter.queue_id, dead=True) == b"dead\r\n"
    assert sorted(p.suffix for p in queue.iterdir()) == [".msg"] * 3
    assert list(spool.tmp_dir.iterdir()) == []
    # The converted messages behave like any other: retry a dead letter, deliver.
    revived = await asyncio.to_thread(
        SpoolAdmin(spool.directory).retry_dead_letter, dead_letter.queue_id
    )
    assert [r.status for r in revived.recipients] == ["delivered", "pending"]
    loaded = spool.claim_and_load(dead_letter.queue_id)
    assert not isinstance(loaded, str)
    assert loaded[1] == revived and loaded[2] == b"dead\r\n"
    spool.remove_and_release(dead_letter.queue_id, loaded[0])


async def test_free_bytes_and_writable(spool: Spool) -> None:
    assert spool.free_bytes() > 0
    assert spool.writable()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"Message-ID: <a@b>\r\n\r\nx", "<a@b>"),
        (b"message-id:\r\n <folded@b>\r\n\r\nx", "<folded@b>"),
        (b"Subject: x\r\n\r\nMessage-ID: <in-body@b>\r\n", None),
    ],
)
def test_extract_message_id(data: bytes, expected: str | None) -> None:
    assert extract_message_id(data) == expected
