"""What every HTTP provider transport shares: client, limits, credentials, error classes.

`ApiTransport` implements the relay's `Transport` protocol once. A provider subclass only
says where its API lives (`default_base_url`), turns one envelope and message into HTTP
requests (`prepare`, one `Call` per batch of recipients) and, where its API has its own
error vocabulary, refines `classify_error`. The base class owns the rest:

- one long-lived `ApiClient` (`http`) per upstream endpoint, explicit connect and read
  timeouts, and a semaphore so at most `concurrency` requests are in flight;
- the provider's size limit, checked before anything is sent;
- one error classification for all providers (`classify_status`): network errors,
  timeouts, 429 and 5xx are temporary; 400/413/422 permanent; 401/403/404 a configuration
  problem that keeps the mail queued, logs loudly and sets a metric;
- a throttle: a 429 (or SparkPost's 420) pauses the whole upstream until the provider's
  `Retry-After` or rate-limit reset, so queued mail is deferred without calling the API;
- credentials from files in a mounted Secret, re-read when the files change;
- `idempotency_key`, one stable key per message and batch of recipients, sent in the
  provider's `idempotency_header` where its API takes one (Resend; the webhook), so the
  retry after a lost answer is the same request and is sent once;
- where the API takes no key, a retry after an outcome-unknown failure (a timeout or a
  connection lost once the request may have been read) is counted as ambiguous
  (`mailrelay_upstream_ambiguous_retries_total`): it may reach the recipients twice;
- a 2xx whose body is not the provider's documented success answer (`answer_problem`)
  is logged and counted; it is delivery where the provider did accept, and an unknown
  outcome (retried) where a retry is safe or the answer must be read (`unexpected_answer`).

`deliver` never raises: whatever happens becomes one `RecipientResult` per recipient.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mailrelay.relay.config import ApiUpstream
from mailrelay.relay.redact import SECRETS
from mailrelay.relay.upstreams.providers.http import (
    ApiClient,
    ApiConfigError,
    ApiRequest,
    ApiResponse,
    ApiTimeout,
    ApiUnreachable,
    BlockedDestination,
)
from mailrelay.relay.upstreams.providers.limits import PROVIDER_LIMITS, ProviderLimits
from mailrelay.relay.upstreams.providers.mime import UnrepresentableMessage, ascii_address
from mailrelay.relay.upstreams.transport import (
    Envelope,
    RecipientOutcome,
    RecipientResult,
    in_envelope_order,
    split_unsendable,
)

__all__ = [
    "AmbiguousSends",
    "ApiTransport",
    "Call",
    "CredentialError",
    "CredentialStore",
    "ProviderMetrics",
    "Verdict",
    "classify_status",
    "error_text",
    "idempotency_key",
    "provider_metrics",
    "retry_after_seconds",
]

log = logging.getLogger(__name__)

# A 429 without any hint still pauses the upstream, briefly; a hint is never trusted past
# an hour, so a bogus reset header cannot park the upstream for days.
DEFAULT_THROTTLE_SECONDS = 10.0
MAX_THROTTLE_SECONDS = 3600.0
_DETAIL_LIMIT = 300
# Messages above this size are converted, encoded and signed in a worker thread.
OFFLOAD_BYTES = 256 * 1024


class CredentialError(Exception):
    """A credential file is missing or empty: our configuration, never the sender's fault."""


@dataclass
class _CachedFile:
    signature: tuple[int, int, int]
    value: str
    checked_at: float


