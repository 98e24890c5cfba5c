"""Every relay metric, on a registry passed in (never prometheus-client's global one).

`RelayMetrics` is created once per process and handed to the SMTP front, the spool
gauges and the delivery engine. Label values come from fixed sets (`REJECT_REASONS`,
listeners, results) or from config names (routes, upstreams), so cardinality is bounded.
The front's metrics are defined here first; the delivery side adds its own below.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from mailrelay.relay.client_limits import CLIENT_LIMIT_REASONS

__all__ = [
    "CLIENT_LIMIT_REASONS",
    "DEAD_LETTER_REASONS",
    "DELIVERY_RESULTS",
    "HANDOFF_DIRECTIONS",
    "HANDOFF_FAILURE_REASONS",
    "LISTENERS",
    "REJECT_REASONS",
    "DeliveryMetrics",
    "HandoffMetrics",
    "RelayMetrics",
]

LISTENERS: Final = ("submission", "implicit_tls")

# Why a message or recipient was refused; fixed so the label stays bounded.
REJECT_REASONS: Final = (
    "auth_required",  # 530 5.7.0 at MAIL: neither authenticated nor in allowed_networks
    "sender_forbidden",  # 553 5.7.1: user may not send as this sender domain
    "no_route",  # 550 5.7.1 at RCPT
    "too_many_recipients",  # 452 4.5.3
    "rate_limited",  # 450 4.7.0 at RCPT (route with on_exceed=reject)
    "route_held",  # 451 4.7.5 at RCPT: the route is held (a DKIM key not usable yet)
    "message_too_large",  # 552 5.3.4
    "loop_detected",  # 554 5.4.6: too many Received headers
    "low_disk",  # 452 4.3.1 at MAIL
    "in_flight_budget",  # 452 4.3.1 at DATA: limits.max_bytes_in_flight is taken
    "spool_error",  # 451 4.3.0: the spool write failed
    "internal_error",  # 451 4.3.0: any other exception
    "shutting_down",  # 421 while draining
    "too_many_connections",  # 421 at connect: limits.max_connections
    "bad_address",  # 501 5.1.3 or 553 5.6.7 at MAIL or RCPT (relay/address.py)
    "client_limit",  # 421 4.7.0: a per-client limit (mailrelay_client_limit_refusals_total)
    "tls_handshake",  # the client's TLS handshake failed; the connection is closed
    "timeout",  # 421 4.4.2: the client was idle too long, or too slow with DATA
    "too_many_errors",  # 421 4.7.0: too many unknown or invalid commands in a session
)


class RelayMetrics:
    """Holds every metric; attribute names match the metric names without the prefix."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # CPU, memory, open fds and start time of this process, as mailrelay_process_*.
        ProcessCollector(namespace="mailrelay", registry=registry)
        # -- SMTP front ---------------------------------------------------------------
        self.smtp_sessions = Counter(
            "mailrelay_smtp_sessions",
            "SMTP sessions opened, by listener.",
            ["listener"],
            registry=registry,
        )
        self.smtp_sessions_active = Gauge(
            "mailrelay_smtp_sessions_active",
            "SMTP sessions open now.",
            registry=registry,
        )
        self.tls_sessions = Counter(
            "mailrelay_smtp_tls_sessions",
            "SMTP sessions that negotiated TLS, by mode (starttls or implicit).",
            ["mode"],
            registry=registry,
        )
        self.auth_attempts = Counter(
            "mailrelay_smtp_auth_attempts",
            "SMTP AUTH attempts by result (success or failure).",
            ["result"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "mailrelay_smtp_auth_failures",
            "Failed SMTP AUTH attempts (wrong user or password).",
            registry=registry,
        )
        self.auth_verifications = Counter(
            "mailrelay_smtp_auth_verifications",
            "Password checks by what answered them: cache (auth.cache), app_credential "
            "(a fast keyed hash) or password_hash (bcrypt or argon2, the costly one).",
            ["method"],
            registry=registry,
        )
        self.auth_cache_entries = Gauge(
            "mailrelay_smtp_auth_cache_entries",
            "Verified logins held by the AUTH cache (0 when it is off).",
            registry=registry,
        )
        self.client_limit_refusals = Counter(
            "mailrelay_client_limit_refusals",
            "Connections and AUTH attempts refused by a per-client limit, by limit.",
            ["reason"],
            registry=registry,
        )
        self.messages_accepted = Counter(
            "mailrelay_messages_accepted",
            "Messages durably spooled and answered 250.",
            registry=registry,
        )
        self.messages_rejected = Counter(
            "mailrelay_messages_rejected",
            "Refusals at MAIL, RCPT or DATA, by reason (a fixed set).",
            ["reason"],
            registry=registry,
        )
        self.recipients_accepted = Counter(
            "mailrelay_recipients_accepted",
            "Recipients of accepted messages, by route.",
            ["route"],
            registry=registry,
        )
        self.accepted_bytes = Counter(
            "mailrelay_accepted_bytes",
            "Bytes of accepted messages as spooled (with our Received header).",
            registry=registry,
        )
        self.spool_write_seconds = Histogram(
            "mailrelay_spool_write_seconds",
            "Time to make one message durable (write, fsync, rename, directory fsync).",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        # -- operations ---------------------------------------------------------------
        self.config_reloads = Counter(
            "mailrelay_config_reloads",
            "Configuration reloads by result (success or failure).",
            ["result"],
            registry=registry,
        )
        self.config_last_reload_success = Gauge(
            "mailrelay_config_last_reload_successful",
            "1 if the last reload attempt succeeded (or none happened yet), else 0.",
            registry=registry,
        )
        self.config_last_reload_success.set(1)
        self.queue_depth = Gauge(
            "mailrelay_queue_depth",
            "Messages in the spool's queue (not dead letters).",
            registry=registry,
        )
        self.queue_oldest_age = Gauge(
            "mailrelay_queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue; 0 when empty.",
            registry=registry,
        )
        self.dead_letter_depth = Gauge(
            "mailrelay_dead_letter_depth",
            "Messages in the dead-letter folder.",
            registry=registry,
        )
        self.bytes_in_flight = Gauge(
            "mailrelay_bytes_in_flight",
            "Message bytes reserved on the budget for bytes in flight (DATA to first attempt,"
            " and retries being delivered).",
            registry=registry,
        )
        self.bytes_in_flight_limit = Gauge(
            "mailrelay_bytes_in_flight_limit",
            "The budget for bytes in flight (limits.max_bytes_in_flight or its default).",
            registry=registry,
        )
        # -- delivery (owned by the delivery side) --------------------------------------
        self.delivery = DeliveryMetrics(registry)
        self.handoff = HandoffMetrics(registry)
        for reason in REJECT_REASONS:
            self.messages_rejected.labels(reason)
        for reason in CLIENT_LIMIT_REASONS:
            self.client_limit_refusals.labels(reason)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
            self.auth_attempts.labels(result)
        for listener in LISTENERS:
            self.smtp_sessions.labels(listener)

    def budget_changed(self, used: int, limit: int) -> None:
        """`ByteBudget`'s `on_change`: keep the two gauges current."""
        self.bytes_in_flight.set(used)
        self.bytes_in_flight_limit.set(limit)

    def auth_verified(self, method: str) -> None:
        """Count one password check by what answered it (``UserDatabase.verify``)."""
        self.auth_verifications.labels(method).inc()

    def client_limit(self, reason: str) -> None:
        """Count one refusal by a per-client limit (also a `client_limit` rejection)."""
        assert reason in CLIENT_LIMIT_REASONS, reason
        self.client_limit_refusals.labels(reason).inc()
        self.reject("client_limit")

    def reject(self, reason: str) -> None:
        """Count one refusal; `reason` must be one of REJECT_REASONS."""
        assert reason in REJECT_REASONS, reason
        self.messages_rejected.labels(reason).inc()


# What one delivery attempt did for one recipient (RecipientOutcome values).
DELIVERY_RESULTS: Final = ("delivered", "temporary", "permanent", "config_error")
# Why a message ended in the dead-letter folder.
DEAD_LETTER_REASONS: Final = (
    "permanent",  # an upstream refused a recipient with 5xx (or the message cannot be sent)
    "expired",  # temporary failures until retry.max_age_seconds
    "unroutable_bounce",  # a bounce that no route takes
)
BOUNCE_RESULTS: Final = ("queued", "unroutable", "null_sender")


class DeliveryMetrics:
    """The delivery engine's metrics; routes and upstreams are config names (bounded)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "mailrelay_delivery_attempts",
            "Recipient delivery attempts by route, upstream and result.",
            ["route", "upstream", "result"],
            registry=registry,
        )
        self.latency = Histogram(
            "mailrelay_delivery_latency_seconds",
            "Time from acceptance to delivery, by route (once per message and route).",
            ["route"],
            buckets=(
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                300,
                900,
                3600,
                14400,
                86400,
            ),
            registry=registry,
        )
        self.dkim_signatures = Counter(
            "mailrelay_dkim_signatures",
            "DKIM signing attempts by route and result (signed, key_error, message_error, error).",
            ["route", "result"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "mailrelay_dead_letters",
            "Messages moved to the dead-letter folder, by route and reason (a fixed set).",
            ["route", "reason"],
            registry=registry,
        )
        self.bounces = Counter(
            "mailrelay_bounces",
            "Bounces (DSNs): queued, unroutable (dead-lettered), or not sent (null sender).",
            ["result"],
            registry=registry,
        )
        self.upstream_config_errors = Counter(
            "mailrelay_upstream_config_errors",
            "Delivery attempts that failed on our configuration (AUTH, TLS, provider).",
            ["upstream"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "mailrelay_delivery_rate_limited",
            "Deliveries put off by a route's rate limit (on_exceed=defer).",
            ["route"],
            registry=registry,
        )
        self.connections_opened = Counter(
            "mailrelay_upstream_connections_opened",
            "Connections opened to SMTP upstreams.",
            ["upstream"],
            registry=registry,
        )
        self.connections_reused = Counter(
            "mailrelay_upstream_connections_reused",
            "Pooled SMTP connections reused for another message.",
            ["upstream"],
            registry=registry,
        )
        self.connections_open = Gauge(
            "mailrelay_upstream_connections_open",
            "SMTP upstream connections open now (in use or idle).",
            ["upstream"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "mailrelay_deliveries_in_flight",
            "Messages being delivered now.",
            registry=registry,
        )
        for result in BOUNCE_RESULTS:
            self.bounces.labels(result)


HANDOFF_DIRECTIONS: Final = ("sent", "received", "duplicate")
# Why a hand-off request failed, on either side; fixed so the label stays bounded.
HANDOFF_FAILURE_REASONS: Final = (
    "connect",  # sender: the peer could not be reached or the connection broke
    "timeout",  # sender: no answer in time
    "refused",  # sender: the peer answered an error status (busy, too large, ...)
    "bad_answer",  # sender: the answer was malformed or not signed with the token
    "self",  # sender: the address was this relay itself (skipped)
    "resolve",  # sender: the peers name did not resolve
    "unauthorized",  # receiver: no or malformed proof (401)
    "forbidden",  # receiver: wrong signature or stale timestamp (403)
    "bad_request",  # receiver: a malformed batch (400)
    "store",  # receiver: the spool could not store the batch (500)
)


class HandoffMetrics:
    """The hand-off of queued mail between relays (`handoff.py`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "mailrelay_handoff_messages",
            "Messages handed off: sent (a peer holds them now), received from a peer, "
            "duplicate (received, but already held here: one copy kept).",
            ["direction"],
            registry=registry,
        )
        self.failures = Counter(
            "mailrelay_handoff_failures",
            "Hand-off requests that failed, by reason.",
            ["reason"],
            registry=registry,
        )
        self.in_progress = Gauge(
            "mailrelay_handoff_in_progress",
            "1 while this relay hands its queue to peers.",
            registry=registry,
        )
        for direction in HANDOFF_DIRECTIONS:
            self.messages.labels(direction)
        for reason in HANDOFF_FAILURE_REASONS:
            self.failures.labels(reason)
