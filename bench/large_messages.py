"""Benchmark: the relay's memory with many large messages in flight at once.

Why: a relay sized for a 512Mi pod must survive a burst of large messages (issue 16: on
the old front one 20 MB message cost ~90 MB of RSS, a dozen at once got the pod
OOM-killed). This prints, for each scenario, the relay's RSS before the burst, its peak
(`VmHWM` from /proc, which the kernel keeps exactly, not a sample), the peak's growth per
message sent at once and per MB sent, how many messages were accepted and refused (and
with which replies), and whether every accepted message arrived byte-exact.

One run: an upstream sink (aiosmtpd in a thread of this process, keeping only a SHA-256
of each message) and the relay as a subprocess (`python -m mailrelay.relay`, no TLS, no
AUTH, `allowed_networks: [127.0.0.1/32]`, one route to the sink, a fresh spool under
`--workdir`); N clients connect at once and each sends one message of `--size-mb` MB
(random base64 lines, a few dot-led lines to exercise dot-stuffing). The relay's memory
is the subprocess's own `VmHWM`; the senders and the sink live in this process and do
not count.

    .venv/bin/python bench/large_messages.py                       # 1, 10, 20 x 20 MB
    .venv/bin/python bench/large_messages.py --concurrent 10 --size-mb 20 --budget-mb 128

Keep runs short on a shared machine: 20 x 20 MB takes ~10-30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status_kb(pid: int, field_name: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


def make_message(index: int, size: int, rng: random.Random) -> bytes:
    """A message of about `size` bytes: headers, then base64 lines (some starting with a
    dot, which the client stuffs and the relay must unstuff)."""
    head = (
        f"From: bench@example.com\r\nTo: sink@example.net\r\n"
        f"Subject: large {index}\r\nMessage-ID: <large-{index}-{rng.getrandbits(32)}@bench>\r\n"
        "\r\n"
    ).encode()
    line_raw = 57  # 76 base64 characters per line
    lines: list[bytes] = []
    total = len(head)
    while total < size:
        line = base64.b64encode(rng.randbytes(line_raw))
        if len(lines) % 997 == 0:
            line = b"." + line[1:]
        lines.append(line)
        total += len(line) + 2
    return head + b"\r\n".join(lines) + b"\r\n"


@dataclass
class Sink:
    """Digests of what the upstream received, keyed by Subject."""

    pipelining: bool = True
    digests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Offer PIPELINING, as every real upstream does (aiosmtpd reads pipelined
        commands in order anyway); without it the relay uses aiosmtplib's sendmail."""
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Keep the digest of the message as the client sent it (our Received removed)."""
        digest = hashlib.sha256(_strip_received(envelope.original_content or b"")).hexdigest()
        with self.lock:
            self.digests.append(digest)
        return "250 2.0.0 Sunk"


class _SinkController(Controller):
    def factory(self) -> SMTP:
        return SMTP(self.handler, decode_data=False, data_size_limit=None, hostname="sink.test")


@dataclass
class Result:
    """What one scenario measured."""

    concurrent: int
    size: int
    baseline_kb: int
    peak_kb: int
    accepted: int
    refused: dict[str, int]
    arrived_exact: int
    seconds: float

    def row(self) -> str:
        growth_mb = (self.peak_kb - self.baseline_kb) / 1024
        sent_mb = self.concurrent * self.size / 1e6
        refused = ", ".join(f"{k} x{v}" for k, v in sorted(self.refused.items())) or "-"
        return (
            f"| {self.concurrent} x {self.size / 1e6:.0f} MB | {self.baseline_kb / 1024:.0f} "
            f"| {self.peak_kb / 1024:.0f} | {growth_mb / self.concurrent:.1f} "
            f"| {growth_mb / sent_mb:.2f} | {self.accepted} | {refused} "
            f"| {self.arrived_exact}/{self.accepted} | {self.seconds:.1f} |"
        )


async def run_scenario(
    workdir: Path, concurrent: int, size: int, budget: int | None, *, pipelining: bool
) -> Result:
    sink = Sink(pipelining=pipelining)
    sink_port = free_port()
    controller = _SinkController(sink, hostname="127.0.0.1", port=sink_port)
    controller.start()
    smtp_port, metrics_port = free_port(), free_port()
    spool = workdir / "spool"
    limits: dict[str, Any] = {"max_message_size": max(size * 2, 26_214_400)}
    if budget is not None:
        limits["max_bytes_in_flight"] = budget
    config = {
        "hostname": "relay.bench",
        "listener": {"host": "127.0.0.1", "submission_port": smtp_port},
        "auth": {"required": False},
        "allowed_networks": ["127.0.0.1/32"],
        "limits": limits,
        "spool": {"directory": str(spool), "min_free_bytes": 0},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "routes": [
            {
                "name": "all",
                "upstream": {
                    "type": "smtp",
                    "name": "sink",
                    "host": "127.0.0.1",
                    "port": sink_port,
                    "tls": "none",
                    "insecure_allow_plaintext": True,
                    "timeout_seconds": 120,
                },
            }
        ],
    }
    config_path = workdir / "relay.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process = start_relay(config_path)
    try:
        await _wait_listening(smtp_port, process)
        await asyncio.sleep(0.5)
        baseline = proc_status_kb(process.pid, "VmRSS")
        rng = random.Random(concurrent * 1000 + size)
        messages = [make_message(i, size, rng) for i in range(concurrent)]
        expected = {hashlib.sha256(m).hexdigest() for m in messages}
        started = time.perf_counter()
        replies = await asyncio.gather(*(_send(smtp_port, m) for m in messages))
        accepted = sum(1 for r in replies if r.startswith("250"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with sink.lock:
                if len(sink.digests) >= accepted:
                    break
            await asyncio.sleep(0.1)
        seconds = time.perf_counter() - started
        peak = proc_status_kb(process.pid, "VmHWM")
        refused: dict[str, int] = {}
        for reply in replies:
            if not reply.startswith("250"):
                key = reply[:9]
                refused[key] = refused.get(key, 0) + 1
        with sink.lock:
            arrived = sum(1 for d in sink.digests if d in expected)
        return Result(concurrent, size, baseline, peak, accepted, refused, arrived, seconds)
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        if process.poll() is None:
            process.kill()
        controller.stop()


def start_relay(config_path: Path) -> subprocess.Popen[bytes]:
    """`python -m mailrelay.relay` on `config_path`, logging next to it."""
    with (config_path.parent / "relay.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "mailrelay.relay", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=config_path.parent,
        )


async def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"relay exited with {process.returncode}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("relay did not listen within 30 s")


async def _send(port: int, message: bytes) -> str:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=300)
    try:
        await smtp.connect()
        _, reply = await smtp.sendmail("bench@example.com", ["sink@example.net"], message)
        return f"250 {reply}"
    except aiosmtplib.SMTPResponseException as exc:
        return f"{exc.code} {exc.message}"
    except aiosmtplib.SMTPException as exc:
        return f"error {exc}"
    finally:
        with contextlib.suppress(Exception):
            await smtp.quit()
        smtp.close()


def _strip_received(data: bytes) -> bytes:
    while data[:9].lower() == b"received:":
        end = data.find(b"\r\n")
        while data[end + 2 : end + 3] in (b" ", b"\t"):
            end = data.find(b"\r\n", end + 2)
        data = data[end + 2 :]
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrent", type=int, nargs="+", default=[1, 10, 20])
    parser.add_argument("--size-mb", type=float, default=20)
    parser.add_argument("--budget-mb", type=float, default=None, help="limits.max_bytes_in_flight")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument(
        "--no-pipelining",
        action="store_true",
        help="the upstream does not offer PIPELINING (the relay then sends with aiosmtplib)",
    )
    args = parser.parse_args(argv)
    size = int(args.size_mb * 1e6)
    budget = None if args.budget_mb is None else int(args.budget_mb * 1e6)
    print(
        "| burst | RSS before MB | peak RSS MB | peak growth per message MB "
        "| growth per MB sent | accepted | refused | arrived byte-exact | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for concurrent in args.concurrent:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mailrelay-large-") as tmp:
            result = asyncio.run(
                run_scenario(Path(tmp), concurrent, size, budget, pipelining=not args.no_pipelining)
            )
        print(result.row(), flush=True)


if __name__ == "__main__":
    main()
