"""How each upstream's authentication stands, for the operator: `GET /status/upstreams`.

The relay pods run without a Kubernetes API token, so they cannot write the MailRoute's
conditions themselves; the operator reads this document from each ready pod instead (by
pod IP, on the metrics port) and turns it into the route's `UpstreamAuthenticated`
condition (docs/oauth2.md, "Status for the operator").

Shape:

- `AuthTracker` (one per SMTP upstream, held by its connection pool) remembers the last
  outcome of logging in: `ok`, `token_failed` (no OAuth2 token: the token endpoint refused
  or could not be reached), `auth_refused` (the upstream refused our AUTH) or
  `config_error` (the upstream cannot be used as configured: no AUTH, no STARTTLS, a
  credential file that cannot be read), since when (wall clock, set only when the state
  changes), a short reason in our words and the provider's error code (the OAuth2 `error`
  of RFC 6749 5.2, or the `status` of an RFC 7628 error challenge, or the SMTP reply
  code).
- `status_document` (pure) builds the JSON document from the trackers' snapshots: every
  text cleaned to printable ASCII, cut to a bound and passed through the redactor (so a
  token or secret that reached a reason anyway is replaced), at most `MAX_UPSTREAMS`
  entries. `UpstreamStatusDocument` is the pydantic model of that document; the operator
  parses what it fetches with the same model.

An upstream that was never used since the relay started (or since a config change
replaced its transport) has no entry: nothing is known about it yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from mailrelay.relay.redact import SECRETS, Redactor

__all__ = [
    "MAX_UPSTREAMS",
    "STATUS_PATH",
    "AuthState",
    "AuthTracker",
    "ReportsAuth",
    "UpstreamAuth",
    "UpstreamStatusDocument",
    "status_document",
]

STATUS_PATH = "/status/upstreams"
# A relay has one upstream per route and fallback; the document stays small whatever the
# config holds (the operator reads it often, from every pod).
MAX_UPSTREAMS = 1024
MAX_REASON = 300
MAX_ERROR = 64

AuthState = Literal["ok", "token_failed", "auth_refused", "config_error"]


def _clean(value: str, limit: int, redactor: Redactor) -> str:
    """Printable ASCII on one line, redacted, at most `limit` characters."""
    text = "".join(ch if " " <= ch <= "~" else " " for ch in value)
    text = redactor(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UpstreamAuth(BaseModel):
    """One upstream's authentication state."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: AuthState
    since: datetime = Field(description="When the upstream entered this state (UTC).")
    reason: str = Field(default="", max_length=MAX_REASON)
    error: str | None = Field(
        default=None,
        max_length=MAX_ERROR,
        description="The provider's error code: OAuth2 `error`, RFC 7628 `status`, SMTP code.",
    )


class UpstreamStatusDocument(BaseModel):
    """What `GET /status/upstreams` answers."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Literal[1] = 1
    upstreams: dict[str, UpstreamAuth] = Field(default_factory=dict, max_length=MAX_UPSTREAMS)


class AuthTracker:
    """The last login outcome of one upstream; `since` moves only when the state changes."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._current: UpstreamAuth | None = None

    def record(self, state: AuthState, reason: str = "", error: str | None = None) -> None:
        """Remember an outcome (texts are cleaned when the document is built)."""
        current = self._current
        if current is not None and current.state == state:
            since = current.since
        else:
            since = datetime.fromtimestamp(self._clock(), UTC)
        # Bounded here too: a provider's text can be long, and the snapshot is kept.
        self._current = UpstreamAuth.model_construct(
            state=state, since=since, reason=reason[: MAX_REASON * 4], error=error
        )

    def snapshot(self) -> UpstreamAuth | None:
        """The last outcome, or None when the upstream has not logged in yet."""
        return self._current


@runtime_checkable
class ReportsAuth(Protocol):
    """A transport that tracks its upstream's authentication (SMTP with credentials)."""

    def auth_status(self) -> UpstreamAuth | None:
        """The last login outcome, or None."""
        ...


def status_document(
    snapshots: Mapping[str, UpstreamAuth | None], redactor: Redactor = SECRETS
) -> UpstreamStatusDocument:
    """The document for these upstreams' snapshots: cleaned, redacted, bounded."""
    upstreams: dict[str, UpstreamAuth] = {}
    for name in sorted(snapshots)[:MAX_UPSTREAMS]:
        snapshot = snapshots[name]
        if snapshot is None:
            continue
        error = snapshot.error
        upstreams[name] = UpstreamAuth(
            state=snapshot.state,
            since=snapshot.since,
            reason=_clean(snapshot.reason, MAX_REASON, redactor),
            error=(_clean(error, MAX_ERROR, redactor) or None) if error is not None else None,
        )
    return UpstreamStatusDocument(upstreams=upstreams)
