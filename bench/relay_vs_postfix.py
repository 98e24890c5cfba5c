"""Benchmark: our relay against Postfix as a pure loopback relay, side by side in one run.

Why this shape: the issue's target is relative ("end to end at least 1.5x Postfix, p99 no
worse, at most 100 MB"), and this machine is shared and noisy, so both systems run in the
same invocation, alternating, and the table reports medians and ratios.

One *run* measures one system once:

1. a fresh `smtp-sink -c` (Postfix's test server) on 127.0.0.1 counts every message it
   receives (its `mesg=` counter, read from its stdout as it changes);
2. a fresh server forwards everything to that sink: either a private Postfix instance
   (own config, queue and data directories in a temp dir, `postfix -c DIR start`, its
   normal fsync'd queue, relayhost = the sink, no local delivery, mynetworks =
   127.0.0.1/32), or our relay (`python -m mailrelay.relay --config`, allowed_networks
   127.0.0.1/32, one catch-all route to the sink with `tls: none`, a fresh spool);
3. `smtp-source` sends the load (default 20 sessions, 2 KB, 20,000 messages, one message
   per session like real submission clients); at the same time a small async SMTP client
   in this process runs `--probe-sessions` sequential sessions and times each one, step
   by step (connect, banner, EHLO, MAIL, RCPT, DATA, body to 250, QUIT to 221), because
   smtp-source reports no per-session latency;
4. accepted msg/s is measured until smtp-source exits, end-to-end msg/s until the sink has
   counted every message sent (smtp-source's plus the probe's);
5. CPU seconds come from /proc (utime+stime+cutime+cstime summed over the server's process
   tree, end minus start), memory is the peak of the summed RSS (and PSS) of that tree,
   sampled four times a second.

Repetitions alternate the systems (rotating the order each time). Everything Postfix needs
is generated into a temp dir under `--workdir` (default /var/tmp, a real disk: the queue
must pay for fsync like the relay's spool does); the system's /etc/postfix and its service
are never touched. The script installs nothing: it says what is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import pstats
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
TOOLS = ("postfix", "postconf", "smtp-source", "smtp-sink")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
SENDER = "bench@example.com"
RECIPIENT = "sink@example.net"


class BenchError(Exception):
    """A run could not be completed; the message says why."""


# --------------------------------------------------------------------------------------
# /proc accounting


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, cpu ticks including reaped children) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return ppid, utime + stime + cutime + cstime


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU time of a process tree: live processes plus everything they have reaped."""
    ticks = 0
    for pid in process_tree(root):
        stat = _proc_stat(pid)
        if stat is not None:
            ticks += stat[1]
    return ticks / CLK_TCK


def tree_thread_times(root: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(ns on CPU, ns waiting for a CPU) of every live thread in a tree, keyed by (pid, tid).

    From /proc/PID/task/TID/schedstat: telling a thread that is busy from one that wants
    the CPU but waits for it is what shows a pinned event loop on a shared, loaded machine.
    """
    times: dict[tuple[int, int], tuple[int, int]] = {}
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for task in os.scandir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    on_cpu, waiting, *_ = Path(task.path, "schedstat").read_text().split()
                    times[(pid, int(task.name))] = (int(on_cpu), int(waiting))
    return times


@dataclass(frozen=True)
class ThreadFigures:
    hottest_share: float  # the busiest thread's time on CPU, as a share of one core
    hottest_wait_share: float  # the same thread's time runnable but waiting for a CPU
    side_cpu_seconds: float  # CPU of threads other than each process's main thread


def thread_figures(
    before: dict[tuple[int, int], tuple[int, int]],
    after: dict[tuple[int, int], tuple[int, int]],
    seconds: float,
) -> ThreadFigures:
    deltas = {
        key: (cpu - before.get(key, (0, 0))[0], wait - before.get(key, (0, 0))[1])
        for key, (cpu, wait) in after.items()
    }
    if not deltas or seconds <= 0:
        return ThreadFigures(math.nan, math.nan, math.nan)
    hottest = max(deltas, key=lambda key: deltas[key][0])
    side = sum(cpu for (pid, tid), (cpu, _) in deltas.items() if pid != tid)
    return ThreadFigures(
        hottest_share=deltas[hottest][0] / 1e9 / seconds,
        hottest_wait_share=deltas[hottest][1] / 1e9 / seconds,
        side_cpu_seconds=side / 1e9,
    )


def cpu_pressure() -> str:
    """`some avg10` of /proc/pressure/cpu: the share of time something waited for a CPU."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "?"
    match = re.search(r"avg10=([\d.]+)", first)
    return f"{float(match.group(1)):.0f}%" if match else "?"


def _status_kb(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def tree_memory_kb(root: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, process count) of a tree right now."""
    pids = process_tree(root)
    return (
        sum(_status_kb(p, "VmRSS") for p in pids),
        sum(_pss_kb(p) for p in pids),
        len(pids),
    )


class MemorySampler:
    """Samples a process tree's memory in a thread; keeps the peaks."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_processes = 0
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> None:
        rss, pss, count = tree_memory_kb(self.root)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.peak_processes = max(self.peak_processes, count)

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self._sample)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._sample)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------------------
# Small helpers