class CredentialStore:
    """Secret files of one upstream, re-read when they change (a Secret update swaps them).

    Files are stat'ed at most every `check_interval` seconds, in a worker thread; an
    authentication failure calls `invalidate` so the next attempt looks again at once.
    """

    def __init__(
        self,
        directory: Path | None,
        *,
        upstream: str,
        check_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._upstream = upstream
        self._check_interval = check_interval
        self._clock = clock
        self._cache: dict[str, _CachedFile] = {}

    def invalidate(self) -> None:
        """Forget when files were last checked; the next `get` stats them again."""
        for cached in self._cache.values():
            cached.checked_at = float("-inf")

    async def get(self, name: str) -> str:
        """The file's content without surrounding whitespace, or CredentialError."""
        value = await self.get_optional(name)
        if value is None:
            where = self._directory if self._directory is not None else "(no credentials_dir)"
            raise CredentialError(
                f"upstream {self._upstream!r}: credential file {name!r} is missing in {where}; "
                "mount the provider's Secret there (see docs/providers.md)"
            )
        return value

    async def get_optional(self, name: str) -> str | None:
        """The file's content, or None when the directory or the file does not exist."""
        if self._directory is None:
            return None
        now = self._clock()
        cached = self._cache.get(name)
        if cached is not None and now - cached.checked_at < self._check_interval:
            return cached.value
        path = self._directory / name
        previous = cached.signature if cached is not None else None
        loaded = await asyncio.to_thread(_load_if_changed, path, previous)
        if loaded is None:
            self._cache.pop(name, None)
            return None
        signature, value = loaded
        if value is None:
            assert cached is not None
            cached.checked_at = now
            return cached.value
        if cached is not None:
            log.info("Reloaded credential %s of upstream %s", name, self._upstream)
        if not value:
            raise CredentialError(f"upstream {self._upstream!r}: credential file {path} is empty")
        SECRETS.add(value)
        self._cache[name] = _CachedFile(signature=signature, value=value, checked_at=now)
        return value


def _load_if_changed(
    path: Path, previous: tuple[int, int, int] | None
) -> tuple[tuple[int, int, int], str | None] | None:
    """(signature, new content or None if unchanged), or None if the file is gone."""
    try:
        st = os.stat(path)
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == previous:
            return signature, None
        return signature, path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"cannot read credential file {path}: {exc}") from exc


@dataclass(frozen=True)
class Verdict:
    """How one failed API answer is treated; `throttle` pauses the whole upstream."""

    outcome: RecipientOutcome
    detail: str
    retry_after: float | None = None
    throttle: bool = False


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds until the provider wants us back: `Retry-After`, else a rate-limit reset.

    Reset headers differ by provider: seconds to wait (Resend's `ratelimit-reset`), or a
    unix time in seconds or milliseconds (SendGrid's and Mailgun's `X-RateLimit-Reset`);
    the size of the number tells which.
    """
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    for name in ("ratelimit-reset", "x-ratelimit-reset", "x-rate-limit-reset"):
        raw = headers.get(name)
        if not raw:
            continue
        try:
            number = float(raw)
        except ValueError:
            continue
        if number > 1e12:
            return max(0.0, number / 1000 - now)
        if number > 1e9:
            return max(0.0, number - now)
        return max(0.0, number)
    return None


def idempotency_key(queue_id: str, recipients: Sequence[str]) -> str:
    """Stable for one message and one set of recipients, whatever the attempt.

    Sent as `Idempotency-Key` (Resend, webhook), so the retry after a timeout (the
    request may have been sent) is the same request with the same key. A message split
    over several requests gets one key per batch; letter case and order of the
    recipients do not matter. At most 92 ASCII characters (Resend allows 256).
    """
    digest = hashlib.sha256("\n".join(sorted(r.lower() for r in recipients)).encode()).hexdigest()
    return f"mailrelay/{queue_id}/{digest[:24]}"


def error_text(response: ApiResponse) -> str:
    """A short human reason from an error body: the provider's message, else the raw text."""
    text = response.text.strip()
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "Message", "error"):
            if isinstance(body.get(key), str):
                return str(body[key])[:_DETAIL_LIMIT]
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            messages = [
                str(e.get("message") or e.get("description") or e) if isinstance(e, dict) else e
                for e in errors
            ]
            return "; ".join(str(m) for m in messages)[:_DETAIL_LIMIT]
    return text[:_DETAIL_LIMIT] or response.reason_phrase


