"""Log setup: plain text lines by default, one JSON object per line as an option.

Call sites pass structured fields through `extra=` (e.g. `queue_id`); the JSON format
carries them as keys, the text format only shows the message, which already names the
object.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

__all__ = ["JsonFormatter", "configure_logging"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already formatted (and redacted, see relay/redact.py)
            payload["exception"] = record.exc_text
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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.setLevel(level)
    # Neither format shows where a line was logged from, nor thread or process details,
    # so they are not computed per record (Logging HOWTO, "Optimization"). The relay logs
    # twice per message; in a py-spy profile the caller lookup (a stack walk) alone was
    # an eighth of the event loop's time in log calls.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiosmtpd logs every command at INFO and a deprecation warning on every successful
    # AUTH (Session.login_data); our own lines already say what happened.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
