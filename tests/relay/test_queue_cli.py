"""The queue CLI (`python -m mailrelay.relay queue ...`) run as a real process beside a
live relay: list, show, retry now, delete, and the same for dead letters."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mailrelay.relay.journal import encode_record
from mailrelay.relay.main import main
from mailrelay.relay.spool import Spool, encode_header
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.relay.conftest import (
    USERS,
    RelayFactory,
    RelayHandle,
    fresh_entry,
    smtp_route,
    write_legacy_pair,
)

ALICE = ("alice", USERS["alice"])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay.relay", *args],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
        timeout=60,
    )


async def acli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args)


def msg(n: int) -> bytes:
    return b"Subject: %d\r\nMessage-ID: <cli-%d@example.com>\r\n\r\nbody %d\r\n" % (n, n, n)


async def send(relay: RelayHandle, count: int, rcpt: str = "b@dest.test") -> list[str]:
    ids = []
    async with relay.client(login=ALICE) as smtp:
        for n in range(count):
            _, reply = await smtp.sendmail("a@example.com", [rcpt], msg(n))
            ids.append(reply.split()[-1])
    return ids


async def until(predicate: Any, what: str, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
async def test_list_show_retry_delete_beside_a_live_relay(
    relay_factory: RelayFactory, recording_upstream: Any, tls_certs: TlsCerts
) -> None:
    upstream: RecordingUpstream = recording_upstream(tls="starttls")
    upstream.stop()  # down: mail waits in the queue
    relay = await relay_factory(
        routes=[smtp_route("out", upstream, tls_certs.ca_file)],
        retry={"initial_backoff_seconds": 3600, "max_backoff_seconds": 3600},
    )
    spool = Spool(relay.spool_dir)
    keep, drop = await send(relay, 2)
    await until(
        lambda: (
            all(e.recipients[0].attempts >= 1 for e in SpoolAdmin(spool.directory).list_queue())
            and len(SpoolAdmin(spool.directory).list_queue()) == 2
        ),
        "first failed attempts",
    )
    listing = await acli("--config", str(relay.config_path), "queue", "list")
    assert listing.returncode == 0, listing.stderr
    assert keep in listing.stdout and drop in listing.stdout
    assert "deferred  b@dest.test via out" in listing.stdout
    assert "-- 2 message(s)" in listing.stdout
    as_json = await acli("queue", "--spool-dir", str(relay.spool_dir), "list", "--json")
    assert {json.loads(line)["queue_id"] for line in as_json.stdout.splitlines()} == {keep, drop}
    shown = await acli("queue", "--spool-dir", str(relay.spool_dir), "show", keep, "--message")
    assert shown.returncode == 0
    assert f'"queue_id": "{keep}"' in shown.stdout
    assert shown.stdout.rstrip().endswith("body 0")
    # Delete one; bring the upstream back and retry the other now (not in an hour).
    deleted = await acli("queue", "--spool-dir", str(relay.spool_dir), "delete", drop)
    assert (deleted.returncode, deleted.stdout) == (0, f"Deleted {drop}\n")
    upstream.start()
    retried = await acli("queue", "--spool-dir", str(relay.spool_dir), "retry", "--all")
    assert retried.returncode == 0 and keep in retried.stdout
    await upstream.wait_for(1)
    await until(lambda: SpoolAdmin(spool.directory).list_queue() == [], "the queue to empty")
    assert upstream.message_ids() == {"<cli-0@example.com>"}
    assert (
        await acli("queue", "--spool-dir", str(relay.spool_dir), "list")
    ).stdout == "Queue is empty\n"
    missing = await acli("queue", "--spool-dir", str(relay.spool_dir), "delete", drop)
    assert missing.returncode == 1 and "no queued message" in missing.stderr


async def test_dead_letters_list_show_retry_delete(
    relay_factory: RelayFactory, recording_upstream: Any, tls_certs: TlsCerts
) -> None:
    upstream: RecordingUpstream = recording_upstream(tls="starttls")
    refusing = {"b@dest.test"}
    upstream.rcpt_reply = lambda rcpt: "550 5.1.1 No such user" if rcpt in refusing else None
    relay = await relay_factory(routes=[smtp_route("out", upstream, tls_certs.ca_file)])
    spool = Spool(relay.spool_dir)
    first, second = await send(relay, 2)
    await until(
        lambda: len(SpoolAdmin(spool.directory).list_dead_letters()) == 2, "two dead letters"
    )
    args = ("queue", "--spool-dir", str(relay.spool_dir), "dead")
    listing = await acli(*args, "list")
    assert first in listing.stdout and "dead: " in listing.stdout and "550" in listing.stdout
    shown = await acli(*args, "show", first)
    assert json.loads(shown.stdout)["dead_reason"]
    # The user exists now: requeue one dead letter, delete the other.
    refusing.clear()
    upstream.messages.clear()  # forget the bounces sent to a@example.com
    assert (await acli(*args, "retry", first)).returncode == 0
    assert (await acli(*args, "delete", second)).returncode == 0
    await until(lambda: "<cli-0@example.com>" in upstream.message_ids(), "the requeued delivery")
    await until(lambda: SpoolAdmin(spool.directory).list_queue() == [], "the queue to empty")
    assert SpoolAdmin(spool.directory).list_dead_letters() == []
    assert "<cli-1@example.com>" not in upstream.message_ids()


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Usage and spool errors, through `main` in-process (the real CLI runs above)."""
    assert main(["queue", "--spool-dir", str(tmp_path / "nothing"), "list"]) == 1
    assert "no spool here" in capsys.readouterr().err
    (tmp_path / "queue").mkdir()
    assert main(["queue", "--spool-dir", str(tmp_path), "retry"]) == 2
    assert "give queue ids or --all" in capsys.readouterr().err
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("hostname: [\n")
    assert main(["--config", str(bad_config), "queue", "list"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_old_two_file_spool_is_flagged_then_listed_once_converted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI never converts (an old relay may still run); it says what it cannot show."""
    queue = tmp_path / "queue"
    queue.mkdir()
    entry = fresh_entry("b@dest.test", "out", msg(7), mail_from="old@example.com")
    write_legacy_pair(queue, entry, msg(7))
    assert main(["queue", "--spool-dir", str(tmp_path), "list"]) == 0
    out, err = capsys.readouterr()
    assert out == "Queue is empty\n"
    assert "1 message(s) in the old two-file format are not shown" in err
    Spool(tmp_path).start_sync()  # what the relay does when it starts
    assert main(["queue", "--spool-dir", str(tmp_path), "show", entry.queue_id, "--message"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert '"mail_from": "old@example.com"' in out
    assert out.endswith(msg(7).decode())
    assert main(["queue", "--spool-dir", str(tmp_path), "delete", entry.queue_id]) == 0
    assert list(queue.iterdir()) == []


def test_messages_in_a_journal_are_listed_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A journal segment (here as a crash leaves it) is listed, read only, after the queue."""
    (tmp_path / "queue").mkdir()
    (tmp_path / "journal").mkdir()
    entry = fresh_entry("b@dest.test", "out", msg(3), mail_from="fresh@example.com")
    record = encode_record(b"M", encode_header(entry), msg(3))
    (tmp_path / "journal" / "0badc0de-000001.jnl").write_bytes(b"".join(record))
    assert main(["queue", "--spool-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    head, _, journaled = out.partition("In the journal")
    assert entry.queue_id not in head and entry.queue_id in journaled
    assert "pending   b@dest.test via out" in journaled
    assert main(["queue", "--spool-dir", str(tmp_path), "list", "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {**entry.model_dump(mode="json"), "journal": True}
    # Listing never recovers or removes anything: that is a starting relay's job.
    assert len(list((tmp_path / "journal").iterdir())) == 1


def test_listing_escapes_control_characters_of_spooled_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A message spooled before the front refused such addresses: the operator's
    # terminal gets `\x1b`, not an escape sequence.
    queue = tmp_path / "queue"
    queue.mkdir()
    entry = fresh_entry("b\x1b[2J\x00@dest.test", "out", msg(3), mail_from="e\x07vil@example.com")
    entry.recipients[0].last_error = "5.1.3 Bad recipient address: \x1b]0;title\x07"
    write_legacy_pair(queue, entry, msg(3))
    Spool(tmp_path).start_sync()
    assert main(["queue", "--spool-dir", str(tmp_path), "list"]) == 0
    out, _ = capsys.readouterr()
    assert not any(ch in out for ch in "\x00\x07\x1b")
    assert "b\\x1b[2J\\x00@dest.test" in out and "e\\x07vil@example.com" in out
