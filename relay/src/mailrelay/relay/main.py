"""Command line and lifecycle of the relay process.

`parse_args` turns argv into a `Command` (tested on its own); `main` dispatches:

* run (default): `RelayApp` wires spool, metrics, SMTP front, delivery engine, health
  server and config watcher, runs until SIGTERM/SIGINT, then drains;
* `--check-config`: validate the file (and the users file) and exit 0 or 2;
* `queue ...`: the spool CLI in `queue_cli`, safe beside a running relay.

With `listener.workers > 1` the process is worker 0 and starts workers 1..N-1, all sharing
the SMTP ports (SO_REUSEPORT) and the spool; worker N serves metrics on
`metrics.port + N`, so each worker's numbers stay scrapeable. Worker 0 forwards SIGTERM
and exits non-zero if a worker dies; workers die with worker 0 (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from mailrelay.relay.auth import load_auth_users
from mailrelay.relay.budget import ByteBudget, budget_limit, cgroup_memory_limit
from mailrelay.relay.config import ConfigError, RelayConfig, load_config
from mailrelay.relay.delivery import DeliveryEngine
from mailrelay.relay.drain import EXIT_MAIL_REMAINS, DrainError, drain, leave
from mailrelay.relay.handoff import INSTANCE_ENV, HandoffServer, instance_id
from mailrelay.relay.health import HealthServer
from mailrelay.relay.logging import configure_logging
from mailrelay.relay.metrics import RelayMetrics
from mailrelay.relay.reload import ConfigWatcher
from mailrelay.relay.server import FrontSettings, SmtpFront
from mailrelay.relay.smtp_base import quiet_aiosmtpd_log
from mailrelay.relay.spool import Spool
from mailrelay.relay.tlsfiles import tls_problem
from mailrelay.relay.upstream_status import status_document

__all__ = ["Command", "RelayApp", "main", "parse_args"]

log = logging.getLogger("mailrelay.relay")

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2
_PARENT_ENV = "MAILRELAY_WORKER_PARENT_PID"
# Where Kubernetes reads a container's termination message from (terminationMessagePath).
TERMINATION_LOG = Path("/dev/termination-log")
_IO_THREADS = 4  # the default executor: spool file work and other blocking calls


@dataclass(frozen=True)
class Command:
    """What the command line asked for."""

    action: str  # "run", "check-config", "queue" or "drain"
    config: Path | None = None
    deadline: float | None = None
    report_file: Path | None = None
    spool_dir: Path | None = None
    worker_index: int | None = None
    queue_args: list[str] = field(default_factory=list)
    queue: argparse.Namespace | None = None


def _build_parser() -> argparse.ArgumentParser:
    from mailrelay.relay.queue_cli import add_queue_parser  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m mailrelay.relay",
        description="The mailrelay SMTP relay: accept, spool durably, deliver.",
    )
    parser.add_argument("--config", type=Path, help="relay configuration file (YAML)")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration (and the users file) and exit",
    )
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="{queue,drain}")
    add_queue_parser(sub)
    drain = sub.add_parser(
        "drain",
        help="empty the spool of a relay that is gone: hand it to peers, or deliver it and "
        "dead-letter the rest; exit 0 when empty, 3 when mail remains",
    )
    drain.add_argument(
        "--deadline",
        type=float,
        help="seconds to try (default: handoff.deadline_seconds, or 60)",
    )
    drain.add_argument(
        "--report-file",
        type=Path,
        default=TERMINATION_LOG,
        help="also write the JSON report here when the file exists (default: Kubernetes' "
        "termination message file, which the operator reads the report from)",
    )
    return parser


def parse_args(argv: list[str]) -> Command:
    """Parse the command line; argparse exits with status 2 on a usage error."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "queue":
        if args.config is None and args.spool_dir is None:
            parser.error("queue commands need --config or --spool-dir")
        return Command(action="queue", config=args.config, spool_dir=args.spool_dir, queue=args)
    if args.config is None:
        parser.error("--config is required")
    if args.command == "drain":
        if args.deadline is not None and not args.deadline > 0:
            parser.error("--deadline must be a positive number of seconds")
        return Command(
            action="drain",
            config=args.config,
            deadline=args.deadline,
            report_file=args.report_file,
        )
    if args.check_config:
        return Command(action="check-config", config=args.config)
    return Command(action="run", config=args.config, worker_index=args.worker_index)