def free_port(count: int = 1) -> int:
    """A port P on 127.0.0.1 such that P..P+count-1 are free right now."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            for offset in range(1, count):
                with socket.socket() as extra:
                    extra.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise BenchError("found no free port range on 127.0.0.1")


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def wait_for_banner(port: int, within: float, alive: Process | None = None) -> None:
    """Wait until something on the port answers 220 (and hang up politely)."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        if alive is not None and alive.returncode is not None:
            raise BenchError(f"process exited with status {alive.returncode} before listening")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
                if line.startswith(b"220"):
                    writer.write(b"QUIT\r\n")
                    await writer.drain()
                    return
                last = line
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise BenchError(f"nothing answered 220 on 127.0.0.1:{port} within {within}s ({last!r})")


async def http_ok(port: int, path: str) -> bool:
    """GET http://127.0.0.1:port/path and say whether it answered 200."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        return status.split()[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


Process = asyncio.subprocess.Process


# --------------------------------------------------------------------------------------
# The sink


class Sink:
    """`smtp-sink -c` on loopback; its running `mesg=` counter is parsed as it changes."""

    def __init__(self, tool: str, port: int, log_path: Path) -> None:
        self.tool = tool
        self.port = port
        self.log_path = log_path
        self.count = 0
        self.target: int | None = None
        self.reached_at: float | None = None
        self.first_at: float | None = None
        self._changed = asyncio.Event()
        self.proc: Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        argv = [self.tool, "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "postfix"]  # smtp-sink refuses to run as root
        argv += [f"127.0.0.1:{self.port}", "1024"]
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=log
            )
        self._reader = asyncio.create_task(self._read())
        await wait_for_banner(self.port, 10, self.proc)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        pending = b""
        while True:
            chunk = await self.proc.stdout.read(65536)
            if not chunk:
                return
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for record in reversed(records):
                match = re.search(rb"mesg=(\d+)", record)
                if match:
                    self._update(int(match.group(1)))
                    break

    def _update(self, count: int) -> None:
        now = time.monotonic()
        if count > 0 and self.first_at is None:
            self.first_at = now
        self.count = count
        if self.target is not None and self.reached_at is None and count >= self.target:
            self.reached_at = now
        self._changed.set()

    async def wait_for(self, target: int, within: float) -> float | None:
        """Monotonic time the counter reached `target`, or None after `within` seconds."""
        self.target = target
        self._update(self.count)
        deadline = time.monotonic() + within
        while self.reached_at is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.reached_at

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid) if self.proc is not None else math.nan

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


# --------------------------------------------------------------------------------------
# The servers under test


class Server:
    """A mail server under test: started fresh per run, measured by its process tree."""

    label = "server"
    port = 0

    async def start(self) -> None:
        raise NotImplementedError

    def root_pid(self) -> int:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def log_tail(self) -> str:
        return ""

    def describe(self) -> str:
        return self.label


POSTFIX_MASTER_CF = """\
# Generated by bench/relay_vs_postfix.py: a private instance, nothing chrooted.
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

POSTFIX_MAIN_CF = """\
# Generated by bench/relay_vs_postfix.py: Postfix as a pure relay on loopback.
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
myhostname = bench-postfix.localdomain
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# No local delivery: every recipient is relayed to the sink.
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
mynetworks = 127.0.0.1/32
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_tls_security_level = none
smtp_tls_security_level = none
# Log to a file like the relay does (there is no syslog daemon here).
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
append_dot_mydomain = no
"""


