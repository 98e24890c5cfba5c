"""The system under fuzzing: a relay subprocess with two real aiosmtpd upstreams.

`FuzzTarget.start(directory, ...)` writes certificates, a users file and a relay config,
starts two recording upstreams (one with STARTTLS and AUTH, one plain) on their own
threads, then `python -m mailrelay.relay` as a real process, and waits for `/readyz`. The
fuzzer reads the relay's RSS from /proc, its metrics over HTTP and its log file, and
the upstreams' `Received` records. Everything is synchronous: a hypothesis state machine
drives it from plain test code, and `bench/smtp_fuzz.py` from a script.

Addresses on 127.0.0.0/8 tell sessions apart for the relay: hostile sessions come from
`HOSTILE_ADDRESS`, the victim from `VICTIM_ADDRESS`, and `TRUSTED_ADDRESS` is the relay's
only allowed network (it may send without AUTH).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from mailrelay.support.ports import free_port
from mailrelay.support.smtp_peers import Received, RecordingUpstream, TlsCerts, make_tls_certs

__all__ = [
    "DOMAIN_A",
    "DOMAIN_B",
    "HOSTILE_ADDRESS",
    "TRUSTED_ADDRESS",
    "UPSTREAM_AUTH",
    "USERS",
    "VICTIM_ADDRESS",
    "FuzzTarget",
    "Limits",
]

HOSTILE_ADDRESS = "127.0.0.1"
VICTIM_ADDRESS = "127.0.0.2"
TRUSTED_ADDRESS = "127.0.0.3"
# Recipient domains the two routes take; anything else has no route (550 5.7.1).
DOMAIN_A = "a.test"
DOMAIN_B = "b.test"
# alice may send as anyone; bob only as example.com. Cheap bcrypt (cost 4): the fuzzer
# authenticates hundreds of times and the cost of a hash is not what it tests.
USERS = {"alice": "alice-secret", "bob": "bob-secret"}
BOB_DOMAIN = "example.com"
UPSTREAM_AUTH = ("relayuser", "upstream-secret")
RELAY_HOSTNAME = "relay.test"
_READY_WITHIN = 60.0


@dataclass(frozen=True)
class Limits:
    """The relay limits the model needs to predict replies."""

    max_message_size: int = 65_536
    max_recipients: int = 5
    max_received_headers: int = 10
    command_timeout_seconds: float = 60.0
    data_timeout_seconds: float = 60.0
    line_length_limit: int = 1001  # aiosmtpd's, CRLF included


def _write_users(path: Path) -> None:
    def cheap_hash(password: str) -> str:
        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()

    users = [
        {"username": "alice", "password_hash": cheap_hash(USERS["alice"])},
        {
            "username": "bob",
            "password_hash": cheap_hash(USERS["bob"]),
            "allowed_sender_domains": [BOB_DOMAIN],
        },
    ]
    path.write_text(yaml.safe_dump({"users": users}))


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@dataclass
class FuzzTarget:
    """A running relay subprocess and its two upstreams (see the module docstring)."""

    directory: Path
    certs: TlsCerts
    limits: Limits
    upstream_a: RecordingUpstream
    upstream_b: RecordingUpstream
    process: subprocess.Popen[bytes]
    smtp_port: int
    implicit_tls_port: int
    metrics_port: int
    log_path: Path
    baseline_rss: int = 0
    _stopped: bool = field(default=False)

    @classmethod
    def start(
        cls, directory: Path, *, certs: TlsCerts | None = None, limits: Limits | None = None
    ) -> FuzzTarget:
        """Start the upstreams and the relay; returns once the relay answers /readyz."""
        directory.mkdir(parents=True, exist_ok=True)
        certs = certs or make_tls_certs(directory / "tls")
        limits = limits or Limits()
        upstream_a = RecordingUpstream(
            host="127.0.0.1", port=free_port(), tls="starttls", auth=UPSTREAM_AUTH, certs=certs
        )
        upstream_a.start()
        upstream_b = RecordingUpstream(
            host="127.0.0.1", port=free_port(), tls="none", auth=None, certs=certs
        )
        upstream_b.start()
        users_file = directory / "users.yaml"
        _write_users(users_file)
        (directory / "upstream-user").write_text(UPSTREAM_AUTH[0])
        (directory / "upstream-password").write_text(UPSTREAM_AUTH[1])
        smtp_port, implicit_port, metrics_port = free_port(), free_port(), free_port()
        config: dict[str, Any] = {
            "hostname": RELAY_HOSTNAME,
            "listener": {
                "host": "127.0.0.1",
                "submission_port": smtp_port,
                "implicit_tls_port": implicit_port,
                "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
            },
            "auth": {"required": True, "users_file": str(users_file)},
            "allowed_networks": [f"{TRUSTED_ADDRESS}/32"],
            "spool": {"directory": str(directory / "spool"), "min_free_bytes": 0},
            "retry": {
                "initial_backoff_seconds": 0.2,
                "max_backoff_seconds": 1,
                "max_age_seconds": 120,
                "jitter": 0,
            },
            "delivery": {"concurrency": 8, "poll_interval_seconds": 0.1},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
            "limits": {
                "max_message_size": limits.max_message_size,
                "max_recipients": limits.max_recipients,
                "max_received_headers": limits.max_received_headers,
                "command_timeout_seconds": limits.command_timeout_seconds,
                "data_timeout_seconds": limits.data_timeout_seconds,
                # The fuzzer fails AUTH thousands of times from one address by design;
                # with the per-client limit on, that address would be locked out after
                # ten and the run would test little else (the limit has its own tests).
                # The other per-client limits stay at their defaults.
                "per_client": {"auth_failures": 0},
            },
            "routes": [
                {
                    "name": "route-a",
                    "match": {"recipient_domains": [DOMAIN_A]},
                    "upstream": upstream_a.smtp_upstream(
                        "upstream-a",
                        certs.ca_file,
                        username_file=str(directory / "upstream-user"),
                        password_file=str(directory / "upstream-password"),
                    ),
                },
                {
                    "name": "route-b",
                    "match": {"recipient_domains": [DOMAIN_B]},
                    "upstream": upstream_b.smtp_upstream("upstream-b", certs.ca_file),
                },
            ],
            "shutdown_grace_seconds": 5,
        }
        config_path = directory / "relay.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = directory / "relay.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "mailrelay.relay", "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
                cwd=str(directory),
            )
        target = cls(
            directory=directory,
            certs=certs,
            limits=limits,
            upstream_a=upstream_a,
            upstream_b=upstream_b,
            process=process,
            smtp_port=smtp_port,
            implicit_tls_port=implicit_port,
            metrics_port=metrics_port,
            log_path=log_path,
        )
        try:
            target._wait_ready()
        except BaseException:
            target.stop()
            raise
        target.baseline_rss = target.rss()
        return target

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_WITHIN
        while time.monotonic() < deadline:
            self.assert_alive()
            with contextlib.suppress(OSError):
                if self._http_get("/readyz")[0] == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"relay not ready after {_READY_WITHIN}s:\n{self.log()}")

    def _http_get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    # -- what the fuzzer checks ----------------------------------------------------------

    def assert_alive(self) -> None:
        """Fail with the log's tail if the relay process has exited."""
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"relay exited with {code}:\n{self.log()[-4000:]}")

    def rss(self) -> int:
        """The relay process's resident set size in bytes."""
        return _rss_bytes(self.process.pid)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample from /metrics (0 when absent)."""
        wanted = labels or {}
        _, text = self._http_get("/metrics")
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match is None or match["name"] != name:
                continue
            found = dict(
                (k, v.strip('"'))
                for k, _, v in (p.partition("=") for p in (match["labels"] or "").split(",") if p)
            )
            if found == wanted:
                return float(match["value"])
        return 0.0

    def log(self) -> str:
        """The relay's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def upstream_messages(self) -> list[tuple[str, Received]]:
        """Every message the upstreams received, as (route name, record)."""
        return [("route-a", m) for m in self.upstream_a.snapshot()] + [
            ("route-b", m) for m in self.upstream_b.snapshot()
        ]

    def stop(self) -> None:
        """SIGTERM the relay (SIGKILL after 30 s), then stop the upstreams."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.upstream_a.stop()
        self.upstream_b.stop()
