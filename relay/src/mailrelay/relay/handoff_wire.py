"""The hand-off protocol between relays, as pure functions (no I/O).

One request hands a batch of queued messages to a peer::

    POST /v1/handoff/messages
    X-Mailrelay-Timestamp: <unix seconds>
    X-Mailrelay-Nonce: <32 hex>
    X-Mailrelay-Instance: <sender's instance id>
    X-Mailrelay-Body-Sha256: <hex SHA-256 of the body>
    Authorization: MAILRELAY-HMAC-SHA256 <hex>
    <body: per message its queue-file header line (the `QueueEntry` JSON, with the
     current per-recipient state), a newline, then exactly `size` message bytes>

The signature is HMAC-SHA256, keyed with the shared token, over the method, path,
timestamp, nonce, instance and the SHA-256 of the body (also sent as a header, so the
receiver checks the proof before it reads, or reserves memory for, a body; then that
the body matches): the token never crosses the wire, a body cannot be swapped under a
signature, and a request older or newer than `MAX_SKEW_SECONDS` is refused. A replay
inside that window is harmless: the queue id is the message's identity and a peer that
holds it keeps one copy.

The answer (JSON `BatchResult`) is signed the same way over the request's nonce and the
answer's body, so only a peer that knows the token can make a sender drop its copy.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict

from mailrelay.relay.spool import QueueEntry, encode_header

__all__ = [
    "AUTH_SCHEME",
    "ENVELOPE_ALLOWANCE",
    "H_DIGEST",
    "H_INSTANCE",
    "H_NONCE",
    "H_SIGNATURE",
    "H_TIMESTAMP",
    "MAX_BATCH_MESSAGES",
    "MAX_SKEW_SECONDS",
    "PATH",
    "BatchResult",
    "MessageResult",
    "WireError",
    "body_digest",
    "decode_batch",
    "encode_message",
    "max_request_bytes",
    "sign_request",
    "sign_response",
    "verify_request",
    "verify_response",
]

PATH = "/v1/handoff/messages"
AUTH_SCHEME = "MAILRELAY-HMAC-SHA256"
H_TIMESTAMP = "X-Mailrelay-Timestamp"
H_NONCE = "X-Mailrelay-Nonce"
H_INSTANCE = "X-Mailrelay-Instance"
H_DIGEST = "X-Mailrelay-Body-Sha256"
H_SIGNATURE = "X-Mailrelay-Signature"  # on the answer
MAX_SKEW_SECONDS = 120.0
# Room for the envelope lines of a batch beyond the message bytes: recipients, their
# state and last errors. A batch never holds more message bytes than one largest message.
ENVELOPE_ALLOWANCE = 1 << 20
MAX_BATCH_MESSAGES = 200


class WireError(ValueError):
    """A request or answer that does not follow the protocol."""


class MessageResult(BaseModel):
    """What the peer did with one message of the batch."""

    model_config = ConfigDict(extra="ignore")

    queue_id: str
    status: Literal["stored", "duplicate"]


class BatchResult(BaseModel):
    """The peer's answer: one result per message, in the order sent."""

    model_config = ConfigDict(extra="ignore")

    results: list[MessageResult]


def max_request_bytes(max_message_size: int) -> int:
    """The largest request body a relay with this message size limit accepts."""
    return max_message_size + ENVELOPE_ALLOWANCE


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _mac(token: bytes, *parts: str) -> str:
    return hmac.new(token, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def sign_request(
    token: bytes, *, method: str, path: str, timestamp: str, nonce: str, instance: str, digest: str
) -> str:
    """The Authorization header value of a request."""
    return f"{AUTH_SCHEME} {_mac(token, 'req', method, path, timestamp, nonce, instance, digest)}"


def verify_request(
    token: bytes,
    *,
    method: str,
    path: str,
    headers: dict[str, str],
    now: float,
) -> Literal["ok", "missing", "stale", "bad"]:
    """Check a request's proof from its headers alone (the body is checked against
    `H_DIGEST` once read): "missing" (no or malformed headers), "stale" (timestamp
    outside the window), "bad" (wrong signature), or "ok"."""
    auth = headers.get("Authorization", "")
    timestamp = headers.get(H_TIMESTAMP, "")
    nonce = headers.get(H_NONCE, "")
    instance = headers.get(H_INSTANCE, "")
    digest = headers.get(H_DIGEST, "")
    scheme, _, given = auth.partition(" ")
    if not (scheme == AUTH_SCHEME and given and timestamp and nonce and instance and digest):
        return "missing"
    try:
        sent = float(timestamp)
    except ValueError:
        return "missing"
    if not abs(now - sent) <= MAX_SKEW_SECONDS:  # also refuses nan
        return "stale"
    expected = sign_request(
        token,
        method=method,
        path=path,
        timestamp=timestamp,
        nonce=nonce,
        instance=instance,
        digest=digest,
    )
    if not hmac.compare_digest(f"{scheme} {given}", expected):
        return "bad"
    return "ok"


def sign_response(token: bytes, nonce: str, body: bytes) -> str:
    return _mac(token, "resp", nonce, body_digest(body))


def verify_response(token: bytes, nonce: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign_response(token, nonce, body), signature)


def encode_message(entry: QueueEntry, data: bytes) -> list[bytes]:
    """One message of a batch: its header line and its bytes."""
    if len(data) != entry.size:
        raise WireError(
            f"message {entry.queue_id} holds {len(data)} bytes, its header says {entry.size}"
        )
    return [encode_header(entry), data]


def decode_batch(body: bytes) -> Iterator[tuple[QueueEntry, bytes]]:
    """The messages of a request body, in order; WireError on anything malformed."""
    view = memoryview(body)
    offset = 0
    count = 0
    while offset < len(body):
        end = body.find(b"\n", offset)
        if end < 0:
            raise WireError("a message header line is not terminated")
        try:
            entry = QueueEntry.model_validate_json(body[offset:end])
        except ValueError as exc:
            raise WireError(f"a message header is not a valid envelope: {exc}") from None
        start = end + 1
        if entry.size < 0 or start + entry.size > len(body):
            raise WireError(f"message {entry.queue_id} is shorter than its size")
        count += 1
        if count > MAX_BATCH_MESSAGES:
            raise WireError(f"more than {MAX_BATCH_MESSAGES} messages in one request")
        yield entry, bytes(view[start : start + entry.size])
        offset = start + entry.size
