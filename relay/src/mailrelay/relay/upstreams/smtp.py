"""SMTP upstreams: aiosmtplib behind a small connection pool, one pool per upstream.

Shape:

- `CredentialFiles` reads the AUTH user and password from their files, again whenever
  a file's identity (inode, size, mtime) changes, so a rotated Kubernetes Secret is
  picked up without a restart.
- `SmtpConnectionPool` hands out connected, TLS-checked, authenticated `aiosmtplib.SMTP`
  clients. At most `pool_size` are in use at once; released healthy ones wait idle and
  are reused (after an RSET, which also proves the connection is still alive); broken
  ones are dropped; idle ones are closed after `idle_timeout` seconds, and a connection
  authenticated with credentials that have since changed is not reused.
- `SmtpTransport.deliver` runs one transaction, the original bytes unchanged: when the
  upstream offers PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in one write
  (`smtp_pipelining`), otherwise through aiosmtplib's `sendmail`. Recipients whose
  address cannot go on a command line fail alone before anything is sent
  (`transport.split_unsendable`). Every answer or exception becomes per-recipient
  results: 4xx temporary, 5xx permanent (but 503, a command out of sequence, is ours
  and temporary), connection problems temporary for all, and problems that are ours to
  fix (AUTH refused, STARTTLS missing, a certificate that does not verify)
  `CONFIG_ERROR`, which keeps mail queued instead of bouncing it.
- Each transaction says how it ended (`_Ending`): cleanly (the final reply to the body,
  or a refused MAIL), possibly open (any refusal after MAIL, any error of ours), or
  broken. A possibly open one is reset with RSET, its reply checked, before the
  connection goes back to the pool; a broken one, or one whose RSET fails, is closed.
  So a connection never carries a half-finished transaction into another message.

TLS is never negotiated down: `starttls` passes `start_tls=True` (aiosmtplib's default
`None` silently continues in plain text when the server offers no STARTTLS) and the
transport checks that the socket really is TLS before any AUTH or MAIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import aiosmtplib

from mailrelay.relay.address import ascii_form
from mailrelay.relay.config import SmtpUpstream
from mailrelay.relay.redact import SECRETS
from mailrelay.relay.upstream_status import AuthTracker, UpstreamAuth
from mailrelay.relay.upstreams import oauth2
from mailrelay.relay.upstreams.smtp_pipelining import (
    DATA_PIECE_BYTES,
    command_group,
    normalized_size,
    pipeline,
    sendmail_in_pieces,
    write_data,
)
from mailrelay.relay.upstreams.transport import (
    Envelope,
    RecipientOutcome,
    RecipientResult,
    all_recipients,
    describe_error,
    in_envelope_order,
    split_unsendable,
)

__all__ = [
    "CredentialFiles",
    "PoolClosedError",
    "PoolObserver",
    "SmtpConnectionPool",
    "SmtpTransport",
    "UpstreamConfigError",
    "classify_reply",
    "pipelined_results",
]

log = logging.getLogger(__name__)

# Idle connections are closed after this long; upstreams commonly drop idle sessions
# after 60-300 s, and a stale connection costs a failed RSET before reconnecting.
DEFAULT_IDLE_TIMEOUT_SECONDS = 30.0
# An RSET on a reused connection answers in milliseconds; this only bounds a dead peer.
_RSET_TIMEOUT_SECONDS = 10.0
# A connection idle longer than this is probed with RSET before reuse. One used moments
# ago is not: the last transaction ended with 250 (which resets the server's state,
# RFC 5321 4.1.1.4) or with an RSET answered 250 after a refusal (`_reset`), and a probe
# would add a round trip to every message (measured with bench/delivery_engine.py).
RSET_AFTER_IDLE_SECONDS = 1.0
# Credential files are stat'ed at most this often (each check is a thread hop).
CREDENTIAL_CHECK_SECONDS = 1.0
_QUIT_TIMEOUT_SECONDS = 5.0
# AUTH answers that mean "these credentials are wrong", as opposed to "try later" (454).
_AUTH_CONFIG_CODES = frozenset({530, 534, 535, 538})


_T = TypeVar("_T")


class UpstreamConfigError(Exception):
    """A connection failed for a reason only configuration can fix (TLS, AUTH)."""


class _Ending(enum.Enum):
    """How a transaction left the connection."""

    CLEAN = "clean"  # nothing open: the body's final reply was 250, or MAIL was refused
    RESET = "reset"  # a transaction may be open: RSET (reply checked) before reuse
    BROKEN = "broken"  # state unknown or closing: close the connection


class _RetryFreshError(Exception):
    """MAIL was answered 421 (the server is closing the channel) or 503 (the connection
    is out of step): nothing was accepted, and a new connection may do better."""

    def __init__(self, results: list[RecipientResult]) -> None:
        super().__init__("MAIL refused by the connection's state")
        self.results = results


class PoolClosedError(Exception):
    """The pool was closed (reload or shutdown) while a delivery still wanted it."""


class PoolObserver(Protocol):
    """Receives pool events, for metrics; the engine adapts it to prometheus."""

    def connection_opened(self, upstream: str) -> None:
        """A new connection was established and is in use."""

    def connection_reused(self, upstream: str) -> None:
        """An idle connection was handed out again."""

    def connection_closed(self, upstream: str) -> None:
        """A connection was closed (idle, broken, or at shutdown)."""


class _NullObserver:
    def connection_opened(self, upstream: str) -> None:
        pass

    def connection_reused(self, upstream: str) -> None:
        pass

    def connection_closed(self, upstream: str) -> None:
        pass


# 503 "bad sequence of commands" is about our command order, never the message or the
# mailbox: a bounce for it would punish the sender for our (or the connection's) fault.
_OUR_SEQUENCE_ERROR = 503


def classify_reply(code: int) -> RecipientOutcome:
    """An SMTP reply code's meaning for a recipient: 5xx permanent, anything else
    temporary, and 503 (a command out of sequence: our side's fault) temporary."""
    if code == _OUR_SEQUENCE_ERROR:
        return RecipientOutcome.TEMPORARY
    return RecipientOutcome.PERMANENT if 500 <= code <= 599 else RecipientOutcome.TEMPORARY


def _refused(rcpt: str, reply: aiosmtplib.SMTPResponse, command: str) -> RecipientResult:
    """A recipient the upstream refused with `reply` to `command` (RCPT, DATA)."""
    return RecipientResult(
        rcpt,
        classify_reply(reply.code),
        f"{reply.code} {reply.message} ({command})",
        code=reply.code,
    )


def _delivered(rcpt: str, reply_text: str) -> RecipientResult:
    """A recipient the upstream took; its reply to the body usually names its queue id."""
    return RecipientResult(
        rcpt, RecipientOutcome.DELIVERED, reply_text, remote_id=reply_text or None, code=250
    )


@dataclass(frozen=True)
class _Credentials:
    username: str
    password: str
    # Changes whenever either file changes; connections remember the one they used.
    fingerprint: tuple[int, ...]


def _file_identity(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_dev)


class CredentialFiles:
    """The AUTH user and password, read from files and re-read when the files change."""

    def __init__(
        self,
        username_file: Path,
        password_file: Path | None,
        *,
        check_interval: float = CREDENTIAL_CHECK_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._username_file = username_file
        self._password_file = password_file
        self._cached: _Credentials | None = None
        self._check_interval = check_interval
        self._monotonic = monotonic
        self._checked_at = float("-inf")

    def _read(self) -> _Credentials:
        # Stat through the path each time: a Kubernetes Secret update swaps a symlink.
        identity = _file_identity(self._username_file)
        if self._password_file is not None:
            identity += _file_identity(self._password_file)
        if self._cached is not None and self._cached.fingerprint == identity:
            return self._cached
        username = self._username_file.read_text(encoding="utf-8").strip()
        password = ""
        if self._password_file is not None:
            # Only the line break a secret file usually ends with is removed; spaces may matter.
            password = self._password_file.read_text(encoding="utf-8").rstrip("\r\n")
            SECRETS.add_credentials(username, password)
        self._cached = _Credentials(username, password, identity)
        return self._cached

    async def current(self) -> _Credentials:
        """The credentials as the files hold them (re-checked at most every interval)."""
        now = self._monotonic()
        if self._cached is not None and now - self._checked_at < self._check_interval:
            return self._cached
        credentials = await asyncio.to_thread(self._read)
        self._checked_at = now
        return credentials


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
    fingerprint: tuple[int, ...] | None
    last_used: float = field(default=0.0)
    reused: bool = False


class SmtpConnectionPool:
    """Connections to one upstream, reused across messages and bounded by `pool_size`."""

    def __init__(
        self,
        upstream: SmtpUpstream,
        *,
        local_hostname: str | None = None,
        observer: PoolObserver | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        credential_check_interval: float = CREDENTIAL_CHECK_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self._local_hostname = local_hostname
        self._observer: PoolObserver = observer or _NullObserver()
        self._idle_timeout = idle_timeout
        self._monotonic = monotonic
        self._slots = asyncio.Semaphore(upstream.pool_size)
        self._idle: list[_Connection] = []
        self._open = 0
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None
        self._credentials = (
            CredentialFiles(
                upstream.username_file,
                upstream.password_file,
                check_interval=credential_check_interval,
                monotonic=monotonic,
            )
            if upstream.username_file is not None
            and (upstream.password_file is not None or upstream.oauth2 is not None)
            else None
        )
        self.tokens = (
            oauth2.TokenSource(upstream.name, upstream.oauth2)
            if upstream.oauth2 is not None
            else None
        )
        # Only an upstream we log in to has an authentication state worth reporting.
        self.auth = AuthTracker() if self._credentials is not None else None

    @property
    def open_connections(self) -> int:
        """Connections currently open, in use or idle."""
        return self._open

    @property
    def idle_connections(self) -> int:
        """Connections waiting to be reused."""
        return len(self._idle)

    async def acquire(self, *, fresh: bool = False) -> _Connection:
        """A ready connection: reused if one is idle and alive (unless `fresh`), else new."""
        if self._closed:
            raise PoolClosedError(f"the pool for upstream {self.upstream.name!r} is closed")
        await self._slots.acquire()
        try:
            credentials = await self._login_tracked(self._credentials_now())
            fingerprint = credentials.fingerprint if credentials else None
            while self._idle and not fresh:
                conn = self._idle.pop()  # most recently used first: likeliest alive
                if (
                    conn.fingerprint != fingerprint
                    or not conn.smtp.is_connected
                    or self._monotonic() - conn.last_used > self._idle_timeout
                ):
                    await self._discard(conn, polite=conn.smtp.is_connected)
                    continue
                if self._monotonic() - conn.last_used > RSET_AFTER_IDLE_SECONDS:
                    try:
                        await conn.smtp.rset(timeout=_RSET_TIMEOUT_SECONDS)
                    except (aiosmtplib.SMTPException, OSError, TimeoutError):
                        await self._discard(conn, polite=False)
                        continue
                self._observer.connection_reused(self.upstream.name)
                conn.reused = True
                return conn
            conn = await self._login_tracked(self._connect(credentials))
            self._open += 1
            self._observer.connection_opened(self.upstream.name)
            return conn
        except BaseException:
            self._slots.release()
            raise

    async def _credentials_now(self) -> _Credentials | None:
        return await self._credentials.current() if self._credentials else None

    async def _login_tracked(self, step: Awaitable[_T]) -> _T:
        """`step` (reading the credentials, or connecting and logging in), its outcome
        recorded in `auth` (docs/oauth2.md, "Status for the operator")."""
        auth = self.auth
        if auth is None:
            return await step
        try:
            result = await step
        except UpstreamConfigError as exc:
            auth.record("config_error", str(exc))
            raise
        except oauth2.TokenError as exc:
            auth.record("token_failed", str(exc), exc.error)
            raise
        except oauth2.OAuthRefusedError as exc:
            auth.record("auth_refused", _reply_text(exc), _challenge_status(exc) or str(exc.code))
            raise
        except aiosmtplib.SMTPAuthenticationError as exc:
            auth.record("auth_refused", _reply_text(exc), str(exc.code))
            raise
        except OSError as exc:
            if exc.filename is not None:  # a credential file, not the network
                auth.record(
                    "config_error",
                    f"cannot read the credentials ({exc.filename}): {exc.strerror}",
                )
            raise
        if isinstance(result, _Connection) and result.fingerprint is not None:
            auth.record("ok", "logged in")
        return result

    def release(self, conn: _Connection, *, reusable: bool) -> None:
        """Give a connection back; only a healthy one in a live pool is kept."""
        try:
            if reusable and not self._closed and conn.smtp.is_connected:
                conn.last_used = self._monotonic()
                self._idle.append(conn)
                self._ensure_reaper()
            else:
                self._drop(conn)
        finally:
            self._slots.release()

    def _drop(self, conn: _Connection) -> None:
        """Close without a QUIT; for broken connections and synchronous paths."""
        conn.smtp.close()
        self._open -= 1
        self._observer.connection_closed(self.upstream.name)

    async def _discard(self, conn: _Connection, *, polite: bool) -> None:
        if polite:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await conn.smtp.quit(timeout=_QUIT_TIMEOUT_SECONDS)
        self._drop(conn)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(
                self._reap(), name=f"smtp-pool-reaper-{self.upstream.name}"
            )

    async def _reap(self) -> None:
        """Close connections idle for longer than the idle timeout, until none are idle."""
        while self._idle and not self._closed:
            await asyncio.sleep(self._idle_timeout / 2)
            cutoff = self._monotonic() - self._idle_timeout
            stale = [c for c in self._idle if c.last_used <= cutoff]
            self._idle = [c for c in self._idle if c.last_used > cutoff]
            for conn in stale:
                await self._discard(conn, polite=True)
                log.debug("Closed idle connection to upstream %s", self.upstream.name)

    async def close(self) -> None:
        """Close idle connections now; connections in use are closed when released."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._discard(conn, polite=True)
        if self.tokens is not None:
            await self.tokens.close()

    async def _connect(self, credentials: _Credentials | None) -> _Connection:
        upstream = self.upstream
        smtp = aiosmtplib.SMTP(
            hostname=upstream.host,
            port=upstream.port,
            local_hostname=self._local_hostname,
            timeout=upstream.timeout_seconds,
            use_tls=upstream.tls == "implicit",
            # True, not None: None would quietly go on in plain text without STARTTLS.
            start_tls=upstream.tls == "starttls",
            validate_certs=True,
            cert_bundle=str(upstream.ca_file) if upstream.ca_file is not None else None,
        )
        try:
            await smtp.connect(timeout=upstream.connect_timeout_seconds)
            if upstream.tls != "none" and smtp.get_transport_info("sslcontext") is None:
                raise UpstreamConfigError(
                    f"upstream {upstream.name!r}: connection is not encrypted although "
                    f"tls is {upstream.tls!r}; refusing to send"
                )
            if credentials is not None and self.tokens is not None:
                await self._token_login(smtp, credentials.username, self.tokens)
            elif credentials is not None:
                await smtp.login(credentials.username, credentials.password)
        except aiosmtplib.SMTPException as exc:
            smtp.close()
            if "STARTTLS extension not supported" in str(exc):
                raise UpstreamConfigError(
                    f"upstream {upstream.name!r} at {upstream.host}:{upstream.port} does not "
                    "offer STARTTLS and tls is 'starttls'; refusing to send in plain text "
                    "(fix the upstream, or set tls: implicit or none deliberately)"
                ) from exc
            if "AUTH extension is not supported" in str(exc):
                raise UpstreamConfigError(
                    f"upstream {upstream.name!r} does not offer AUTH but credentials are "
                    "configured; check the upstream's port and TLS mode"
                ) from exc
            raise
        except BaseException:
            smtp.close()
            raise
        return _Connection(smtp, credentials.fingerprint if credentials else None)

    async def _token_login(
        self, smtp: aiosmtplib.SMTP, username: str, tokens: oauth2.TokenSource
    ) -> None:
        """AUTH with the upstream's OAuth2 token; after a refusal (535, or an error
        challenge), once more with a refreshed token (the upstream may have revoked or
        expired the cached one early)."""
        upstream = self.upstream
        assert upstream.oauth2 is not None
        mechanism = upstream.oauth2.mechanism
        if smtp.is_ehlo_or_helo_needed:
            await smtp.ehlo()  # STARTTLS forgot the extensions
        if mechanism not in smtp.server_auth_methods:
            raise UpstreamConfigError(
                f"upstream {upstream.name!r} does not offer AUTH {mechanism.upper()}; check "
                "oauth2.mechanism and the upstream's port and TLS mode"
            )
        token = await tokens.token()
        for attempt in (1, 2):
            try:
                await oauth2.authenticate(
                    smtp,
                    mechanism,
                    username,
                    token.value,
                    host=upstream.host,
                    port=upstream.port,
                    timeout=upstream.timeout_seconds,
                )
                return
            except oauth2.OAuthRefusedError as exc:
                log.warning(
                    "Upstream %s refused our OAuth2 token (%s attempt): %s %s",
                    upstream.name,
                    "first" if attempt == 1 else "second, with a refreshed token,",
                    exc.code,
                    exc.message,
                )
                if attempt == 2 or not (exc.code == 535 or exc.provider_error is not None):
                    raise
            token = await tokens.refresh(token)


def _find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _reply_text(exc: aiosmtplib.SMTPResponseException) -> str:
    return f"{exc.code} {exc.message}".strip()


def _challenge_status(exc: oauth2.OAuthRefusedError) -> str | None:
    """The `status` of the RFC 7628 error challenge the upstream sent, if any."""
    for part in (exc.provider_error or "").split(", "):
        key, _, value = part.partition("=")
        if key == "status" and value:
            return value
    return None


class SmtpTransport:
    """Delivers to one SMTP upstream through its pool."""

    def __init__(
        self,
        upstream: SmtpUpstream,
        *,
        local_hostname: str | None = None,
        observer: PoolObserver | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        credential_check_interval: float = CREDENTIAL_CHECK_SECONDS,
    ) -> None:
        self.name = upstream.name
        self.upstream = upstream
        self.pool = SmtpConnectionPool(
            upstream,
            local_hostname=local_hostname,
            observer=observer,
            idle_timeout=idle_timeout,
            credential_check_interval=credential_check_interval,
        )

    async def close(self) -> None:
        """Close the pool's idle connections; in-flight ones close on release."""
        await self.pool.close()

    def auth_status(self) -> UpstreamAuth | None:
        """The upstream's last login outcome (`upstream_status.ReportsAuth`)."""
        return self.pool.auth.snapshot() if self.pool.auth is not None else None

    def _broken_transaction(
        self, smtp: aiosmtplib.SMTP, envelope: Envelope, exc: BaseException
    ) -> tuple[list[RecipientResult], _Ending]:
        """A transaction cut off midway: the connection's state is unknown, so drop it."""
        smtp.close()
        results = all_recipients(
            envelope,
            RecipientOutcome.TEMPORARY,
            f"4.4.2 upstream {self.name!r}: {describe_error(exc)} during the transaction",
        )
        return results, _Ending.BROKEN

    def _our_error(
        self, envelope: Envelope, exc: BaseException, ending: _Ending
    ) -> tuple[list[RecipientResult], _Ending]:
        """A failure on our side (aiosmtplib refused what we asked): temporary, logged."""
        log.error(
            "Failed to send message %s to upstream %s: the SMTP client refused it (%s)",
            envelope.queue_id,
            self.name,
            type(exc).__name__,
            exc_info=exc,
        )
        results = all_recipients(
            envelope,
            RecipientOutcome.TEMPORARY,
            f"4.3.0 upstream {self.name!r}: internal error of the relay's SMTP client",
        )
        return results, ending

    def _connection_failure(self, envelope: Envelope, exc: BaseException) -> list[RecipientResult]:
        where = f"upstream {self.name!r} ({self.upstream.host}:{self.upstream.port})"
        if isinstance(exc, UpstreamConfigError):
            # Our own words (no Python text in them), under a security status code.
            return all_recipients(envelope, RecipientOutcome.CONFIG_ERROR, f"4.7.0 {exc}")
        if isinstance(exc, oauth2.TokenError):
            # Never a bounce: a revoked refresh token keeps mail queued until it is replaced.
            return all_recipients(
                envelope,
                RecipientOutcome.CONFIG_ERROR if exc.config else RecipientOutcome.TEMPORARY,
                f"4.7.0 upstream {self.name!r}: no OAuth2 token: {exc}",
            )
        cert = _find_cause(exc, ssl.SSLCertVerificationError)
        if cert is not None:
            return all_recipients(
                envelope,
                RecipientOutcome.CONFIG_ERROR,
                f"4.7.5 {where}: {describe_error(cert)}; check ca_file and the "
                "upstream's certificate",
            )
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            detail = f"{where} refused our AUTH: {_reply_text(exc)}"
            if exc.code in _AUTH_CONFIG_CODES:
                return all_recipients(
                    envelope,
                    RecipientOutcome.CONFIG_ERROR,
                    detail
                    + (
                        "; check the OAuth2 client, its scopes and the mailbox in username_file"
                        if self.upstream.oauth2 is not None
                        else "; check username_file and password_file"
                    ),
                    code=exc.code,
                )
            return all_recipients(envelope, RecipientOutcome.TEMPORARY, detail, code=exc.code)
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            # Greeting, EHLO or STARTTLS refused: the server is not taking mail right now.
            return all_recipients(
                envelope,
                RecipientOutcome.TEMPORARY,
                f"{where} answered {_reply_text(exc)} before the transaction",
                code=exc.code,
            )
        return all_recipients(
            envelope,
            RecipientOutcome.TEMPORARY,
            f"4.4.1 {where}: {describe_error(exc)}",
        )

    async def deliver(self, envelope: Envelope, message: bytes) -> list[RecipientResult]:
        """Send one transaction; every recipient gets a result, nothing is raised."""
        sendable, refused = split_unsendable(envelope)
        if sendable is None:
            return refused
        results = await self._deliver_sendable(sendable, message)
        return in_envelope_order(envelope, results, refused) if refused else results

    async def _deliver_sendable(self, envelope: Envelope, message: bytes) -> list[RecipientResult]:
        fresh = False
        while True:
            try:
                conn = await self.pool.acquire(fresh=fresh)
            except (
                aiosmtplib.SMTPException,
                OSError,
                TimeoutError,
                UpstreamConfigError,
                PoolClosedError,
                oauth2.TokenError,
            ) as exc:
                return self._connection_failure(envelope, exc)
            reusable = False
            retry_fresh = False
            try:
                try:
                    results, ending = await self._transaction(conn.smtp, envelope, message)
                except _RetryFreshError as exc:
                    conn.smtp.close()
                    results, ending, retry_fresh = exc.results, _Ending.BROKEN, True
                except Exception as exc:  # a bug of ours must not bounce mail
                    conn.smtp.close()
                    results, ending = self._our_error(envelope, exc, _Ending.BROKEN)
                if ending is _Ending.RESET:
                    ending = await _reset(conn.smtp)
                reusable = ending is _Ending.CLEAN and conn.smtp.is_connected
            finally:
                self.pool.release(conn, reusable=reusable)
            if conn.reused and not fresh and retry_fresh:
                # A pooled connection the server is done with (a per-connection message
                # limit answers 421 at MAIL) or out of step with (503): nothing was
                # accepted, so one more try on a new connection is safe and spares the
                # message a whole backoff.
                fresh = True
                continue
            return results

    async def _transaction(
        self, smtp: aiosmtplib.SMTP, envelope: Envelope, message: bytes
    ) -> tuple[list[RecipientResult], _Ending]:
        """Results per recipient, and how the transaction left the connection."""
        options: list[str] = []
        if smtp.is_ehlo_or_helo_needed:
            # STARTTLS forgets the extensions; learn them again before looking at them.
            try:
                await smtp.ehlo()
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                return self._broken_transaction(smtp, envelope, exc)
        if envelope.smtputf8:
            if not smtp.supports_extension("smtputf8"):
                return await self._without_smtputf8(smtp, envelope, message)
            options.append("SMTPUTF8")
        if envelope.body_8bitmime and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.supports_extension("pipelining"):
            return await self._pipelined(smtp, envelope, message, options)
        try:
            if len(message) > DATA_PIECE_BYTES:
                refused, data_reply = await sendmail_in_pieces(
                    smtp,
                    envelope.mail_from,
                    envelope.recipients,
                    message,
                    mail_options=options,
                    reply_timeout=self.upstream.timeout_seconds,
                )
            else:
                refused, data_reply = await smtp.sendmail(
                    envelope.mail_from, list(envelope.recipients), message, mail_options=options
                )
        # aiosmtplib (and sendmail_in_pieces, which does as it does) tried an RSET after a
        # refusal but ignores its failure: RSET again, checked, before the connection is
        # reused.
        except aiosmtplib.SMTPRecipientsRefused as exc:
            by_rcpt = {e.recipient: e for e in exc.recipients}
            results = [
                RecipientResult(
                    address=rcpt,
                    outcome=classify_reply(by_rcpt[rcpt].code),
                    detail=f"{_reply_text(by_rcpt[rcpt])} (RCPT)",
                    code=by_rcpt[rcpt].code,
                )
                if rcpt in by_rcpt
                else RecipientResult(rcpt, RecipientOutcome.TEMPORARY, "4.4.2 no answer to RCPT")
                for rcpt in envelope.recipients
            ]
            return results, _Ending.RESET
        except aiosmtplib.SMTPSenderRefused as exc:
            results = all_recipients(
                envelope, classify_reply(exc.code), f"{_reply_text(exc)} (MAIL)", code=exc.code
            )
            if exc.code in (421, _OUR_SEQUENCE_ERROR):
                raise _RetryFreshError(results) from exc
            return results, _Ending.RESET
        except aiosmtplib.SMTPDataError as exc:
            results = all_recipients(
                envelope, classify_reply(exc.code), f"{_reply_text(exc)} (DATA)", code=exc.code
            )
            return results, _Ending.BROKEN if exc.code == 421 else _Ending.RESET
        except aiosmtplib.SMTPResponseException as exc:
            results = all_recipients(
                envelope, classify_reply(exc.code), _reply_text(exc), code=exc.code
            )
            return results, _Ending.BROKEN if exc.code == 421 else _Ending.RESET
        except (aiosmtplib.SMTPNotSupported, ValueError) as exc:
            # Refused by aiosmtplib itself, possibly after MAIL went out: never the
            # message's fault (split_unsendable let its addresses through).
            return self._our_error(envelope, exc, _Ending.RESET)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return self._broken_transaction(smtp, envelope, exc)
        results = [
            _delivered(rcpt, data_reply)
            if rcpt not in refused
            else _refused(rcpt, refused[rcpt], "RCPT")
            for rcpt in envelope.recipients
        ]
        return results, _Ending.CLEAN

    async def _without_smtputf8(
        self, smtp: aiosmtplib.SMTP, envelope: Envelope, message: bytes
    ) -> tuple[list[RecipientResult], _Ending]:
        """An SMTPUTF8 message for an upstream without SMTPUTF8 (RFC 6531 3.2).

        When the header section is ASCII and an address needs SMTPUTF8 only for its
        domain (sent as IDNA A-labels instead), the message goes out without SMTPUTF8 to
        every recipient that can be written in ASCII; those with a non-ASCII mailbox name
        fail alone (as Postfix does for mail that does not need SMTPUTF8). Otherwise the
        message needs SMTPUTF8 and fails for all.
        """

        def refusal(what: str) -> str:
            return (
                f"5.6.7 upstream {self.name!r} does not support SMTPUTF8, which this {what} "
                "needs (internationalised addresses or headers, RFC 6531)"
            )

        sender = ascii_form(envelope.mail_from)
        as_sent = {r: ascii_form(r) for r in envelope.recipients}
        # The ASCII form sent -> the recipients written that way (U-label and A-label).
        sendable: dict[str, list[str]] = {}
        for rcpt, sent in as_sent.items():
            if sent is not None:
                sendable.setdefault(sent, []).append(rcpt)
        if sender is None or not sendable or not _header_section(message).isascii():
            results = all_recipients(envelope, RecipientOutcome.PERMANENT, refusal("message"))
            return results, _Ending.CLEAN
        refused = [
            RecipientResult(r, RecipientOutcome.PERMANENT, refusal("address"))
            for r, sent in as_sent.items()
            if sent is None
        ]
        plain = dataclasses.replace(
            envelope, mail_from=sender, recipients=tuple(sendable), smtputf8=False
        )
        results, ending = await self._transaction(smtp, plain, message)
        results = [
            dataclasses.replace(r, address=rcpt) for r in results for rcpt in sendable[r.address]
        ]
        return in_envelope_order(envelope, results, refused), ending

    async def _pipelined(
        self, smtp: aiosmtplib.SMTP, envelope: Envelope, message: bytes, options: list[str]
    ) -> tuple[list[RecipientResult], _Ending]:
        """One transaction with RFC 2920 PIPELINING: MAIL, RCPTs and DATA in one write.

        The body follows only after a 354 and only when MAIL and at least one RCPT were
        accepted. A server that answers 354 anyway gets a lone "." (RFC 2920 3.1), which
        ends the transaction and keeps the connection usable.
        """
        if smtp.supports_extension("size"):
            # Same position and spelling as aiosmtplib's sendmail.
            options = [f"size={normalized_size(message)}", *options]
        encoding = "utf-8" if envelope.smtputf8 else "ascii"
        try:
            group = command_group(envelope.mail_from, envelope.recipients, options, encoding)
        except ValueError as exc:
            # Nothing was sent; split_unsendable let the addresses through, so it is ours.
            return self._our_error(envelope, exc, _Ending.CLEAN)
        timeout = self.upstream.timeout_seconds
        replies: list[aiosmtplib.SMTPResponse] = []
        final: aiosmtplib.SMTPResponse | None = None
        try:
            async with pipeline(smtp) as reader:
                reader.write(group)
                for _ in range(len(envelope.recipients) + 2):
                    replies.append(await reader.next_reply(timeout))
                    if replies[-1].code == 421:
                        break  # the server is closing the channel: no more answers
                if replies[-1].code == 354:
                    accepted = replies[0].code == 250 and any(
                        r.code in (250, 251) for r in replies[1:-1]
                    )
                    if accepted:
                        await write_data(reader, message, timeout)
                    else:
                        reader.write(b".\r\n")
                    final = await reader.next_reply(timeout)
                    if not accepted:
                        final = None  # the reply to an empty message delivers nothing
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return self._broken_transaction(smtp, envelope, exc)
        results = pipelined_results(envelope, replies, final)
        if replies[0].code in (421, _OUR_SEQUENCE_ERROR):
            raise _RetryFreshError(results)
        if any(r.code == 421 for r in replies) or (final is not None and final.code == 421):
            smtp.close()
            return results, _Ending.BROKEN
        if final is not None and final.code == 250:
            return results, _Ending.CLEAN
        # Something was refused after MAIL: a transaction may still be open.
        return results, _Ending.RESET


def _header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end]


async def _reset(smtp: aiosmtplib.SMTP) -> _Ending:
    """RSET a connection that may hold an open transaction; CLEAN only on a 250."""
    if not smtp.is_connected:
        return _Ending.BROKEN
    try:
        await smtp.rset(timeout=_RSET_TIMEOUT_SECONDS)  # raises unless the reply is 250
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        smtp.close()
        return _Ending.BROKEN
    return _Ending.CLEAN


def pipelined_results(
    envelope: Envelope,
    replies: Sequence[aiosmtplib.SMTPResponse],
    final: aiosmtplib.SMTPResponse | None,
) -> list[RecipientResult]:
    """Per-recipient results from a pipelined group's replies, in command order.

    `replies` holds MAIL's reply, then one per RCPT, then DATA's; it stops early after a
    421. `final` is the reply to the body, None if no body was sent.
    """
    mail = replies[0]
    if mail.code != 250:
        detail = f"{mail.code} {mail.message} (MAIL)".strip()
        return all_recipients(envelope, classify_reply(mail.code), detail, code=mail.code)
    closing = next((r for r in replies if r.code == 421), None)
    rcpt_replies = replies[1 : 1 + len(envelope.recipients)]
    data = replies[1 + len(envelope.recipients)] if closing is None else None
    results = []
    for index, rcpt in enumerate(envelope.recipients):
        reply = rcpt_replies[index] if index < len(rcpt_replies) else None
        if reply is not None and reply.code not in (250, 251):
            results.append(_refused(rcpt, reply, "RCPT"))
        elif closing is not None:
            results.append(
                RecipientResult(
                    rcpt,
                    RecipientOutcome.TEMPORARY,
                    f"{closing.code} {closing.message} (the server closed the transaction)",
                    code=closing.code,
                )
            )
        elif data is not None and data.code != 354:
            results.append(_refused(rcpt, data, "DATA"))
        elif final is not None and final.code == 250:
            results.append(_delivered(rcpt, final.message))
        else:
            # The body was refused (a recipient was accepted, so `final` is DATA's
            # final reply whenever DATA answered 354).
            refusal = final or data
            code = refusal.code if refusal is not None else None
            text = f"{refusal.code} {refusal.message}" if refusal is not None else "no reply"
            outcome = classify_reply(code) if code is not None else RecipientOutcome.TEMPORARY
            results.append(RecipientResult(rcpt, outcome, f"{text} (DATA)", code=code))
    return results
