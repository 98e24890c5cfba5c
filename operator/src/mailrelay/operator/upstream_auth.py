"""The MailRoute's ``UpstreamAuthenticated`` condition, from what the relay pods report.

The relay pods have no Kubernetes API token; each serves how its upstreams' logins stand
as JSON on its metrics port (``GET /status/upstreams``, ``mailrelay.relay.upstream_status``).
The operator reads that document from every ready pod of a relay, by pod IP:

- ``ready_pod_addresses`` (pure) picks the pods to ask from a pod list: Ready, with an IP,
  not being deleted.
- ``UpstreamStatusPoller`` (thin I/O) fetches the documents in the background: at most one
  poll per relay at a time and one per ``interval``, every pod with a short timeout, all
  relays' requests bounded by one semaphore. A pass never waits for it: the pass reads
  the reports of the last poll (``reports``), and a poll whose reports differ from the
  previous ones asks for a pass (``on_change``). A pod that does not answer, or answers
  something else, is left out: failing to ask is not a fault of the route.
- ``auth_condition`` (pure) decides a route's condition from the reports, for the
  upstreams the relay config gives it (``relay_config.upstream_name``: the route's name,
  then ``<route>-fallback-N``): ``False`` when any pod's login to any of them failed, with
  the provider's error as reason (``OAuth2InvalidGrant``...) and message; ``True`` when
  every report of them is ``ok``; ``Unknown`` when the pods answered but none has logged
  in to them since the condition was set (a new transport after a config change). A route
  none of whose upstreams was ever reported gets no condition (one without credentials
  never will be).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from lightkube import AsyncClient
from lightkube.resources.core_v1 import Pod
from pydantic import ValidationError

from mailrelay.operator.conditions import ConditionUpdate, find_condition
from mailrelay.operator.relay_config import upstream_name
from mailrelay.operator.routes import UPSTREAM_AUTHENTICATED, RouteVerdict
from mailrelay.relay.upstream_status import STATUS_PATH, UpstreamAuth, UpstreamStatusDocument

__all__ = [
    "UPSTREAM_AUTHENTICATED",
    "PodReport",
    "UpstreamStatusPoller",
    "auth_condition",
    "ready_pod_addresses",
    "route_auth_update",
    "route_upstreams",
]

log = logging.getLogger(__name__)

FETCH_TIMEOUT_SECONDS = 2.0
FETCH_CONCURRENCY = 16
MAX_DOCUMENT_BYTES = 1 << 20
MAX_MESSAGE = 1000
# RFC 6749 5.2 and 4.1.2.1 error codes; each has its own reason (OAuth2InvalidGrant, ...).
_OAUTH2_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
        "server_error",
        "temporarily_unavailable",
    }
)
_FAILURE_ORDER = {"config_error": 0, "token_failed": 1, "auth_refused": 2}

RelayKey = tuple[str, str]  # namespace, name


@dataclass(frozen=True)
class PodReport:
    """One pod's document."""

    pod: str
    document: UpstreamStatusDocument


def route_upstreams(route: str, fallbacks: int) -> list[str]:
    """The relay config's names of a route's upstreams: primary first, then fallbacks."""
    return [upstream_name(route, index) for index in range(fallbacks + 1)]


