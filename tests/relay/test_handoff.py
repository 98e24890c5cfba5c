"""Hand-off of the queue between relays (issue 13), with real relays on loopback.

Relays run in-process (`RelayApp`, real spools) or as `python -m mailrelay.relay`
subprocesses that a test SIGKILLs; the upstream is a recording aiosmtpd server that is
"down" (stopped) while mail moves between relays, then up. Every test checks what the
upstream finally received: each accepted message exactly once (by Message-ID), or
duplicates counted where a crash makes them possible.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailrelay.relay import handoff as handoff_module
from mailrelay.relay import handoff_wire as wire
from mailrelay.relay.drain import leave
from mailrelay.relay.spool import QueueEntry, Spool
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.support.ports import free_port
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.relay.conftest import (
    USERS,
    RelayFactory,
    RelayHandle,
    fresh_entry,
    smtp_route,
    start_subprocess,
)

ALICE = ("alice", USERS["alice"])
# Messages a sender has in flight to one peer at most (batches x batch size).
IN_FLIGHT = handoff_module._SEND_PER_PEER * handoff_module._BATCH_MESSAGES


def message(tag: str, size: int = 0) -> bytes:
    body = b"x" * 76 + b"\r\n"
    body *= max(0, size - 150) // len(body)
    return (
        b"From: alice@example.com\r\nTo: bob@dest.test\r\nSubject: " + tag.encode() + b"\r\n"
        b"Message-ID: <" + tag.encode() + b"@example.com>\r\n\r\n" + body + b"\r\n"
    )


def message_ids(upstream: RecordingUpstream) -> collections.Counter[str]:
    from mailrelay.relay.spool import extract_message_id  # noqa: PLC0415

    return collections.Counter(
        mid for m in upstream.snapshot() if (mid := extract_message_id(m.data)) is not None
    )


async def send_many(relay: RelayHandle, tags: list[str], rcpts: list[str] | None = None) -> None:
    async with relay.client(login=ALICE) as smtp:
        for tag in tags:
            errors, _ = await smtp.sendmail(
                "alice@example.com", rcpts or ["bob@dest.test"], message(tag)
            )
            assert errors == {}


def queued(spool_dir: Path) -> list[QueueEntry]:
    return SpoolAdmin(spool_dir).list_queue()


async def eventually(check: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "handoff-token"
    path.write_text(secrets.token_urlsafe(32) + "\n")
    return path


def handoff_block(token_file: Path, peers: list[str], port: int = 0) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "token_file": str(token_file),
        "peers": peers,
        "deadline_seconds": 30,
    }


async def stop_and_hand_off(relay: RelayHandle) -> None:
    """SIGTERM semantics for an in-process relay: stop, then hand the queue to peers."""
    app = relay.app
    assert app is not None
    config = app.config
    assert config.handoff is not None
    handoff = config.handoff

    async def then() -> None:
        await leave(config, handoff, app.metrics, budget=app.budget, instance=app.instance)

    await app.stop(then=then)
    relay.app = None


def sent(relay: RelayHandle, direction: str) -> float:
    return relay.metric("mailrelay_handoff_messages_total", {"direction": direction})


# -- in-process relays ------------------------------------------------------------------


async def test_hands_off_hundreds_while_upstream_is_down_then_delivers_each_once(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    peer = await relay_factory(routes=[route], handoff=handoff_block(token_file, ["127.0.0.1:1"]))
    assert peer.app is not None
    leaving = await relay_factory(
        routes=[route],
        handoff=handoff_block(token_file, [f"127.0.0.1:{peer.app.handoff_port}"]),
    )
    tags = [f"m{i}" for i in range(300)]
    await send_many(leaving, tags)
    # Every message had its first attempt (the upstream is down): attempts are kept.
    await eventually(
        lambda: (
            len(entries := queued(leaving.spool_dir)) == 300
            and all(e.recipients[0].attempts >= 1 for e in entries)
        )
    )
    before = {e.queue_id: e for e in queued(leaving.spool_dir)}

    await stop_and_hand_off(leaving)

    assert queued(leaving.spool_dir) == []
    after = {e.queue_id: e for e in queued(peer.spool_dir)}
    assert set(after) == set(before)  # the queue id is the stable message id
    for qid, entry in after.items():
        assert entry.received_at == before[qid].received_at  # max age continues
        assert entry.recipients[0].attempts >= before[qid].recipients[0].attempts
        assert entry.client_address == before[qid].client_address
    assert sent(peer, "received") == 300
    assert sent(peer, "duplicate") == 0

    upstream.start()
    await upstream.wait_for(300, within=60)
    await eventually(lambda: queued(peer.spool_dir) == [])
    counts = message_ids(upstream)
    assert set(counts) == {f"<{t}@example.com>" for t in tags}
    assert max(counts.values()) == 1


async def test_keeps_per_recipient_state_and_sends_only_the_pending_recipient(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    # carol's mailbox is temporarily unavailable; bob's takes the message.
    upstream.rcpt_reply = lambda rcpt: "450 4.2.1 try later" if rcpt.startswith("carol") else None
    route = smtp_route("out", upstream, tls_certs.ca_file)
    peer = await relay_factory(routes=[route], handoff=handoff_block(token_file, ["127.0.0.1:1"]))
    assert peer.app is not None
    leaving = await relay_factory(
        routes=[route],
        handoff=handoff_block(token_file, [f"127.0.0.1:{peer.app.handoff_port}"]),
        retry={"initial_backoff_seconds": 4, "max_backoff_seconds": 4},
    )
    await send_many(leaving, ["split"], ["bob@dest.test", "carol@dest.test"])
    await upstream.wait_for(1)
    await eventually(lambda: len(queued(leaving.spool_dir)) == 1)
    [entry] = queued(leaving.spool_dir)
    assert entry.recipients[1].next_attempt_at > time.time() + 2
    assert [r.status for r in entry.recipients] == ["delivered", "deferred"]

    await stop_and_hand_off(leaving)

    [moved] = queued(peer.spool_dir)
    assert moved.queue_id == entry.queue_id
    assert [(r.address, r.status, r.attempts) for r in moved.recipients] == [
        ("bob@dest.test", "delivered", 1),
        ("carol@dest.test", "deferred", 1),
    ]
    assert moved.recipients[1].next_attempt_at == entry.recipients[1].next_attempt_at
    # carol's mailbox is back; only she gets the message, from the peer, when it is due.
    upstream.rcpt_reply = None
    assert len(upstream.snapshot()) == 1
    got = await upstream.wait_for(2, within=15)
    assert got[0].rcpt_tos == ("bob@dest.test",)  # carol was refused at RCPT then
    assert got[1].rcpt_tos == ("carol@dest.test",)
    await eventually(lambda: queued(peer.spool_dir) == [])
    await asyncio.sleep(0.3)
    assert len(upstream.snapshot()) == 2


async def signed_post(
    port: int, token: bytes, body: bytes, *, timestamp: float | None = None, instance: str = "t"
) -> tuple[int, bytes]:
    stamp = f"{time.time() if timestamp is None else timestamp:.3f}"
    nonce = secrets.token_hex(16)
    auth = wire.sign_request(
        token,
        method="POST",
        path=wire.PATH,
        timestamp=stamp,
        nonce=nonce,
        instance=instance,
        digest=wire.body_digest(body),
    )
    headers = {
        "Authorization": auth,
        wire.H_TIMESTAMP: stamp,
        wire.H_NONCE: nonce,
        wire.H_INSTANCE: instance,
        wire.H_DIGEST: wire.body_digest(body),
    }
    return await raw_post(port, body, headers)


async def raw_post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{port}{wire.PATH}", data=io.BytesIO(body), headers=headers
        ) as resp,
    ):
        return resp.status, await resp.read()


def batch(*items: tuple[QueueEntry, bytes]) -> bytes:
    return b"".join(b"".join(wire.encode_message(entry, data)) for entry, data in items)


async def test_refuses_missing_wrong_and_stale_proofs_and_queues_nothing(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    peer = await relay_factory(routes=[route], handoff=handoff_block(token_file, ["127.0.0.1:1"]))
    assert peer.app is not None
    port = peer.app.handoff_port
    data = message("forged")
    body = batch((fresh_entry("bob@dest.test", "out", data), data))
    token = (await asyncio.to_thread(token_file.read_bytes)).strip()

    assert (await raw_post(port, body, {}))[0] == 401
    # The token itself as a bearer credential is not a proof.
    assert (await raw_post(port, body, {"Authorization": f"Bearer {token.decode()}"}))[0] == 401
    assert (await signed_post(port, b"wrong-token", body))[0] == 403
    assert (await signed_post(port, token, body, timestamp=time.time() - 3600))[0] == 403
    # A valid signature over another body does not carry this one.
    stamp, nonce = f"{time.time():.3f}", "ab" * 16
    auth = wire.sign_request(
        token,
        method="POST",
        path=wire.PATH,
        timestamp=stamp,
        nonce=nonce,
        instance="t",
        digest=wire.body_digest(b""),
    )
    headers = {"Authorization": auth, wire.H_TIMESTAMP: stamp, wire.H_NONCE: nonce}
    headers[wire.H_INSTANCE] = "t"
    # ... neither with the signed digest in the header (the body does not match it),
    assert (await raw_post(port, body, {**headers, wire.H_DIGEST: wire.body_digest(b"")}))[0] == 403
    # ... nor with this body's digest (the signature does not cover it).
    assert (await raw_post(port, body, {**headers, wire.H_DIGEST: wire.body_digest(body)}))[
        0
    ] == 403
    await asyncio.sleep(0.3)
    assert queued(peer.spool_dir) == []
    assert upstream.snapshot() == []
    assert peer.metric("mailrelay_handoff_failures_total", {"reason": "unauthorized"}) == 2
    assert peer.metric("mailrelay_handoff_failures_total", {"reason": "forbidden"}) == 4

    # Without a valid proof the body is never waited for (nor memory reserved for it): a
    # client announcing a large body and sending none gets its answer at once.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {wire.PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        f"Authorization: {wire.AUTH_SCHEME} {'0' * 64}\r\n{wire.H_NONCE}: n\r\n"
        f"{wire.H_TIMESTAMP}: {time.time():.3f}\r\n{wire.H_INSTANCE}: t\r\n"
        f"{wire.H_DIGEST}: {'0' * 64}\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 403")
    writer.close()
    await writer.wait_closed()
    assert peer.app.budget.used == 0

    # A relay whose token differs hands off nothing and keeps its mail.
    other = token_file.with_name("other-token")
    other.write_text("not-the-shared-token\n")
    upstream.stop()
    leaving = await relay_factory(
        routes=[route],
        handoff={**handoff_block(other, [f"127.0.0.1:{port}"]), "deadline_seconds": 1},
    )
    await send_many(leaving, ["kept"])
    await stop_and_hand_off(leaving)
    assert [e.message_id for e in queued(leaving.spool_dir)] == ["<kept@example.com>"]
    assert queued(peer.spool_dir) == []


async def test_replayed_request_keeps_one_copy_even_after_delivery(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    peer = await relay_factory(routes=[route], handoff=handoff_block(token_file, ["127.0.0.1:1"]))
    assert peer.app is not None
    port = peer.app.handoff_port
    token = (await asyncio.to_thread(token_file.read_bytes)).strip()
    data = message("replayed")
    entry = fresh_entry("bob@dest.test", "out", data)
    body = batch((entry, data))

    for expected in ("stored", "duplicate", "duplicate"):
        status, answer = await signed_post(port, token, body)
        assert status == 200
        [result] = wire.BatchResult.model_validate_json(answer).results
        assert (result.queue_id, result.status) == (entry.queue_id, expected)
    assert [e.queue_id for e in queued(peer.spool_dir)] == [entry.queue_id]

    upstream.start()
    await upstream.wait_for(1)
    await eventually(lambda: queued(peer.spool_dir) == [])
    # Delivered and gone from the queue, the id is still known: a late replay is a duplicate.
    status, answer = await signed_post(port, token, body)
    assert status == 200
    assert wire.BatchResult.model_validate_json(answer).results[0].status == "duplicate"
    await asyncio.sleep(0.5)
    assert queued(peer.spool_dir) == []
    assert message_ids(upstream) == {"<replayed@example.com>": 1}
    assert sent(peer, "duplicate") == 3


async def test_message_handed_on_and_back_is_taken_again(tmp_path: Path) -> None:
    """A relay that passed a message on must take it back later, not call it a duplicate
    (that would drop the only copy)."""
    spool = Spool(tmp_path / "spool")
    await spool.start()
    data = message("roundtrip")
    entry = fresh_entry("bob@dest.test", "out", data)
    assert await spool.adopt([(entry, data)]) == ["stored"]
    assert await spool.adopt([(entry, data)]) == ["duplicate"]
    lease = spool.lease(entry.queue_id)
    assert not isinstance(lease, str)
    await lease.hand_over()
    assert spool.queue_ids() == []
    assert await spool.adopt([(entry, data)]) == ["stored"]
    assert spool.queue_ids() == [entry.queue_id]
    await spool.aclose()


async def test_concurrent_adopters_of_one_id_keep_one_copy(tmp_path: Path) -> None:
    """Two worker processes receiving the same message at once: one stores it."""
    directory = tmp_path / "spool"
    first, second = Spool(directory), Spool(directory)
    await first.start()
    await second.start()
    data = message("race")
    entries = [fresh_entry("bob@dest.test", "out", data) for _ in range(50)]
    results = await asyncio.gather(
        *(spool.adopt([(e, data)]) for e in entries for spool in (first, second))
    )
    for index in range(50):
        pair = results[2 * index] + results[2 * index + 1]
        assert sorted(pair) == ["duplicate", "stored"]
    assert len(first.queue_ids()) == 50
    await first.aclose()
    await second.aclose()


async def test_no_hand_off_to_itself(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    port = free_port()
    relay = await relay_factory(
        routes=[route],
        handoff={
            **handoff_block(token_file, [f"localhost:{port}"], port),
            "deadline_seconds": 2,
        },
    )
    await send_many(relay, ["mine"])
    await stop_and_hand_off(relay)
    assert [e.message_id for e in queued(relay.spool_dir)] == ["<mine@example.com>"]
    # Its own addresses (127.0.0.1 and ::1 on its own port) were left out: never tried.
    for reason in ("connect", "self", "refused"):
        assert relay.metric("mailrelay_handoff_failures_total", {"reason": reason}) == 0
    assert relay.metric("mailrelay_handoff_failures_total", {"reason": "resolve"}) == 1


# -- processes killed in the middle ---------------------------------------------------


def subprocess_handoff(token_file: Path, port: int, peers: list[str], deadline: float = 30) -> Any:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "token_file": str(token_file),
        "peers": peers,
        "deadline_seconds": deadline,
    }


async def fill(relay: RelayHandle, count: int, prefix: str) -> list[str]:
    tags = [f"{prefix}{i}" for i in range(count)]
    await send_many(relay, tags)
    await eventually(lambda: len(queued(relay.spool_dir)) == count)
    return tags


async def test_sender_killed_mid_hand_off_loses_nothing(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    peer = await relay_factory(routes=[route], handoff=handoff_block(token_file, ["127.0.0.1:1"]))
    assert peer.app is not None
    leaving = await relay_factory(
        routes=[route],
        subprocess=True,
        handoff=subprocess_handoff(token_file, free_port(), [f"127.0.0.1:{peer.app.handoff_port}"]),
        # Big enough messages that the hand-off takes a while to SIGKILL it in the middle.
        limits={"max_message_size": 1 << 20},
    )
    tags = [f"k{i}" for i in range(400)]
    async with leaving.client(login=ALICE) as smtp:
        for tag in tags:
            errors, _ = await smtp.sendmail(
                "alice@example.com", ["bob@dest.test"], message(tag, 40_000)
            )
            assert errors == {}
    await eventually(lambda: len(queued(leaving.spool_dir)) == 400)
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)
    await eventually(lambda: sent(peer, "received") > 0, within=30)
    leaving.kill()
    moved = sent(peer, "received")
    assert 0 < moved < 400, "the hand-off was not interrupted"

    # Restarted, the relay still has what it had not handed off; the next stop hands it.
    await start_subprocess(leaving)
    await leaving.stop()
    assert leaving.process is not None and leaving.process.returncode == 0
    assert queued(leaving.spool_dir) == []

    upstream.start()
    await eventually(lambda: set(message_ids(upstream)) == {f"<{t}@example.com>" for t in tags}, 90)
    await eventually(lambda: queued(peer.spool_dir) == [])
    # Batches in flight at the kill were held on both sides; the second hand-off sent
    # them again and the peer recognised them (counted), so each arrived once.
    assert max(message_ids(upstream).values()) == 1
    assert sent(peer, "received") == 400
    assert sent(peer, "duplicate") <= IN_FLIGHT


async def test_receiver_killed_mid_hand_off_sender_keeps_the_rest(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    peer_port = free_port()
    peer = await relay_factory(
        routes=[route],
        subprocess=True,
        handoff=subprocess_handoff(token_file, peer_port, ["127.0.0.1:1"]),
    )
    leaving = await relay_factory(
        routes=[route],
        handoff={**handoff_block(token_file, [f"127.0.0.1:{peer_port}"]), "deadline_seconds": 5},
        limits={"max_message_size": 1 << 20},
    )
    tags = [f"r{i}" for i in range(400)]
    async with leaving.client(login=ALICE) as smtp:
        for tag in tags:
            errors, _ = await smtp.sendmail(
                "alice@example.com", ["bob@dest.test"], message(tag, 40_000)
            )
            assert errors == {}
    await eventually(lambda: len(queued(leaving.spool_dir)) == 400)

    async def kill_peer_once_it_receives() -> None:
        await eventually(lambda: len(queued(peer.spool_dir)) > 0, within=30)
        peer.kill()

    killer = asyncio.create_task(kill_peer_once_it_receives())
    await stop_and_hand_off(leaving)
    await killer
    kept = {e.message_id for e in queued(leaving.spool_dir)}
    at_peer = {e.message_id for e in queued(peer.spool_dir)}
    assert kept, "the receiver was not killed in the middle"
    assert kept | at_peer == {f"<{t}@example.com>" for t in tags}
    # Only batches in flight at the kill can be on both sides.
    assert len(kept & at_peer) <= IN_FLIGHT

    # Both come back with the upstream up: everything arrives.
    upstream.start()
    await start_subprocess(peer)
    restarted = await relay_factory(routes=[route], spool_dir=leaving.spool_dir)
    await eventually(lambda: set(message_ids(upstream)) == {f"<{t}@example.com>" for t in tags}, 90)
    await eventually(lambda: queued(peer.spool_dir) == [] and queued(restarted.spool_dir) == [])


# -- SIGTERM and the drain command ------------------------------------------------------


async def test_sigterm_without_peers_keeps_the_mail_on_disk(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    relay = await relay_factory(
        routes=[route],
        subprocess=True,
        handoff=subprocess_handoff(token_file, free_port(), ["no-such-peer.invalid"], deadline=5),
    )
    tags = await fill(relay, 20, "s")
    await relay.stop()
    assert relay.process is not None and relay.process.returncode == 0
    assert sorted(e.message_id or "" for e in queued(relay.spool_dir)) == sorted(
        f"<{t}@example.com>" for t in tags
    )
    assert "no peer relay resolved" in relay.log()


async def test_sigterm_with_workers_hands_off_every_workers_mail_once(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    peer = await relay_factory(routes=[route], handoff=handoff_block(token_file, ["127.0.0.1:1"]))
    assert peer.app is not None
    leaving = await relay_factory(
        routes=[route],
        subprocess=True,
        listener={"workers": 2},
        handoff=subprocess_handoff(token_file, free_port(), [f"127.0.0.1:{peer.app.handoff_port}"]),
    )
    # Worker 1 starts after worker 0 answers ready: wait for its own /readyz.
    await eventually(lambda: worker_ready(leaving.health_port + 1), within=30)
    tags = []
    for session in range(12):  # several sessions: SO_REUSEPORT spreads them over the workers
        tags += await fill_more(leaving, 5, f"w{session}-")
    await eventually(lambda: len(queued(leaving.spool_dir)) == 60)
    await leaving.stop()
    assert leaving.process is not None and leaving.process.returncode == 0
    assert queued(leaving.spool_dir) == []
    assert sent(peer, "received") == 60
    assert sent(peer, "duplicate") == 0
    upstream.start()
    await eventually(lambda: len(message_ids(upstream)) == 60, 60)
    assert max(message_ids(upstream).values()) == 1


def worker_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


async def fill_more(relay: RelayHandle, count: int, prefix: str) -> list[str]:
    tags = [f"{prefix}{i}" for i in range(count)]
    await send_many(relay, tags)
    return tags


def run_drain(config: Path, *extra: str) -> tuple[int, dict[str, int], str]:
    done = subprocess.run(
        [sys.executable, "-m", "mailrelay.relay", "--config", str(config), "drain", *extra],
        capture_output=True,
        timeout=120,
        env=dict(os.environ),
        check=False,
    )
    lines = done.stdout.decode().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    if report:
        assert len(lines) == 1, "the drain prints exactly one line on stdout"
    return done.returncode, report, done.stderr.decode()


async def test_drain_hands_the_spool_to_a_peer(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    peer = await relay_factory(routes=[route], handoff=handoff_block(token_file, ["127.0.0.1:1"]))
    assert peer.app is not None
    orphan = await relay_factory(
        routes=[route],
        handoff=handoff_block(token_file, [f"127.0.0.1:{peer.app.handoff_port}"]),
    )
    tags = await fill(orphan, 30, "d")
    assert orphan.app is not None
    await orphan.stop()  # the pod is gone; its spool is left behind

    code, report, _ = await asyncio.to_thread(run_drain, orphan.config_path)

    assert code == 0
    assert report == {"handed_off": 30, "delivered": 0, "dead_lettered": 0, "remaining": 0}
    assert queued(orphan.spool_dir) == []
    upstream.start()
    await eventually(lambda: set(message_ids(upstream)) == {f"<{t}@example.com>" for t in tags})


async def test_drain_without_peers_delivers(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    orphan = await relay_factory(
        routes=[route], handoff=handoff_block(token_file, ["no-such-peer.invalid"])
    )
    tags = await fill(orphan, 12, "n")
    await orphan.stop()
    upstream.start()

    code, report, _ = await asyncio.to_thread(run_drain, orphan.config_path, "--deadline", "30")

    assert code == 0
    assert report == {"handed_off": 0, "delivered": 12, "dead_lettered": 0, "remaining": 0}
    assert message_ids(upstream) == {f"<{t}@example.com>": 1 for t in tags}


async def test_drain_without_peers_dead_letters_at_the_deadline(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    orphan = await relay_factory(
        routes=[route], handoff=handoff_block(token_file, ["no-such-peer.invalid"])
    )
    await fill(orphan, 5, "x")
    await orphan.stop()

    started = time.monotonic()
    code, report, _ = await asyncio.to_thread(run_drain, orphan.config_path, "--deadline", "3")

    assert time.monotonic() - started < 30
    assert code == 0
    # Five originals, and their five DSNs (the upstream stays down: dead-lettered too).
    assert report == {"handed_off": 0, "delivered": 0, "dead_lettered": 10, "remaining": 0}
    admin = SpoolAdmin(orphan.spool_dir)
    dead = admin.list_dead_letters()
    originals = [e for e in dead if e.mail_from]
    assert len(originals) == 5
    assert all(r.status == "bounced" for e in originals for r in e.recipients)
    assert all("relay was removed" in (e.dead_reason or "") for e in originals)
    assert queued(orphan.spool_dir) == []


async def test_drain_exits_3_when_peers_fail_and_mail_remains(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    # The peer name resolves, but nothing listens there: the peer fails every time.
    orphan = await relay_factory(
        routes=[route], handoff=handoff_block(token_file, [f"127.0.0.1:{free_port()}"])
    )
    await fill(orphan, 4, "f")
    await orphan.stop()

    code, report, _ = await asyncio.to_thread(run_drain, orphan.config_path, "--deadline", "2")

    assert code == 3
    assert report == {"handed_off": 0, "delivered": 0, "dead_lettered": 0, "remaining": 4}
    assert len(queued(orphan.spool_dir)) == 4


async def test_drain_refuses_to_run_without_the_token(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    tmp_path: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    orphan = await relay_factory(
        routes=[route],
        start=False,
        handoff=handoff_block(tmp_path / "missing-token", ["no-such-peer.invalid"]),
    )
    code, report, stderr = await asyncio.to_thread(run_drain, orphan.config_path)
    assert code == 1
    assert report == {}
    assert "token" in stderr


# -- the config block -------------------------------------------------------------------


def _config(**extra: Any) -> str:
    import yaml  # noqa: PLC0415

    data = {
        "hostname": "relay.test",
        "spool": {"directory": "/spool"},
        "auth": {"required": False},
        "allowed_networks": ["10.0.0.0/8"],
        "routes": [{"name": "out", "upstream": {"type": "smtp", "name": "up", "host": "up.test"}}],
        **extra,
    }
    return yaml.safe_dump(data)


def test_handoff_block_parses_peers_and_is_a_restart_setting() -> None:
    from mailrelay.relay.config import ConfigError, parse_config  # noqa: PLC0415

    plain = parse_config(_config())
    assert plain.handoff is None
    assert "handoff.listen" not in plain.restart_settings()  # digest unchanged without it

    config = parse_config(
        _config(
            handoff={"token_file": "/t/token", "peers": "relay-headless.mail.svc.cluster.local"}
        )
    )
    assert config.handoff is not None
    assert config.handoff.listen.port == 2526 and config.handoff.listen.host == ""
    assert config.handoff.deadline_seconds == 60
    assert config.handoff.peer_targets() == [("relay-headless.mail.svc.cluster.local", 2526)]
    assert config.restart_settings()["handoff.listen"] == {"host": "", "port": 2526}
    assert Path("/t/token") in config.referenced_files()

    several = parse_config(
        _config(handoff={"token_file": "/t", "peers": ["a.test:2600", "[fd00::1]:7", "b.test"]})
    )
    assert several.handoff is not None
    assert several.handoff.peer_targets() == [("a.test", 2600), ("fd00::1", 7), ("b.test", 2526)]

    for bad in ("two words", "a.test:0", "a.test:99999", "http://a.test", ""):
        with pytest.raises(ConfigError, match="peer"):
            parse_config(_config(handoff={"token_file": "/t", "peers": [bad]}))
    with pytest.raises(ConfigError, match="token_file"):
        parse_config(_config(handoff={"peers": "a.test"}))


async def test_a_temporary_resolver_failure_is_not_taken_for_no_peers(
    tmp_path: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain must not dead-letter mail because DNS hiccuped: EAI_AGAIN is "uncertain",
    a name without addresses is "no peers"."""
    from mailrelay.relay.config import HandoffConfig  # noqa: PLC0415
    from mailrelay.relay.handoff import resolve_peers  # noqa: PLC0415

    config = HandoffConfig(token_file=token_file, peers=["peers.test"])
    loop = asyncio.get_running_loop()

    async def again(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    async def nxdomain(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(loop, "getaddrinfo", again)
    found = await resolve_peers(config, [], 2526)
    assert (found.addresses, found.uncertain) == ([], True)
    monkeypatch.setattr(loop, "getaddrinfo", nxdomain)
    found = await resolve_peers(config, [], 2526)
    assert (found.addresses, found.uncertain) == ([], False)

    # And through a drain: a temporary failure leaves the mail queued (exit 3 in the CLI).
    from mailrelay.relay.config import parse_config  # noqa: PLC0415
    from mailrelay.relay.drain import drain  # noqa: PLC0415

    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    await spool.start()
    data = message("dns")
    await spool.adopt([(fresh_entry("bob@dest.test", "out", data), data)])
    await spool.aclose()
    relay_config = parse_config(
        _config(
            spool={"directory": str(spool_dir)},
            handoff={"token_file": str(token_file), "peers": "peers.test"},
        )
    )
    monkeypatch.setattr(loop, "getaddrinfo", again)
    report = await drain(relay_config, deadline_seconds=1.5)
    assert report.model_dump() == {
        "handed_off": 0,
        "delivered": 0,
        "dead_lettered": 0,
        "remaining": 1,
    }


async def test_a_failing_peer_is_skipped_and_the_others_take_the_mail(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    upstream.stop()
    peer = await relay_factory(routes=[route], handoff=handoff_block(token_file, ["127.0.0.1:1"]))
    assert peer.app is not None
    dead = free_port()  # resolves, but nothing listens there
    leaving = await relay_factory(
        routes=[route],
        handoff=handoff_block(
            token_file, [f"127.0.0.1:{dead}", f"127.0.0.1:{peer.app.handoff_port}"]
        ),
    )
    tags = await fill(leaving, 120, "p")
    await stop_and_hand_off(leaving)
    assert queued(leaving.spool_dir) == []
    assert sorted(e.message_id or "" for e in queued(peer.spool_dir)) == sorted(
        f"<{t}@example.com>" for t in tags
    )
    assert leaving.metric("mailrelay_handoff_failures_total", {"reason": "connect"}) >= 1
    assert leaving.metric("mailrelay_handoff_messages_total", {"direction": "sent"}) == 120


async def test_a_request_beyond_the_size_bound_is_refused_unread(
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    token_file: Path,
    relay_factory: RelayFactory,
) -> None:
    upstream = recording_upstream(tls="starttls")
    route = smtp_route("out", upstream, tls_certs.ca_file)
    peer = await relay_factory(
        routes=[route],
        handoff=handoff_block(token_file, ["127.0.0.1:1"]),
        limits={"max_message_size": 4096},
    )
    assert peer.app is not None
    token = (await asyncio.to_thread(token_file.read_bytes)).strip()
    data = b"Subject: big\r\n\r\n" + b"y" * (wire.max_request_bytes(4096) + 10)
    body = batch((fresh_entry("bob@dest.test", "out", data), data))
    status, _ = await signed_post(peer.app.handoff_port, token, body)
    assert status == 413
    assert queued(peer.spool_dir) == []
