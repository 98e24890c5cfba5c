"""Known secrets out of every text the relay shows: log lines, delivery results, bounces.

The relay reads upstream credentials (SMTP passwords, provider API keys, webhook signing
secrets) from files. Nothing of ours prints them, but text from elsewhere can: a provider
that echoes the key in its error body, an HTTP library whose error quotes a header value,
an SMTP server whose AUTH refusal repeats what it got. So every credential is registered
here when it is read (`SECRETS.add`), and:

- every log record, of any logger, is redacted when it is created (a log record factory,
  installed with the first secret), message and traceback alike, before any handler sees
  it;
- every delivery result's text is redacted where the delivery engine receives it, before
  it reaches the spool, the queue CLI or a bounce (`redact_results`).

Besides the exact values, their usual encodings (base64, as in `Authorization: Basic`
and SMTP AUTH, URL quoting, Python's escaped repr) and the password part of URLs with credentials
(`https://user:password@host`) are replaced. Values shorter than `MIN_SECRET_LENGTH` are
not registered: replacing every `ab` in every log line would garble them without hiding
anything a guess could not find.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailrelay.relay.upstreams.transport import RecipientResult

__all__ = ["MIN_SECRET_LENGTH", "REDACTED", "SECRETS", "Redactor", "redact_results"]

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 6
# Rotations add values; old ones stay secret too, but the list must not grow without end.
_MAX_SECRETS = 4096
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*):[^\s/@]*@")


class Redactor:
    """A set of secret strings and the function that hides them in text."""

    def __init__(self) -> None:
        self._values: dict[str, None] = {}  # ordered, for a bounded forget-oldest
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        self._on_first: Callable[[], None] | None = None

    def add(self, *values: str) -> None:
        """Remember secrets, with their base64 and URL-quoted forms."""
        forms = set()
        for value in values:
            if len(value) < MIN_SECRET_LENGTH:
                continue
            raw = value.encode("utf-8", "surrogatepass")
            forms |= {value, base64.b64encode(raw).decode("ascii"), urllib.parse.quote(value)}
            forms.add(urllib.parse.quote_plus(value))
            # As Python quotes it in an error (`b'Bearer key\\n...'`): escapes instead of
            # line breaks and non-ASCII.
            forms |= {repr(value)[1:-1], repr(raw)[2:-1]}
        with self._lock:
            new = [f for f in forms if f not in self._values]
            if not new:
                return
            first = not self._values
            for form in new:
                self._values[form] = None
            while len(self._values) > _MAX_SECRETS:
                del self._values[next(iter(self._values))]
            # Longest first, so a secret containing another is replaced whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
            hook = self._on_first if first else None
        if hook is not None:
            hook()

    def add_credentials(self, username: str, password: str) -> None:
        """An AUTH pair: the password, and the SMTP AUTH PLAIN and HTTP Basic forms."""
        self.add(password)
        for joined in (f"\0{username}\0{password}", f"{username}:{password}"):
            raw = joined.encode("utf-8", "surrogatepass")
            self.add(base64.b64encode(raw).decode("ascii"))

    def __call__(self, text: str) -> str:
        """`text` with every known secret and URL password replaced."""
        if "://" in text:
            text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
        pattern = self._pattern
        return pattern.sub(REDACTED, text) if pattern is not None else text

    def install_log_filter(self) -> None:
        """Redact every log record from now on (idempotent), whatever logger or handler."""
        install_record_factory(self)


SECRETS = Redactor()


def install_record_factory(redactor: Redactor) -> None:
    """Wrap the log record factory so records carry redacted text only."""
    current = logging.getLogRecordFactory()
    if getattr(current, "_mailrelay_redactor", None) is redactor:
        return
    formatter = logging.Formatter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it as usual
            return record
        record.msg, record.args = redactor(message), None
        if record.exc_info and record.exc_info[1] is not None:
            # Formatters use exc_text when set; the exception's own text may hold a secret.
            # The exception object goes: a handler that formats it itself would print it.
            record.exc_text = redactor(formatter.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redactor(record.stack_info)
        return record

    factory._mailrelay_redactor = redactor  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


SECRETS._on_first = SECRETS.install_log_filter


def redact_results(
    results: Iterable[RecipientResult], redactor: Redactor = SECRETS
) -> list[RecipientResult]:
    """Delivery results with secrets removed from their text (detail and remote id)."""
    out = []
    for result in results:
        detail = redactor(result.detail)
        remote = redactor(result.remote_id) if result.remote_id is not None else None
        changed = detail != result.detail or remote != result.remote_id
        replaced = dataclasses.replace(result, detail=detail, remote_id=remote)
        out.append(replaced if changed else result)
    return out
