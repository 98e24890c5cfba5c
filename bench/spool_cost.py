"""Benchmark: what the durable spool costs per message, and what raw file patterns cost.

Why: in `relay_vs_postfix.py` the relay's I/O threads spend about as much CPU per message
as its event loop; Postfix writes one fsync'd file per message, and so does the spool
now (it wrote two before), plus a shared directory fsync. This script separates that
cost from SMTP:

- `spool`: `Spool.enqueue` with `--concurrency` enqueues in flight (what the SMTP front
  does), then, for every message, claim + load + read + remove + release (what the
  delivery engine does for a message it did not spool itself, on a first-attempt
  success), then one state save per message (what a deferral costs);
- `raw`: the same number of messages written with plain syscalls in a thread pool:
  two fsync'd files + two renames (the old two-file pattern without the directory
  fsync), one fsync'd file + one rename (the spool's pattern), one fsync'd file written
  in place and marked complete with `fchmod` (Postfix's execute bit), the first two
  without fsync (the syscall cost alone), and a state change as a small file vs. the
  whole message file rewritten.

Figures are this process's CPU milliseconds per message (user + system, all threads) and
messages per second of wall time. Run it under `--dir` on the disk the spool uses:
`.venv/bin/python bench/spool_cost.py [--messages 2000] [--dir /var/tmp]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mailrelay.relay.spool import QueueEntry, Spool

DATA = b"x" * 2300  # a 2 KB message plus our Received header, as in the relay benchmark


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _report(name: str, messages: int, cpu: float, wall: float) -> None:
    print(f"  {name:<44} {cpu / messages * 1000:6.2f} ms CPU/msg  {messages / wall:7.0f} msg/s")


async def spool_figures(directory: Path, messages: int, concurrency: int) -> None:
    """Enqueue like the front, then claim/load/remove like a first-attempt delivery."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=32))
    spool = Spool(directory)
    await spool.start()
    gate = asyncio.Semaphore(concurrency)
    entries: list[QueueEntry] = []

    async def enqueue() -> None:
        async with gate:
            entry = await spool.enqueue(
                "bench@example.com",
                [("sink@example.net", "all")],
                DATA,
                smtputf8=False,
                body_8bitmime=False,
                client_address="127.0.0.1",
                authenticated_user=None,
            )
            entries.append(entry)

    async def deliver(queue_id: str) -> None:
        async with gate:
            loaded = await asyncio.to_thread(spool.claim_and_load, queue_id)
            assert not isinstance(loaded, str)
            await asyncio.to_thread(spool.remove_and_release, queue_id, loaded[0])

    async def save(entry: QueueEntry) -> None:
        async with gate:
            await spool.save(entry)

    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(enqueue() for _ in range(messages)))
    _report("spool enqueue", messages, _cpu() - cpu, time.perf_counter() - wall)
    print(f"    ({spool.directory_syncs} directory fsyncs for {messages} messages)")
    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(save(entry) for entry in entries))
    _report("state save (deferral)", messages, _cpu() - cpu, time.perf_counter() - wall)
    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(deliver(entry.queue_id) for entry in entries))
    _report(
        "claim + load + read + remove + release", messages, _cpu() - cpu, time.perf_counter() - wall
    )


def raw_figures(directory: Path, messages: int, concurrency: int) -> None:
    """Plain syscalls: n files per message, with or without fsync, then renamed."""
    tmp, queue = directory / "tmp", directory / "queue"
    tmp.mkdir()
    queue.mkdir()

    def one(index: int, files: int, fsync: bool) -> None:
        for k in range(files):
            fd = os.open(tmp / f"{index}.{k}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                os.write(fd, DATA)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        for k in range(files):
            os.rename(tmp / f"{index}.{k}", queue / f"{index}.{k}")

    def in_place(index: int) -> None:
        fd = os.open(queue / f"{index}.0", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, DATA)
            os.fchmod(fd, 0o740)
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(index: int, size: int) -> None:
        fd = os.open(tmp / f"{index}.s", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, DATA[:size])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp / f"{index}.s", queue / f"{index}.s")

    patterns: list[tuple[str, Callable[[int], None]]] = [
        ("raw: 2 fsync'd files + 2 renames", lambda i: one(i, 2, True)),
        ("raw: 1 fsync'd file + 1 rename", lambda i: one(i, 1, True)),
        ("raw: 1 fsync'd file in place + fchmod", in_place),
        ("raw: 2 files + 2 renames, no fsync", lambda i: one(i, 2, False)),
        ("raw: 1 file + 1 rename, no fsync", lambda i: one(i, 1, False)),
        ("raw: state as a 400 B file + rename", lambda i: rewrite(i, 400)),
        ("raw: state as the whole file rewritten", lambda i: rewrite(i, len(DATA))),
    ]
    for name, pattern in patterns:
        with ThreadPoolExecutor(concurrency) as pool:
            cpu, wall = _cpu(), time.perf_counter()
            list(pool.map(pattern, range(messages)))
            _report(name, messages, _cpu() - cpu, time.perf_counter() - wall)
        if not name.startswith("raw: state as"):
            for path in queue.iterdir():
                path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20, help="like 20 SMTP sessions")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to write")
    args = parser.parse_args()
    print(f"{args.messages} messages of {len(DATA)} B, {args.concurrency} at once, in {args.dir}")
    for step in ("spool", "raw"):
        work = Path(tempfile.mkdtemp(prefix="mailrelay-spoolcost-", dir=args.dir))
        try:
            if step == "spool":
                asyncio.run(spool_figures(work, args.messages, args.concurrency))
            else:
                raw_figures(work, args.messages, args.concurrency)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