class PostfixServer(Server):
    """A private Postfix instance: own config/queue/data dirs, started with `postfix -c`."""

    def __init__(self, postfix: str, root: Path, port: int, sink_port: int) -> None:
        self.label = "postfix"
        self.postfix = postfix
        self.root = root
        self.port = port
        self.sink_port = sink_port
        self.etc = root / "etc"
        self._master: int | None = None

    async def _postfix(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.postfix,
            "-c",
            str(self.etc),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise BenchError(
                f"postfix -c {self.etc} {' '.join(args)} failed ({proc.returncode}):\n"
                f"{out.decode(errors='replace')}\n{self.log_tail()}"
            )

    async def start(self) -> None:
        for sub in ("etc", "queue", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Postfix's daemons run as `postfix` and must traverse into the instance.
        os.chmod(self.root, 0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.root / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        (self.etc / "main.cf").write_text(
            POSTFIX_MAIN_CF.format(root=self.root, sink_port=self.sink_port)
        )
        (self.etc / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=self.port))
        await self._postfix("check")
        await self._postfix("start")
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self._master = int(pid_file.read_text().strip())
                break
            await asyncio.sleep(0.05)
        if self._master is None:
            raise BenchError(f"Postfix wrote no {pid_file}\n{self.log_tail()}")
        await wait_for_banner(self.port, 20)

    def root_pid(self) -> int:
        assert self._master is not None
        return self._master

    async def stop(self) -> None:
        if self._master is None:
            return
        with contextlib.suppress(BenchError):
            await self._postfix("stop")
        for _ in range(150):  # `postfix stop` returns before the daemons have exited
            if not _alive(self._master):
                break
            await asyncio.sleep(0.1)
        for pid in reversed(process_tree(self._master)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._master = None

    def log_tail(self) -> str:
        return tail(self.root / "maillog")

    def queued_files(self) -> int:
        """Messages still in Postfix's queue (0 after a complete run)."""
        queue = self.root / "queue"
        return sum(
            1
            for sub in ("incoming", "active", "deferred", "hold", "maildrop")
            for path in (queue / sub).rglob("*")
            if path.is_file()
        )


@dataclass(frozen=True)
class RelayOptions:
    """Levers of our relay that the benchmark can set (None = the relay's default)."""

    workers: int = 1
    pool_size: int | None = None
    concurrency: int | None = None
    profile: Path | None = None
    pythonpath: Path | None = None  # a patched copy of the package, to measure a lever
    spool_parent: Path | None = None  # diagnostic: the spool elsewhere (e.g. tmpfs)


class RelayServer(Server):
    """Our relay, `python -m mailrelay.relay --config`, on a fresh spool."""

    def __init__(
        self, python: str, root: Path, port: int, sink_port: int, options: RelayOptions
    ) -> None:
        self.label = f"relay-w{options.workers}"
        self.python = python
        self.root = root
        self.port = port
        self.sink_port = sink_port
        self.options = options
        self.metrics_port = free_port(options.workers)
        self.spool_dir = (
            root / "spool"
            if options.spool_parent is None
            else Path(tempfile.mkdtemp(prefix="mailrelay-bench-spool-", dir=options.spool_parent))
        )
        self.proc: Process | None = None

    def config_text(self) -> str:
        upstream = {
            "type": "smtp",
            "name": "sink",
            "host": "127.0.0.1",
            "port": self.sink_port,
            "tls": "none",
            "insecure_allow_plaintext": True,
        }
        if self.options.pool_size is not None:
            upstream["pool_size"] = self.options.pool_size
        config: dict[str, object] = {
            "hostname": "bench-relay.localdomain",
            "listener": {
                "host": "127.0.0.1",
                "submission_port": self.port,
                "workers": self.options.workers,
            },
            "auth": {"required": False},
            "allowed_networks": ["127.0.0.1/32"],
            "spool": {"directory": str(self.spool_dir)},
            "routes": [{"name": "all", "upstream": upstream}],
            "metrics": {"host": "127.0.0.1", "port": self.metrics_port},
            "log_format": "text",
        }
        if self.options.concurrency is not None:
            config["delivery"] = {"concurrency": self.options.concurrency}
        # JSON is YAML, and avoids needing PyYAML in the benchmark itself.
        return json.dumps(config, indent=2)

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "relay.yaml"
        config_path.write_text(self.config_text())
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.options.pythonpath is not None:
            env["PYTHONPATH"] = str(self.options.pythonpath)
        argv = [self.python]
        if self.options.profile is not None:
            argv += ["-m", "cProfile", "-o", str(self.options.profile)]
        argv += ["-m", "mailrelay.relay", "--config", str(config_path)]
        with (self.root / "relay.log").open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root
            )
        try:
            await wait_for_banner(self.port, 30, self.proc)
            # Every worker must be up before the load starts: each serves /readyz.
            deadline = time.monotonic() + 30
            for index in range(self.options.workers):
                while not await http_ok(self.metrics_port + index, "/readyz"):
                    if time.monotonic() > deadline or self.proc.returncode is not None:
                        raise BenchError(f"relay worker {index} never became ready")
                    await asyncio.sleep(0.1)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self.log_tail()}") from exc

    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 60)
        if self.proc.returncode is None:
            for pid in reversed(process_tree(self.proc.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await self.proc.wait()

    def log_tail(self) -> str:
        return tail(self.root / "relay.log")

    def log_problems(self) -> list[str]:
        """WARNING/ERROR lines the relay logged (a clean run has none)."""
        try:
            lines = (self.root / "relay.log").read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if " WARNING " in line or " ERROR " in line]

    def queued_files(self) -> int:
        queue = self.spool_dir / "queue"
        return sum(1 for _ in queue.glob("*.msg")) if queue.is_dir() else 0


# --------------------------------------------------------------------------------------
# Load: smtp-source, plus our latency probe


def probe_message(size: int, serial: int) -> bytes:
    """Headers plus `size` bytes of body, dot-terminated, as on the wire."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency probe {serial}\r\n"
        f"Message-ID: <{serial}.{os.getpid()}.probe@bench.example.com>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = (line * (size // len(line) + 1))[:size]
    body = body[: size - 2] + b"\r\n" if size >= 2 else b"\r\n"
    return head + body + b".\r\n"


async def _expect(reader: asyncio.StreamReader, code: int) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise BenchError(f"connection closed while waiting for {code}")
        if line[:3] != str(code).encode():
            raise BenchError(f"expected {code}, got {line.decode(errors='replace').strip()}")
        if line[3:4] != b"-":
            return


PROBE_STEPS = ("connect", "banner", "ehlo", "mail", "rcpt", "data", "body", "quit")


async def probe_session(port: int, message: bytes) -> dict[str, float]:
    """One submission session; seconds per step (`body` is end-of-data to the 250)."""
    steps: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        steps[step] = now - mark
        mark = now

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lap("connect")
        await _expect(reader, 220)
        lap("banner")
        for step, command, code in (
            ("ehlo", b"EHLO probe.example.com", 250),
            ("mail", f"MAIL FROM:<{SENDER}>".encode(), 250),
            ("rcpt", f"RCPT TO:<{RECIPIENT}>".encode(), 250),
            ("data", b"DATA", 354),
        ):
            writer.write(command + b"\r\n")
            await _expect(reader, code)
            lap(step)
        writer.write(message)
        await _expect(reader, 250)
        lap("body")
        writer.write(b"QUIT\r\n")
        await _expect(reader, 221)
        lap("quit")
        return steps
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class ProbeResults:
    sessions: list[float] = field(default_factory=list)
    steps: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in PROBE_STEPS})
    finished_at: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def run_probe(port: int, size: int, stop: asyncio.Event, results: ProbeResults) -> None:
    """Sequential sessions until `stop` is set; the in-flight session always completes."""
    serial = 0
    while not stop.is_set():
        serial += 1
        try:
            steps = await asyncio.wait_for(probe_session(port, probe_message(size, serial)), 120)
        except (OSError, TimeoutError, BenchError) as exc:
            results.errors.append(repr(exc))
            await asyncio.sleep(0.05)
            continue
        results.sessions.append(sum(steps.values()))
        for step, seconds in steps.items():
            results.steps[step].append(seconds)
        results.finished_at.append(time.monotonic())


# --------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    system: str
    repetition: int
    messages: int
    probe_messages: int = 0
    load_before: str = ""
    load_after: str = ""
    accepted_seconds: float = math.nan
    e2e_seconds: float = math.nan
    accepted_rate: float = math.nan
    e2e_rate: float = math.nan
    backlog_at_accepted: int = 0
    drain_seconds: float = math.nan
    delivered: int = 0
    session_p50_ms: float = math.nan
    session_p99_ms: float = math.nan
    data_ack_p50_ms: float = math.nan
    data_ack_p99_ms: float = math.nan
    cpu_seconds: float = math.nan
    cores_used: float = math.nan
    cpu_ms_per_message: float = math.nan
    peak_rss_mb: float = math.nan
    peak_pss_mb: float = math.nan
    processes: int = 0
    sink_cpu_seconds: float = math.nan
    hottest_thread_share: float = math.nan
    hottest_thread_wait_share: float = math.nan
    hottest_thread_ms_per_message: float = math.nan
    side_thread_cpu_seconds: float = math.nan
    cpu_pressure_before: str = ""
    cpu_pressure_after: str = ""
    probe_errors: int = 0
    step_p50_ms: dict[str, float] = field(default_factory=dict)
    step_p99_ms: dict[str, float] = field(default_factory=dict)
    left_in_queue: int = 0
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class LoadSpec:
    messages: int
    sessions: int
    size: int
    probe_sessions: int
    drain_timeout: float


async def run_once(
    server: Server,
    sink: Sink,
    smtp_source: str,
    load: LoadSpec,
    repetition: int,
) -> RunResult:
    """Start sink and server, drive the load, wait for the sink, collect the figures."""
    result = RunResult(system=server.label, repetition=repetition, messages=load.messages)
    try:
        await sink.start()
        await server.start()
        await asyncio.sleep(1.0)  # let start-up work (imports, first scans) settle
        root = server.root_pid()
        result.load_before = load_average()
        result.cpu_pressure_before = cpu_pressure()
        memory = MemorySampler(root)
        memory.start()
        cpu_start = await asyncio.to_thread(tree_cpu_seconds, root)
        threads_start = await asyncio.to_thread(tree_thread_times, root)
        sink_cpu_start = await asyncio.to_thread(sink.cpu_seconds)
        probe = ProbeResults()
        stop_probe = asyncio.Event()
        argv = [
            smtp_source,
            "-s",
            str(load.sessions),
            "-m",
            str(load.messages),
            "-l",
            str(load.size),
            "-f",
            SENDER,
            "-t",
            RECIPIENT,
            "-M",
            "bench-client.example.com",
            f"127.0.0.1:{server.port}",
        ]
        started = time.monotonic()
        source = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        probes = [
            asyncio.create_task(run_probe(server.port, load.size, stop_probe, probe))
            for _ in range(load.probe_sessions)
        ]
        source_out, _ = await source.communicate()
        accepted_at = time.monotonic()
        delivered_at_accepted = sink.count
        stop_probe.set()
        await asyncio.gather(*probes)
        if source.returncode != 0:
            raise BenchError(
                f"smtp-source failed ({source.returncode}): "
                f"{source_out.decode(errors='replace').strip()[-2000:]}"
            )
        result.probe_messages = len(probe.sessions)
        result.probe_errors = len(probe.errors)
        expected = load.messages + result.probe_messages
        reached = await sink.wait_for(expected, load.drain_timeout)
        cpu_end = await asyncio.to_thread(tree_cpu_seconds, root)
        threads_end = await asyncio.to_thread(tree_thread_times, root)
        sink_cpu_end = await asyncio.to_thread(sink.cpu_seconds)
        await memory.stop()
        result.load_after = load_average()
        result.cpu_pressure_after = cpu_pressure()
        result.accepted_seconds = accepted_at - started
        # Probe sessions that ended after smtp-source did add nothing to the accepted rate.
        probe_in_time = sum(1 for t in probe.finished_at if t <= accepted_at)
        result.accepted_rate = (load.messages + probe_in_time) / result.accepted_seconds
        result.delivered = sink.count
        result.session_p50_ms = percentile(probe.sessions, 50) * 1000
        result.session_p99_ms = percentile(probe.sessions, 99) * 1000
        result.data_ack_p50_ms = percentile(probe.steps["body"], 50) * 1000
        result.data_ack_p99_ms = percentile(probe.steps["body"], 99) * 1000
        result.step_p50_ms = {k: percentile(v, 50) * 1000 for k, v in probe.steps.items()}
        result.step_p99_ms = {k: percentile(v, 99) * 1000 for k, v in probe.steps.items()}
        result.cpu_seconds = cpu_end - cpu_start
        result.sink_cpu_seconds = sink_cpu_end - sink_cpu_start
        result.peak_rss_mb = memory.peak_rss_kb / 1024
        result.peak_pss_mb = memory.peak_pss_kb / 1024
        result.processes = memory.peak_processes
        if probe.errors:
            result.problems.append(f"probe errors: {probe.errors[:3]}")
        if reached is None:
            raise BenchError(
                f"the sink counted {sink.count} of {expected} messages within "
                f"{load.drain_timeout:.0f}s"
            )
        result.e2e_seconds = reached - started
        # What was accepted but not yet delivered when smtp-source ended, and how long it took.
        result.backlog_at_accepted = max(0, expected - delivered_at_accepted)
        result.drain_seconds = max(0.0, reached - accepted_at)
        result.e2e_rate = expected / result.e2e_seconds
        result.cpu_ms_per_message = result.cpu_seconds / expected * 1000
        result.cores_used = result.cpu_seconds / result.e2e_seconds
        threads = thread_figures(threads_start, threads_end, result.e2e_seconds)
        result.hottest_thread_share = threads.hottest_share
        result.hottest_thread_wait_share = threads.hottest_wait_share
        result.side_thread_cpu_seconds = threads.side_cpu_seconds
        result.hottest_thread_ms_per_message = (
            threads.hottest_share * result.e2e_seconds / expected * 1000
        )
        await asyncio.sleep(0.5)  # a duplicate delivery would show up as an extra count
        result.delivered = sink.count
        if sink.count > expected:
            result.problems.append(f"sink counted {sink.count} > {expected} sent: duplicates")
    except BenchError as exc:
        result.error = str(exc)
    finally:
        with contextlib.suppress(Exception):
            await server.stop()
        await sink.stop()
    if isinstance(server, PostfixServer | RelayServer):
        result.left_in_queue = server.queued_files()
        if result.left_in_queue:
            result.problems.append(f"{result.left_in_queue} message(s) left in the queue")
    if isinstance(server, RelayServer):
        if server.options.spool_parent is not None:
            shutil.rmtree(server.spool_dir, ignore_errors=True)
        logged = server.log_problems()
        if logged:
            result.problems.append(f"{len(logged)} warning/error log lines, first: {logged[0]}")
    return result


# --------------------------------------------------------------------------------------
# Reporting


def _median(values: Iterable[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def run_lines(result: RunResult) -> list[str]:
    """One run, as printed after it ends and kept in the README."""
    if not result.ok:
        return [f"{result.system:<10} rep {result.repetition}: FAILED: {result.error}"]
    lines = [
        f"{result.system:<10} rep {result.repetition}: "
        f"accepted {_fmt(result.accepted_rate)}/s, e2e {_fmt(result.e2e_rate)}/s "
        f"(backlog {result.backlog_at_accepted} drained in {_fmt(result.drain_seconds, 2)} s), "
        f"session p50/p99 {_fmt(result.session_p50_ms, 1)}/{_fmt(result.session_p99_ms, 1)} ms "
        f"(n={result.probe_messages}), CPU {_fmt(result.cpu_seconds, 1)} s "
        f"({_fmt(result.cores_used, 2)} cores), RSS {_fmt(result.peak_rss_mb, 1)} MB, "
        f"PSS {_fmt(result.peak_pss_mb, 1)} MB",
        f"    hottest thread {_fmt(result.hottest_thread_share * 100)}% on CPU + "
        f"{_fmt(result.hottest_thread_wait_share * 100)}% waiting for one "
        f"({_fmt(result.hottest_thread_ms_per_message, 2)} ms/msg); side threads "
        f"{_fmt(result.side_thread_cpu_seconds, 1)} CPU s; load {result.load_before} -> "
        f"{result.load_after}, CPU pressure {result.cpu_pressure_before} -> "
        f"{result.cpu_pressure_after}",
    ]
    if result.step_p99_ms:
        lines.append(
            "    probe p50/p99 ms by step: "
            + ", ".join(
                f"{step} {_fmt(result.step_p50_ms[step], 1)}/{_fmt(result.step_p99_ms[step], 1)}"
                for step in PROBE_STEPS
                if step in result.step_p99_ms
            )
        )
    lines += [f"    ! {problem}" for problem in result.problems]
    return lines


def print_run(result: RunResult) -> None:
    for line in run_lines(result):
        print(f"  {line}")


COLUMNS = (
    ("accepted msg/s", "accepted_rate", 0),
    ("e2e msg/s", "e2e_rate", 0),
    ("session p50 ms", "session_p50_ms", 1),
    ("session p99 ms", "session_p99_ms", 1),
    ("DATA ack p99 ms", "data_ack_p99_ms", 1),
    ("CPU s", "cpu_seconds", 1),
    ("cores", "cores_used", 2),
    ("CPU ms/msg", "cpu_ms_per_message", 2),
    ("hot thread CPU", "hottest_thread_share", 2),
    ("hot thread wait", "hottest_thread_wait_share", 2),
    ("hot thread ms/msg", "hottest_thread_ms_per_message", 2),
    ("peak RSS MB", "peak_rss_mb", 1),
    ("peak PSS MB", "peak_pss_mb", 1),
)
RATIO_COLUMNS = ("e2e_rate", "session_p99_ms", "cpu_seconds", "peak_rss_mb", "peak_pss_mb")


def summary_table(results: list[RunResult], systems: list[str]) -> str:
    """Markdown table of medians per system, then each system's ratios to Postfix."""
    medians: dict[str, dict[str, float]] = {}
    for system in systems:
        runs = [r for r in results if r.system == system and r.ok]
        medians[system] = {attr: _median(getattr(r, attr) for r in runs) for _, attr, _ in COLUMNS}
        medians[system]["runs"] = len(runs)
    header = ["system", "ok runs", *(name for name, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for system in systems:
        row = [system, f"{int(medians[system]['runs'])}"]
        row += [_fmt(medians[system][attr], digits) for _, attr, digits in COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    base = medians.get("postfix")
    if base is not None and len(systems) > 1:
        lines.append("")
        names = {attr: name for name, attr, _ in COLUMNS}
        header = ["ratio to postfix", *(names[a] for a in RATIO_COLUMNS)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for system in systems:
            if system == "postfix":
                continue
            row = [system]
            for attr in RATIO_COLUMNS:
                ratio = medians[system][attr] / base[attr] if base[attr] else math.nan
                row.append(_fmt(ratio, 2) + "x")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine_description(workdir: Path, postconf: str) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = "unknown"
    with contextlib.suppress(OSError):
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mount, fstype, *_ = line.split()
            if str(workdir).startswith(mount) and len(mount) > len(best):
                best, fs = mount, f"{fstype} on {mount}"
    version = subprocess.run(
        [postconf, "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory": f"{os.sysconf('SC_PHYS_PAGES') * PAGE_KB // (1024 * 1024)} GiB",
        "kernel": os.uname().release,
        "workdir": f"{workdir} ({fs})",
        "postfix": version,
        "python": sys.version.split()[0],
        "relay commit": commit,
    }


README = Path(__file__).resolve().parent / "README.md"
RESULTS_HEADING = "### Latest results"


def write_readme(
    path: Path, machine: dict[str, str], setup: str, table: str, results: list[RunResult]
) -> None:
    """Replace the README's results section (everything from its heading) with this run."""
    text = path.read_text() if path.exists() else ""
    head = text.split(RESULTS_HEADING)[0].rstrip() + "\n\n" if RESULTS_HEADING in text else text
    runs = [line for result in results for line in run_lines(result)]
    section = [
        RESULTS_HEADING,
        "",
        "Written by `relay_vs_postfix.py --write-readme`; everything above the heading is kept.",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        f"- load: {setup}",
        "",
        table,
        "",
        "Every run, in the order they ran:",
        "",
        "```",
        *runs,
        "```",
        "",
    ]
    path.write_text(head + "\n".join(section))


def print_profile(path: Path, limit: int = 30) -> None:
    if not path.exists():
        print(f"(no profile written at {path})")
        return
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    print(out.getvalue())


# --------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=textwrap.dedent(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--messages", type=int, help="messages per run (default 20,000; --quick: 2,000)"
    )
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source sessions")
    parser.add_argument("--size", type=int, default=2048, help="message payload bytes")
    parser.add_argument(
        "--repetitions", type=int, help="alternating repetitions (default 3; --quick: 1)"
    )
    parser.add_argument(
        "--probe-sessions",
        type=int,
        default=1,
        help="extra sequential sessions timed by this script (latency); 0 disables",
    )
    parser.add_argument(
        "--systems",
        default="postfix,relay",
        help="comma-separated: postfix, relay",
    )
    parser.add_argument("--workers", default="1,2", help="relay listener.workers values to measure")
    parser.add_argument("--relay-pool-size", type=int, help="SMTP upstream pool_size override")
    parser.add_argument("--relay-concurrency", type=int, help="delivery.concurrency override")
    parser.add_argument(
        "--profile-relay",
        action="store_true",
        help="run the relay under cProfile (one worker process only) and print the top "
        "functions; figures are then slower than normal",
    )
    parser.add_argument(
        "--relay-pythonpath",
        type=Path,
        help="PYTHONPATH for the relay: a directory holding a patched copy as "
        "mailrelay/relay, to measure a lever before changing the real code",
    )
    parser.add_argument(
        "--relay-spool-parent",
        type=Path,
        help="diagnostic: put the relay's spool under this directory (e.g. /dev/shm) to see "
        "how much of its cost is the disk; not equal durability",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2,000 messages, 1 repetition"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/var/tmp"), help="where the temp dir goes"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument(
        "--write-readme",
        action="store_true",
        help=f"replace the '{RESULTS_HEADING}' section of bench/README.md with this run",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter that has mailrelay installed"
    )
    args = parser.parse_args(argv)
    # --quick changes the defaults only; explicit --messages/--repetitions still win.
    if args.messages is None:
        args.messages = 2_000 if args.quick else 20_000
    if args.repetitions is None:
        args.repetitions = 1 if args.quick else 3
    return args


def missing_prerequisites(python: str) -> list[str]:
    problems = []
    absent = [tool for tool in TOOLS if find_tool(tool) is None]
    if absent:
        problems.append(
            f"missing {', '.join(absent)}: install Postfix from Debian with "
            "`DEBIAN_FRONTEND=noninteractive apt-get install -y postfix` (its tools land in "
            "/usr/sbin; the service does not need to run)"
        )
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        problems.append("no `postfix` user: the Postfix package creates it")
    if os.geteuid() != 0:
        problems.append("must run as root: `postfix -c DIR start` needs it")
    check = subprocess.run(
        [python, "-c", "import mailrelay.relay.main"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
        cwd="/",
    )
    if check.returncode != 0:
        problems.append(
            f"{python} cannot import mailrelay.relay.main (run `make venv`): "
            f"{check.stderr.strip().splitlines()[-1:] or ''}"
        )
    return problems


async def bench(args: argparse.Namespace) -> int:
    systems_wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    problems = missing_prerequisites(args.python)
    if "relay" not in systems_wanted:
        problems = [p for p in problems if "mailrelay" not in p]
    if problems:
        for problem in problems:
            print(f"Cannot run the benchmark: {problem}", file=sys.stderr)
        return 2
    tools = {tool: find_tool(tool) or tool for tool in TOOLS}
    load = LoadSpec(
        messages=args.messages,
        sessions=args.sessions,
        size=args.size,
        probe_sessions=args.probe_sessions,
        drain_timeout=max(120.0, args.messages / 20),
    )
    variants: list[str] = []
    if "postfix" in systems_wanted:
        variants.append("postfix")
    if "relay" in systems_wanted:
        variants += [f"relay-w{w}" for w in worker_counts]
    args.workdir.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="mailrelay-bench-", dir=args.workdir))
    os.chmod(top, 0o755)
    machine = machine_description(top, tools["postconf"])
    print("Relay vs Postfix benchmark")
    for key, value in machine.items():
        print(f"  {key}: {value}")
    setup = (
        f"smtp-source {load.sessions} sessions x {load.messages} messages of "
        f"{load.size} B (one message per session), + {load.probe_sessions} latency probe "
        f"session(s); {args.repetitions} alternating repetition(s)"
    )
    print(f"  load: {setup}; temp dir {top}")
    results: list[RunResult] = []
    try:
        for rep in range(1, args.repetitions + 1):
            shift = (rep - 1) % len(variants)
            order = variants[shift:] + variants[:shift]
            for variant in order:
                run_dir = top / f"rep{rep}-{variant}"
                run_dir.mkdir()
                sink_port, server_port = free_port(), free_port()
                sink = Sink(tools["smtp-sink"], sink_port, run_dir / "sink.log")
                server: Server
                profile: Path | None = None
                if variant == "postfix":
                    server = PostfixServer(tools["postfix"], run_dir, server_port, sink_port)
                else:
                    workers = int(variant.removeprefix("relay-w"))
                    if args.profile_relay and workers == 1:
                        profile = run_dir / "relay.prof"
                    options = RelayOptions(
                        workers=workers,
                        pool_size=args.relay_pool_size,
                        concurrency=args.relay_concurrency,
                        profile=profile,
                        pythonpath=args.relay_pythonpath,
                        spool_parent=args.relay_spool_parent,
                    )
                    server = RelayServer(args.python, run_dir, server_port, sink_port, options)
                result = await run_once(server, sink, tools["smtp-source"], load, rep)
                results.append(result)
                print_run(result)
                if profile is not None:
                    print_profile(profile)
    finally:
        failed = [r for r in results if not r.ok]
        if args.keep or failed:
            print(f"Kept {top} (logs of every run{', failures included' if failed else ''})")
        else:
            shutil.rmtree(top, ignore_errors=True)
    print()
    table = summary_table(results, variants)
    print(table)
    if args.write_readme:
        write_readme(README, machine, setup, table, results)
        print(f"Wrote the results into {README}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "load": dataclasses.asdict(load),
                    "runs": [dataclasses.asdict(r) for r in results],
                },
                indent=2,
            )
        )
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
