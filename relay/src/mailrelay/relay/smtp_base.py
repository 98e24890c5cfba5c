"""Every use of aiosmtpd's private API, in one place, pinned to the version it was tested with.

aiosmtpd's handler hooks (`handle_MAIL`, `handle_DATA`, ...) and its public methods
(`push`, `challenge_auth`, the `smtp_*` commands) cannot express everything the relay
needs, so `SMTPBase` subclasses aiosmtpd's `SMTP` and overrides or reads some of its
internals. It turns each of them into a small, named, documented method, and the rest of
the relay (`server.RelaySMTP`) uses only those and aiosmtpd's public API. Nothing else
in the relay touches an underscored name of aiosmtpd or of asyncio's `StreamReader`.

The internals relied on, and why:

* `_handle_client` (the session's command loop): wrapped so that a session refused at
  connect (`connect_refusal`, over a client limit or draining) answers its 421 and hangs
  up before aiosmtpd's 220 greeting.
* `_create_envelope`: returns `envelope_class()`, so the envelope carries the relay's
  per-transaction fields.
* `_getaddr` (the MAIL/RCPT path parser): routed through `parse_path`, which a subclass
  overrides (a fast path for plain addresses, stricter control-character rules);
  `parse_path` of this class is aiosmtpd's full RFC 5322 parser.
* `_reset_timeout`: `rearm_timeout(seconds)` re-arms the idle timer with a longer
  duration for the whole DATA (aiosmtpd re-arms it per command only).
* `_timeout_cb`: `idle_timed_out()` may answer the timeout itself (a 421 before the
  hang-up, RFC 5321 4.2) instead of aiosmtpd's silent close.
* `_writer`: `write_now(data)` writes a reply without awaiting the drain (from a timer
  callback or a shutdown), and the bulk DATA reader closes it on a lost connection.
* `_reader` and `StreamReader._buffer`: the DATA body is read in bulk chunks, and bytes
  read past the end of data (pipelined commands) are put back in front of the buffer
  (`_unread`; StreamReader has no public unread).
* `_tls_protocol`, `session.ssl`: `starttls_done` (STARTTLS has run; a second one is
  refused) and `tls_handshake_running` (no plain-text 421 in the middle of a handshake).
* `smtp_STARTTLS` (aiosmtpd's, then a check): when the connection ends during the
  handshake without an error (our close after the idle timeout), asyncio's `SSLProtocol`
  resolves aiosmtpd's handshake waiter as a success and never calls `connection_lost`
  on the session; the check calls it, or the session would stay open for good.
* `_auth_methods`: `offers_auth` (whether EHLO advertises AUTH).
* `_handler_coroutine`: `stop_commands()` cancels the command loop (commands pipelined
  after a 421 must not run), and `_release_when_over` hooks its end.
* `_handler_coroutine`, `_tls_protocol`, `_original_transport`, `_reader._transport`,
  `session.ssl` (`_release_when_over`): dropped once the connection and its handler have
  ended, breaking reference cycles that otherwise keep each ended TLS session's buffers
  (256 KB) until a full GC (tests/relay/test_session_memory.py).
* `smtp_DATA`, copied: aiosmtpd's checks before the 354, its replies and its handler call
  (`_call_handler_hook`, `_set_post_data_state`, `_decode_data`), with the body read by
  `data_reader.DataScanner` instead of one `readuntil` per line, and optionally streamed
  to a sink (`open_data_sink`). tests/relay/test_data_reader.py compares it byte for
  byte with aiosmtpd's own.
* `auth_PLAIN` and `auth_LOGIN`, copied: aiosmtpd's parsing of both mechanisms, with the
  password check awaited (`check_password`; aiosmtpd's `authenticator` is synchronous and
  bcrypt/argon2 must not run on the event loop).
* `__dir__` (`CheapDir`, also for the handler): aiosmtpd finds its `smtp_*`, `auth_*`
  and `handle_*` methods with `dir()`/`inspect.getmembers()` on every new session;
  listing only those names (cached per class) saves a fifth of a millisecond per
  connection.
* aiosmtpd's reply texts that the relay rewrites (`AIOSMTPD_MALFORMED_REPLY`,
  `AIOSMTPD_BOGUS_REPLY`, `AIOSMTPD_TOO_LARGE_PREFIX`).
* Its logger `mail.log` (`quiet_aiosmtpd_log`): INFO lines for every command are dropped,
  and so is the one deprecation warning aiosmtpd logs itself on every successful AUTH
  (`Session.login_data`, set by its own `smtp_AUTH`); its other warnings reach our log.

`pyproject.toml` pins aiosmtpd to `AIOSMTPD_VERSION`; tests/relay/test_smtp_base.py fails
on any other installed version and checks that each internal above exists with the
signature used here. The differential tests (tests/relay/test_data_reader.py,
tests/relay/test_smtp_paths.py) compare the copies with aiosmtpd's own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from base64 import b64decode
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, syntax

from mailrelay.relay.data_reader import DataOutcome, DataScanner, DataSink

__all__ = [
    "AIOSMTPD_BOGUS_REPLY",
    "AIOSMTPD_MALFORMED_REPLY",
    "AIOSMTPD_TOO_LARGE_PREFIX",
    "AIOSMTPD_VERSION",
    "LOGIN_DATA_DEPRECATION",
    "CheapDir",
    "SMTPBase",
    "quiet_aiosmtpd_log",
]

log = logging.getLogger(__name__)

# The only aiosmtpd release the overrides below were written and tested against.
AIOSMTPD_VERSION = "1.4.6"

# aiosmtpd's reply when its parser cannot read a path (smtp_MAIL/RCPT).
AIOSMTPD_MALFORMED_REPLY = "553 5.1.3 Error: malformed address"
# aiosmtpd's reply (then hang-up) after too many unknown commands.
AIOSMTPD_BOGUS_REPLY = "502 5.5.1 Too many unrecognized commands, goodbye."
# How aiosmtpd's replies to a message over `data_size_limit` start (MAIL SIZE=, DATA).
AIOSMTPD_TOO_LARGE_PREFIX = "552 Error"
# The warning aiosmtpd logs whenever its own smtp_AUTH sets `Session.login_data`.
LOGIN_DATA_DEPRECATION = "Session.login_data is deprecated"

# StreamReader buffers up to its recv size (256 KiB) before pausing the transport: take
# everything it holds in one read.
_CHUNK = 1 << 18

_HOOK_NAMES: dict[type, list[str]] = {}


def _hook_names(cls: type) -> list[str]:
    names = _HOOK_NAMES.get(cls)
    if names is None:
        prefixes = ("auth_", "smtp_", "handle_")
        names = _HOOK_NAMES[cls] = sorted(n for n in dir(cls) if n.startswith(prefixes))
    return names


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put bytes read past the end of data back in front of the stream's buffer (the next
    command's reader takes them). StreamReader has no public unread."""
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    buffer[:0] = data


