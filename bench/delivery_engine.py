"""Benchmark: the delivery engine alone, from a full spool to Postfix's smtp-sink.

Why: the relay-vs-Postfix benchmark measures the whole path; this one isolates the
delivery side, so a change to the engine or the SMTP pool shows up without the noise of
SMTP acceptance. It prints figures; it asserts nothing.

One run: a fresh spool in a temp dir is filled with `--messages` messages of `--size`
bytes (not timed), a fresh `smtp-sink` listens on 127.0.0.1, then a `DeliveryEngine`
starts and the clock runs until the spool's queue is empty (every message answered 250
by the sink and removed). Reported per variant: messages/s (median of `--reps`, runs
alternating between variants), this process's CPU seconds per 1,000 messages, and how
many upstream connections were opened.

Variants:
- `pool`: the real engine, connections pooled and reused (`pool_size` = `--pool-size`);
- `pool+rset`: pooled, but every reuse is preceded by an RSET round trip (the pool only
  sends one after `RSET_AFTER_IDLE_SECONDS` idle; this shows what that saves);
- `no-reuse`: the same, but every connection is closed after one message (the pool's
  idle timeout set to 0), which is what delivery without a pool costs.

Run: `.venv/bin/python bench/delivery_engine.py [--messages 3000] [--reps 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from mailrelay.relay.config import ApiUpstream, RelayConfig, SmtpUpstream
from mailrelay.relay.delivery import DeliveryEngine
from mailrelay.relay.metrics import RelayMetrics
from mailrelay.relay.spool import Spool
from mailrelay.relay.upstreams import smtp as smtp_transport
from mailrelay.relay.upstreams.factory import build_transport
from mailrelay.relay.upstreams.smtp import PoolObserver, SmtpTransport
from mailrelay.relay.upstreams.transport import Transport

VARIANTS = ("pool", "pool+rset", "no-reuse")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def message(index: int, size: int) -> bytes:
    head = (
        f"From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench {index}\r\n"
        f"Message-ID: <bench-{index}@example.com>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def start_sink(port: int) -> subprocess.Popen[bytes]:
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    return subprocess.Popen(
        [sink, "-u", "nobody", f"127.0.0.1:{port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_listening(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise SystemExit(f"smtp-sink did not listen on port {port}")


async def one_run(
    variant: str, args: argparse.Namespace, workdir: Path
) -> tuple[float, float, int]:
    """(messages/s, CPU seconds per 1,000 messages, connections opened)."""
    port = free_port()
    sink = start_sink(port)
    try:
        wait_listening(port)
        spool_dir = Path(tempfile.mkdtemp(dir=workdir))
        spool = Spool(spool_dir)
        await spool.start()
        for i in range(args.messages):
            await spool.enqueue(
                "bench@example.com",
                [("sink@example.net", "sink")],
                message(i, args.size),
                smtputf8=False,
                body_8bitmime=False,
                client_address="127.0.0.1",
                authenticated_user=None,
            )
        config = RelayConfig.model_validate(
            {
                "hostname": "bench.test",
                "auth": {"required": False},
                "allowed_networks": ["127.0.0.1/32"],
                "spool": {"directory": str(spool_dir)},
                "delivery": {"concurrency": args.concurrency, "poll_interval_seconds": 1.0},
                "routes": [
                    {
                        "name": "sink",
                        "upstream": {
                            "type": "smtp",
                            "name": "sink",
                            "host": "127.0.0.1",
                            "port": port,
                            "tls": "none",
                            "insecure_allow_plaintext": True,
                            "pool_size": args.pool_size,
                        },
                    }
                ],
            }
        )
        registry = CollectorRegistry()
        metrics = RelayMetrics(registry)

        def no_reuse(
            upstream: SmtpUpstream | ApiUpstream, observer: PoolObserver, _: RelayMetrics
        ) -> Transport:
            assert isinstance(upstream, SmtpUpstream)
            return SmtpTransport(upstream, observer=observer, idle_timeout=0)

        def pooled(
            upstream: SmtpUpstream | ApiUpstream, observer: PoolObserver, _: RelayMetrics
        ) -> Transport:
            return build_transport(upstream, observer=observer)

        engine = DeliveryEngine(
            config, spool, metrics, transport_factory=no_reuse if variant == "no-reuse" else pooled
        )
        default_rset_after = smtp_transport.RSET_AFTER_IDLE_SECONDS
        if variant == "pool+rset":
            smtp_transport.RSET_AFTER_IDLE_SECONDS = -1.0
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        await engine.start()
        # The spool directory is the only witness of "all delivered": poll it.
        while any(True for _ in spool.iter_queue_ids()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        await engine.stop(5)
        smtp_transport.RSET_AFTER_IDLE_SECONDS = default_rset_after
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (
            cpu_after.ru_stime - cpu_before.ru_stime
        )
        opened = registry.get_sample_value(
            "mailrelay_upstream_connections_opened_total", {"upstream": "sink"}
        )
        shutil.rmtree(spool_dir, ignore_errors=True)
        return args.messages / elapsed, cpu / args.messages * 1000, int(opened or 0)
    finally:
        sink.terminate()
        sink.wait(10)


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    if shutil.which("smtp-sink") is None and not Path("/usr/sbin/smtp-sink").exists():
        print("smtp-sink not found: apt-get install postfix", file=sys.stderr)
        return 2
    return asyncio.run(main(args))


async def main(args: argparse.Namespace) -> int:
    results: dict[str, list[tuple[float, float, int]]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        shift = rep % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for variant in order:
            figures = await one_run(variant, args, args.workdir)
            results[variant].append(figures)
            print(
                f"rep {rep + 1} {variant:9s} {figures[0]:8.0f} msg/s "
                f"{figures[1]:6.2f} CPU s/1k msgs {figures[2]:6d} connections",
                flush=True,
            )

    print()
    print(
        f"{args.messages} messages of {args.size} B, concurrency {args.concurrency}, "
        f"pool_size {args.pool_size}, median of {args.reps}"
    )
    print(f"{'variant':10s} {'msg/s':>8s} {'CPU s/1k':>9s} {'connections':>12s}")
    for variant in VARIANTS:
        rows = results[variant]
        rate = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        conns = statistics.median(r[2] for r in rows)
        print(f"{variant:10s} {rate:8.0f} {cpu:9.2f} {conns:12.0f}")
    pool = statistics.median(r[0] for r in results["pool"])
    rset = statistics.median(r[0] for r in results["pool+rset"])
    plain = statistics.median(r[0] for r in results["no-reuse"])
    print(f"pool / no-reuse throughput: {pool / plain:.2f}x; pool / pool+rset: {pool / rset:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