def _reason(entry: UpstreamAuth) -> str:
    if entry.state == "token_failed":
        if entry.error in _OAUTH2_ERRORS:
            return "OAuth2" + "".join(part.capitalize() for part in entry.error.split("_"))
        return "TokenUnavailable"
    if entry.state == "auth_refused":
        return "AuthRefused"
    return "UpstreamMisconfigured"


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join("".join(ch if " " <= ch <= "~" else " " for ch in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def auth_condition(
    route: str,
    upstreams: Sequence[str],
    reports: Sequence[PodReport] | None,
    *,
    existing: bool,
) -> ConditionUpdate | None:
    """The route's condition from the pods' reports; None to leave it as it is.

    ``reports`` is None when no pod answered (the condition stays as the last answer left
    it); ``existing`` says whether the route has the condition already.
    """
    if not reports:
        return None
    seen = [
        (name, report.pod, report.document.upstreams[name])
        for name in upstreams
        for report in sorted(reports, key=lambda r: r.pod)
        if name in report.document.upstreams
    ]
    failures = [item for item in seen if item[2].state != "ok"]
    if failures:
        # The most basic problem first; among equals, the primary upstream and the
        # longest-standing failure.
        failures.sort(key=lambda item: (_FAILURE_ORDER[item[2].state], item[2].since))
        name, pod, entry = failures[0]
        said = f" ({entry.error})" if entry.error else ""
        others = len({(n, p) for n, p, _ in failures}) - 1
        more = f" {others} more failing login(s) on other pods or upstreams." if others else ""
        message = (
            f"Upstream {name!r} of route {route!r}: {entry.state.replace('_', ' ')}{said} on pod "
            f"{pod} since {entry.since.strftime('%Y-%m-%dT%H:%M:%SZ')}: {entry.reason}.{more}"
        )
        return ConditionUpdate(UPSTREAM_AUTHENTICATED, "False", _reason(entry), _clip(message))
    if seen:
        names = sorted({name for name, _, _ in seen}, key=list(upstreams).index)
        pods = len({pod for _, pod, _ in seen})
        return ConditionUpdate(
            UPSTREAM_AUTHENTICATED,
            "True",
            "Authenticated",
            _clip(f"Logged in to upstream(s) {', '.join(names)} from {pods} relay pod(s)."),
        )
    if existing:
        return ConditionUpdate(
            UPSTREAM_AUTHENTICATED,
            "Unknown",
            "NoLoginYet",
            "No relay pod has logged in to this route's upstreams since they last changed.",
        )
    return None


def route_auth_update(
    verdict: RouteVerdict, reports: Sequence[PodReport] | None
) -> ConditionUpdate | None:
    """``auth_condition`` for a route of this pass (None for one not in the config)."""
    if not verdict.included or verdict.spec is None:
        return None
    route = verdict.route
    existing = find_condition(route.status.get("conditions"), UPSTREAM_AUTHENTICATED)
    return auth_condition(
        route.name,
        route_upstreams(route.name, len(verdict.spec.fallbacks)),
        reports,
        existing=existing is not None,
    )


def ready_pod_addresses(pods: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(pod name, IP) of each Ready pod with an IP that is not being deleted, by name."""
    found = []
    for pod in pods:
        metadata = pod.get("metadata") or {}
        status = pod.get("status") or {}
        if metadata.get("deletionTimestamp") is not None or not status.get("podIP"):
            continue
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        )
        try:
            address = ipaddress.ip_address(str(status["podIP"]))
        except ValueError:
            continue
        if ready:
            found.append((str(metadata.get("name")), str(address)))
    return sorted(found)


def status_url(address: str, port: int) -> str:
    """The document's URL on a pod (an IPv6 address in brackets)."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{STATUS_PATH}"


@dataclass
class _Target:
    selector: dict[str, str]
    port: int
    reports: tuple[PodReport, ...] | None = None
    polled_at: float = float("-inf")
    task: asyncio.Task[None] | None = None


class UpstreamStatusPoller:
    """Fetches the relays' upstream status documents in the background (see the module)."""

    def __init__(
        self,
        *,
        interval: float,
        timeout: float = FETCH_TIMEOUT_SECONDS,
        concurrency: int = FETCH_CONCURRENCY,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.on_change: Callable[[str, str], None] | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._monotonic = monotonic
        self._targets: dict[RelayKey, _Target] = {}
        self._session: aiohttp.ClientSession | None = None

    def reports(self, namespace: str, name: str) -> tuple[PodReport, ...] | None:
        """The last poll's reports for the relay; None before one answered."""
        target = self._targets.get((namespace, name))
        return target.reports if target is not None else None

    def target(self, namespace: str, name: str, selector: Mapping[str, str], port: int) -> None:
        """Where the relay's pods are (from its pass): polled from now on."""
        target = self._targets.get((namespace, name))
        if target is None:
            self._targets[(namespace, name)] = _Target(dict(selector), port)
        else:
            target.selector, target.port = dict(selector), port

    def poll(self, client: AsyncClient, namespace: str, name: str) -> None:
        """Start a poll of the relay's pods unless one runs or the last is recent."""
        target = self._targets.get((namespace, name))
        if target is None or (target.task is not None and not target.task.done()):
            return
        now = self._monotonic()
        if now - target.polled_at < self.interval:
            return
        target.polled_at = now
        target.task = asyncio.create_task(
            self._poll(client, namespace, name, target), name=f"upstream-status-{namespace}/{name}"
        )

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted relay (and stop its poll)."""
        target = self._targets.pop((namespace, name), None)
        if target is not None and target.task is not None:
            target.task.cancel()

    async def close(self) -> None:
        """Stop every poll and close the HTTP session (operator shutdown)."""
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _poll(self, client: AsyncClient, namespace: str, name: str, target: _Target) -> None:
        try:
            await self._poll_pods(client, namespace, name, target)
        except Exception:  # a bug of ours must not go unseen, nor stop the next poll
            log.exception("Failed to poll the upstream status of MailRelay %s/%s", namespace, name)

    async def _poll_pods(
        self, client: AsyncClient, namespace: str, name: str, target: _Target
    ) -> None:
        try:
            pods = [
                pod.to_dict()
                async for pod in client.list(Pod, namespace=namespace, labels=dict(target.selector))
            ]
        except Exception as error:  # the API server's trouble; the next poll tries again
            log.warning("Could not list the pods of MailRelay %s/%s: %s", namespace, name, error)
            return
        addresses = ready_pod_addresses(pods)
        answers = await asyncio.gather(
            *(self.fetch(pod, address, target.port) for pod, address in addresses)
        )
        reports = tuple(report for report in answers if report is not None) or None
        if reports is None or reports == target.reports:
            return
        target.reports = reports
        if self._targets.get((namespace, name)) is target and self.on_change is not None:
            self.on_change(namespace, name)

    async def fetch(self, pod: str, address: str, port: int) -> PodReport | None:
        """One pod's document; None when it does not answer it in time, or in full."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False
            )
        session = self._session
        url = status_url(address, port)
        async with self._slots:
            try:
                async with session.get(url, allow_redirects=False) as response:
                    if response.status != 200:
                        log.debug("Pod %s answered %s for %s", pod, response.status, url)
                        return None
                    body = b""
                    async for chunk in response.content.iter_chunked(1 << 16):
                        body += chunk
                        if len(body) > MAX_DOCUMENT_BYTES:
                            log.debug("Pod %s answered more than %d bytes", pod, len(body))
                            return None
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                log.debug("Could not read %s from pod %s: %r", url, pod, error)
                return None
        with contextlib.suppress(ValidationError):
            return PodReport(pod, UpstreamStatusDocument.model_validate_json(body))
        log.debug("Pod %s answered %s with something else than the document", pod, url)
        return None