class RelayApp:
    """One relay process: everything started in order and stopped in reverse."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        config_path: Path | None = None,
        registry: CollectorRegistry | None = None,
        reuse_port: bool = False,
        metrics_port: int | None = None,
        enable_delivery: bool = True,
        reload_interval: float = 1.0,
        instance: str | None = None,
    ) -> None:
        self.config = config
        # Who this relay is to its peers (shared by its worker processes).
        self.instance = instance or instance_id()
        self.config_path = config_path
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RelayMetrics(self.registry)
        self.spool = Spool(config.spool.directory)
        # Read once: a container's memory limit does not change while it runs.
        self._memory_limit = cgroup_memory_limit()
        self.budget = ByteBudget(
            budget_limit(config, self._memory_limit), on_change=self.metrics.budget_changed
        )
        self.engine: DeliveryEngine | None = None
        self._enable_delivery = enable_delivery
        self._reuse_port = reuse_port
        self._metrics_port = config.metrics.port if metrics_port is None else metrics_port
        self._reload_interval = reload_interval
        self.front: SmtpFront | None = None
        self.health: HealthServer | None = None
        self.watcher: ConfigWatcher | None = None
        self.handoff: HandoffServer | None = None
        self._gauge_task: asyncio.Task[None] | None = None
        self.stopped = asyncio.Event()

    @property
    def smtp_port(self) -> int:
        """The bound submission port (useful with port 0)."""
        assert self.front is not None
        return self.front.ports["submission"]

    @property
    def implicit_tls_port(self) -> int | None:
        """The bound implicit-TLS port, if configured."""
        assert self.front is not None
        return self.front.ports.get("implicit_tls")

    @property
    def handoff_port(self) -> int:
        """The bound hand-off port (useful with port 0)."""
        assert self.handoff is not None
        return self.handoff.port

    @property
    def health_port(self) -> int:
        """The bound metrics/health port."""
        assert self.health is not None
        return self.health.port

    async def start(self) -> None:
        """Spool, delivery, SMTP, health, watcher: each ready before the next starts."""
        await self.spool.start()
        users = await asyncio.to_thread(load_auth_users, self.config.auth)
        if self._enable_delivery:
            self.engine = DeliveryEngine(self.config, self.spool, self.metrics, budget=self.budget)
            await self.engine.start()
        else:
            log.warning("Started without a delivery engine: mail is accepted and spooled only")
        self.front = SmtpFront(
            FrontSettings.build(self.config, users),
            self.spool,
            self.metrics,
            delivery=self.engine,
            reuse_port=self._reuse_port,
            budget=self.budget,
        )
        await self.front.start()
        if self.config.handoff is not None:
            self.handoff = HandoffServer(
                self.config.handoff,
                spool=self.spool,
                metrics=self.metrics.handoff,
                max_message_size=self.config.limits.max_message_size,
                instance=self.instance,
                on_stored=self.engine.adopted if self.engine is not None else None,
                reuse_port=self._reuse_port,
                budget=self.budget,
            )
            await self.handoff.start()
        self.health = HealthServer(
            self.registry,
            self._ready,
            host=self.config.metrics.host,
            port=self._metrics_port,
            reuse_port=self._reuse_port,
            upstream_status=self._upstream_status,
        )
        await self.health.start()
        if self.config_path is not None:
            self.watcher = ConfigWatcher(
                self.config_path,
                self.config,
                self.apply_config,
                self.metrics,
                interval=self._reload_interval,
            )
            await self.watcher.start()
        self._gauge_task = asyncio.create_task(self._update_gauges(), name="queue-gauges")

    async def _ready(self) -> tuple[bool, str]:
        if self.front is None or not self.front.listening:
            return False, "SMTP listeners not open"
        if not await asyncio.to_thread(self.spool.writable):
            return False, "spool not writable"
        return True, "ready"

    def _upstream_status(self) -> bytes:
        snapshots = self.engine.auth_status() if self.engine is not None else {}
        return status_document(snapshots).model_dump_json().encode()

    async def apply_config(self, config: RelayConfig) -> None:
        """Swap in a new config; raises (and changes nothing) if any part fails to load."""
        assert self.front is not None
        users = await asyncio.to_thread(load_auth_users, config.auth)
        tls = config.listener.tls
        if tls is not None:
            # Prove the new certificate loads before touching the live context.
            problem = await asyncio.to_thread(tls_problem, tls.cert_file, tls.key_file)
            if problem is not None:
                users.close()
                raise ConfigError(problem)
        old = self.config
        kept, wanted = old.restart_settings(), config.restart_settings()
        restart_only = [name for name in wanted if wanted[name] != kept.get(name)]
        if restart_only:
            log.warning(
                "Kept the running %s settings; changes to them apply after a restart",
                ", ".join(restart_only),
            )
        if self.engine is not None:
            await self.engine.reload(config)
        self.front.apply(FrontSettings.build(config, users))
        if self.handoff is not None and config.handoff is not None:
            await self.handoff.apply(config.handoff, config.limits.max_message_size)
        self.budget.set_limit(budget_limit(config, self._memory_limit))
        if config.log_format != self.config.log_format:
            configure_logging(config.log_format)
        self.config = config

    async def _update_gauges(self) -> None:
        while True:
            try:
                depth, oldest, dead = await asyncio.to_thread(self._queue_stats)
                self.metrics.queue_depth.set(depth)
                self.metrics.queue_oldest_age.set(oldest)
                self.metrics.dead_letter_depth.set(dead)
            except Exception:
                log.exception("Failed to update the queue gauges")
            await asyncio.sleep(2.0)

    def _queue_stats(self) -> tuple[int, float, int]:
        ids = list(self.spool.iter_queue_ids())
        # Messages in this process's journal are queued too (in their first attempt).
        journaled = self.spool.journaled_count
        oldest = 0.0
        if ids:
            # Queue ids start with the receive time in microseconds (see new_queue_id).
            first = min(ids)
            oldest = max(0.0, time.time() - int(first[:14], 16) / 1_000_000)
        dead = self.spool.count_dead_letters()
        return len(ids) + journaled, oldest, dead

    async def stop(self, then: Callable[[], Awaitable[None]] | None = None) -> None:
        """SIGTERM semantics: 421 to new sessions, finish transactions, give deliveries
        the grace period, keep the rest in the spool. `then` runs once the spool is
        closed, while /metrics still answers (the hand-off to peers)."""
        grace = self.config.shutdown_grace_seconds
        log.info("Began stopping the relay (grace %.0fs)", grace)
        if self.watcher is not None:
            await self.watcher.stop()
        steps = []
        if self.handoff is not None:
            # A leaving relay takes no more mail from its peers.
            steps.append(self.handoff.close())
        if self.front is not None:
            steps.append(self.front.drain(grace))
        if self.engine is not None:
            steps.append(self.engine.stop(grace))
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("Failed to stop cleanly: %r", result)
        if self._gauge_task is not None:
            self._gauge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauge_task
        if self.front is not None:
            self.front.settings.users.close()
        await self.spool.aclose()
        if then is not None:
            try:
                await then()
            except Exception:
                log.exception("Failed to hand the queue to peers; it stays on the spool")
        if self.health is not None:
            await self.health.close()
        self.stopped.set()
        log.info("Stopped the relay")


def _spawn_workers(config_path: Path, count: int, instance: str) -> list[subprocess.Popen[bytes]]:
    """Start worker processes 1..count-1 (this process is worker 0)."""
    argv = [sys.executable, "-m", "mailrelay.relay", "--config", str(config_path)]
    env = {**os.environ, _PARENT_ENV: str(os.getpid()), INSTANCE_ENV: instance}
    return [
        subprocess.Popen([*argv, "--worker-index", str(index)], env=env)
        for index in range(1, count)
    ]


def _die_with_parent() -> bool:
    """Ask Linux to SIGTERM this worker if worker 0 dies, so no orphan keeps the port.

    False if worker 0 is already gone (it died before this worker got here).
    """
    with contextlib.suppress(OSError, AttributeError):
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    parent = os.environ.get(_PARENT_ENV)
    return parent is None or os.getppid() == int(parent)


async def _serve(
    config: RelayConfig,
    config_path: Path,
    worker_index: int | None,
    children: list[subprocess.Popen[bytes]],
) -> int:
    """Run one relay process until a signal; worker 0 also forwards it to its workers.

    If a worker dies on its own, worker 0 stops everything and exits non-zero, so the pod
    restarts as a whole instead of running with part of its capacity.
    """
    loop = asyncio.get_running_loop()
    # Spool writes and fsyncs run in threads. A few are enough for group commit; more
    # only contend for the GIL and the spool's directory locks (bench/README.md: 32
    # threads cost 15% more CPU per message than 4, at a lower rate).
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    loop.set_default_executor(ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="io"))
    reuse = worker_index is not None
    metrics_port = config.metrics.port + worker_index if worker_index is not None else None
    app = RelayApp(config, config_path=config_path, reuse_port=reuse, metrics_port=metrics_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    status = EXIT_OK

    async def watch_children() -> None:
        nonlocal status
        while not stop.is_set():
            if any(child.poll() is not None for child in children):
                log.error("A relay worker process exited unexpectedly; stopping all workers")
                status = EXIT_ERROR
                stop.set()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_children()) if children else None
    await app.start()
    log.info("Started the relay %s (pid %d)", config.hostname, os.getpid())
    await stop.wait()
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    if watcher is not None:
        watcher.cancel()
    codes: list[int] = []

    async def workers_then_handoff() -> None:
        # The workers share the spool: each moves its journal to queue files as it
        # stops, so the hand-off starts once they all exited and covers every message.
        codes.extend([await asyncio.to_thread(child.wait) for child in children])
        handoff = app.config.handoff
        if handoff is not None and worker_index in (None, 0):
            await leave(app.config, handoff, app.metrics, budget=app.budget, instance=app.instance)

    await app.stop(then=workers_then_handoff)
    if any(code != 0 for code in codes):
        status = EXIT_ERROR
    return status


def _check_config(path: Path) -> int:
    """Every problem of the config file, the users file and the TLS files, all at once."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    problems: list[str] = []
    users = 0
    try:
        database = load_auth_users(config.auth)
        users = len(database)
        database.close()
    except ConfigError as exc:
        problems.append(str(exc))
    tls = config.listener.tls
    if tls is not None:
        problem = tls_problem(tls.cert_file, tls.key_file)
        if problem is not None:
            problems.append(f"{path}: listener.tls: {problem}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: configuration is valid ({len(config.routes)} route(s), {users} user(s))")
    return EXIT_OK


