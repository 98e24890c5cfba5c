"""Benchmark: what the durable spool costs per message, and what raw file patterns cost.

Why: in `relay_vs_postfix.py` the relay's I/O threads spend about as much CPU per message
as its event loop, and Postfix writes one fsync'd file per message where the spool writes
two plus a shared directory fsync. This script separates that cost from SMTP:

- `spool`: `Spool.enqueue` with `--concurrency` enqueues in flight (what the SMTP front
  does), then, for every message, claim + load + read + remove + release (what the
  delivery engine does on a first-attempt success);
- `raw`: the same number of messages written with plain syscalls in a thread pool:
  two fsync'd files + two renames (today's pattern without the directory fsync), one
  fsync'd file + one rename (a one-file spool), and both without fsync (the syscall cost
  alone).

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

from mailrelay.relay.spool import Spool

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
    ids: list[str] = []

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
            ids.append(entry.queue_id)

    def claim_and_read(queue_id: str) -> Callable[[], None]:
        claim = spool.try_claim(queue_id)
        assert claim is not None
        spool.load_entry(queue_id)
        (spool.queue_dir / f"{queue_id}.eml").read_bytes()
        return claim.release

    async def deliver(queue_id: str) -> None:
        async with gate:
            release = await asyncio.to_thread(claim_and_read, queue_id)
            await spool.remove(queue_id)
            await asyncio.to_thread(release)

    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(enqueue() for _ in range(messages)))
    _report("spool enqueue", messages, _cpu() - cpu, time.perf_counter() - wall)
    print(f"    ({spool.directory_syncs} directory fsyncs for {messages} messages)")
    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(deliver(queue_id) for queue_id in ids))
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

    for name, files, fsync in (
        ("raw: 2 fsync'd files + 2 renames", 2, True),
        ("raw: 1 fsync'd file + 1 rename", 1, True),
        ("raw: 2 files + 2 renames, no fsync", 2, False),
        ("raw: 1 file + 1 rename, no fsync", 1, False),
    ):
        with ThreadPoolExecutor(concurrency) as pool:
            cpu, wall = _cpu(), time.perf_counter()
            list(pool.map(lambda i, n=files, s=fsync: one(i, n, s), range(messages)))
            _report(name, messages, _cpu() - cpu, time.perf_counter() - wall)
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