class _DropLoginDataDeprecation(logging.Filter):
    """Drops aiosmtpd's `Session.login_data is deprecated` line, and only that one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(LOGIN_DATA_DEPRECATION))


_LOGIN_DATA_FILTER = _DropLoginDataDeprecation()


def quiet_aiosmtpd_log() -> None:
    """aiosmtpd's logger `mail.log` at WARNING, without the login_data deprecation.

    aiosmtpd logs every command at INFO (our own lines already say what happened), and the
    deprecation on every successful AUTH from its own `smtp_AUTH`, which no code of ours
    can avoid. Idempotent (reload calls it)."""
    logger = logging.getLogger("mail.log")
    logger.setLevel(logging.WARNING)
    if _LOGIN_DATA_FILTER not in logger.filters:
        logger.addFilter(_LOGIN_DATA_FILTER)


class CheapDir:
    """aiosmtpd finds its commands and hooks with `dir()`/`inspect.getmembers()` on every
    new session (of the `SMTP` protocol and of its handler), which walks ~170 attributes
    each time (a fifth of a millisecond per connection). Listing only the names it looks
    for (cached per class) keeps the per-connection cost down; nothing else relies on
    `dir()` of these objects."""

    def __dir__(self) -> list[str]:
        return _hook_names(type(self))


class SMTPBase(CheapDir, SMTP):
    """aiosmtpd's `SMTP` with its internals behind named methods (see the module docstring).

    Hooks a subclass may override: `connect_refusal`, `idle_timed_out`, `parse_path`,
    `open_data_sink`, `check_password`, and the class attributes `envelope_class` and
    `data_scanner`.
    """

    envelope_class: type[Envelope] = Envelope
    # A class attribute so the differential tests can swap in a deliberately broken one.
    data_scanner: type[DataScanner] = DataScanner

    # -- hooks ------------------------------------------------------------------------

    def connect_refusal(self) -> str | None:
        """A reply (421) to send instead of the greeting, then hang up; None to serve."""
        return None

    def idle_timed_out(self) -> bool:
        """The command timeout fired; True if handled here, False for aiosmtpd's close."""
        return False

    def parse_path(self, arg: str) -> tuple[str | None, str | None]:
        """`(address, parameters)` of a MAIL/RCPT argument: aiosmtpd's RFC 5322 parser."""
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    async def open_data_sink(self) -> DataSink | str | None:
        """A sink for this DATA's body, a reply refusing the DATA, or None (in memory).

        Called after aiosmtpd's checks, before the 354. With a sink, `envelope.content`
        and `original_content` stay None and the DATA hook finds the body wherever the
        sink put it."""
        return None

    async def check_password(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        """The outcome of AUTH PLAIN or LOGIN with these credentials (refused here)."""
        return AuthResult(success=False, handled=False)

    # -- named access to aiosmtpd's state ----------------------------------------------

    @property
    def starttls_done(self) -> bool:
        """STARTTLS has run on this connection (its handshake may still be running)."""
        return self._tls_protocol is not None

    @property
    def tls_handshake_running(self) -> bool:
        """A STARTTLS handshake has started and not finished."""
        return (
            self._tls_protocol is not None
            and self.session is not None
            and (self.session.ssl is None)
        )

    @property
    def offers_auth(self) -> bool:
        """Some AUTH mechanism is enabled (EHLO advertises AUTH when TLS allows)."""
        return bool(self._auth_methods)

    def rearm_timeout(self, seconds: float) -> None:
        """Restart the idle timer with `seconds` (until the next command re-arms it)."""
        self._reset_timeout(seconds)

    def write_now(self, data: bytes) -> None:
        """Write `data` to the client without waiting for the drain (errors suppressed)."""
        with contextlib.suppress(Exception):
            self._writer.write(data)

    def stop_commands(self) -> None:
        """Cancel the session's command loop: commands pipelined after now do not run."""
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    # -- overrides of aiosmtpd's internals ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first and self._handler_coroutine is not None:
            self._handler_coroutine.add_done_callback(lambda _: self._release_when_over())

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._release_when_over()

    def _release_when_over(self) -> None:
        """Break the session's reference cycles once the connection and its handler ended.

        The handler task, its CancelledError's traceback (whose frames hold this session)
        and aiosmtpd's references to the STARTTLS protocol form cycles that only the
        cyclic GC frees, and a full collection runs rarely in a process this size: each
        ended TLS session kept its SSL protocol's 256 KB read buffer for minutes (about
        100 MB after a few hundred sessions). Dropping them here frees a session by
        reference counting the moment it is over.
        """
        task = self._handler_coroutine
        if self.transport is not None or task is None or not task.done():
            return
        self._tls_protocol = None
        self._original_transport = None
        self._handler_coroutine = None
        # What remains is the session's own small cycles (aiosmtpd's bound methods); the
        # SSL object (with OpenSSL's buffers) must not wait in them for the GC.
        if self.session is not None:
            self.session.ssl = None
        if self._reader is not None:
            self._reader._transport = None  # type: ignore[attr-defined]

    async def _handle_client(self) -> None:
        refusal = self.connect_refusal()
        if refusal is not None:
            with contextlib.suppress(ConnectionError):
                await self.push(refusal)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    def _timeout_cb(self) -> None:
        if self.idle_timed_out():
            return
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _create_envelope(self) -> Envelope:
        return self.envelope_class()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return self.parse_path(arg)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        await super().smtp_STARTTLS(arg)
        if self.tls_handshake_running and self.transport is not None:
            # The connection ended during the handshake without an error (our own close
            # after the idle timeout, or a shutdown): asyncio's SSLProtocol then resolves
            # aiosmtpd's handshake waiter as a success and never calls connection_lost on
            # the session, which would stay open (and counted) for good.
            self.connection_lost(None)

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd 1.4.6's smtp_DATA, with the body read by `data_scanner`. The checks
        # before the 354 are aiosmtpd's, in its order.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        sink = await self.open_data_sink()
        if isinstance(sink, str):
            await self.push(sink)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        scanner = self.data_scanner(
            line_length_limit=self.line_length_limit, size_limit=self.data_size_limit
        )
        reader = self._reader
        while True:
            if self.transport is None:
                return
            try:
                chunk = await reader.read(_CHUNK)
            except asyncio.CancelledError:
                # eof_received and connection_lost cancel the session's task.
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
            if not chunk:
                log.info("Connection lost during DATA")
                self._writer.close()
                return
            rest = scanner.feed(chunk)
            if sink is not None and (rest is not None or scanner.buffered >= sink.flush_bytes):
                # After a failed limit the scanner holds nothing: only NOMINAL lines go out.
                blocks = scanner.take_content()
                if blocks:
                    await sink.take(blocks)
            if rest is not None:
                if rest:
                    _unread(reader, rest)
                break
        if scanner.outcome is DataOutcome.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if scanner.outcome is DataOutcome.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if sink is not None:
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
            return
        original_content = scanner.content()
        content: str | bytes = original_content
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        self.envelope.content = content
        self.envelope.original_content = original_content
        # aiosmtpd's deprecated `process_message` fallback is left out: handlers here
        # implement handle_DATA.
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    # -- AUTH: aiosmtpd's parsing, with the password check awaited off the loop -------

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            _, login, password = blob.split(b"\x00")
        except ValueError:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self.check_password("PLAIN", login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        return await self.check_password("LOGIN", login, password)
