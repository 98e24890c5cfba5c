"""The delivery side's transport interface, shared by SMTP and the HTTP providers.

A transport takes one envelope (a message and the recipients one route sends to one
upstream) and returns one `RecipientResult` per recipient. It never raises for a
delivery problem: every failure is classified into a `RecipientOutcome`, so the
delivery engine only decides what to do next (done, retry, bounce, keep queued).

`build_transport` maps an upstream from the config to its transport class: SMTP
upstreams to `smtp_transport.SmtpTransport`, api upstreams to the HTTP provider
transports in `providers/`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mailrelay.relay.config import ApiUpstream, SmtpUpstream

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from mailrelay.relay.smtp_transport import PoolObserver

__all__ = [
    "Envelope",
    "RecipientOutcome",
    "RecipientResult",
    "Transport",
    "all_recipients",
    "build_transport",
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


@dataclass(frozen=True)
class Envelope:
    """What a transport needs besides the bytes: who from, who to, which extensions."""

    queue_id: str
    mail_from: str
    recipients: tuple[str, ...]
    smtputf8: bool
    body_8bitmime: bool


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


def build_transport(
    upstream: SmtpUpstream | ApiUpstream,
    *,
    local_hostname: str | None = None,
    observer: PoolObserver | None = None,
    registry: CollectorRegistry | None = None,
) -> Transport:
    """The transport for one configured upstream.

    `local_hostname` is our EHLO name, `observer` receives SMTP pool events, and
    `registry` is the relay's metrics registry for transports that keep their own metrics
    (the HTTP providers).
    """
    if isinstance(upstream, SmtpUpstream):
        # Imported here: smtp_transport imports this module, so a top-level import would cycle.
        from mailrelay.relay.smtp_transport import SmtpTransport  # noqa: PLC0415

        return SmtpTransport(upstream, local_hostname=local_hostname, observer=observer)
    # Imported here for the same reason: the providers import this module's types.
    from mailrelay.relay.providers import build_api_transport  # noqa: PLC0415

    return build_api_transport(upstream, registry=registry)