def classify_status(status: int, headers: Mapping[str, str], detail: str, *, now: float) -> Verdict:
    """The shared classification of a non-2xx HTTP status."""
    reason = f"HTTP {status}: {detail}"
    if status in (420, 429):
        return Verdict(
            RecipientOutcome.TEMPORARY,
            f"rate limited by the provider ({reason})",
            retry_after_seconds(headers, now),
            throttle=True,
        )
    if status in {408, 409} or status >= 500:
        return Verdict(RecipientOutcome.TEMPORARY, reason, retry_after_seconds(headers, now))
    if status in (401, 403):
        return Verdict(
            RecipientOutcome.CONFIG_ERROR,
            f"the provider refused our credentials ({reason}); check the upstream's Secret",
        )
    if status in (400, 413, 422):
        return Verdict(RecipientOutcome.PERMANENT, f"the provider rejected the message ({reason})")
    # 3xx, 404, 405, 415 ...: a wrong endpoint, region or domain. Our mistake: keep the mail.
    return Verdict(
        RecipientOutcome.CONFIG_ERROR,
        f"unexpected answer from the provider ({reason}); check endpoint, region and domain",
    )


class AmbiguousSends:
    """Recipients whose last request went out through an API without an idempotency key
    and ended with an unknown outcome; the next request for one of them is an ambiguous
    retry.

    Bounded (the oldest entries go first): a message that never comes back (delivered
    by a fallback later counted, expired, deleted) must not grow it for ever.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._pending: OrderedDict[tuple[str, str], None] = OrderedDict()

    def remember(self, queue_id: str, recipients: Sequence[str]) -> None:
        """The request for these recipients may have been acted on; nobody knows."""
        for rcpt in recipients:
            self._pending[(queue_id, rcpt.lower())] = None
            self._pending.move_to_end((queue_id, rcpt.lower()))
        while len(self._pending) > self._limit:
            self._pending.popitem(last=False)

    def take(self, queue_id: str, recipients: Sequence[str]) -> bool:
        """Whether any of these recipients had an unknown outcome last time (forgotten now)."""
        found = False
        for rcpt in recipients:
            if self._pending.pop((queue_id, rcpt.lower()), False) is None:
                found = True
        return found

    def __len__(self) -> int:
        return len(self._pending)


class ProviderMetrics:
    """Metrics of all API upstreams, on the registry the relay passes in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["upstream", "provider"]
        # Shared by every transport of the registry, so a retry through a transport
        # rebuilt on reload, or through another API upstream, still counts.
        self.ambiguous = AmbiguousSends()
        self.ambiguous_retries = Counter(
            "mailrelay_upstream_ambiguous_retries_total",
            "Requests that retried recipients whose previous request through an API without "
            "an idempotency key had an unknown outcome (timeout or connection lost after "
            "the request was sent): those recipients may get the message twice. "
            "upstream_kind is the provider of the retrying upstream.",
            ["upstream_kind"],
            registry=registry,
        )
        self.unexpected_answers = Counter(
            "mailrelay_provider_unexpected_answers_total",
            "2xx answers whose body was not the provider's documented success answer.",
            labels,
            registry=registry,
        )
        self.requests = Counter(
            "mailrelay_provider_requests_total",
            "Provider API requests by result (delivered, temporary, permanent, config_error).",
            [*labels, "result"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "mailrelay_provider_request_seconds",
            "Time from sending an API request to its answer.",
            labels,
            registry=registry,
        )
        self.config_error = Gauge(
            "mailrelay_provider_config_error",
            "1 while the upstream's last answer was a configuration problem (credentials, "
            "account suspended or paused, wrong endpoint); mail stays queued meanwhile.",
            labels,
            registry=registry,
        )
        self.throttled = Counter(
            "mailrelay_provider_throttled_total",
            "Times a provider rate-limited us and the upstream was paused.",
            labels,
            registry=registry,
        )


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ProviderMetrics] = (
    weakref.WeakKeyDictionary()
)


