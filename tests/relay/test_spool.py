"""The spool: durable layout, atomic state, group commit, claims across processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from mailrelay.relay.spool import QueueEntry, Spool, SpoolError, extract_message_id, new_queue_id


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


async def test_enqueue_writes_both_files_and_nothing_in_tmp(spool: Spool) -> None:
    data = b"Message-ID: <m1@x>\r\nSubject: x\r\n\r\n\x00\xff binary\r\n"
    entry = await enqueue(spool, data, rcpts=2)
    assert (spool.queue_dir / f"{entry.queue_id}.eml").read_bytes() == data
    stored = QueueEntry.model_validate_json(
        (spool.queue_dir / f"{entry.queue_id}.json").read_bytes()
    )
    assert stored == entry
    assert entry.message_id == "<m1@x>"
    assert entry.size == len(data)
    assert [r.next_attempt_at for r in entry.recipients] == [1000.0, 1000.0]
    assert list(spool.tmp_dir.iterdir()) == []
    assert await spool.read_message(entry.queue_id) == data


def test_queue_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_queue_id(1_700_000_000 + i / 1000) for i in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000
    same_instant = {new_queue_id(1_700_000_000.0) for _ in range(1000)}
    assert len(same_instant) == 1000


async def test_concurrent_enqueues_share_directory_fsyncs(spool: Spool) -> None:
    entries = await asyncio.gather(*(enqueue(spool) for _ in range(64)))
    assert len({e.queue_id for e in entries}) == 64
    assert len(spool.list_queue()) == 64
    assert 1 <= spool.directory_syncs < 64


async def test_save_is_atomic_and_listing_sees_the_new_state(spool: Spool) -> None:
    entry = await enqueue(spool)
    entry.recipients[0].status = "deferred"
    entry.recipients[0].attempts = 3
    entry.recipients[0].last_error = "451 try later"
    await spool.save(entry)
    [listed] = spool.list_queue()
    assert listed.recipients[0].attempts == 3
    assert list(spool.tmp_dir.iterdir()) == []


async def test_dead_letter_round_trip(spool: Spool) -> None:
    entry = await enqueue(spool, rcpts=2)
    entry.recipients[0].status = "delivered"
    entry.recipients[1].status = "bounced"
    entry.recipients[1].attempts = 7
    await spool.move_to_dead_letter(entry, "550 5.1.1 no such user")
    assert spool.list_queue() == []
    [dead] = spool.list_dead_letters()
    assert dead.dead_reason == "550 5.1.1 no such user"
    revived = await spool.retry_dead_letter(entry.queue_id)
    assert spool.list_dead_letters() == []
    assert [(r.status, r.attempts) for r in revived.recipients] == [
        ("delivered", 0),
        ("pending", 0),
    ]
    assert revived.dead_reason is None
    assert spool.load_entry(entry.queue_id) == revived
    with pytest.raises(SpoolError):
        await spool.retry_dead_letter(entry.queue_id)


async def test_remove_and_delete(spool: Spool) -> None:
    a, b = await enqueue(spool), await enqueue(spool)
    await spool.remove(a.queue_id)
    assert [e.queue_id for e in spool.list_queue()] == [b.queue_id]
    spool.delete_sync(b.queue_id)
    assert spool.list_queue() == []
    with pytest.raises(SpoolError):
        spool.delete_sync(b.queue_id)


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
    updated = spool.retry_now_sync(entry.queue_id)
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
            spool.claim_blocking(entry.queue_id, timeout=0.2)
    finally:
        done.set()
        await asyncio.to_thread(proc.join, 20)
    claim = spool.claim_blocking(entry.queue_id, timeout=5)
    claim.release()


async def test_start_removes_only_old_debris(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.start()
    old_tmp, new_tmp = spool.tmp_dir / "A.eml", spool.tmp_dir / "B.eml"
    lone_eml = spool.queue_dir / ("0" * 24 + ".eml")
    for path in (old_tmp, new_tmp, lone_eml):
        path.write_bytes(b"x")
    for path in (old_tmp, lone_eml):
        os.utime(path, (0, 0))
    await spool.start()
    assert not old_tmp.exists() and not lone_eml.exists()
    assert new_tmp.exists()


async def test_unreadable_envelope_is_skipped_not_fatal(spool: Spool) -> None:
    good = await enqueue(spool)
    (spool.queue_dir / ("F" * 24 + ".json")).write_text("{not json")
    assert [e.queue_id for e in spool.list_queue()] == [good.queue_id]


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
