"""Shared fixtures for relay tests: real peers on 127.0.0.1, no mocks.

* `tls_certs`: a trustme CA and a server certificate for localhost/127.0.0.1, as files.
* `users_file`: a users file with a bcrypt user (any sender) and an argon2 user limited
  to example.com; `USERS` holds their passwords.
* `recording_upstream`: factory of aiosmtpd upstreams (own thread and loop) with
  STARTTLS, implicit TLS or plain, optional AUTH, that record every envelope and the
  exact bytes received, and whose replies a test can change while running.
* `relay_factory`: writes a config (defaults below, deep-merged with overrides) and
  starts the relay in-process (`RelayApp` on the test's loop) or as a real subprocess
  (`python -m mailrelay.relay`), on free loopback ports. `smtp_route` builds a route
  entry for a recording upstream.
* `RelayHandle.client(...)`: an aiosmtplib client connected to the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml
from prometheus_client import CollectorRegistry

from mailrelay.relay.auth import hash_password
from mailrelay.relay.config import RelayConfig, load_config
from mailrelay.relay.main import RelayApp
from mailrelay.relay.spool import QueueEntry, RecipientState, new_queue_id
from mailrelay.support.ports import free_port
from mailrelay.support.smtp_peers import (
    RecordingUpstream,
    TlsCerts,
    make_tls_certs,
)

REPO = Path(__file__).resolve().parents[2]
USERS = {"alice": "alice-secret", "bob": "bob-secret"}
UPSTREAM_USER = ("relayuser", "upstream-secret")


def fresh_entry(
    address: str, route: str, data: bytes, *, mail_from: str = "a@example.com", **fields: Any
) -> QueueEntry:
    """The envelope of `data` as if just queued (new id, one pending recipient), for
    tests that write spool files by hand."""
    return QueueEntry(
        queue_id=new_queue_id(),
        mail_from=mail_from,
        recipients=[RecipientState(address=address, route=route)],
        received_at=time.time(),
        size=len(data),
        **fields,
    )


def write_legacy_pair(folder: Path, entry: QueueEntry, data: bytes) -> None:
    """A message as the two-file spool of earlier versions stored it (`.eml` + `.json`)."""
    (folder / f"{entry.queue_id}.eml").write_bytes(data)
    (folder / f"{entry.queue_id}.json").write_text(entry.model_dump_json())


# -- TLS and users --------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    """One CA and localhost certificate for the whole session."""
    directory = tmp_path_factory.mktemp("tls")
    return make_tls_certs(directory)


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice (bcrypt, any sender) and bob (argon2, only example.com senders)."""
    path = tmp_path_factory.mktemp("users") / "users.yaml"
    users = [
        {"username": "alice", "password_hash": hash_password(USERS["alice"])},
        {
            "username": "bob",
            "password_hash": hash_password(USERS["bob"], "argon2"),
            "allowed_sender_domains": ["example.com"],
        },
    ]
    path.write_text(yaml.safe_dump({"users": users}))
    return path


@pytest.fixture
def recording_upstream(
    tls_certs: TlsCerts,
) -> Iterator[Callable[..., RecordingUpstream]]:
    """Factory: `recording_upstream(tls="starttls"|"implicit"|"none", auth=(user, pw))`."""
    made: list[RecordingUpstream] = []

    def make(tls: str = "starttls", auth: tuple[str, str] | None = None) -> RecordingUpstream:
        upstream = RecordingUpstream(
            host="127.0.0.1", port=free_port(), tls=tls, auth=auth, certs=tls_certs
        )
        upstream.start()
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.stop()


# -- the relay ------------------------------------------------------------------------


