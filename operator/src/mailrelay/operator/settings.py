"""Operator settings: one frozen pydantic-settings object, built at startup and passed in.

Values come from ``MAILRELAY_OPERATOR_*`` environment variables, overridden by the command
line flags of ``python -m mailrelay.operator`` (which passes them as init arguments). The
renderers and handlers receive the object explicitly, so tests build one with the values they
need instead of patching a global.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, cast

import kopf
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_RELAY_IMAGE = "ghcr.io/mailrelay/mailrelay:0.1.0"
FIELD_MANAGER = "mailrelay-operator"
# The label users put on Secrets that MailRelays and MailRoutes reference (docs/operator.md).
WATCH_LABEL = "mailrelay.dev/watch"
SECRET_SELECTOR = f"{WATCH_LABEL}=true"


def _default_resources() -> dict[str, dict[str, str]]:
    return {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}


class OperatorSettings(BaseSettings):
    """Everything the operator reads from its environment; frozen once built."""

    model_config = SettingsConfigDict(
        env_prefix="MAILRELAY_OPERATOR_", frozen=True, extra="forbid", populate_by_name=True
    )

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch; empty watches all (comma separated in the environment).",
    )
    relay_image: str = Field(
        default=DEFAULT_RELAY_IMAGE, min_length=1, description="Relay image when a spec sets none."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Pull policy of the relay container."
    )
    default_resources: dict[str, dict[str, str]] = Field(
        default_factory=_default_resources,
        description="Relay container resources when a spec sets none.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log format of the operator and of the relays it renders."
    )
    metrics_port: int = Field(default=8080, ge=0, le=65535, description="Operator /metrics port.")
    liveness_port: int = Field(
        default=8081, ge=0, le=65535, description="kopf liveness endpoint (/healthz) port."
    )
    peering_name: str = Field(
        default="mailrelay", min_length=1, description="kopf peering object (leader election)."
    )
    standalone: bool = Field(default=False, description="Run without peering (tests, dev).")
    priority: int = Field(default=0, description="Peering priority; the highest one acts.")
    resync_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Interval of the level-based pass per MailRelay; it puts back deleted or edited "
            "children and picks up Secrets created later."
        ),
    )
    dns_resolver: str | None = Field(
        default=None,
        pattern=r"^(\[[0-9A-Fa-f:.]+\]|[0-9.]+|[0-9A-Fa-f:]+):[0-9]{1,5}$",
        description=(
            "DNS server (address:port, an IPv6 address in brackets) the DKIMReady check asks "
            "for selectors' TXT records; unset: the pod's resolv.conf."
        ),
    )
    dkim_dns_cache_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "How long a DKIM TXT answer is reused; a published or removed record is noticed "
            "within this plus resync_seconds."
        ),
    )
    drain_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="Time a relay pod gets to finish deliveries in flight before it is killed.",
    )
    handoff_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        description=(
            "Time a leaving relay pod (or a drain Job) hands its queue to the other pods before "
            "it keeps the rest on its spool volume (handoff.deadline_seconds)."
        ),
    )
    workers: int = Field(default=8, ge=1, le=256, description="MailRelays reconciled concurrently.")
    settle_seconds: float = Field(
        default=0.5,
        ge=0,
        le=30,
        description="How long a triggered pass waits, so a burst of changes makes one pass.",
    )
    cluster_domain: str = Field(default="cluster.local", description="Cluster DNS suffix.")
    api_qps_burst: int = Field(
        default=64, ge=1, description="API requests the operator keeps in flight at once."
    )
    secret_selector: str = Field(
        default=SECRET_SELECTOR,
        description=(
            "Label selector of the Secrets the operator watches (server-side); a referenced "
            "Secret outside it is reported, not read. Empty watches every Secret."
        ),
    )
    api_retry_seconds: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description=(
            "Longest wait between two attempts of a failed API request (the watches too), so "
            "the operator catches up within about this long once an API server is back."
        ),
    )
    api_outage_seconds: float = Field(
        default=300.0,
        gt=0,
        description=(
            "How long a failing API request keeps being retried before the operator gives up "
            "and exits (its pod is restarted)."
        ),
    )
    index_timeout_seconds: float = Field(
        default=180.0,
        gt=0,
        description=(
            "Liveness fails when the watch caches are not loaded this long after start-up."
        ),
    )
    stall_seconds: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Liveness fails when a relay has waited this long for its pass while no pass finished."
        ),
    )

    def watches_all_namespaces(self) -> bool:
        """Whether the operator watches the whole cluster (a ClusterKopfPeering is used)."""
        return not self.namespaces

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """Accept ``a,b`` from the environment or a flag, as well as a list."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def load_settings(**overrides: Any) -> OperatorSettings:
    """Build settings from the environment, with explicit overrides (command line) on top."""
    return OperatorSettings(**{k: v for k, v in overrides.items() if v is not None})


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf's is for on.create/update/field handlers, and we register none.

    The default builds one per watch event anyway, a deep copy of the whole body with its
    managedFields, for every watched object (a visible share of the operator's CPU at
    1,000 relays); kopf then only asks whether it differs from the stored one (none).
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def api_backoffs(settings: OperatorSettings) -> tuple[float, ...]:
    """kopf's delays between attempts of a failed API request: short, for a long time.

    kopf sleeps through each delay without waking up when the server comes back, and its
    default (1, 1, 2, 3, 5, 8, 13, 21 s) left a new object waiting 13 s after an outage;
    it also gave up after 54 s, which stopped the operator. Capped at ``api_retry_seconds``
    and repeated for ``api_outage_seconds``, the watches resume within about a second of
    the server being back, and only a long outage exits the process.
    """
    cap = settings.api_retry_seconds
    ramp = tuple(d for d in (0.1, 0.25, 0.5) if d < cap)
    rest = max(0.0, settings.api_outage_seconds - sum(ramp))
    return (*ramp, *[cap] * max(1, math.ceil(rest / cap)))


