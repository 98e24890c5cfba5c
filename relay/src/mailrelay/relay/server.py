"""The SMTP front: aiosmtpd sessions that accept mail into the spool, and nothing more.

Three pieces:

* `RelaySMTP`, a small subclass of `smtp_base.SMTPBase` (aiosmtpd's `SMTP` protocol, with
  every use of aiosmtpd's internals behind named hooks). It adds what aiosmtpd cannot
  express through handler hooks: password checks awaited in a thread pool (the stock
  `authenticator` is synchronous), 421 for connections over the limit or during
  shutdown, a DATA timeout separate from the command timeout, enhanced status codes
  on aiosmtpd's own 552 replies, and the DATA body read in bulk (`data_reader`).
* `RelayHandler`, the thin aiosmtpd handler: policy at MAIL (who may send, as whom, is
  there disk), routing at RCPT; at the DATA command our Received header and the
  message's share of the budget for bytes in flight (`budget.py`; the body then streams
  into an `IncomingMessage`, `data_sink.py`), and after the body the size and hop checks
  and the durable enqueue that must finish before the `250`.
* `SmtpFront`, which owns the listeners, the live sessions (for limits and the SIGTERM
  drain) and the swappable `FrontSettings` a reload replaces.

The front never delivers: it calls `DeliveryHook.notify` after each durable enqueue,
handing over the message's lease (`spool.MessageLease`, which alone knows where the
message lives) so the first attempt needs no disk reads, and asks `try_acquire_rate` at
RCPT for routes that reject when over their rate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol

from aiosmtpd.smtp import AuthResult, Envelope, Session, TLSSetupException, syntax

from mailrelay.relay.address import (
    DROPPED_CHARACTER,
    PLAIN_ADDRESS,
    SYNTAX_REFUSAL,
    address_refusal,
)
from mailrelay.relay.auth import User, UserDatabase
from mailrelay.relay.budget import (
    ByteBudget,
    budget_limit,
    cgroup_memory_limit,
    charge,
    cost_factor,
)
from mailrelay.relay.client_limits import ClientLimiter
from mailrelay.relay.config import ApiUpstream, RelayConfig, RouteConfig
from mailrelay.relay.data_sink import IncomingMessage
from mailrelay.relay.envelope import Envelope as MailEnvelope  # aiosmtpd's is `Envelope`
from mailrelay.relay.metrics import RelayMetrics
from mailrelay.relay.routing import domain_of, select_route
from mailrelay.relay.smtp_base import (
    AIOSMTPD_BOGUS_REPLY,
    AIOSMTPD_MALFORMED_REPLY,
    AIOSMTPD_TOO_LARGE_PREFIX,
    CheapDir,
    SMTPBase,
)
from mailrelay.relay.smtp_params import postmaster_rewrite, split_auth_parameter
from mailrelay.relay.spool import Arrival, MessageLease, QueueEntry, Spool, new_queue_id
from mailrelay.relay.tls_accept import Handoff, ImplicitTlsAcceptor

__all__ = [
    "DeliveryHook",
    "FrontSettings",
    "RelayHandler",
    "RelaySMTP",
    "SmtpFront",
    "build_tls_context",
    "count_received_headers",
    "plain_path",
    "received_header",
]

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Each failed AUTH waits this long times the session's failures; this many close it.
_AUTH_FAILURE_DELAY = 0.2
_AUTH_FAILURE_LIMIT = 3
# Replies 500-504 (unknown command, syntax, sequence) a session may earn before 421 4.7.0
# closes it (Postfix's smtpd_hard_error_limit); aiosmtpd's own cap of 5 unknown commands
# answers 421 4.7.0 too.
_PROTOCOL_ERROR_LIMIT = 20
# asyncio's default for TLS handshakes; the command timeout if that is shorter.
_TLS_HANDSHAKE_TIMEOUT = 60.0
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
# Control characters and lone surrogates (undecodable bytes, kept by aiosmtpd's
# surrogateescape) that a reply echoing client input must not carry (RFC 5321 4.2:
# reply text is printable; a raw CR or NUL confuses clients and log readers).
_REPLY_UNSAFE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
# `<local@domain>` with a dot-atom local part and a plain ASCII domain, then the rest.
_PLAIN_PATH = re.compile(rf"<({PLAIN_ADDRESS})>(.*)", re.S)


class DeliveryHook(Protocol):
    """What the front needs from the delivery engine."""

    def notify(self, entry: QueueEntry, lease: MessageLease | None = None) -> None:
        """A message was durably enqueued; deliver it soon (taking over `lease`)."""

    def try_acquire_rate(self, route_name: str) -> bool:
        """Take one token from a route's bucket; False when the route is over its rate."""