def _run_drain(path: Path, deadline: float | None, report_file: Path | None = None) -> int:
    """The drain command: one JSON line on stdout, exit 0 (empty) or 3 (mail remains).

    The line also goes to `report_file` when that file exists: Kubernetes' termination
    message (/dev/termination-log), the only place the operator reads it from after a
    success (`FallbackToLogsOnError` falls back to the log only on failure). Without it the
    operator would not know the drain dead-lettered mail and would delete the volume."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_format)
    quiet_aiosmtpd_log()
    try:
        report = asyncio.run(drain(config, deadline_seconds=deadline))
    except DrainError as exc:
        log.error("Could not drain the spool: %s", exc)
        return EXIT_ERROR
    line = report.model_dump_json()
    print(line, flush=True)
    if report_file is not None and report_file.exists():
        try:
            report_file.write_text(line + "\n")
        except OSError as exc:
            log.error("Could not write the drain report to %s: %s", report_file, exc)
            return EXIT_ERROR
    return EXIT_OK if report.remaining == 0 else EXIT_MAIL_REMAINS


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    command = parse_args(sys.argv[1:] if argv is None else argv)
    if command.action == "check-config":
        assert command.config is not None
        return _check_config(command.config)
    if command.action == "queue":
        from mailrelay.relay.queue_cli import run_queue_command  # noqa: PLC0415

        assert command.queue is not None
        return run_queue_command(command.queue)
    if command.action == "drain":
        assert command.config is not None
        return _run_drain(command.config, command.deadline, command.report_file)
    assert command.config is not None
    try:
        config = load_config(command.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    tls = config.listener.tls
    problem = tls_problem(tls.cert_file, tls.key_file) if tls is not None else None
    if problem is not None:
        print(f"{command.config}: listener.tls: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_format)
    quiet_aiosmtpd_log()
    worker_index, children = command.worker_index, []
    if worker_index is not None:
        if not _die_with_parent():
            log.error("Exited worker %d: worker 0 is already gone", worker_index)
            return EXIT_ERROR
    elif config.listener.workers > 1:
        instance = instance_id()
        os.environ[INSTANCE_ENV] = instance  # worker 0's own RelayApp reads it too
        worker_index, children = (
            0,
            _spawn_workers(command.config, config.listener.workers, instance),
        )
        log.info("Started %d more relay worker processes", len(children))
    return asyncio.run(_serve(config, command.config, worker_index, children))
