"""Long run of the SMTP session fuzzer: hostile sessions against a real relay for minutes.

Why: `make test` runs the fuzzer's short, derandomized profile (tests/security); this
script runs the same state machine (mailrelay.support.fuzz.smtp_fuzz) with fresh seeds until
the time is up, against one relay subprocess with two real aiosmtpd upstreams, and
prints what it tried: examples and steps, commands sent per kind, replies seen per code
and enhanced code, messages delivered and checked byte for byte, the victim's messages,
the relay's peak RSS growth, and every failure with hypothesis's shrunk reproducer.

Run: `.venv/bin/python bench/smtp_fuzz.py --minutes 10` (add `--classes envelope_controls
,auth_parameter` to switch on input classes whose fixes are still pending; see
tests/security/test_smtp_fuzz.py). Exit status 1 when a failure was found.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import Phase, settings

from mailrelay.support.fuzz.smtp_fuzz import FuzzRun, run
from mailrelay.support.fuzz.smtp_model import InputClasses
from mailrelay.support.fuzz.target import FuzzTarget


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz")
    parser.add_argument("--batch", type=int, default=25, help="examples per hypothesis run")
    parser.add_argument("--steps", type=int, default=40, help="steps per example")
    parser.add_argument(
        "--classes",
        default="",
        help="comma-separated InputClasses fields to switch on: "
        + ", ".join(f.name for f in dataclasses.fields(InputClasses)),
    )
    parser.add_argument(
        "--no-shrink",
        action="store_true",
        help="report a failure at once with all its steps (shrinking replays it many times)",
    )
    parser.add_argument("--keep-going", action="store_true", help="continue after a failure")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.classes.split(",") if n.strip()]
    classes = InputClasses(**dict.fromkeys(names, True))
    failures: list[str] = []
    phases = [p for p in Phase if not (args.no_shrink and p is Phase.shrink)]
    with tempfile.TemporaryDirectory(prefix="smtp-fuzz-") as tmp:
        target = FuzzTarget.start(Path(tmp))
        fuzz = FuzzRun(target, classes=classes)
        deadline = time.monotonic() + args.minutes * 60
        started = time.monotonic()
        batches = 0
        try:
            while time.monotonic() < deadline:
                batches += 1
                try:
                    run(
                        fuzz,
                        settings(
                            max_examples=args.batch,
                            stateful_step_count=args.steps,
                            deadline=None,
                            database=None,
                            derandomize=False,
                            print_blob=True,
                            phases=phases,
                        ),
                    )
                except Exception as exc:
                    report = "".join(traceback.format_exception(exc))
                    notes = "\n".join(getattr(exc, "__notes__", []))
                    failures.append(f"{report}\n{notes}")
                    print(f"FAILURE in batch {batches}:\n{report}\n{notes}", flush=True)
                    if not args.keep_going:
                        break
                print(
                    f"batch {batches}: {fuzz.stats.examples} examples, {fuzz.stats.steps} steps, "
                    f"{time.monotonic() - started:.0f}s",
                    flush=True,
                )
        finally:
            target.stop()
    stats = fuzz.stats
    print(f"\nSMTP fuzz: {time.monotonic() - started:.0f}s, classes: {names or 'default'}")
    print(f"examples {stats.examples}, steps {stats.steps}, batches {batches}")
    print(f"messages delivered and checked: {stats.delivered} (victim: {stats.victim_messages})")
    print(f"relay peak RSS growth: {stats.peak_rss_growth / 2**20:.1f} MiB")
    print("\ncommands sent, per kind:")
    for kind, count in sorted(stats.commands.items(), key=lambda kv: -kv[1]):
        print(f"  {count:7d}  {kind}")
    print("\nreplies seen, per code and enhanced code:")
    for code, count in sorted(stats.replies.items()):
        print(f"  {count:7d}  {code}")
    print(f"\nfailures: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
