"""Real SMTP peers on loopback for tests, benchmarks and the fuzzer.

* `TlsCerts` / `make_tls_certs`: a trustme CA and a localhost certificate, as files.
* `RecordingUpstream`: an aiosmtpd upstream on its own thread (STARTTLS, implicit TLS or
  plain, optional AUTH) that records every envelope and the exact bytes received, and
  whose replies a caller can change while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass(frozen=True)
class TlsCerts:
    """A CA and a server certificate for localhost, as files and contexts."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        """A server context with the localhost certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context

    def issue(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Another localhost certificate (for reload tests), as (cert_file, key_file)."""
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
        cert.private_key_pem.write_to_path(str(key_file))
        with cert_file.open("wb") as fh:
            for blob in cert.cert_chain_pems:
                fh.write(blob.bytes())
        return cert_file, key_file


def make_tls_certs(directory: Path) -> TlsCerts:
    """A fresh CA and a localhost certificate, as files under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    bare = TlsCerts(ca=ca, ca_file=ca_file, cert_file=ca_file, key_file=ca_file)
    cert_file, key_file = bare.issue(directory, "server")
    return TlsCerts(ca=ca, ca_file=ca_file, cert_file=cert_file, key_file=key_file)


@dataclass(frozen=True)
class Received:
    """One message as an upstream received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]
    tls: bool
    auth_user: str | None


@dataclass
class RecordingUpstream:
    """An aiosmtpd upstream on its own thread; tests read `messages` and set replies.

    `rcpt_reply(address)` may return a status to refuse a recipient; `data_reply(env)`
    may return a status instead of 250 (the message is then not recorded).
    """

    host: str
    port: int
    tls: str
    auth: tuple[str, str] | None
    messages: list[Received] = field(default_factory=list)
    rcpt_reply: Callable[[str], str | None] | None = None
    data_reply: Callable[[Envelope], str | None] | None = None
    connections: int = 0
    certs: TlsCerts | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Any = None

    def record(self, message: Received) -> None:
        with self._lock:
            self.messages.append(message)

    def snapshot(self) -> list[Received]:
        """A copy of the messages received so far."""
        with self._lock:
            return list(self.messages)

    async def wait_for(self, count: int, within: float = 10.0) -> list[Received]:
        """Wait until at least `count` messages arrived; fail the test after `within` s."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            got = self.snapshot()
            if len(got) >= count:
                return got
            await asyncio.sleep(0.02)
        raise AssertionError(f"upstream got {len(self.snapshot())} message(s), wanted {count}")

    def message_ids(self) -> set[str]:
        """Message-ID header values of everything received."""
        from mailrelay.relay.spool import extract_message_id  # noqa: PLC0415

        return {mid for m in self.snapshot() if (mid := extract_message_id(m.data)) is not None}

    def stop(self) -> None:
        """Stop listening and drop open connections ('upstream down')."""
        controller = self._controller
        if controller is None:
            return
        self._controller = None

        async def hang_up() -> None:
            for session in list(controller.sessions):
                if session.transport is not None:
                    session.transport.close()
            await asyncio.sleep(0.05)  # let connection_lost run before the loop stops

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(hang_up(), controller.loop).result(5)
        controller.stop()

    def start(self) -> None:
        """(Re)start listening on the same port."""
        assert self._controller is None
        self._controller = _start_controller(self)

    def smtp_upstream(self, name: str, ca_file: Path, **extra: Any) -> dict[str, Any]:
        """The config entry for this upstream (credential files: see `relay_factory`)."""
        entry: dict[str, Any] = {
            "type": "smtp",
            "name": name,
            "host": self.host,
            "port": self.port,
            "tls": self.tls,
            "ca_file": str(ca_file),
            "connect_timeout_seconds": 2,
            "timeout_seconds": 5,
        }
        if self.tls == "none":
            entry["insecure_allow_plaintext"] = True
        entry.update(extra)
        return entry


class _RecordingHandler:
    def __init__(self, upstream: RecordingUpstream) -> None:
        self.upstream = upstream

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.upstream.rcpt_reply(address) if self.upstream.rcpt_reply else None
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self.upstream.data_reply(envelope) if self.upstream.data_reply else None
        if reply is not None:
            return reply
        auth_user = getattr(session.auth_data, "login", b"").decode() or None
        self.upstream.record(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                mail_options=tuple(envelope.mail_options),
                tls=session.ssl is not None or self.upstream.tls == "implicit",
                auth_user=auth_user,
            )
        )
        return "250 2.0.0 Recorded"


class _UpstreamController(Controller):
    def __init__(self, upstream: RecordingUpstream, certs: TlsCerts | None) -> None:
        self.upstream = upstream
        self.certs = certs
        self.sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        implicit = upstream.tls == "implicit"
        super().__init__(
            _RecordingHandler(upstream),
            hostname=upstream.host,
            port=upstream.port,
            ssl_context=certs.server_context() if implicit and certs else None,
        )

    def factory(self) -> SMTP:
        upstream = self.upstream

        def authenticator(
            server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
        ) -> AuthResult:
            ok = (
                isinstance(data, LoginPassword)
                and upstream.auth is not None
                and (data.login.decode(), data.password.decode()) == upstream.auth
            )
            return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

        upstream.connections += 1
        session = SMTP(
            self.handler,
            hostname="upstream.test",
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=(
                self.certs.server_context() if upstream.tls == "starttls" and self.certs else None
            ),
            require_starttls=upstream.tls == "starttls",
            auth_required=upstream.auth is not None,
            auth_require_tls=upstream.tls == "starttls",
            authenticator=authenticator,
            data_size_limit=None,
        )
        self.sessions.add(session)
        return session


def _start_controller(upstream: RecordingUpstream) -> _UpstreamController:
    controller = _UpstreamController(upstream, upstream.certs)
    controller.start()
    return controller