@dataclass(frozen=True)
class FrontSettings:
    """Everything a reload may change for new commands, swapped as one object."""

    config: RelayConfig
    users: UserDatabase
    networks: tuple[IPNetwork, ...]

    @classmethod
    def build(cls, config: RelayConfig, users: UserDatabase) -> FrontSettings:
        """Settings for `config` with its users loaded."""
        return cls(config=config, users=users, networks=tuple(config.allowed_networks))


def build_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for STARTTLS and implicit TLS (TLS 1.2 or newer)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def count_received_headers(data: bytes) -> int:
    """How many Received headers the message's header section holds (loop detection)."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    if data.startswith(b"\r\n"):
        return 0
    count = 0
    for line in head.split(b"\r\n"):
        if line[:9].lower() == b"received:":
            count += 1
    return count


def received_header(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    now: datetime,
) -> bytes:
    """Our trace header (RFC 5321 4.4); `for` only for a single ASCII recipient."""
    helo = _HELO_SAFE.sub("?", helo)[:255] or "unknown"
    text = f"Received: from {helo} ([{peer_ip}])\r\n\tby {hostname} (mailrelay) with {protocol}"
    text += f" id {queue_id}"
    if recipient is not None and recipient.isascii() and "\r" not in recipient:
        text += f"\r\n\tfor <{recipient}>"
    text += f"; {format_datetime(now)}\r\n"
    return text.encode("ascii", "replace")


def plain_path(arg: str) -> tuple[str, str] | None:
    """`(address, parameters)` of a MAIL/RCPT argument in the plain `<local@domain>` form,
    or None for anything else (null path, quoted or non-ASCII parts, comments, source
    routes), which aiosmtpd's full RFC 5322 parser then handles. Same result as that
    parser for every argument it takes, at a fraction of the cost (the parser walks a
    token tree and defines a class on each call)."""
    match = _PLAIN_PATH.fullmatch(arg)
    if match is None:
        return None
    rest = match[2]
    params = rest.lstrip(" \t")
    if (rest and params == rest) or params.startswith("("):
        return None
    return match[1], params


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus what we decide per transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: list[RouteConfig] = []
        self.declared_size: int | None = None
        self.body_8bitmime = False
        self.body: IncomingMessage | None = None  # the DATA body (see `data_sink`)


class RelaySMTP(SMTPBase):
    """One SMTP session; see the module docstring for what it adds to aiosmtpd."""

    envelope_class = RelayEnvelope

    def __init__(self, front: SmtpFront, listener: str, *, implicit_tls: bool) -> None:
        settings = front.settings
        limits = settings.config.limits
        self.front = front
        self.listener = listener
        self.implicit_tls = implicit_tls
        self._registered = False
        self._refusal: str | None = None
        self._held_lines: list[str] = []
        self._auth_failures = 0
        self._protocol_errors = 0
        self.client_key: str | None = None  # counted by the front's ClientLimiter
        # Drops an implicit-TLS connection whose handshake still runs (tls_accept).
        self.abort_handshake: Callable[[], None] | None = None
        self._data_timeout = limits.data_timeout_seconds
        super().__init__(
            front.handler,
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.config.hostname,
            ident="mailrelay ESMTP",
            # On the implicit-TLS port the whole connection is TLS already.
            tls_context=None if implicit_tls else front.tls_context,
            timeout=limits.command_timeout_seconds,
            auth_required=False,  # checked at MAIL, where allowed_networks also counts
            auth_require_tls=not implicit_tls,
            loop=asyncio.get_running_loop(),
        )

    # -- session bookkeeping ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        self.abort_handshake = None
        if first and not self._registered:
            self._registered = True
            self._refusal = self.front.session_opened(self, _peer_ip(self.session))
        if first and self.implicit_tls:
            self.front.metrics.tls_sessions.labels("implicit").inc()

    def connection_lost(self, error: Exception | None) -> None:
        if self._registered:
            self._registered = False
            self.front.session_closed(self)
        super().connection_lost(error)

    def connect_refusal(self) -> str | None:
        return self._refusal

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply to DATA: a drain lets this finish."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def idle_timed_out(self) -> bool:
        # aiosmtpd just hangs up; RFC 5321 4.2 wants a 421 first (Postfix: "421 4.4.2 host
        # Error: timeout exceeded"). Not while a STARTTLS handshake runs: that would be
        # plain text in the middle of it.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.front.metrics.reject("timeout")
            log.info("Closed the session from %s: timeout exceeded", _peer_ip(self.session))
            if not self.tls_handshake_running:
                self.write_now(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
            transport.close()
            return True
        return False

    def close_for_shutdown(self) -> None:
        """Say 421 and hang up (an idle session while the relay drains)."""
        if self.transport is None:
            if self.abort_handshake is not None:
                self.abort_handshake()
            return
        self.write_now(b"421 4.3.2 Service shutting down, try again later\r\n")
        self.transport.close()

    # -- commands ---------------------------------------------------------------------

    # The decorators keep MAIL, RCPT, STARTTLS and DATA in HELP's list (aiosmtpd lists only
    # methods carrying its help text).
    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.front.draining:
            self.front.metrics.reject("shutting_down")
            await self.push("421 4.3.2 Service shutting down, try again later")
            if self.transport is not None:
                self.transport.close()
            return
        if arg is not None and self.session is not None and self.session.extended_smtp:
            # Only after EHLO: after HELO aiosmtpd refuses every MAIL parameter (501).
            split = split_auth_parameter(arg)
            if split is None:
                await self.push("501 5.5.4 Bad AUTH parameter syntax")
                return
            arg, submitter = split
            if submitter is not None:
                # RFC 4954 5: a relay that trusts no client's AUTH= parses and discards
                # it (and MAY log it); it is never forwarded (like Postfix's default
                # smtp_send_dummy_mail_auth = no).
                log.debug("MAIL from %s with AUTH=%s", _peer_ip(self.session), submitter)
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg is not None:
            arg = postmaster_rewrite(arg, self.front.settings.config.postmaster_address)
        await super().smtp_RCPT(arg)

    async def smtp_EHLO(self, hostname: str) -> None:
        await super().smtp_EHLO(hostname)
        if self.session is not None and self.session.extended_smtp and self.offers_auth:
            # RFC 4954 5: AUTH lengthens the MAIL command line by up to 500 octets.
            self.command_size_limits["MAIL"] = max(
                self.command_size_limits["MAIL"], self.command_size_limit + 26 + 10 + 500
            )

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # aiosmtpd would answer 220 again inside TLS and nest a second handshake.
        if self.implicit_tls or self.starttls_done:
            await self.push("503 5.5.1 TLS already active")
            return
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as error:
            self.front.tls_handshake_failed(
                _peer_ip(self.session), "STARTTLS", error.__cause__ or error
            )
            raise

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd re-arms its idle timer per command only, so this bounds the whole DATA.
        self.rearm_timeout(self._data_timeout)
        envelope = self.envelope
        try:
            await super().smtp_DATA(arg)
        finally:
            # A body not handed to the spool (refused, failed, connection lost) gives back
            # its share of the budget and its temp file.
            body = getattr(envelope, "body", None)
            if body is not None:
                envelope.body = None  # type: ignore[union-attr]
                await body.close()

    async def open_data_sink(self) -> IncomingMessage | str:
        assert isinstance(self.envelope, RelayEnvelope) and self.session is not None
        return self.front.handler.open_body(self, self.session, self.envelope)

    async def push(self, status: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            # Hung up (421) already: commands the client pipelined behind run before the
            # cancel lands, and a closed TLS transport raises on write.
            return
        if isinstance(status, str):
            # aiosmtpd echoes client input in some replies (an unknown command, VRFY).
            status = _REPLY_UNSAFE.sub("?", status)
            if status.startswith(AIOSMTPD_TOO_LARGE_PREFIX):
                self.front.metrics.reject("message_too_large")
                status = "552 5.3.4 Message size exceeds fixed maximum message size"
            elif status == AIOSMTPD_MALFORMED_REPLY:
                # An address aiosmtpd's parser refused: the same reply as relay/address.py.
                self.front.metrics.reject("bad_address")
                status = SYNTAX_REFUSAL.reply
            elif status == AIOSMTPD_BOGUS_REPLY:
                await self._hang_up(
                    f"421 4.7.0 {self.hostname} Error: too many unrecognized commands"
                )
                return
            elif len(status) > 3 and status[3] == "-":
                # A continuation line of a multi-line reply (EHLO): hold it and send the
                # whole reply with its last line, one write instead of one per line.
                self._held_lines.append(status)
                return
            if status[:3] in ("500", "501", "502", "503", "504"):
                self._protocol_errors += 1
                if self._protocol_errors >= _PROTOCOL_ERROR_LIMIT:
                    await self._hang_up(f"421 4.7.0 {self.hostname} Error: too many errors")
                    return
        if self._held_lines:
            held = "\r\n".join(self._held_lines)
            self._held_lines.clear()
            status = (
                f"{held}\r\n{status}"
                if isinstance(status, str)
                else held.encode() + b"\r\n" + status
            )
        await super().push(status)

    async def _hang_up(self, reply: str) -> None:
        """Answer `reply` (a 421) and close: too many errors in this session."""
        self.front.metrics.reject("too_many_errors")
        log.info("Closed the session from %s: %s", _peer_ip(self.session), reply[4:])
        await super().push(reply)
        if self.transport is not None:
            self.transport.close()
        # Commands the client pipelined after the last one must not run.
        self.stop_commands()

    def parse_path(self, arg: str) -> tuple[str | None, str | None]:
        found = plain_path(arg)
        if found is None:
            address, rest = super().parse_path(arg)
            # The RFC 5322 parser reads a tab or a comment inside the path as folding
            # space and drops it (`<a\t@b>` becomes a@b): a control character or a
            # non-ASCII space anywhere in the path is bad syntax, whatever address the
            # parser made of it.
            path = arg[: len(arg) - len(rest)] if rest and arg.endswith(rest) else arg
            path = path.strip(" \t")
            if address is not None and DROPPED_CHARACTER.search(path):
                # The path as sent goes on to the handler, whose address rule refuses it.
                return path.removeprefix("<").removesuffix(">"), rest
            return address, rest
        address, params = found
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, params

    # -- AUTH: the password check awaited off the loop (the parsing is SMTPBase's) -----

    async def check_password(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        metrics = self.front.metrics
        peer_ip = _peer_ip(self.session)
        blocked = self.front.client_limits.auth_blocked(peer_ip)
        if blocked is not None:
            # Other sessions of this client used up its AUTH failures: no more guesses.
            metrics.client_limit(blocked.reason)
            await self._refuse_client(blocked.reply(self.hostname, peer_ip))
            return AuthResult(success=False, handled=True)
        username = login.decode("utf-8", "replace")
        users = self.front.settings.users
        user = await users.verify(username, password, metrics.auth_verified)
        metrics.auth_cache_entries.set(len(users.cache) if users.cache is not None else 0)
        if user is None:
            metrics.auth_attempts.labels("failure").inc()
            metrics.auth_failures.inc()
            self._auth_failures += 1
            log.warning(
                "Refused AUTH %s for user %r from %s", mechanism, username, _peer_ip(self.session)
            )
            # Slow down password guessing: each failure costs more, and a session that
            # keeps failing is closed (Postfix's smtpd_hard_error_limit in spirit).
            await asyncio.sleep(_AUTH_FAILURE_DELAY * self._auth_failures)
            blocked = self.front.client_limits.auth_failed(peer_ip)
            if blocked is not None:
                metrics.client_limit(blocked.reason)
                log.warning(
                    "Blocked client %s for %.0fs: too many AUTH failures",
                    peer_ip,
                    blocked.retry_after,
                )
                await self._refuse_client(blocked.reply(self.hostname, peer_ip))
                return AuthResult(success=False, handled=True)
            if self._auth_failures >= _AUTH_FAILURE_LIMIT:
                await self.push("421 4.7.0 Too many authentication failures")
                if self.transport is not None:
                    self.transport.close()
                return AuthResult(success=False, handled=True)
            # handled=False makes aiosmtpd answer 535 5.7.8; handled=True would leave the
            # client waiting for a reply that never comes.
            return AuthResult(success=False, handled=False)
        metrics.auth_attempts.labels("success").inc()
        return AuthResult(success=True, auth_data=user)

    async def _refuse_client(self, reply: str) -> None:
        await self.push(reply)
        if self.transport is not None:
            self.transport.close()


def _peer_ip(session: Session | None) -> str:
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


def _in_networks(ip: str, networks: Sequence[IPNetwork]) -> bool:
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def _declared_size(options: Sequence[str]) -> int | None:
    for option in options:
        if option.upper().startswith("SIZE="):
            value = option[5:]
            return int(value) if value.isdigit() else None
    return None


def _route_size_limit(route: RouteConfig, relay_limit: int) -> int:
    """The size a route can carry: min of the relay's, the route's and its providers' limits."""
    if any(isinstance(u, ApiUpstream) for u in (route.upstream, *route.fallbacks)):
        # Importing the providers loads every provider SDK (botocore for SES): only pay
        # for that in memory and startup time when a route really uses an HTTP provider.
        from mailrelay.relay.upstreams.providers.limits import effective_max_message_size  # noqa: PLC0415

        return effective_max_message_size(route, relay_limit)
    if route.max_message_size is None:
        return relay_limit
    return min(relay_limit, route.max_message_size)