def smtp_route(
    name: str,
    upstream: RecordingUpstream,
    ca_file: Path,
    *,
    upstream_name: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A route entry sending to a recording upstream (match and more via `extra`)."""
    route: dict[str, Any] = {
        "name": name,
        "upstream": upstream.smtp_upstream(upstream_name or f"{name}-up", ca_file),
    }
    route.update(extra)
    return route


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class RelayHandle:
    """A running relay, in-process (`app`) or as a subprocess (`process`)."""

    config_path: Path
    spool_dir: Path
    log_path: Path
    host: str = "127.0.0.1"
    smtp_port: int = 0
    implicit_tls_port: int | None = None
    health_port: int = 0
    app: RelayApp | None = None
    process: subprocess.Popen[bytes] | None = None
    registry: CollectorRegistry | None = None
    ca_file: Path | None = None

    @property
    def config(self) -> RelayConfig:
        """The config file as it is now."""
        return load_config(self.config_path)

    def write_config(self, data: dict[str, Any]) -> None:
        """Replace the config file atomically (the relay's watcher picks it up)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data))
        os.replace(tmp, self.config_path)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample from the in-process registry (0 if absent)."""
        assert self.registry is not None, "metric() needs an in-process relay"
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    @contextlib.asynccontextmanager
    async def client(
        self,
        *,
        starttls: bool = True,
        implicit: bool = False,
        login: tuple[str, str] | None = None,
        command_timeout: float = 10,
    ) -> AsyncIterator[aiosmtplib.SMTP]:
        """An aiosmtplib session to the relay (EHLO done, STARTTLS and AUTH as asked)."""
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        port = self.implicit_tls_port if implicit else self.smtp_port
        assert port is not None
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=port,
            use_tls=implicit,
            start_tls=False,
            tls_context=context,
            timeout=command_timeout,
            local_hostname="client.test",
        )
        await smtp.connect()
        try:
            await smtp.ehlo()
            if starttls and not implicit:
                await smtp.starttls(tls_context=context)
                await smtp.ehlo()
            if login is not None:
                await smtp.login(*login)
            yield smtp
        finally:
            with contextlib.suppress(Exception):
                await smtp.quit()
            smtp.close()

    async def wait_ready(self, within: float = 20.0) -> None:
        """Poll /readyz until it answers 200."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"relay exited {self.process.returncode}: {self.log()}")
            with contextlib.suppress(OSError):
                status = await http_get(self.host, self.health_port, "/readyz")
                if status[0] == 200:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"relay not ready after {within}s: {self.log()}")

    def log(self) -> str:
        """The subprocess's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self) -> None:
        """Stop gracefully (SIGTERM for a subprocess)."""
        if self.app is not None:
            await self.app.stop()
            self.app = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.process.wait, 30)

    def kill(self) -> None:
        """SIGKILL the subprocess: a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()


async def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """A minimal HTTP GET: (status, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


RelayFactory = Callable[..., Awaitable[RelayHandle]]


@pytest.fixture
async def relay_factory(
    tmp_path: Path,
    tls_certs: TlsCerts,
    users_file: Path,
    recording_upstream: Callable[..., RecordingUpstream],
) -> AsyncIterator[RelayFactory]:
    """Factory: `await relay_factory(routes=[...], subprocess=False, **config_overrides)`.

    Defaults: STARTTLS with the session certificate, the `users_file` users, no allowed
    networks, fast retries, spool under tmp_path. Overrides are deep-merged into the
    config dict (e.g. `limits={"max_recipients": 2}`, `allowed_networks=["127.0.0.0/8"]`).
    Depends on `recording_upstream` so relays stop before their upstreams do.
    """
    handles: list[RelayHandle] = []
    counter = 0

    async def make(
        routes: list[dict[str, Any]] | None = None,
        *,
        subprocess: bool = False,
        start: bool = True,
        enable_delivery: bool = True,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> RelayHandle:
        nonlocal counter
        counter += 1
        base_dir = tmp_path / f"relay{counter}"
        base_dir.mkdir()
        spool_dir = overrides.pop("spool_dir", base_dir / "spool")
        smtp_port = free_port() if subprocess else 0
        health_port = free_port(span=4) if subprocess else 0
        data: dict[str, Any] = {
            "hostname": "relay.test",
            "listener": {
                "host": "127.0.0.1",
                "submission_port": smtp_port,
                "tls": {"cert_file": str(tls_certs.cert_file), "key_file": str(tls_certs.key_file)},
            },
            "auth": {"required": True, "users_file": str(users_file)},
            "allowed_networks": [],
            "spool": {"directory": str(spool_dir), "min_free_bytes": 0},
            "retry": {
                "initial_backoff_seconds": 0.2,
                "max_backoff_seconds": 1,
                "max_age_seconds": 60,
                "jitter": 0,
            },
            "delivery": {"concurrency": 8, "poll_interval_seconds": 0.1},
            "metrics": {"host": "127.0.0.1", "port": health_port},
            "routes": routes or [],
            "shutdown_grace_seconds": 5,
        }
        data = _merge(data, overrides)
        config_path = base_dir / "relay.yaml"
        config_path.write_text(yaml.safe_dump(data))
        handle = RelayHandle(
            config_path=config_path,
            spool_dir=Path(spool_dir),
            log_path=base_dir / "relay.log",
            ca_file=tls_certs.ca_file,
        )
        handles.append(handle)
        if not start:
            return handle
        if subprocess:
            await start_subprocess(handle, env=env)
        else:
            registry = CollectorRegistry()
            app = RelayApp(
                load_config(config_path),
                config_path=config_path,
                registry=registry,
                enable_delivery=enable_delivery,
                reload_interval=0.1,
            )
            await app.start()
            handle.app, handle.registry = app, registry
            handle.smtp_port = app.smtp_port
            handle.implicit_tls_port = app.implicit_tls_port
            handle.health_port = app.health_port
        return handle

    yield make
    for handle in handles:
        with contextlib.suppress(Exception):
            await handle.stop()
        if handle.process is not None and handle.process.poll() is None:
            handle.process.kill()
            handle.process.wait()


async def start_subprocess(handle: RelayHandle, env: dict[str, str] | None = None) -> None:
    """Start (or restart) `python -m mailrelay.relay` for `handle` and wait for /readyz."""
    config = load_config(handle.config_path)
    handle.smtp_port = config.listener.submission_port
    handle.implicit_tls_port = config.listener.implicit_tls_port
    handle.health_port = config.metrics.port
    handle.process = _spawn(handle, env)
    await handle.wait_ready()


def _spawn(handle: RelayHandle, env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, **(env or {})}
    log = handle.log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "mailrelay.relay", "--config", str(handle.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=str(handle.config_path.parent),
    )
    log.close()
    return process
