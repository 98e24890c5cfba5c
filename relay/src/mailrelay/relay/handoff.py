"""Hand-off of queued mail between relays: the receiving listener and the sending side.

A relay that leaves (SIGTERM) or a drain of a spool left behind (`drain.py`) sends every
queued message to ready peers, found by resolving `handoff.peers` (A and AAAA) and
leaving out this relay's own addresses. The protocol is in `handoff_wire.py`.

Receiving (`HandoffServer`): an aiohttp listener on `handoff.listen`, separate from SMTP.
A request must carry a valid HMAC made with the shared token (401 without, 403 when wrong
or stale); its batch is queued with `Spool.adopt` (durable before the answer, one copy per
queue id), then handed to the delivery engine like mail received over SMTP, with its
attempts, per-recipient state and first arrival kept: no bounce, no restart of the retry
schedule. At most `_RECEIVE_SLOTS` batches are read at once per process.

Sending (`hand_off`): every queued message is leased (the spool's claim, so another
process never works on it meanwhile), packed into batches of at most one largest message's
worth of bytes (`_BATCH_TARGET_BYTES` usually), sent to a peer, and forgotten here only
after the peer's signed answer says it holds it (`Spool.hand_over`). A peer that fails is
skipped for the round and its batch goes to another; the name is resolved again each
round, until the queue is empty or the deadline passes. What is left stays queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import io
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from mailrelay.relay import handoff_wire as wire
from mailrelay.relay.budget import ByteBudget
from mailrelay.relay.config import HandoffConfig
from mailrelay.relay.metrics import HandoffMetrics
from mailrelay.relay.spool import MessageLease, QueueEntry, Spool, SpoolError, is_queue_id

__all__ = [
    "INSTANCE_ENV",
    "HandoffResult",
    "HandoffServer",
    "Peers",
    "hand_off",
    "instance_id",
    "local_addresses",
    "read_token",
    "resolve_peers",
]

log = logging.getLogger(__name__)

# Worker processes of one relay share the instance id of worker 0 (see `main.py`).
INSTANCE_ENV = "MAILRELAY_HANDOFF_INSTANCE"
# Batches read at once per receiving process (their bytes also count in the relay's
# in-flight budget), and sent at once per peer: small batches, several in flight, keep
# the receiver's fsyncs busy without waiting on one large batch.
_RECEIVE_SLOTS = 8
_SEND_PER_PEER = 4
_BATCH_MESSAGES = 50
_BATCH_TARGET_BYTES = 1 << 20
_REQUEST_TIMEOUT_SECONDS = 60.0
_CONNECT_TIMEOUT_SECONDS = 3.0
# A peer's body must arrive within this (a slow sender would hold a slot and budget).
_BODY_TIMEOUT_SECONDS = 60.0
# Threshold above which hashing a body goes to a thread (a few ms of CPU).
_HASH_IN_THREAD_BYTES = 1 << 20


def instance_id() -> str:
    """A relay's id for the hand-off: inherited by a worker process from worker 0 (which
    sets `INSTANCE_ENV` for it), else new. A relay never hands off to its own id."""
    return os.environ.get(INSTANCE_ENV) or secrets.token_hex(8)


def read_token(path: Path) -> bytes | None:
    """The shared token (blocking), or None if the file is missing or empty."""
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        log.error("Could not read the hand-off token file %s: %s", path, exc.strerror)
        return None
    if not token:
        log.error("The hand-off token file %s is empty", path)
        return None
    return token


async def _digest(body: bytes) -> str:
    if len(body) > _HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(wire.body_digest, body)
    return wire.body_digest(body)


# -- receiving ------------------------------------------------------------------------


class HandoffServer:
    """The listener peers hand their queue to."""

    def __init__(
        self,
        config: HandoffConfig,
        *,
        spool: Spool,
        metrics: HandoffMetrics,
        max_message_size: int,
        instance: str,
        on_stored: Callable[[QueueEntry], None] | None = None,
        reuse_port: bool = False,
        budget: ByteBudget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._budget = budget
        self._spool = spool
        self._metrics = metrics
        self._max_message_size = max_message_size
        self._instance = instance
        self._on_stored = on_stored
        self._reuse_port = reuse_port
        self._clock = clock
        self._token: bytes | None = None
        self._slots = asyncio.Semaphore(_RECEIVE_SLOTS)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.accepting = False

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._runner is not None
        for address in self._runner.addresses:
            return int(address[1])
        raise RuntimeError("the hand-off listener is not bound")

    async def start(self) -> None:
        """Read the token and open the listener."""
        self._token = await asyncio.to_thread(read_token, self._config.token_file)
        app = web.Application(client_max_size=wire.max_request_bytes(self._max_message_size))
        app.router.add_post(wire.PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host = self._config.listen.host or None  # None: every address, both families
        self._site = web.TCPSite(
            self._runner, host, self._config.listen.port, reuse_port=self._reuse_port
        )
        await self._site.start()
        self.accepting = True
        log.info("Listening for hand-offs from peers on port %d", self.port)

    async def apply(self, config: HandoffConfig, max_message_size: int) -> None:
        """Adopt a reloaded config: the token is read again (the listener stays)."""
        self._token = await asyncio.to_thread(read_token, config.token_file)
        self._config = config
        self._max_message_size = max_message_size

    async def close(self) -> None:
        """Refuse further requests and close the listener."""
        self.accepting = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _fail(self, status: int, reason: str, text: str) -> web.Response:
        self._metrics.failures.labels(reason).inc()
        return web.Response(status=status, text=text + "\n")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = self._token
        if not self.accepting or token is None:
            return web.Response(status=503, text="not accepting hand-offs\n")
        headers = request.headers
        if not headers.get("Authorization") or not headers.get(wire.H_NONCE):
            return self._fail(401, "unauthorized", "a signed request is required")
        size = request.content_length
        limit = wire.max_request_bytes(self._max_message_size)
        if size is None or size > limit:
            return self._fail(413, "bad_request", f"the body must have a length of at most {limit}")
        # The proof is checked before the body is read or memory reserved for it: only
        # a peer with the token can make this relay hold a batch.
        verdict = wire.verify_request(
            token,
            method=request.method,
            path=request.path,
            headers=_plain(headers),
            now=self._clock(),
        )
        if verdict == "missing":
            return self._fail(401, "unauthorized", "a signed request is required")
        if verdict != "ok":
            return self._fail(403, "forbidden", "the request's signature is not valid")
        async with self._slots, contextlib.AsyncExitStack() as held:
            if self._budget is not None:
                # The relay's bytes-in-flight budget, shared with the SMTP front.
                held.callback((await self._budget.reserve(size)).release)
            try:
                async with asyncio.timeout(_BODY_TIMEOUT_SECONDS):
                    body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._fail(413, "bad_request", "the body is too large")
            except TimeoutError:
                return self._fail(408, "bad_request", "the body did not arrive in time")
            if not hmac.compare_digest(await _digest(body), headers[wire.H_DIGEST]):
                return self._fail(403, "forbidden", "the body does not match its signature")
            if headers[wire.H_INSTANCE] == self._instance:
                return web.Response(status=409, text="a relay does not hand off to itself\n")
            try:
                messages = list(wire.decode_batch(body))
                for entry, _ in messages:
                    _check_entry(entry)
            except wire.WireError as exc:
                return self._fail(400, "bad_request", str(exc))
            del body
            try:
                outcomes = await self._spool.adopt(messages)
            except (OSError, SpoolError) as exc:
                log.error(
                    "Failed to queue %d message(s) handed off by a peer: %s", len(messages), exc
                )
                return self._fail(500, "store", "the spool could not store the batch")
        stored = 0
        for (entry, _), outcome in zip(messages, outcomes, strict=True):
            if outcome == "stored":
                stored += 1
                if self._on_stored is not None:
                    self._on_stored(entry)
        self._metrics.messages.labels("received").inc(stored)
        self._metrics.messages.labels("duplicate").inc(len(outcomes) - stored)
        log.info(
            "Received %d message(s) from a peer (%d already held here)",
            stored,
            len(outcomes) - stored,
        )
        answer = (
            wire.BatchResult(
                results=[
                    wire.MessageResult(queue_id=entry.queue_id, status=outcome)
                    for (entry, _), outcome in zip(messages, outcomes, strict=True)
                ]
            )
            .model_dump_json()
            .encode()
        )
        signature = wire.sign_response(token, headers[wire.H_NONCE], answer)
        return web.Response(
            body=answer,
            content_type="application/json",
            headers={wire.H_SIGNATURE: signature},
        )


def _plain(headers: Mapping[str, str]) -> dict[str, str]:
    names = ("Authorization", wire.H_TIMESTAMP, wire.H_NONCE, wire.H_INSTANCE, wire.H_DIGEST)
    return {name: headers.get(name, "") for name in names}


def _check_entry(entry: QueueEntry) -> None:
    if not is_queue_id(entry.queue_id):
        raise wire.WireError(f"queue id {entry.queue_id!r} is not a relay's queue id")
    if not entry.recipients:
        raise wire.WireError(f"message {entry.queue_id} has no recipients")


# -- finding peers --------------------------------------------------------------------


def local_addresses() -> set[str]:
    """Every address of this host's interfaces (blocking; /proc on Linux), normalised."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        last = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|--"):
                last = text[3:].strip()
            elif text == "/32 host LOCAL" and last:
                found.add(last)
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(_normal(str(info[4][0])))
    return found