def configure_kopf(
    kopf_settings: Any, settings: OperatorSettings, selectors: Mapping[tuple[str, str, str], str]
) -> None:
    """Apply our settings to kopf's (peering, Event posting, watches, retries).

    ``selectors`` are label selectors by (group, version, plural), applied by the API server
    to the lists and watches of that resource, so the operator never receives (nor keeps)
    objects it has no business with.
    """
    kopf_settings.peering.name = settings.peering_name
    kopf_settings.peering.standalone = settings.standalone
    kopf_settings.peering.priority = settings.priority
    kopf_settings.peering.mandatory = not settings.standalone
    # Only our explicit Events reach users; kopf's handler chatter stays in the log.
    kopf_settings.posting.level = logging.ERROR
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    for resource, selector in selectors.items():
        if selector:
            kopf_settings.watching.label_selectors[resource] = selector
    # No limit on kopf's per-object workers, on purpose. During the initial listing each
    # object's worker indexes it and then waits until every object of every watched kind is
    # indexed; a worker for the next object only starts when a slot is free. With a limit
    # below the number of objects of one kind, the waiting workers hold every slot and the
    # operator never handles an event (kopf 1.45, _core/reactor/queueing.py and
    # processing.py). The workers only index and enqueue (the passes run in WorkQueue), and
    # each one exits ``idle_timeout`` after its last event.
    kopf_settings.queueing.worker_limit = None
    # kopf keeps a worker per object alive this long after its last event; after a burst of
    # thousands of objects, a short idle time keeps the peak memory down.
    kopf_settings.queueing.idle_timeout = 1.0
    kopf_settings.networking.request_timeout = 30
    kopf_settings.networking.error_backoffs = api_backoffs(settings)
    kopf_settings.persistence.diffbase_storage = NoDiffBase()
