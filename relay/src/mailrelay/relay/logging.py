"""Log setup: plain text lines by default, one JSON object per line as an option.

Call sites pass structured fields through `extra=` (e.g. `queue_id`); the JSON format
carries them as keys, the text format only shows the message, which already names the
object.

Both formats escape control characters (and the lone surrogates of undecodable bytes) in
every message and field as `\\xNN`: log lines quote client-supplied text (addresses, HELO
names, upstream replies), and a NUL, CR or escape sequence must never reach a terminal or
a log pipeline raw, nor forge a line. Tracebacks keep their line breaks.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "printable"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_UNPRINTABLE_BUT_LF = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with control characters and lone surrogates escaped (`\\x00`, `\\udcff`)."""
    pattern = _UNPRINTABLE_BUT_LF if keep_newlines else _UNPRINTABLE
    return pattern.sub(_escape, text) if pattern.search(text) else text


class TextFormatter(logging.Formatter):
    """`time level logger: message`, with control characters escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_text:  # formatted already (relay/redact.py does it when logged)
            record.exc_text = printable(record.exc_text, keep_newlines=True)
        return super().format(record)

    def formatException(self, ei: Any) -> str:
        return printable(super().formatException(ei), keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return printable(super().formatStack(stack_info), keep_newlines=True)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": printable(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = printable(value) if isinstance(value, str) else value
        if record.exc_info:
            payload["exception"] = printable(
                self.formatException(record.exc_info), keep_newlines=True
            )
        elif record.exc_text:  # already formatted (and redacted, see relay/redact.py)
            payload["exception"] = printable(record.exc_text, keep_newlines=True)
        return json.dumps(payload, default=str)


def configure_logging(fmt: Literal["text", "json"], level: int = logging.INFO) -> None:
    """Route the root logger to stderr in the chosen format (idempotent: reload calls it)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_mailrelay", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._mailrelay = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root.setLevel(level)
    # Neither format shows where a line was logged from, nor thread or process details,
    # so they are not computed per record (Logging HOWTO, "Optimization"). The relay logs
    # twice per message; in a py-spy profile the caller lookup (a stack walk) alone was
    # an eighth of the event loop's time in log calls.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiosmtpd's own logger is set up by relay/smtp_base.py (`quiet_aiosmtpd_log`).
