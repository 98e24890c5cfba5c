"""Benchmark: handing a relay's queue to its peers (issue 13).

A leaving relay's spool is filled with `--messages` queued 2 KB messages (Spool.enqueue,
as the SMTP front would leave them), then handed off with the relay's own `hand_off` to
1 and to 2 peers. Each peer is a separate process (`serve`) running the relay's
`HandoffServer` on its own spool (durable before it answers, as in a relay), so sender
and receivers do not share an event loop. Figures: messages per second of wall time, the
time to empty the spool, and the sender's CPU per message.

Run: `.venv/bin/python bench/handoff.py [--messages 10000] [--dir /var/tmp]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from mailrelay.relay.config import HandoffConfig, HandoffListen
from mailrelay.relay.handoff import HandoffServer, hand_off
from mailrelay.relay.metrics import RelayMetrics
from mailrelay.relay.spool import Spool

DATA = (b"Subject: bench\r\n\r\n" + b"x" * 76 + b"\r\n") * 26  # about 2 KB
MAX_MESSAGE = 26_214_400


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


async def serve(port: int, spool_dir: Path, token_file: Path) -> None:
    """One receiving peer: the relay's hand-off listener on its own spool, until SIGTERM."""
    spool = Spool(spool_dir)
    await spool.start()
    config = HandoffConfig(
        listen=HandoffListen(host="127.0.0.1", port=port),
        token_file=token_file,
        peers=["127.0.0.1"],
    )
    server = HandoffServer(
        config,
        spool=spool,
        metrics=RelayMetrics(CollectorRegistry()).handoff,
        max_message_size=MAX_MESSAGE,
        instance=f"peer-{port}",
    )
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.close()
    await spool.aclose()


async def fill(spool: Spool, count: int) -> None:
    gate = asyncio.Semaphore(64)

    async def one(index: int) -> None:
        async with gate:
            await spool.enqueue(
                "alice@example.com",
                [(f"rcpt{index}@dest.test", "out")],
                DATA,
                smtputf8=False,
                body_8bitmime=False,
                client_address="10.0.0.1",
                authenticated_user="alice",
            )

    await asyncio.gather(*(one(i) for i in range(count)))


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_case(base: Path, messages: int, peers: int, token_file: Path) -> None:
    case = base / f"peers{peers}"
    spool = Spool(case / "leaving")
    await spool.start()
    started = time.monotonic()
    await fill(spool, messages)
    print(f"  filled {messages} x {len(DATA)} B in {time.monotonic() - started:.1f}s")
    ports = [free_port() for _ in range(peers)]
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "serve",
            "--port",
            str(port),
            "--spool",
            str(case / f"peer{port}"),
            "--token-file",
            str(token_file),
            stdout=asyncio.subprocess.PIPE,
        )
        for port in ports
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            await process.stdout.readline()
        config = HandoffConfig(
            token_file=token_file,
            peers=[f"127.0.0.1:{port}" for port in ports],
            deadline_seconds=600,
        )
        metrics = RelayMetrics(CollectorRegistry())
        loop = asyncio.get_running_loop()
        cpu, wall = _cpu(), time.monotonic()
        result = await hand_off(
            spool,
            config,
            metrics=metrics.handoff,
            instance="leaving",
            deadline=loop.time() + 600,
            max_message_size=MAX_MESSAGE,
            own_addresses=[],
        )
        wall, cpu = time.monotonic() - wall, _cpu() - cpu
        left = len(spool.queue_ids())
        received = sum(len(list((case / f"peer{p}" / "queue").glob("*.msg"))) for p in ports)
        print(
            f"  {peers} peer(s): handed off {result.handed_off} in {wall:.2f}s = "
            f"{result.handed_off / wall:.0f} msg/s; sender CPU {cpu / messages * 1000:.3f} ms/msg; "
            f"left {left}, peers hold {received}"
        )
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
        await spool.aclose()


async def main_async(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="handoff-bench-", dir=args.dir))
    try:
        token_file = base / "token"
        token_file.write_text(secrets.token_urlsafe(32))
        print(f"hand-off of {args.messages} queued messages of {len(DATA)} B ({base})")
        for peers in args.peers:
            await run_case(base, args.messages, peers, token_file)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command")
    peer = sub.add_parser("serve")
    peer.add_argument("--port", type=int, required=True)
    peer.add_argument("--spool", type=Path, required=True)
    peer.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.port, args.spool, args.token_file))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