def provider_metrics(registry: CollectorRegistry) -> ProviderMetrics:
    """The one ProviderMetrics of a registry; transports rebuilt on reload share it."""
    metrics = _METRICS.get(registry)
    if metrics is None:
        metrics = _METRICS[registry] = ProviderMetrics(registry)
    return metrics


@dataclass(frozen=True)
class Call:
    """One API request and the recipients its answer speaks for."""

    recipients: tuple[str, ...]
    request: ApiRequest


# A permanently refused request for at most this many recipients is retried one
# recipient per request, so one address the provider refuses does not bounce the rest.
SPLIT_REFUSED_UP_TO = 50


def json_object(response: ApiResponse) -> dict[str, object] | None:
    """The answer's body as a JSON object, or None when it is not one."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class ApiTransport:
    """The shared half of every provider transport; subclasses fill in the API."""

    provider: ClassVar[str]
    # The message goes out as its bytes, recipients beside it (not rebuilt from headers),
    # so a request per recipient delivers the same message: see `_split_refused`.
    sends_raw_message: ClassVar[bool] = False
    # The request header that carries `idempotency_key` where the provider's API takes
    # one (a retry with the same key is answered without sending again); None where the
    # API has no such key, and a retry after an unknown outcome may send twice.
    idempotency_header: ClassVar[str | None] = None
    # How a 2xx that is not the documented success answer is taken: as delivery (the
    # provider said yes, and a retry would send twice) or as an unknown outcome to retry
    # (where the key makes a retry safe, or the answer's content decides the outcome).
    unexpected_answer: ClassVar[RecipientOutcome] = RecipientOutcome.DELIVERED

    def __init__(
        self,
        upstream: ApiUpstream,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = upstream.name
        self.upstream = upstream
        self.limits: ProviderLimits = PROVIDER_LIMITS[self.provider]
        self._clock = clock
        self._wall_clock = wall_clock
        self._metrics = provider_metrics(registry) if registry is not None else None
        self._labels = {"upstream": upstream.name, "provider": self.provider}
        self.credentials = CredentialStore(
            upstream.credentials_dir, upstream=upstream.name, clock=clock
        )
        self._semaphore = asyncio.Semaphore(upstream.concurrency)
        self._paused_until = float("-inf")
        self.base_url = (upstream.endpoint or self.default_base_url()).rstrip("/")
        self.client = ApiClient(
            concurrency=upstream.concurrency,
            connect_timeout=upstream.connect_timeout_seconds,
            timeout=upstream.timeout_seconds,
            ca_file=upstream.ca_file,
            allow_local=upstream.insecure_allow_local_endpoint,
        )

    # --- what a provider supplies ------------------------------------------------------

    def default_base_url(self) -> str:
        """The API's base URL when `endpoint` does not override it."""
        raise NotImplementedError

    async def prepare(self, envelope: Envelope, message: bytes) -> list[Call]:
        """The requests that send `message` to every envelope recipient."""
        key = await self.load_secret()
        return await self.offload(len(message), self.build, envelope, message, key)

    async def load_secret(self) -> str:
        """The provider's API key (the credential file `api_key`)."""
        return await self.credentials.get("api_key")

    def build(self, envelope: Envelope, message: bytes, key: str) -> list[Call]:
        """The requests for one message, given the key; CPU work only, no awaiting."""
        raise NotImplementedError

    async def offload(self, size: int, fn: Callable[..., list[Call]], *args: object) -> list[Call]:
        """Run `fn` in a worker thread for big messages: parsing, base64, JSON and hashing
        tens of megabytes would stall every SMTP session on the loop."""
        if size > OFFLOAD_BYTES:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def classify_error(self, response: ApiResponse) -> Verdict:
        """A non-2xx answer; providers with richer error bodies refine this."""
        return classify_status(
            response.status_code, response.headers, error_text(response), now=self._wall_clock()
        )

    def accepted(self, call: Call, response: ApiResponse) -> list[RecipientResult]:
        """A 2xx answer: every recipient of the call delivered, with the provider's id."""
        remote_id = self.remote_id(response)
        return [
            RecipientResult(
                address=rcpt,
                outcome=RecipientOutcome.DELIVERED,
                detail=f"accepted by {self.provider} as {remote_id} (HTTP {response.status_code})",
                remote_id=remote_id,
            )
            for rcpt in call.recipients
        ]

    # The field of the success answer's JSON object holding the provider's message id;
    # None when the answer carries none (or a provider overrides `remote_id`).
    remote_id_field: ClassVar[str | None] = None

    def answer_problem(self, response: ApiResponse) -> str | None:
        """How a 2xx answer differs from the provider's documented success answer, or None.

        By default the documented answer is a JSON object with a non-empty
        `remote_id_field`; providers with another shape override this.
        """
        if self.remote_id_field is None:
            return None
        body = json_object(response)
        if body is None:
            return "the body is not a JSON object"
        if not body.get(self.remote_id_field):
            return f"it has no {self.remote_id_field!r}"
        return None

    def key_headers(self, queue_id: str, recipients: Sequence[str]) -> dict[str, str]:
        """The idempotency header for one request, where the provider takes one."""
        if self.idempotency_header is None:
            return {}
        return {self.idempotency_header: idempotency_key(queue_id, recipients)}

    def remote_id(self, response: ApiResponse) -> str | None:
        """The provider's message id from a success answer (``remote_id_field``)."""
        if self.remote_id_field is None:
            return None
        body = json_object(response)
        value = body.get(self.remote_id_field) if body is not None else None
        return str(value) if value else None

    # --- helpers for providers ---------------------------------------------------------

    def check_request_size(self, body: bytes) -> None:
        """Providers that count the encoded request (base64 inflates by a third) call this."""
        limit = self.limits.max_message_size
        if limit is not None and len(body) > limit:
            raise UnrepresentableMessage(
                f"the {self.provider} request would be {len(body)} bytes after encoding; "
                f"the provider accepts at most {limit}"
            )

    def api_request(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> ApiRequest:
        """A request to `path` under the upstream's base URL (or to `path` itself when it is
        a whole URL)."""
        url = path if path.startswith(("https://", "http://")) else self.base_url + path
        return ApiRequest(method, url, headers, body)

    def json_request(
        self, path: str, payload: object, headers: Mapping[str, str], *, check_size: bool = True
    ) -> ApiRequest:
        """A POST of compact UTF-8 JSON, refused here if it exceeds the provider's limit."""
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if check_size:
            self.check_request_size(body)
        return self.api_request(
            "POST",
            path,
            body,
            {"Content-Type": "application/json", "Accept": "application/json", **headers},
        )

    def api_addresses(self, addresses: Sequence[str]) -> list[str]:
        """Envelope addresses as the provider accepts them (IDNA domains, ASCII mailboxes)."""
        if self.limits.smtputf8:
            return list(addresses)
        return [ascii_address(a) for a in addresses]

    def batches(self, recipients: Sequence[str]) -> list[tuple[str, ...]]:
        """Recipients cut to the provider's per-request maximum, in order."""
        size = self.limits.max_recipients or len(recipients) or 1
        return [tuple(recipients[i : i + size]) for i in range(0, len(recipients), size)]

    # --- the Transport protocol --------------------------------------------------------

    async def deliver(self, envelope: Envelope, message: bytes) -> list[RecipientResult]:
        """Send to every recipient; every failure becomes a classified result.

        A recipient whose address cannot be sent (the envelope rule, or a non-ASCII
        mailbox name for a provider without SMTPUTF8) fails alone; the others go out.
        """
        sendable, refused = split_unsendable(envelope)
        if sendable is not None and not self.limits.smtputf8:
            sendable, not_ascii = self._split_non_ascii(sendable)
            refused += not_ascii
        if sendable is None:
            return in_envelope_order(envelope, refused)
        try:
            results = _one_per_recipient(sendable, await self._deliver(sendable, message))
        except Exception:
            # A bug of ours must not bounce mail: keep it queued and make it visible.
            log.exception(
                "Failed to deliver message %s through upstream %s: internal error",
                envelope.queue_id,
                self.name,
            )
            results = self._all(
                sendable.recipients,
                RecipientOutcome.TEMPORARY,
                f"4.3.0 internal error in the {self.provider} transport (see the relay log)",
            )
        return in_envelope_order(envelope, results, refused) if refused else results

    def _split_non_ascii(self, envelope: Envelope) -> tuple[Envelope | None, list[RecipientResult]]:
        """Recipients this provider cannot address (non-ASCII mailbox names, domains that
        are not valid IDNA) fail alone; None when none is left."""
        refused = []
        for rcpt in envelope.recipients:
            try:
                ascii_address(rcpt)
            except UnrepresentableMessage:
                reason = (
                    "5.6.7 non-ASCII mailbox names (SMTPUTF8) are not accepted by "
                    if not rcpt.rpartition("@")[0].isascii()
                    else "5.1.2 the domain is not valid IDNA, as required by "
                )
                refused.append(
                    RecipientResult(rcpt, RecipientOutcome.PERMANENT, reason + self.provider)
                )
        if not refused:
            return envelope, []
        failed = {r.address for r in refused}
        rest = tuple(r for r in envelope.recipients if r not in failed)
        return (dataclasses.replace(envelope, recipients=rest) if rest else None), refused

    async def close(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self.client.close()

    def _all(
        self,
        recipients: Sequence[str],
        outcome: RecipientOutcome,
        detail: str,
        retry_after: float | None = None,
    ) -> list[RecipientResult]:
        return [
            RecipientResult(address=r, outcome=outcome, detail=detail, retry_after=retry_after)
            for r in recipients
        ]

    def _throttled_for(self) -> float:
        return self._paused_until - self._clock()

    async def _deliver(self, envelope: Envelope, message: bytes) -> list[RecipientResult]:
        limit = self.limits.max_message_size
        if limit is not None and len(message) > limit:
            return self._all(
                envelope.recipients,
                RecipientOutcome.PERMANENT,
                f"5.3.4 message is {len(message)} bytes; {self.provider} accepts at most {limit}",
            )
        wait = self._throttled_for()
        if wait > 0:
            return self._throttled(envelope.recipients, wait)
        try:
            calls = await self.prepare(envelope, message)
        except UnrepresentableMessage as exc:
            log.warning("Refused message %s for upstream %s: %s", envelope.queue_id, self.name, exc)
            return self._all(
                envelope.recipients,
                RecipientOutcome.PERMANENT,
                f"5.6.0 {self.provider} cannot carry this message: {exc}",
            )
        except CredentialError as exc:
            self._config_error(envelope, str(exc))
            return self._all(envelope.recipients, RecipientOutcome.CONFIG_ERROR, str(exc))
        results: list[RecipientResult] = []
        for call in calls:
            wait = self._throttled_for()
            if wait > 0:
                results += self._throttled(call.recipients, wait)
                continue
            sent = await self._send(envelope, call)
            if (
                self.sends_raw_message
                and 1 < len(call.recipients) <= SPLIT_REFUSED_UP_TO
                and all(r.outcome is RecipientOutcome.PERMANENT for r in sent)
            ):
                sent = await self._split_refused(envelope, message, call.recipients, sent)
            results += sent
        return results

    async def _split_refused(
        self,
        envelope: Envelope,
        message: bytes,
        recipients: tuple[str, ...],
        refused: list[RecipientResult],
    ) -> list[RecipientResult]:
        """A request refused for good is tried again once per recipient: a provider
        refuses the whole request for one address it does not accept, and that must not
        bounce the others. Nothing was sent, so this sends nothing twice."""
        log.info(
            "Retrying message %s on upstream %s one recipient at a time after %s refused "
            "a request for %d",
            envelope.queue_id,
            self.name,
            self.provider,
            len(recipients),
        )
        results: list[RecipientResult] = []
        for rcpt, batch_result in zip(recipients, refused, strict=True):
            wait = self._throttled_for()
            if wait > 0:
                results += self._throttled((rcpt,), wait)
                continue
            single = dataclasses.replace(envelope, recipients=(rcpt,))
            try:
                calls = await self.prepare(single, message)
            except (UnrepresentableMessage, CredentialError):
                results.append(batch_result)
                continue
            for call in calls:
                results += await self._send(single, call)
        return results

    def _throttled(self, recipients: Sequence[str], wait: float) -> list[RecipientResult]:
        return self._all(
            recipients,
            RecipientOutcome.TEMPORARY,
            f"upstream {self.name} is paused for {wait:.0f}s after {self.provider} rate-limited us",
            retry_after=wait,
        )

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(**self._labels, result=result).inc()

    def _config_error(self, envelope: Envelope, detail: str) -> None:
        log.error(
            "Kept message %s queued: upstream %s (%s) has a configuration problem: %s",
            envelope.queue_id,
            self.name,
            self.provider,
            detail,
        )
        if self._metrics is not None:
            self._metrics.config_error.labels(**self._labels).set(1)
        self._count(RecipientOutcome.CONFIG_ERROR.value)

    async def _send(self, envelope: Envelope, call: Call) -> list[RecipientResult]:
        if self._metrics is not None and self._metrics.ambiguous.take(
            envelope.queue_id, call.recipients
        ):
            self._metrics.ambiguous_retries.labels(upstream_kind=self.provider).inc()
            log.warning(
                "Retrying message %s on upstream %s after an earlier request had an unknown "
                "outcome: its recipients may get it twice",
                envelope.queue_id,
                self.name,
            )
        async with self._semaphore:
            started = self._clock()
            try:
                response = await self.client.send(call.request)
            except (ApiTimeout, ApiUnreachable) as exc:
                if isinstance(exc, ApiTimeout):
                    detail = f"4.4.2 {self.provider} API timed out"
                else:
                    detail = f"4.4.1 {self.provider} API unreachable: {exc}"
                if exc.maybe_sent:
                    self._outcome_unknown(envelope, call)
                log.warning(
                    "Deferred message %s on upstream %s: %s", envelope.queue_id, self.name, detail
                )
                self._count(RecipientOutcome.TEMPORARY.value)
                return self._all(call.recipients, RecipientOutcome.TEMPORARY, detail)
            except (BlockedDestination, ApiConfigError) as exc:
                detail = str(exc)
                if isinstance(exc, ApiConfigError):
                    detail = f"upstream {self.name!r} ({self.provider}): {exc}"
                self._config_error(envelope, detail)
                return self._all(call.recipients, RecipientOutcome.CONFIG_ERROR, detail)
            finally:
                if self._metrics is not None:
                    self._metrics.request_seconds.labels(**self._labels).observe(
                        self._clock() - started
                    )
        if response.is_success:
            if self._metrics is not None:
                self._metrics.config_error.labels(**self._labels).set(0)
            return self._success(envelope, call, response)
        verdict = self.classify_error(response)
        if verdict.outcome is RecipientOutcome.DELIVERED:
            # An error answer that says the mail went out before (Resend's key reuse).
            log.warning(
                "Took message %s as delivered on upstream %s: %s",
                envelope.queue_id,
                self.name,
                verdict.detail,
            )
            self._count(RecipientOutcome.DELIVERED.value)
            return self._all(call.recipients, RecipientOutcome.DELIVERED, verdict.detail)
        if verdict.outcome is RecipientOutcome.CONFIG_ERROR:
            if response.status_code in (401, 403):
                self.credentials.invalidate()
            self._config_error(envelope, verdict.detail)
        else:
            self._count(verdict.outcome.value)
            log.warning(
                "%s message %s on upstream %s: %s",
                "Deferred" if verdict.outcome is RecipientOutcome.TEMPORARY else "Rejected",
                envelope.queue_id,
                self.name,
                verdict.detail,
            )
        retry_after = verdict.retry_after
        if verdict.throttle:
            pause = min(
                retry_after if retry_after is not None else DEFAULT_THROTTLE_SECONDS,
                MAX_THROTTLE_SECONDS,
            )
            self._paused_until = max(self._paused_until, self._clock() + pause)
            retry_after = pause
            if self._metrics is not None:
                self._metrics.throttled.labels(**self._labels).inc()
            log.warning(
                "Paused upstream %s for %.0fs: rate-limited by %s", self.name, pause, self.provider
            )
        return self._all(call.recipients, verdict.outcome, verdict.detail, retry_after)

    def _outcome_unknown(self, envelope: Envelope, call: Call) -> None:
        """The request may have been acted on: remember it where no key makes a retry safe."""
        if self.idempotency_header is None and self._metrics is not None:
            self._metrics.ambiguous.remember(envelope.queue_id, call.recipients)

    def _success(
        self, envelope: Envelope, call: Call, response: ApiResponse
    ) -> list[RecipientResult]:
        """A 2xx: checked against the documented answer, then read by `accepted`."""
        problem = self.answer_problem(response)
        if problem is not None:
            if self._metrics is not None:
                self._metrics.unexpected_answers.labels(**self._labels).inc()
            what = f"{self.provider} answered HTTP {response.status_code} without its documented "
            what += f"success answer ({problem})"
            if self.unexpected_answer is RecipientOutcome.TEMPORARY:
                log.warning(
                    "Deferred message %s on upstream %s: %s; the outcome is unknown, retrying",
                    envelope.queue_id,
                    self.name,
                    what,
                )
                self._outcome_unknown(envelope, call)
                self._count(RecipientOutcome.TEMPORARY.value)
                return self._all(
                    call.recipients,
                    RecipientOutcome.TEMPORARY,
                    f"4.5.0 {what}; the outcome is unknown",
                )
            log.warning(
                "Took message %s as delivered on upstream %s although %s",
                envelope.queue_id,
                self.name,
                what,
            )
        results = self.accepted(call, response)
        for outcome in dict.fromkeys(r.outcome for r in results):
            self._count(outcome.value)
        delivered = [r for r in results if r.outcome is RecipientOutcome.DELIVERED]
        if delivered:
            log.info(
                "Delivered message %s to %d recipient(s) through upstream %s; %s message id %s",
                envelope.queue_id,
                len(delivered),
                self.name,
                self.provider,
                delivered[0].remote_id,
            )
        refused = [r for r in results if r.outcome is RecipientOutcome.PERMANENT]
        if refused:
            log.warning(
                "Rejected message %s for %d recipient(s) on upstream %s: %s",
                envelope.queue_id,
                len(refused),
                self.name,
                refused[0].detail,
            )
        unnamed = self.refused_within(response)
        if unnamed:
            self._count(RecipientOutcome.PERMANENT.value)
            log.warning(
                "Rejected message %s for %d unnamed recipient(s) on upstream %s: %s accepted "
                "the request for %d and refused some without saying which",
                envelope.queue_id,
                unnamed,
                self.name,
                self.provider,
                len(call.recipients),
            )
        return results

    def refused_within(self, response: ApiResponse) -> int:
        """Recipients a 2xx answer says were refused without naming them (SparkPost)."""
        return 0


def _one_per_recipient(envelope: Envelope, results: list[RecipientResult]) -> list[RecipientResult]:
    """Exactly one result per envelope recipient, in envelope order.

    A recipient listed twice (in any letter case) was sent once; it shares that result.
    """
    by_exact = {r.address: r for r in results}
    by_folded = {r.address.lower(): r for r in results}
    out = []
    for rcpt in envelope.recipients:
        result = by_exact.get(rcpt) or by_folded.get(rcpt.lower())
        if result is None:
            result = RecipientResult(
                address=rcpt,
                outcome=RecipientOutcome.TEMPORARY,
                detail="internal: the provider transport produced no result for this recipient",
            )
        elif result.address != rcpt:
            result = dataclasses.replace(result, address=rcpt)
        out.append(result)
    return out