def _refuse_address(
    front: SmtpFront, role: str, address: str, envelope: RelayEnvelope
) -> str | None:
    """The reply refusing an envelope address the relay could not send on, or None."""
    refusal = address_refusal(address, smtputf8=envelope.smtp_utf8)
    if refusal is None:
        return None
    front.metrics.reject("bad_address")
    # The log escapes control characters (relay/logging.py); %r keeps quoting visible.
    log.info("Refused %s %r: %s", role, address, refusal.reason)
    return refusal.reply


class RelayHandler(CheapDir):
    """aiosmtpd handler hooks: policy, routing and the durable enqueue."""

    def __init__(self, front: SmtpFront) -> None:
        self.front = front

    def handle_STARTTLS(self, server: RelaySMTP, session: Session, envelope: Envelope) -> bool:
        self.front.metrics.tls_sessions.labels("starttls").inc()
        return True

    async def handle_MAIL(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: RelayEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        front = self.front
        if (refusal := _refuse_address(front, "sender", address, envelope)) is not None:
            return refusal
        settings = front.settings
        user: User | None = session.auth_data if session.authenticated else None
        peer_ip = _peer_ip(session)
        if user is None and not _in_networks(peer_ip, settings.networks):
            front.metrics.reject("auth_required")
            log.info("Refused MAIL from %s: not authenticated and not an allowed network", peer_ip)
            return "530 5.7.0 Authentication required"
        sender_domain = domain_of(address) if address != "<>" else ""
        if user is not None and not user.may_send_as(sender_domain):
            front.metrics.reject("sender_forbidden")
            log.warning(
                "Refused sender <%s> for user %r: domain not allowed", address, user.username
            )
            return f"553 5.7.1 Sender address <{address}> not owned by user {user.username}"
        if front.low_on_disk():
            front.metrics.reject("low_disk")
            log.error("Refused MAIL from %s: spool is low on disk space", peer_ip)
            return "452 4.3.1 Insufficient system storage"
        # aiosmtpd needs a truthy mail_from to know MAIL happened; "<>" becomes "" at spooling.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.declared_size = _declared_size(mail_options)
        envelope.body_8bitmime = "BODY=8BITMIME" in mail_options
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: RelayEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        front = self.front
        if (refusal := _refuse_address(front, "recipient", address, envelope)) is not None:
            return refusal
        config = front.settings.config
        if len(envelope.rcpt_tos) >= config.limits.max_recipients:
            front.metrics.reject("too_many_recipients")
            return "452 4.5.3 Too many recipients"
        route = select_route(config.routes, domain_of(envelope.mail_from or ""), domain_of(address))
        if route is None:
            front.metrics.reject("no_route")
            log.info("Refused recipient <%s>: no route takes it", address)
            return f"550 5.7.1 Relaying denied: no route for <{address}>"
        if route.held is not None:
            # Not another route: its mail is meant to go this way (signed), later.
            front.metrics.reject("route_held")
            return f"451 4.7.5 {route.held}"
        route_limit = _route_size_limit(route, config.limits.max_message_size)
        if envelope.declared_size is not None and envelope.declared_size > route_limit:
            front.metrics.reject("message_too_large")
            return "552 5.3.4 Message size exceeds the limit for this recipient"
        if (
            route.rate_limit is not None
            and route.rate_limit.on_exceed == "reject"
            and front.delivery is not None
            and not front.delivery.try_acquire_rate(route.name)
        ):
            front.metrics.reject("rate_limited")
            return "450 4.7.0 Rate limit exceeded, try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.routes.append(route)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(
        self, server: RelaySMTP, session: Session, envelope: RelayEnvelope
    ) -> str:
        try:
            return await self._accept(server, session, envelope)
        except Exception:
            log.exception("Failed to accept a message from %s", _peer_ip(session))
            self.front.metrics.reject("internal_error")
            return "451 4.3.0 Internal error, try again later"

    def open_body(
        self, server: RelaySMTP, session: Session, envelope: RelayEnvelope
    ) -> IncomingMessage | str:
        """At DATA, before the 354: the message's queue id, Received header and share of
        the budget for bytes in flight, or the reply refusing the DATA (452 4.3.1 when the
        declared SIZE does not fit the budget now)."""
        front = self.front
        config = front.settings.config
        declared = envelope.declared_size or 0
        queue_id = new_queue_id()
        user: User | None = session.auth_data if session.authenticated else None
        tls = server.implicit_tls or session.ssl is not None
        protocol = (
            ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP" if session.extended_smtp else "SMTP")
            + ("S" if tls else "")
            + ("A" if user is not None else "")
        )
        # Stamped when the DATA starts, as Postfix's smtpd does.
        header = received_header(
            helo=session.host_name or "unknown",
            peer_ip=_peer_ip(session),
            hostname=config.hostname,
            protocol=protocol,
            queue_id=queue_id,
            recipient=envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None,
            now=datetime.now(UTC),
        )
        factor = cost_factor(envelope.routes)
        reservation = front.budget.try_reserve(
            charge(len(header) + min(declared, config.limits.max_message_size), factor)
        )
        if reservation is None:
            return self._refuse_over_budget(session, declared)
        arrival = Arrival(
            MailEnvelope(
                queue_id=queue_id,
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                recipients=tuple(envelope.rcpt_tos),
                smtputf8=envelope.smtp_utf8,
                body_8bitmime=envelope.body_8bitmime,
            ),
            routes=tuple(route.name for route in envelope.routes),
            client_address=_peer_ip(session),
            authenticated_user=user.username if user is not None else None,
        )
        envelope.body = IncomingMessage(
            front.spool, arrival, header, reservation, cost_factor=factor
        )
        return envelope.body

    def _refuse_over_budget(self, session: Session, size: int) -> str:
        budget = self.front.budget
        self.front.metrics.reject("in_flight_budget")
        log.warning(
            "Refused a message of %d bytes from %s: %d of %d bytes in flight in use",
            size,
            _peer_ip(session),
            budget.used,
            budget.limit,
        )
        return "452 4.3.1 Insufficient system storage, try again later"

    async def _accept(self, server: RelaySMTP, session: Session, envelope: RelayEnvelope) -> str:
        front = self.front
        config = front.settings.config
        body = envelope.body
        assert body is not None, "DATA without a body sink"
        limit = min(
            [config.limits.max_message_size]
            + [_route_size_limit(r, config.limits.max_message_size) for r in envelope.routes]
        )
        if body.body_size > limit:  # permanent: says so even when it did not fit the budget
            front.metrics.reject("message_too_large")
            return "552 5.3.4 Message size exceeds fixed maximum message size"
        if body.failure == "over_budget":
            return self._refuse_over_budget(session, body.size)
        if body.failure == "spool_error":
            front.metrics.reject("spool_error")
            return "451 4.3.0 Could not store the message, try again later"
        hops = count_received_headers(body.head)
        if hops > config.limits.max_received_headers:
            front.metrics.reject("loop_detected")
            log.warning("Refused a message with %d Received headers: mail loop", hops)
            return "554 5.4.6 Too many hops: mail loop detected"
        started = time.perf_counter()
        try:
            lease = await body.enqueue(journal=front.delivery is not None)
        except OSError as exc:
            front.metrics.reject("spool_error")
            log.error("Failed to spool message %s: %s", body.queue_id, exc)
            return "451 4.3.0 Could not store the message, try again later"
        entry = lease.entry
        front.metrics.spool_write_seconds.observe(time.perf_counter() - started)
        front.metrics.messages_accepted.inc()
        front.metrics.accepted_bytes.inc(entry.size)
        for route in envelope.routes:
            front.metrics.recipients_accepted.labels(route.name).inc()
        log.info(
            "Accepted message %s from <%s> for %d recipient(s), %d bytes, client %s%s",
            entry.queue_id,
            entry.mail_from,
            len(entry.recipients),
            entry.size,
            entry.client_address,
            f" user {entry.authenticated_user}" if entry.authenticated_user else "",
            extra={"queue_id": entry.queue_id, "event": "accepted"},
        )
        delivery = front.delivery
        if delivery is None:
            lease.release_reservation()
            await lease.release()
        else:
            try:
                delivery.notify(entry, lease)
            except Exception:
                lease.release_reservation()
                # The message is durable; handed back, it waits where the engine's next
                # scan finds it.
                log.exception("Failed to notify delivery of message %s", entry.queue_id)
                try:
                    await lease.release()
                except OSError as exc:
                    # Still durable where it is: a stop or a restart moves it on.
                    log.error("Failed to hand back message %s: %s", entry.queue_id, exc)
        return f"250 2.0.0 Ok: queued as {entry.queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The client's fault, logged and counted by RelaySMTP.smtp_STARTTLS; aiosmtpd
            # closes the connection without sending this.
            return "421 4.7.0 TLS handshake failed"
        log.error("Failed to handle an SMTP command: %r", error, exc_info=error)
        self.front.metrics.reject("internal_error")
        return "451 4.3.0 Internal error, try again later"


