"""The delivery engine's DKIM signers: keys loaded per route, messages signed off the loop.

``RouteSigners.load(config)`` (blocking: it reads key files; run it in a thread) parses each
route's keys once per config load or reload. A key that cannot be read or parsed does not
make the route send unsigned: ``sign`` answers ``CONFIG_ERROR`` (kept queued, never
expired, like a missing credential) until a reload brings a good key. A message dkimpy
refuses (no From header) is a permanent failure: it was meant to be signed and cannot be.

Signing is CPU work that holds the GIL (dkimpy canonicalises with regular expressions and
does RSA in pure Python: tens of ms for a small message, seconds for a large one), so a
worker thread would still stall the event loop (bench/dkim_sign.py measured it). ``sign``
runs ``dkim.sign_message`` in ``SigningPool``: a small pool of worker processes (spawned,
not forked, on first use; ``SIGNING_PROCESSES``), which takes the message and the key and
returns the signed bytes. A worker that dies is replaced and the message stays queued.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from mailrelay.relay import dkim
from mailrelay.relay.config import RelayConfig
from mailrelay.relay.upstreams.transport import RecipientOutcome

log = logging.getLogger(__name__)

__all__ = ["SIGNING_PROCESSES", "RouteSigners", "SignFailure", "SigningPool"]

# Worker processes per relay process: signing in parallel with delivery, within the 1-2
# cores a relay pod usually has.
SIGNING_PROCESSES = 2


class SigningPool:
    """Worker processes that sign, so signing never runs on (or stalls) the event loop."""

    def __init__(self, processes: int = SIGNING_PROCESSES) -> None:
        self._processes = processes
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self._processes, mp_context=multiprocessing.get_context("spawn")
            )
        return self._executor

    async def sign(self, message: bytes, signer: dkim.Signer) -> bytes:
        """``dkim.sign_message`` in a worker process (SigningError passes through)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool(), dkim.sign_message, message, signer)
        except BrokenProcessPool:
            broken, self._executor = self._executor, None
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            raise

    async def close(self) -> None:
        """Stop the workers (waits for signing in progress)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)


@dataclass(frozen=True)
class SignFailure:
    """Why a message could not be signed, and what that means for its recipients."""

    outcome: RecipientOutcome  # CONFIG_ERROR (ours to fix) or PERMANENT (the message)
    detail: str
    label: str  # the metric's result label


@dataclass(frozen=True)
class RouteSigners:
    """Each signing route's signers, or the problem that keeps it from signing."""

    signers: Mapping[str, tuple[dkim.Signer, ...]] = field(default_factory=dict)
    problems: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, config: RelayConfig) -> RouteSigners:
        """Read and parse every route's keys (blocking file reads)."""
        signers: dict[str, tuple[dkim.Signer, ...]] = {}
        problems: dict[str, str] = {}
        for route in config.routes:
            loaded: list[dkim.Signer] = []
            for signing in route.dkim:
                try:
                    key = dkim.parse_private_key(signing.private_key_file.read_bytes())
                except OSError as error:
                    problems[route.name] = (
                        f"4.3.5 DKIM key for {signing.domain} (selector {signing.selector}) "
                        f"cannot be read: {error.strerror}"
                    )
                    break
                except dkim.KeyProblem as problem:
                    problems[route.name] = (
                        f"4.3.5 DKIM key for {signing.domain} (selector {signing.selector}) "
                        f"{problem}"
                    )
                    break
                loaded.append(
                    dkim.Signer(
                        signing.domain,
                        signing.selector,
                        key,
                        None if signing.headers is None else tuple(signing.headers),
                        signing.canonicalization,
                    )
                )
            else:
                if loaded:
                    signers[route.name] = tuple(loaded)
                continue
            log.error(
                "Held the mail of route %s: %s (it stays queued until a reload brings a good key)",
                route.name,
                problems[route.name],
            )
        return cls(signers, problems)

    async def sign(
        self, route: str, mail_from: str, message: bytes, pool: SigningPool
    ) -> bytes | SignFailure:
        """The signed message for ``route``, or why it cannot be signed."""
        problem = self.problems.get(route)
        if problem is not None:
            return SignFailure(RecipientOutcome.CONFIG_ERROR, problem, "key_error")
        signers = self.signers.get(route)
        if not signers:
            return SignFailure(
                RecipientOutcome.CONFIG_ERROR,
                f"4.3.5 route {route!r} signs with DKIM but has no key loaded",
                "key_error",
            )
        signer = dkim.signer_for(message, mail_from, signers)
        try:
            return await pool.sign(message, signer)
        except BrokenProcessPool:
            log.error("A DKIM signing process died; the message stays queued")
            return SignFailure(
                RecipientOutcome.TEMPORARY, "4.3.0 the DKIM signing process failed", "error"
            )
        except dkim.SigningError as error:
            return SignFailure(
                RecipientOutcome.PERMANENT,
                f"5.6.0 the message cannot be DKIM-signed: {error}",
                "message_error",
            )
