"""`python -m mailrelay.relay queue ...`: inspect and manage the spool, like mailq/postsuper.

    queue list [--json]                  queued messages, oldest first
    queue show ID [--message]            one envelope (and the stored bytes)
    queue retry ID... | --all            make undelivered recipients due now
    queue delete ID... | --all           drop messages for good
    queue dead list|show|retry|delete    the same for dead letters (retry requeues)

Safe beside a running relay: every change first claims the message with the same flock
the delivery engine takes, so the CLI waits for (or reports) a delivery in progress
instead of racing it, and every write is atomic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from mailrelay.relay.config import ConfigError, load_config
from mailrelay.relay.logging import printable
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.relay.spool_format import QueueEntry, SpoolError

__all__ = ["add_queue_parser", "run_queue_command"]


def add_queue_parser(sub: Any) -> None:
    """Add the `queue` subcommand tree to the main parser."""
    queue = sub.add_parser("queue", help="inspect and manage the spool")
    queue.add_argument("--spool-dir", type=Path, help="spool directory (default: from --config)")
    actions = queue.add_subparsers(dest="queue_action", required=True)
    _add_actions(actions, dead=False)
    dead = actions.add_parser("dead", help="dead letters")
    dead_actions = dead.add_subparsers(dest="dead_action", required=True)
    _add_actions(dead_actions, dead=True)


def _add_actions(actions: Any, *, dead: bool) -> None:
    what = "dead letters" if dead else "queued messages"
    listing = actions.add_parser("list", help=f"list {what}")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="show one message's envelope")
    show.add_argument("queue_id")
    show.add_argument("--message", action="store_true", help="also print the stored bytes")
    for name, text in (
        ("retry", "requeue dead letters" if dead else "retry undelivered recipients now"),
        ("delete", f"delete {what}"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("queue_ids", nargs="*", metavar="ID")
        action.add_argument("--all", action="store_true", help=f"all {what}")


def _spool_for(args: argparse.Namespace) -> SpoolAdmin:
    if args.spool_dir is not None:
        return SpoolAdmin(args.spool_dir)
    config = load_config(args.config)
    return SpoolAdmin(config.spool.directory)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_list(
    entries: list[QueueEntry], as_json: bool, out: TextIO, journaled: Sequence[QueueEntry] = ()
) -> None:
    """Print queue entries, then those in a journal (JSON: with `"journal": true`)."""
    if as_json:
        for entry in entries:
            out.write(entry.model_dump_json() + "\n")
        for entry in journaled:
            out.write(json.dumps({**entry.model_dump(mode="json"), "journal": True}) + "\n")
        return
    if not entries and not journaled:
        out.write("Queue is empty\n")
        return
    if entries:
        _print_table(entries, out)
    if journaled:
        out.write(
            "In the journal (first delivery attempt running, or left by a crash and"
            " recovered when a relay starts; not editable):\n"
        )
        _print_table(journaled, out)


def _print_table(entries: Sequence[QueueEntry], out: TextIO) -> None:
    # Addresses and upstream replies are other people's text: escape control characters.
    out.write(f"{'QUEUE ID':<24} {'SIZE':>9} {'ARRIVED (UTC)':<19}  SENDER\n")
    for entry in entries:
        sender = printable(entry.mail_from or "<>")
        out.write(f"{entry.queue_id:<24} {entry.size:>9} {_when(entry.received_at)}  {sender}\n")
        if entry.dead_reason:
            out.write(f"    dead: {printable(entry.dead_reason)}\n")
        for r in entry.recipients:
            detail = f" ({r.last_error})" if r.last_error and r.status != "delivered" else ""
            line = f"{r.status:<9} {r.address} via {r.route}{detail}"
            out.write(f"    {printable(line)}\n")
    out.write(f"-- {len(entries)} message(s), {sum(e.size for e in entries)} bytes\n")


def run_queue_command(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one queue command; returns the exit status (1 if any id failed)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        spool = _spool_for(args)
    except ConfigError as exc:
        err.write(f"{exc}\n")
        return 2
    if not spool.queue_dir.is_dir():
        err.write(f"{spool.directory}: no spool here (no queue/ directory)\n")
        return 1
    legacy = spool.legacy_message_count()
    if legacy:
        err.write(
            f"{spool.directory}: {legacy} message(s) in the old two-file format are not shown;"
            " the relay converts them when it starts\n"
        )
    dead = args.queue_action == "dead"
    action = args.dead_action if dead else args.queue_action
    if action == "list":
        if dead:
            _print_list(spool.list_dead_letters(), args.json, out)
        else:
            _print_list(spool.list_queue(), args.json, out, spool.list_journal())
        return 0
    if action == "show":
        entry = spool.load_entry(args.queue_id, dead=dead)
        if entry is None:
            err.write(f"no {'dead letter' if dead else 'queued message'} {args.queue_id}\n")
            return 1
        out.write(json.dumps(entry.model_dump(), indent=2) + "\n")
        if args.message:
            out.flush()
            data = spool.read_message(args.queue_id, dead=dead)
            buffer = getattr(out, "buffer", None)
            if buffer is not None:
                buffer.write(data)
            else:
                out.write(data.decode("utf-8", "replace"))
        return 0
    ids: list[str] = list(args.queue_ids)
    if args.all:
        source = spool.list_dead_letters() if dead else spool.list_queue()
        ids = [e.queue_id for e in source]
    elif not ids:
        err.write(f"{action}: give queue ids or --all\n")
        return 2
    status = 0
    for queue_id in ids:
        try:
            with spool.claim_blocking(queue_id, dead=dead):
                if action == "delete":
                    spool.delete(queue_id, dead=dead)
                    out.write(f"Deleted {queue_id}\n")
                elif dead:
                    spool.retry_dead_letter(queue_id)
                    out.write(f"Requeued dead letter {queue_id}\n")
                else:
                    spool.retry_now(queue_id)
                    out.write(f"Scheduled {queue_id} for immediate retry\n")
        except SpoolError as exc:
            err.write(f"{exc}\n")
            status = 1
    return status
