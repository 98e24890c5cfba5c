"""Benchmark: the cost of DKIM signing, and that it does not stall the event loop.

For message sizes from 10 KB to 25 MB (the relay's default size limit), per algorithm
(rsa-sha256 with a 2048-bit key, ed25519-sha256):

* the time ``dkim.sign_message`` takes (dkimpy's canonicalisation and hashing), median of
  ``--rounds``;
* the event loop's worst stall while ``RouteSigners.sign`` (what the delivery engine calls)
  signs the message in its worker process: a ticker task sleeps 1 ms in a loop and records
  the longest gap; for comparison the same signing in a worker thread
  (``asyncio.to_thread``: dkimpy holds the GIL, so a thread does not help) and called
  directly on the loop.

Prints one line per case. Run: `.venv/bin/python bench/dkim_sign.py` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailrelay.relay import dkim
from mailrelay.relay.config import parse_config
from mailrelay.relay.signing import RouteSigners, SignFailure, SigningPool


def _pem(algorithm: str) -> bytes:
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _message(size: int) -> bytes:
    head = (
        b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (mailrelay)\r\n"
        b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: bench\r\n"
        b"Message-ID: <bench@example.com>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again \t \r\n"
    return head + line * (size // len(line) + 1)


async def _worst_gap(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(seconds the work took, the longest the loop went without running the ticker)."""
    worst = 0.0
    running = True

    async def tick() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    worst = 0.0
    started = time.perf_counter()
    await work()
    took = time.perf_counter() - started
    running = False
    await ticker
    return took, worst


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--sizes", default="10000,1000000,10000000,25000000", help="message sizes in bytes"
    )
    args = parser.parse_args()
    pool = SigningPool()
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in ("rsa-sha256", "ed25519-sha256"):
            key_file = Path(tmp) / f"{algorithm}.key"
            key_file.write_bytes(_pem(algorithm))
            config = parse_config(
                "hostname: relay.test\nauth: {required: false}\n"
                "allowed_networks: [10.0.0.0/8]\nspool: {directory: /tmp/x}\n"
                "routes:\n- name: r\n  upstream: {type: smtp, name: u, host: mx.test}\n"
                "  dkim:\n  - {domain: example.com, selector: s1, "
                f"private_key_file: {key_file}}}\n"
            )
            signers = RouteSigners.load(config)
            signer = signers.signers["r"][0]
            for size in (int(s) for s in args.sizes.split(",")):
                message = _message(size)
                direct = []
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    dkim.sign_message(message, signer)
                    direct.append(time.perf_counter() - started)
                await signers.sign("r", "a@example.com", message[:2000], pool)  # warm up

                async def in_pool(
                    m: bytes = message, s: RouteSigners = signers
                ) -> bytes | SignFailure:
                    return await s.sign("r", "a@example.com", m, pool)

                async def in_thread(m: bytes = message, s: dkim.Signer = signer) -> bytes:
                    return await asyncio.to_thread(dkim.sign_message, m, s)

                async def on_loop(m: bytes = message, s: dkim.Signer = signer) -> bytes:
                    return dkim.sign_message(m, s)

                in_process = [await _worst_gap(in_pool) for _ in range(args.rounds)]

                threaded = await _worst_gap(in_thread)
                blocking = await _worst_gap(on_loop)
                print(
                    f"{algorithm:15} {size / 1e6:6.2f} MB"
                    f"  sign {statistics.median(direct) * 1e3:7.1f} ms"
                    f" (via pool {statistics.median(t for t, _ in in_process) * 1e3:7.1f} ms)"
                    f"  worst loop stall: pool {max(g for _, g in in_process) * 1e3:5.1f} ms,"
                    f" thread {threaded[1] * 1e3:7.1f} ms, on loop {blocking[1] * 1e3:7.1f} ms",
                    flush=True,
                )
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
