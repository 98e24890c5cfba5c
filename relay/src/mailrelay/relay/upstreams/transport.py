"""The delivery side's transport interface, shared by SMTP and the HTTP providers.

A transport takes one envelope (a message and the recipients one route sends to one
upstream) and returns one `RecipientResult` per recipient. It never raises for a
delivery problem: every failure is classified into a `RecipientOutcome`, so the
delivery engine only decides what to do next (done, retry, bounce, keep queued).

Every transport first takes out the recipients it must not send to (`split_unsendable`:
an address the envelope rule of `relay/address.py` refuses fails alone, permanently,
before any command goes upstream) and words its failures as SMTP text with an enhanced
status code (`describe_error` for exceptions), never a Python exception's repr.

`Envelope` (defined in `envelope.py`, re-exported here with the other types a transport
takes) is the one envelope a transport receives: the delivery engine cuts it from the
queued message per route and upstream (`QueueEntry.envelope`).

This module imports no implementation: `smtp` and the providers import it, and
`factory.build_transport`, the factory above both, maps an upstream from the config to
its transport.
"""

from __future__ import annotations

import dataclasses
import enum
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mailrelay.relay.address import address_refusal
from mailrelay.relay.envelope import Envelope

__all__ = [
    "Envelope",
    "RecipientOutcome",
    "RecipientResult",
    "Transport",
    "all_recipients",
    "describe_error",
    "in_envelope_order",
    "split_unsendable",
]


class RecipientOutcome(enum.Enum):
    """What happened to one recipient; the engine's whole decision hangs on this."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    CONFIG_ERROR = "config_error"


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient, with the upstream's words for logs and bounces."""

    address: str
    outcome: RecipientOutcome
    detail: str
    retry_after: float | None = None
    remote_id: str | None = None
    # The SMTP reply code when there was one; bounces quote it in Diagnostic-Code.
    code: int | None = None


@runtime_checkable
class Transport(Protocol):
    """One upstream. Implementations keep their own connections or HTTP clients."""

    name: str

    async def deliver(self, envelope: Envelope, message: bytes) -> list[RecipientResult]:
        """Send `message` unchanged to every recipient of `envelope`; never raise."""
        ...

    async def close(self) -> None:
        """Release connections; the transport is not used afterwards."""
        ...


def all_recipients(
    envelope: Envelope,
    outcome: RecipientOutcome,
    detail: str,
    *,
    code: int | None = None,
    retry_after: float | None = None,
) -> list[RecipientResult]:
    """The same result for every recipient, for failures that hit the whole transaction."""
    return [
        RecipientResult(
            address=rcpt, outcome=outcome, detail=detail, code=code, retry_after=retry_after
        )
        for rcpt in envelope.recipients
    ]


def split_unsendable(envelope: Envelope) -> tuple[Envelope | None, list[RecipientResult]]:
    """The envelope cut to the recipients that may go upstream, and a permanent failure
    for each of the others (None when nothing may go: a bad sender fails every one).

    The front refuses such addresses at MAIL and RCPT; this catches what was spooled
    before it did, so one bad address never fails in the middle of a transaction.
    """
    sender = address_refusal(envelope.mail_from, smtputf8=envelope.smtputf8)
    if sender is not None:
        return None, all_recipients(
            envelope, RecipientOutcome.PERMANENT, sender.detail("sender"), code=sender.code
        )
    refused: list[RecipientResult] = []
    sendable: list[str] = []
    for rcpt in envelope.recipients:
        refusal = address_refusal(rcpt, smtputf8=envelope.smtputf8)
        if refusal is None:
            sendable.append(rcpt)
        else:
            refused.append(
                RecipientResult(
                    rcpt,
                    RecipientOutcome.PERMANENT,
                    refusal.detail("recipient"),
                    code=refusal.code,
                )
            )
    if not refused:
        return envelope, []
    if not sendable:
        return None, refused
    return dataclasses.replace(envelope, recipients=tuple(sendable)), refused


def in_envelope_order(
    envelope: Envelope, *parts: Sequence[RecipientResult]
) -> list[RecipientResult]:
    """One result per recipient of `envelope`, in its order, from results of sub-envelopes."""
    by_address = {r.address: r for part in parts for r in part}
    return [
        by_address.get(rcpt)
        or RecipientResult(
            rcpt, RecipientOutcome.TEMPORARY, "4.3.0 the transport gave no result (a bug)"
        )
        for rcpt in envelope.recipients
    ]


def describe_error(exc: BaseException) -> str:
    """A connection or protocol failure in words, for details, bounces and logs.

    Never the exception's own text: that is Python's (`[Errno 111] Connect call
    failed ('127.0.0.1', 25)`), not something a sender reading a bounce should see.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError):
            return "timed out"
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"TLS certificate did not verify ({current.verify_message})"
        if isinstance(current, ssl.SSLError):
            return "TLS failed"
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, ConnectionResetError | BrokenPipeError):
            return "connection reset"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror[:1].lower() + current.strerror[1:]
        current = current.__cause__ or current.__context__
    if isinstance(exc, ConnectionError | EOFError):
        return "connection lost"
    return "connection failed"