def _normal(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return address


@dataclass
class Peers:
    """What resolving `handoff.peers` found: addresses, and whether the answer is
    uncertain (a temporary resolver failure: the peers may exist)."""

    addresses: list[tuple[str, int]]
    uncertain: bool = False


async def resolve_peers(config: HandoffConfig, own: Iterable[str], own_port: int) -> Peers:
    """The peers' (address, port), A and AAAA, without this relay's own listener.

    Resolved through the event loop's resolver (in its executor: never blocking the loop).
    An address of this host on our own hand-off port is ourselves. A name that does not
    exist or has no address (a headless Service without ready pods) means no peers; a
    temporary failure (EAI_AGAIN) makes the answer uncertain.
    """
    loop = asyncio.get_running_loop()
    mine = {_normal(a) for a in own}
    found = Peers([])
    for host, port in config.peer_targets():
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            found.uncertain |= isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN
            log.info("Found no peers at %s: %s", host, exc)
            continue
        for info in infos:
            address = _normal(str(info[4][0]))
            if address in mine and port == own_port:
                continue
            if (address, port) not in found.addresses:
                found.addresses.append((address, port))
    return found


# -- sending --------------------------------------------------------------------------


@dataclass
class HandoffResult:
    """What a hand-off did: messages handed off, whether peers were found at all, and
    whether the last resolution failed temporarily (peers may exist after all)."""

    handed_off: int = 0
    peers_found: bool = False
    peers_uncertain: bool = False


class _PeerFailed(Exception):
    def __init__(self, reason: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status


@dataclass
class _Round:
    """The work of one round, shared by its senders: ids not yet taken, ids kept here,
    and batches in flight (a failed one puts its ids back for the other peers)."""

    work: collections.deque[str]
    refused: set[str]
    handed_off: int = 0
    in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


async def hand_off(
    spool: Spool,
    config: HandoffConfig,
    *,
    metrics: HandoffMetrics,
    instance: str,
    deadline: float,
    max_message_size: int,
    budget: ByteBudget | None = None,
    own_addresses: Iterable[str] | None = None,
    stop_when_no_peers: bool = True,
) -> HandoffResult:
    """Hand every queued message of `spool` to peers until it is empty or the loop time
    `deadline` passes. With `stop_when_no_peers`, return as soon as a resolution finds
    for certain that there is no peer (the caller keeps the mail, or delivers it);
    otherwise, and while the resolver fails temporarily, keep trying until the deadline.
    """
    loop = asyncio.get_running_loop()
    result = HandoffResult()
    token = await asyncio.to_thread(read_token, config.token_file)
    if token is None:
        return result
    own = (
        set(own_addresses)
        if own_addresses is not None
        else await asyncio.to_thread(local_addresses)
    )
    budget = budget or ByteBudget(max(max_message_size, 16 << 20))
    batch_bytes = min(max_message_size, _BATCH_TARGET_BYTES)
    metrics.in_progress.set(1)
    refused: set[str] = set()
    timeout = aiohttp.ClientTimeout(
        total=_REQUEST_TIMEOUT_SECONDS, sock_connect=_CONNECT_TIMEOUT_SECONDS
    )
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while loop.time() < deadline:
                ids = [q for q in await asyncio.to_thread(spool.queue_ids) if q not in refused]
                if not ids:
                    break
                resolved = await resolve_peers(config, own, config.listen.port)
                peers = resolved.addresses
                result.peers_uncertain = resolved.uncertain and not peers
                if not peers:
                    metrics.failures.labels("resolve").inc()
                    if stop_when_no_peers and not resolved.uncertain:
                        break
                    await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
                    continue
                result.peers_found = True
                state = _Round(collections.deque(ids), refused)
                sender = _Sender(
                    http,
                    spool=spool,
                    token=token,
                    instance=instance,
                    metrics=metrics,
                    budget=budget,
                    batch_bytes=batch_bytes,
                )
                remaining = deadline - loop.time()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await asyncio.gather(
                            *(
                                sender.run(peer, state)
                                for peer in peers
                                for _ in range(_SEND_PER_PEER)
                            )
                        )
                result.handed_off += state.handed_off
                if state.handed_off == 0:
                    # Nothing moved (every peer failed, or every message was busy): pause
                    # before the next round rather than spin.
                    await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
    finally:
        metrics.in_progress.set(0)
    return result


class _Sender:
    """Sends batches to peers for one round of `hand_off`."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        spool: Spool,
        token: bytes,
        instance: str,
        metrics: HandoffMetrics,
        budget: ByteBudget,
        batch_bytes: int,
    ) -> None:
        self._http = http
        self._spool = spool
        self._token = token
        self._instance = instance
        self._metrics = metrics
        self._budget = budget
        self._batch_bytes = batch_bytes
        self._failed: set[tuple[str, int]] = set()

    async def run(self, peer: tuple[str, int], state: _Round) -> None:
        """Send batches to `peer` until the round's work is gone or the peer fails.

        A sender with nothing left to take waits while other batches are in flight: a
        batch whose peer fails comes back for the senders of the other peers.
        """
        while peer not in self._failed:
            if not state.work:
                if state.in_flight == 0:
                    return
                state.changed.clear()
                await state.changed.wait()
                continue
            count = min(len(state.work), _BATCH_MESSAGES)
            candidates = [state.work.popleft() for _ in range(count)]
            state.in_flight += 1
            try:
                await self._batch(peer, state, candidates)
            finally:
                state.in_flight -= 1
                state.changed.set()

    async def _batch(self, peer: tuple[str, int], state: _Round, candidates: list[str]) -> None:
        leases, unused, unreadable = await asyncio.to_thread(self._lease, candidates)
        state.work.extendleft(reversed(unused))
        state.refused.update(unreadable)
        if not leases:
            return
        try:
            size = sum(lease.entry.size for lease in leases)
            reservation = await self._budget.reserve(size)
            try:
                datas = await asyncio.to_thread(_read_all, leases)
                broken = [lease for lease, data in zip(leases, datas, strict=True) if data is None]
                if broken:
                    state.refused.update(lease.queue_id for lease in broken)
                    await _release(broken)
                    leases = [lease for lease in leases if lease not in broken]
                    if not leases:
                        return
                answer = await self._post(peer, leases, [d for d in datas if d is not None])
                del datas
            finally:
                reservation.release()
        except _PeerFailed as exc:
            self._failed.add(peer)
            self._metrics.failures.labels(exc.reason).inc()
            ids = [lease.queue_id for lease in leases]
            if exc.status == 413:
                state.refused.update(ids)  # kept here: no peer takes a message that large
            else:
                state.work.extendleft(reversed(ids))
            log.warning("Skipped peer %s for the hand-off: %s", _show(peer), exc)
            await _release(leases)
            return
        except BaseException:
            await _release(leases)
            raise
        held = {r.queue_id for r in answer.results}
        done = [lease for lease in leases if lease.queue_id in held]
        rest = [lease for lease in leases if lease.queue_id not in held]
        try:
            await asyncio.shield(self._spool.hand_over(done))
        except (OSError, SpoolError) as exc:
            # The peer holds them; here they stay queued too: delivered twice at worst.
            log.error("Failed to forget %d message(s) handed off: %s", len(done), exc)
            state.refused.update(lease.queue_id for lease in done)
            done = []
        finally:
            await _release(rest)
        state.work.extend(lease.queue_id for lease in rest)
        state.handed_off += len(done)
        self._metrics.messages.labels("sent").inc(len(done))

    def _lease(self, candidates: list[str]) -> tuple[list[MessageLease], list[str], list[str]]:
        """Claim messages for one batch (blocking): up to the batch size in bytes.

        Returns the leases, the candidates not taken (the batch was full), and those
        whose envelope cannot be read (kept here: no peer could do better).
        """
        leases: list[MessageLease] = []
        unreadable: list[str] = []
        total = 0
        for index, queue_id in enumerate(candidates):
            try:
                lease = self._spool.lease(queue_id)
            except (OSError, ValueError) as exc:
                log.error("Kept message %s: its envelope could not be read: %s", queue_id, exc)
                unreadable.append(queue_id)
                continue
            if isinstance(lease, str):
                continue  # busy (another process has it) or gone
            if leases and total + lease.entry.size > self._batch_bytes:
                claim = lease.claim
                if claim is not None:
                    claim.release()
                return leases, candidates[index:], unreadable
            leases.append(lease)
            total += lease.entry.size
        return leases, [], unreadable

    async def _post(
        self, peer: tuple[str, int], leases: list[MessageLease], datas: list[bytes]
    ) -> wire.BatchResult:
        parts: list[bytes] = []
        for lease, data in zip(leases, datas, strict=True):
            parts += wire.encode_message(lease.entry, data)
        body = b"".join(parts)
        del parts
        digest = await _digest(body)
        timestamp = f"{time.time():.3f}"
        nonce = secrets.token_hex(16)
        signature = wire.sign_request(
            self._token,
            method="POST",
            path=wire.PATH,
            timestamp=timestamp,
            nonce=nonce,
            instance=self._instance,
            digest=digest,
        )
        url = f"http://{_show(peer)}{wire.PATH}"
        headers = {
            "Authorization": signature,
            wire.H_TIMESTAMP: timestamp,
            wire.H_NONCE: nonce,
            wire.H_INSTANCE: self._instance,
            wire.H_DIGEST: digest,
            "Content-Type": "application/octet-stream",
        }
        try:
            # A file-like body: aiohttp sends it in pieces (raw bytes above 1 MiB would
            # be copied on the loop in one go) with its Content-Length.
            payload = io.BytesIO(body)
            async with self._http.post(url, data=payload, headers=headers) as response:
                answer = await response.read()
                status = response.status
                signed = response.headers.get(wire.H_SIGNATURE, "")
        except TimeoutError as exc:
            raise _PeerFailed("timeout", "no answer in time") from exc
        except aiohttp.ClientError as exc:
            raise _PeerFailed("connect", f"{type(exc).__name__}: {exc}") from exc
        if status == 409:
            raise _PeerFailed("self", "the address is this relay itself")
        if status != 200:
            text = answer[:200].decode(errors="replace").strip()
            raise _PeerFailed("refused", f"answered {status}: {text}", status)
        if not wire.verify_response(self._token, nonce, answer, signed):
            raise _PeerFailed("bad_answer", "the answer is not signed with the token")
        try:
            result = wire.BatchResult.model_validate_json(answer)
        except ValueError as exc:
            raise _PeerFailed("bad_answer", "the answer is not a batch result") from exc
        sent = {lease.queue_id for lease in leases}
        if any(r.queue_id not in sent for r in result.results):
            raise _PeerFailed("bad_answer", "the answer names messages that were not sent")
        return result


def _read_all(leases: list[MessageLease]) -> list[bytes | None]:
    """The bytes of each leased message (blocking); None for one that cannot be read."""
    out: list[bytes | None] = []
    for lease in leases:
        claim = lease.claim
        assert claim is not None  # leased from queue files
        try:
            out.append(Spool.read_claimed(claim))
        except (OSError, ValueError) as exc:
            log.error(
                "Kept message %s: it could not be read for the hand-off: %s", lease.queue_id, exc
            )
            out.append(None)
    return out


async def _release(leases: list[MessageLease]) -> None:
    for lease in leases:
        with contextlib.suppress(OSError):
            await lease.release()


def _show(peer: tuple[str, int]) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
