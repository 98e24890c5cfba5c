"""Real SMTP upstreams on 127.0.0.1 for the delivery tests: aiosmtpd with TLS and AUTH.

`start_upstream` runs an aiosmtpd server inside the test's event loop on a free port. It
records every transaction (envelope, MAIL options, the exact DATA bytes, whether TLS was
on, who authenticated) and counts TCP connections, so tests can assert on bytes and on
pool reuse. Refusals per recipient, for MAIL or DATA, and a "down" switch (close the
listener, later reopen on the same port) model the failures the engine must survive.

`Certificates` wraps a trustme CA and a server certificate for 127.0.0.1 and localhost,
with the CA written to a file because the relay's config takes paths.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

__all__ = [
    "Certificates",
    "Received",
    "ScriptedUpstream",
    "Upstream",
    "make_certificates",
    "start_upstream",
]


@dataclass
class Certificates:
    """A test CA, its PEM file, and a server TLS context signed by it."""

    ca: trustme.CA
    ca_file: Path
    server_context: ssl.SSLContext


def make_certificates(directory: Path) -> Certificates:
    """A fresh CA and a server certificate valid for 127.0.0.1 and localhost."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file = directory / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return Certificates(ca=ca, ca_file=ca_file, server_context=context)


@dataclass(frozen=True)
class Received:
    """One transaction as the upstream saw it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    data: bytes
    tls: bool
    auth_user: str | None


@dataclass
class _Handler:
    owner: Upstream

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        # aiosmtpd reads pipelined commands fine but does not advertise PIPELINING.
        session.host_name = hostname
        if self.owner.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self.owner.refuse_rcpt.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if self.owner.refuse_mail is not None:
            return self.owner.refuse_mail
        limit = self.owner.max_messages_per_connection
        if limit is not None:
            count = self.owner.session_messages.get(id(session), 0)
            if count >= limit:
                return "421 4.7.0 Too many messages on this connection"
            self.owner.session_messages[id(session)] = count + 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        if self.owner.refuse_data is not None:
            return self.owner.refuse_data
        if self.owner.data_delay:
            await asyncio.sleep(self.owner.data_delay)
        user = session.auth_data.login.decode() if session.auth_data is not None else None
        self.owner.messages.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                mail_options=tuple(envelope.mail_options),
                data=envelope.original_content,
                tls=server.transport is not None
                and server.transport.get_extra_info("sslcontext") is not None,
                auth_user=user,
            )
        )
        self.owner.arrived.set()
        return f"250 2.0.0 Ok: queued as U{len(self.owner.messages)}"


class _RecordingSMTP(SMTP):
    """aiosmtpd's server, noting each chunk it reads, to show what came in one write.

    With the owner's `refuse_rset` set, RSET gets that reply and resets nothing (a
    server whose transaction stays open after a failed RSET)."""

    def __init__(self, owner: Upstream, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def data_received(self, data: bytes) -> None:
        self._owner.chunks.append(bytes(data))
        super().data_received(data)

    async def smtp_RSET(self, arg: str) -> None:
        if self._owner.refuse_rset is not None:
            await self.push(self._owner.refuse_rset)
            return
        await super().smtp_RSET(arg)


@dataclass
class Upstream:
    """A running aiosmtpd upstream and what it saw."""

    host: str
    port: int
    tls: Literal["starttls", "implicit", "none"]
    server_context: ssl.SSLContext | None
    users: dict[str, str] | None
    smtputf8: bool
    pipelining: bool = True
    messages: list[Received] = field(default_factory=list)
    # Every chunk the server's protocol was handed (one per TCP read), in order.
    chunks: list[bytes] = field(default_factory=list)
    connections: int = 0
    auth_failures: int = 0
    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    refuse_mail: str | None = None
    refuse_data: str | None = None
    refuse_rset: str | None = None
    data_delay: float = 0.0
    max_messages_per_connection: int | None = None
    session_messages: dict[int, int] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _protocols: list[SMTP] = field(default_factory=list)

    def _authenticate(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self.users is not None
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode()
            if self.users.get(user) == auth_data.password.decode():
                return AuthResult(success=True, auth_data=auth_data)
        self.auth_failures += 1
        # handled=False makes aiosmtpd answer 535 5.7.8 instead of leaving the client hanging.
        return AuthResult(success=False, handled=False)

    def _factory(self) -> SMTP:
        self.connections += 1
        smtp = _RecordingSMTP(
            self,
            _Handler(self),
            hostname="upstream.test",
            enable_SMTPUTF8=self.smtputf8,
            tls_context=self.server_context if self.tls == "starttls" else None,
            require_starttls=self.tls == "starttls",
            authenticator=self._authenticate if self.users is not None else None,
            # aiosmtpd warns (an error under pytest) when AUTH is required without TLS.
            auth_required=self.users is not None and self.tls == "starttls",
            # On implicit TLS aiosmtpd does not know the socket is encrypted.
            auth_require_tls=self.tls == "starttls",
            loop=asyncio.get_running_loop(),
        )
        self._protocols.append(smtp)
        return smtp

    async def start(self) -> None:
        """Listen (again) on `port`; 0 picks a free one the first time."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory,
            host=self.host,
            port=self.port,
            ssl=self.server_context if self.tls == "implicit" else None,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def go_down(self) -> None:
        """Stop listening and cut every open connection, like a crashed server."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for proto in self._protocols:
            if proto.transport is not None:
                proto.transport.close()
            task = getattr(proto, "_handler_coroutine", None)
            if task is not None:
                task.cancel()
        self._protocols.clear()
        await asyncio.sleep(0)

    async def stop(self) -> None:
        """Shut down for good (test teardown)."""
        await self.go_down()

    async def wait_for(self, count: int, within: float = 10.0) -> None:
        """Wait until `count` transactions have arrived."""

        async def _wait() -> None:
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(_wait(), within)


async def start_upstream(
    *,
    tls: Literal["starttls", "implicit", "none"] = "starttls",
    certs: Certificates | None = None,
    users: dict[str, str] | None = None,
    smtputf8: bool = True,
    pipelining: bool = True,
    configure: Callable[[Upstream], None] | None = None,
) -> Upstream:
    """Start an upstream on 127.0.0.1; `certs` is needed unless tls is 'none'."""
    if tls != "none" and certs is None:
        raise ValueError("a TLS upstream needs certificates")
    upstream = Upstream(
        host="127.0.0.1",
        port=0,
        tls=tls,
        server_context=certs.server_context if certs is not None else None,
        users=users,
        smtputf8=smtputf8,
        pipelining=pipelining,
    )
    if configure is not None:
        configure(upstream)
    await upstream.start()
    return upstream


@dataclass
class ScriptedUpstream:
    """A minimal plain-text SMTP server with PIPELINING that answers DATA with 354 always.

    aiosmtpd refuses DATA without an accepted recipient; some servers do not, and RFC
    2920 3.1 says what the client must then do (send a lone "."). This server records
    every line it reads, so a test sees exactly what the client sent.
    """

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    lines: list[bytes] = field(default_factory=list)
    connections: int = 0
    host: str = "127.0.0.1"
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._session, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close open sessions."""
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        recipients = 0
        writer.write(b"220 scripted.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                self.lines.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-scripted.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    recipients = 0
                    writer.write(b"250 2.1.0 OK\r\n")
                elif verb == b"RCPT":
                    address = line.decode().split(":", 1)[1].strip().strip("<>")
                    reply = self.rcpt_replies.get(address, "250 2.1.5 OK")
                    recipients += reply.startswith("250")
                    writer.write(reply.encode() + b"\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    while (body_line := await reader.readline()) not in (b".\r\n", b""):
                        self.lines.append(body_line)
                    self.lines.append(b".\r\n")
                    if recipients:
                        writer.write(b"250 2.0.0 Ok: queued\r\n")
                    else:
                        writer.write(b"554 5.5.1 No valid recipients\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 Bye\r\n")
                    break
                else:  # RSET, NOOP
                    recipients = 0
                    writer.write(b"250 OK\r\n")
        finally:
            writer.close()
