"""``python -m mailrelay.operator``: parse flags, then run kopf with peering.

Flags override the ``MAILRELAY_OPERATOR_*`` environment; they are handed to the settings by
exporting them before ``mailrelay.operator.main`` is imported (it builds the settings once, at
import, because kopf needs the timer interval at registration).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence

import kopf

ENV_PREFIX = "MAILRELAY_OPERATOR_"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; every flag also has a ``MAILRELAY_OPERATOR_*`` variable."""
    parser = argparse.ArgumentParser(
        prog="python -m mailrelay.operator",
        description=(
            "Kubernetes operator for mailrelay: reconciles MailRelay and MailRoute resources "
            "into relay StatefulSets, Services, ConfigMaps and friends."
        ),
    )
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        help="namespace (or glob) to watch; repeat for more; default: all namespaces",
    )
    parser.add_argument("--relay-image", help="relay image when a MailRelay sets none")
    parser.add_argument("--log-format", choices=["text", "json"], help="log line format")
    parser.add_argument("--metrics-port", type=int, help="operator /metrics port (0: off)")
    parser.add_argument("--liveness-port", type=int, help="/healthz port (0: off)")
    parser.add_argument("--peering-name", help="kopf peering object name (leader election)")
    parser.add_argument("--priority", type=int, help="peering priority; the highest acts")
    parser.add_argument(
        "--standalone", action="store_true", default=None, help="no peering (dev, tests)"
    )
    parser.add_argument("--resync-seconds", type=float, help="per-relay level-based pass interval")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def export_flags(args: argparse.Namespace) -> None:
    """Put the flags into the environment the settings are read from."""
    values = {
        "NAMESPACES": ",".join(args.namespaces) if args.namespaces else None,
        "RELAY_IMAGE": args.relay_image,
        "LOG_FORMAT": args.log_format,
        "METRICS_PORT": args.metrics_port,
        "LIVENESS_PORT": args.liveness_port,
        "PEERING_NAME": args.peering_name,
        "PRIORITY": args.priority,
        "STANDALONE": "true" if args.standalone else None,
        "RESYNC_SECONDS": args.resync_seconds,
    }
    for name, value in values.items():
        if value is not None:
            os.environ[ENV_PREFIX + name] = str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(log_format: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if not verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    export_flags(args)
    # Imported late: the module reads the settings (now including the flags) at import.
    registrations = importlib.import_module("mailrelay.operator.main")

    settings = registrations.SETTINGS
    _configure_logging(settings.log_format, args.verbose)
    # /healthz is served by the operator itself (health.py), not by kopf: kopf's answers 200
    # whenever the event loop runs, even when nothing can be reconciled.
    asyncio.run(
        kopf.operator(
            clusterwide=settings.watches_all_namespaces(),
            namespaces=settings.namespaces,
            standalone=settings.standalone,
            priority=settings.priority,
            peering_name=settings.peering_name,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
