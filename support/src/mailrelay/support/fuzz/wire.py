"""SMTP on the wire, client side, for the fuzzer: raw bytes out, checked replies in.

`Connection` is a blocking socket (optionally bound to a chosen loopback source address)
that sends exactly the bytes it is given and reads replies with a hard bound on the wait,
so a relay that hangs fails the test instead of stalling it. `parse_reply` is pure: it
cuts one reply off a buffer and checks it against RFC 5321 section 4.2 (three-digit code
with a valid first and second digit, every line of a multi-line reply with the same code
and `-` except the last, CRLF line endings, at most 512 octets per line, no control
characters in the text) and RFC 3463 (an enhanced status code's class matches the reply's
class).
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import struct
import time
from dataclasses import dataclass

__all__ = [
    "REPLY_TIMEOUT",
    "Connection",
    "ConnectionClosed",
    "MalformedReply",
    "Reply",
    "parse_reply",
]

# A reply slower than this is a hang. Generous: the machine running the suite is shared
# and loaded, and a hung relay never answers at all.
REPLY_TIMEOUT = 30.0
_MAX_LINE = 512  # RFC 5321 4.5.3.1.5, CRLF included
_MAX_REPLY_LINES = 100
# More unread reply bytes than this: the relay answers what nobody asked (a reply loop).
_MAX_UNREAD = 1 << 20
_LINE = re.compile(rb"([2-5][0-5][0-9])([ -]?)(.*)", re.S)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
# RFC 5321 textstring is HT and printable ASCII; RFC 6531 widens it to UTF-8.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class MalformedReply(AssertionError):
    """The relay sent bytes that are not a valid SMTP reply."""


class ConnectionClosed(Exception):
    """The relay closed the connection (or reset it) before a complete reply."""


@dataclass(frozen=True)
class Reply:
    """One complete reply: its code and the text of each line."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The last line's text (where the relay's own replies put their meaning)."""
        return self.lines[-1]

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code that starts the last line, if any."""
        match = _ENHANCED.match(self.text)
        return None if match is None else ".".join(match.groups())

    def __str__(self) -> str:
        return "\n".join(f"{self.code} {line}" for line in self.lines)


def parse_reply(buffer: bytearray) -> Reply | None:
    """Cut one complete reply off the front of `buffer`; None if it is not complete yet.

    Raises MalformedReply for anything RFC 5321 does not allow.
    """
    lines: list[str] = []
    code: bytes | None = None
    offset = 0
    while True:
        end = buffer.find(b"\n", offset)
        if end < 0:
            if len(buffer) - offset > _MAX_LINE:
                raise MalformedReply(f"reply line over {_MAX_LINE} octets: {bytes(buffer)[:80]!r}")
            return None
        raw = bytes(buffer[offset : end + 1])
        offset = end + 1
        if not raw.endswith(b"\r\n"):
            raise MalformedReply(f"reply line without CRLF: {raw!r}")
        if len(raw) > _MAX_LINE:
            raise MalformedReply(f"reply line over {_MAX_LINE} octets: {raw[:80]!r}...")
        match = _LINE.fullmatch(raw[:-2])
        if match is None:
            raise MalformedReply(f"not a reply line: {raw!r}")
        this_code, separator, text_bytes = match.groups()
        if code is not None and this_code != code:
            raise MalformedReply(f"multi-line reply changed code {code!r} -> {raw!r}")
        code = this_code
        if text_bytes and separator == b"":
            raise MalformedReply(f"no space or hyphen after the code: {raw!r}")
        try:
            text = text_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedReply(f"reply text is not UTF-8: {raw!r}") from None
        if _CONTROL.search(text):
            raise MalformedReply(f"control character in reply text: {raw!r}")
        lines.append(text)
        if len(lines) > _MAX_REPLY_LINES:
            raise MalformedReply("reply of more than 100 lines")
        if separator != b"-":
            break
    del buffer[:offset]
    reply = Reply(code=int(code), lines=tuple(lines))
    enhanced = reply.enhanced
    if enhanced is not None and enhanced[0] != str(reply.code)[0]:
        raise MalformedReply(f"enhanced code class differs from the reply's: {reply}")
    return reply


class Connection:
    """One blocking client connection to the relay (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        source: str,
        implicit_tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = REPLY_TIMEOUT,
    ) -> None:
        self.timeout = timeout
        self._context = tls_context
        self._buffer = bytearray()
        sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        if implicit_tls:
            assert tls_context is not None
            sock = tls_context.wrap_socket(sock, server_hostname="localhost")
        self.sock: socket.socket = sock
        self.tls = implicit_tls
        self.closed = False

    def send(self, data: bytes) -> None:
        """Send all of `data`; a reset or closed peer raises ConnectionClosed."""
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionClosed(f"send failed: {exc!r}") from exc

    def read_reply(self, timeout: float | None = None) -> Reply:
        """The next complete reply; ConnectionClosed on EOF, AssertionError on a hang."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = parse_reply(self._buffer)
            if reply is not None:
                return reply
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no complete reply within {timeout or self.timeout}s "
                    f"(have {bytes(self._buffer)[:200]!r})"
                )
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError) as exc:
                raise ConnectionClosed(f"recv failed: {exc!r}") from exc
            if not chunk:
                if self._buffer:
                    raise MalformedReply(f"connection closed mid-reply: {bytes(self._buffer)!r}")
                raise ConnectionClosed("EOF")
            self._buffer.extend(chunk)
            if len(self._buffer) > _MAX_UNREAD:
                raise MalformedReply(
                    f"the relay sent {len(self._buffer)} bytes nobody asked for: "
                    f"{bytes(self._buffer[:300])!r}..."
                )

    def pending(self) -> bytes:
        """Bytes received but not yet part of a complete reply."""
        return bytes(self._buffer)

    def at_eof(self, timeout: float = REPLY_TIMEOUT) -> bool:
        """Whether the relay closes the connection without sending anything more."""
        try:
            self.read_reply(timeout)
        except ConnectionClosed:
            return True
        return False

    def starttls(self) -> None:
        """Wrap the socket in TLS (after the relay's 220 to STARTTLS)."""
        assert self._context is not None
        assert not self._buffer, f"bytes after 220 to STARTTLS: {bytes(self._buffer)!r}"
        self.sock.settimeout(self.timeout)
        try:
            self.sock = self._context.wrap_socket(self.sock, server_hostname="localhost")
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionClosed(f"TLS handshake failed: {exc!r}") from exc
        self.tls = True

    def close(self, *, reset: bool = False) -> None:
        """Close; `reset` sends an RST instead of a FIN (SO_LINGER 0)."""
        if self.closed:
            return
        self.closed = True
        if reset:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError, ssl.SSLError):
            self.sock.close()