class SmtpFront:
    """The SMTP listeners and their sessions."""

    def __init__(
        self,
        settings: FrontSettings,
        spool: Spool,
        metrics: RelayMetrics,
        *,
        delivery: DeliveryHook | None = None,
        reuse_port: bool = False,
        budget: ByteBudget | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.delivery = delivery
        # Shared with the delivery engine (see `budget.py`); a front alone gets its own.
        self.budget = (
            budget
            if budget is not None
            else ByteBudget(
                budget_limit(settings.config, cgroup_memory_limit()),
                on_change=metrics.budget_changed,
            )
        )
        self.handler = RelayHandler(self)
        self.sessions: set[RelaySMTP] = set()
        self.client_limits = ClientLimiter(settings.config.limits.per_client)
        self.draining = False
        self._reuse_port = reuse_port
        self._servers: list[asyncio.Server] = []
        self.ports: dict[str, int] = {}
        self.tls_context: ssl.SSLContext | None = None
        tls = settings.config.listener.tls
        if tls is not None:
            self.tls_context = build_tls_context(str(tls.cert_file), str(tls.key_file))
        self._free_checked_at = 0.0
        self._low_disk = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the submission listener and, if configured, the implicit-TLS one."""
        loop = asyncio.get_running_loop()
        listener = self.settings.config.listener
        server = await loop.create_server(
            lambda: RelaySMTP(self, "submission", implicit_tls=False),
            host=listener.host,
            port=listener.submission_port,
            reuse_port=self._reuse_port or None,
        )
        self._servers.append(server)
        self.ports["submission"] = server.sockets[0].getsockname()[1]
        if listener.implicit_tls_port is not None and self.tls_context is not None:
            context = self.tls_context
            server = await loop.create_server(
                lambda: ImplicitTlsAcceptor(context, self._handshake_timeout(), self._accept_tls),
                host=listener.host,
                port=listener.implicit_tls_port,
                reuse_port=self._reuse_port or None,
            )
            self._servers.append(server)
            self.ports["implicit_tls"] = server.sockets[0].getsockname()[1]
        log.info(
            "Opened SMTP listeners on %s (%s)",
            listener.host,
            ", ".join(f"{name} {port}" for name, port in self.ports.items()),
        )

    @property
    def listening(self) -> bool:
        """Whether the listeners are open and not draining (for /readyz)."""
        return (
            bool(self._servers) and not self.draining and all(s.is_serving() for s in self._servers)
        )

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new sessions with 421, let transactions in flight finish, then close."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        log.info("Started draining %d SMTP session(s)", len(self.sessions))
        while self.sessions and loop.time() < deadline:
            for session in list(self.sessions):
                if not session.in_transaction:
                    session.close_for_shutdown()
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_for_shutdown()
        await self.close()

    async def close(self) -> None:
        """Close the listeners (sessions are left to `drain`)."""
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def apply(self, settings: FrontSettings) -> None:
        """Use new settings for new commands; sessions in flight keep working."""
        old = self.settings
        self.settings = settings
        tls = settings.config.listener.tls
        if tls is not None:
            if self.tls_context is None:
                self.tls_context = build_tls_context(str(tls.cert_file), str(tls.key_file))
            else:
                # Same context object: the implicit-TLS listener holds a reference to it.
                self.tls_context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        if settings.users is not old.users:
            old.users.close()
        self.client_limits.configure(settings.config.limits.per_client)
        self._free_checked_at = 0.0

    # -- sessions -----------------------------------------------------------------------

    def session_opened(self, session: RelaySMTP, peer_ip: str) -> str | None:
        """Track a new session; a reply string means refuse it with that reply."""
        self.metrics.smtp_sessions.labels(session.listener).inc()
        if self.draining:
            self.metrics.reject("shutting_down")
            return "421 4.3.2 Service shutting down, try again later"
        admission = self.client_limits.admit(peer_ip)
        if admission.refusal is not None:
            self.metrics.client_limit(admission.refusal.reason)
            log.info(
                "Refused a connection from %s: per-client limit (%s)",
                peer_ip,
                admission.refusal.reason,
            )
            return admission.refusal.reply(self.settings.config.hostname, peer_ip)
        if len(self.sessions) >= self.settings.config.limits.max_connections:
            self.client_limits.release(admission.key)
            self.metrics.reject("too_many_connections")
            log.warning("Refused a connection: %d sessions open", len(self.sessions))
            return "421 4.7.0 Too many connections, try again later"
        session.client_key = admission.key
        self.sessions.add(session)
        self.metrics.smtp_sessions_active.set(len(self.sessions))
        return None

    def session_closed(self, session: RelaySMTP) -> None:
        """Forget a finished session."""
        if session in self.sessions:
            self.sessions.discard(session)
            self.client_limits.release(session.client_key)
            session.client_key = None
        self.metrics.smtp_sessions_active.set(len(self.sessions))

    def tls_handshake_failed(self, peer_ip: str, where: str, error: BaseException) -> None:
        """A client's TLS handshake failed: its fault, so one INFO line and a count."""
        self.metrics.reject("tls_handshake")
        detail = getattr(error, "reason", None) or type(error).__name__
        log.info(
            "Closed the connection from %s: TLS handshake failed (%s, %s)", peer_ip, where, detail
        )

    def _handshake_timeout(self) -> float:
        return min(_TLS_HANDSHAKE_TIMEOUT, self.settings.config.limits.command_timeout_seconds)

    def _accept_tls(self, peer_ip: str, abort: Callable[[], None]) -> Handoff | None:
        """Admit a connection on the implicit-TLS port before its handshake (tls_accept)."""
        session = RelaySMTP(self, "implicit_tls", implicit_tls=True)
        session.abort_handshake = abort
        session._registered = True  # counted from the TCP accept, not the end of the handshake
        refusal = self.session_opened(session, peer_ip)
        if refusal is not None:
            return None

        def failed(error: BaseException) -> None:
            self.session_closed(session)
            session._registered = False
            self.tls_handshake_failed(peer_ip, "implicit TLS", error)

        return Handoff(protocol=session, failed=failed)

    def low_on_disk(self) -> bool:
        """Whether the spool has less free space than configured (checked at most 1/s)."""
        now = time.monotonic()
        if now - self._free_checked_at >= 1.0:
            self._free_checked_at = now
            minimum = self.settings.config.spool.min_free_bytes
            self._low_disk = self.spool.free_bytes() < minimum
        return self._low_disk
