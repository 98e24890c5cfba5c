"""The relay's configuration: frozen pydantic models loaded from one YAML file.

`RelayConfig` is the root. Sub-models group one concern each (listener, auth, limits,
spool, retry, delivery, metrics, routes). Upstreams are a discriminated union on
`type`, so the HTTP providers of a later issue slot in beside SMTP. Every field carries
a description because the operator renders this model into a ConfigMap and the docs in
`docs/relay-config.md` follow it field by field.

Secrets never live in this file: TLS keys, the users file and upstream credentials are
paths to files (mounted Secrets in Kubernetes). `referenced_files()` lists them so the
reloader can watch them too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from mailrelay.relay import dkim, netguard, upstream_rules
from mailrelay.relay.problems import validation_problems, yaml_problem

__all__ = [
    "ApiUpstream",
    "AppCredentialConfig",
    "AuthCacheConfig",
    "AuthConfig",
    "ClientLimitsConfig",
    "ConfigError",
    "DeliveryConfig",
    "DkimSigningConfig",
    "HandoffConfig",
    "HandoffListen",
    "LimitsConfig",
    "ListenerConfig",
    "MetricsConfig",
    "OAuth2Config",
    "RateLimit",
    "RelayConfig",
    "RetryPolicy",
    "RouteConfig",
    "RouteMatch",
    "SmtpUpstream",
    "SpoolConfig",
    "TlsFiles",
    "Upstream",
    "load_config",
    "parse_config",
]

# A DNS name (letters, digits, hyphens, dots), or `*.` followed by one.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_RE = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")


class ConfigError(Exception):
    """A configuration file that cannot be read or does not validate; the message is for humans."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsFiles(_Model):
    """A certificate chain and its private key, both PEM files."""

    cert_file: Path = Field(description="PEM certificate chain presented to clients.")
    key_file: Path = Field(description="PEM private key for `cert_file`.")


class ListenerConfig(_Model):
    """Where the relay accepts SMTP."""

    host: str = Field(default="0.0.0.0", description="Address the SMTP listeners bind to.")
    submission_port: int = Field(
        default=587, ge=0, le=65535, description="Submission port (plain, with STARTTLS)."
    )
    implicit_tls_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Optional implicit-TLS port (usually 465); needs `tls`.",
    )
    tls: TlsFiles | None = Field(
        default=None, description="Certificate and key for STARTTLS and the implicit-TLS port."
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Worker processes sharing the ports with SO_REUSEPORT and sharing the spool.",
    )


class AuthCacheConfig(_Model):
    """The cache of successful password checks (docs/relay-config.md, "AUTH cache")."""

    enabled: bool = Field(
        default=True,
        description=(
            "Keep a keyed digest of each (username, password) pair that verified, so a repeated "
            "login skips the bcrypt/argon2 check. Failures are never cached."
        ),
    )
    ttl_seconds: float = Field(
        default=3600,
        gt=0,
        le=86400,
        description="How long a verified pair stays valid in the cache, from the check.",
    )
    max_entries: int = Field(
        default=10000,
        ge=1,
        le=1_000_000,
        description="Most pairs kept; the least recently used goes first (about 200 B each).",
    )


class AppCredentialConfig(_Model):
    """A machine user: a generated 256-bit secret stored as a fast keyed hash."""

    username: str = Field(min_length=1, description="The name the app logs in with.")
    password_hash_file: Path = Field(
        description=(
            "File holding the secret's `$mailrelay-hmac-sha256$` hash (a mounted Secret key)."
        ),
    )
    allowed_sender_domains: list[str] = Field(
        default_factory=list,
        description="Envelope sender domains the app may use; empty: any.",
    )


class AuthConfig(_Model):
    """SMTP AUTH for submission clients."""

    required: bool = Field(
        default=True,
        description=(
            "A users file must be configured and AUTH is offered after TLS. `false` allows a "
            "network-only relay without AUTH (only `allowed_networks` may send). Either way, "
            "a client that is neither authenticated nor in `allowed_networks` gets 530 5.7.0."
        ),
    )
    users_file: Path | None = Field(
        default=None,
        description=(
            "YAML file with a `users` list of {username, password_hash, allowed_sender_domains}; "
            "hashes are bcrypt (`$2b$`) or argon2id (`$argon2id$`)."
        ),
    )
    cache: AuthCacheConfig = Field(
        default_factory=AuthCacheConfig,
        description="Cache of successful password checks; cleared on every reload.",
    )
    app_credentials: list[AppCredentialConfig] = Field(
        default_factory=list,
        description="Machine users with generated secrets, besides the users file's.",
    )


class ClientLimitsConfig(_Model):
    """Fair share per client address, like Postfix's anvil; see docs/relay-config.md.

    A client is an IPv4 address, or an IPv6 network of `ipv6_prefix_length` bits. Limits
    count per relay process (each worker and each pod keeps its own).
    """

    max_connections: int = Field(
        default=50,
        ge=0,
        description=(
            "Concurrent connections one client may hold; more get 421 4.7.0. 0: no limit. "
            "(Postfix's smtpd_client_connection_count_limit.)"
        ),
    )
    connection_rate_per_minute: int = Field(
        default=0,
        ge=0,
        description=(
            "New connections one client may open per minute (a token bucket of this size "
            "refilled over a minute); more get 421 4.7.0. 0: no limit."
        ),
    )
    auth_failures: int = Field(
        default=10,
        ge=0,
        description=(
            "Failed AUTH attempts one client may make within `auth_failure_window_seconds`; "
            "then it is refused with 421 4.7.0 until the oldest failure leaves the window. "
            "0: no limit."
        ),
    )
    auth_failure_window_seconds: float = Field(
        default=300, gt=0, description="The window over which AUTH failures count."
    )
    exempt_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list,
        description="Client networks (CIDRs) that no per-client limit applies to.",
    )
    ipv6_prefix_length: int = Field(
        default=64,
        ge=32,
        le=128,
        description=(
            "IPv6 clients are grouped by this prefix (64: one site or host, as on the "
            "internet; 128: every address on its own, for IPv6 pod networks)."
        ),
    )


class LimitsConfig(_Model):
    """Per-session and per-message limits."""

    max_message_size: int = Field(
        default=26_214_400, ge=1024, description="Largest message accepted, in bytes (SIZE)."
    )
    max_recipients: int = Field(default=100, ge=1, description="Recipients per message.")
    max_connections: int = Field(
        default=200, ge=1, description="Concurrent SMTP sessions per process; more get 421."
    )
    command_timeout_seconds: float = Field(
        default=300, gt=0, description="Idle time allowed between commands."
    )
    data_timeout_seconds: float = Field(
        default=600, gt=0, description="Time allowed to receive the whole DATA section."
    )
    max_received_headers: int = Field(
        default=50, ge=1, description="More Received headers than this means a loop: 554 5.4.6."
    )
    per_client: ClientLimitsConfig = Field(
        default_factory=ClientLimitsConfig,
        description="Limits per client address: connections, connection rate, AUTH failures.",
    )

    max_bytes_in_flight: int | None = Field(
        default=None,
        ge=1024,
        description=(
            "Message bytes one process may hold in flight (from DATA to the end of the first "
            "delivery attempt, and each retry's load); a message that does not fit gets "
            "452 4.3.1. Unset: a quarter of the container's memory limit per worker, or 4 x "
            "`max_message_size` without one; never less than `max_message_size`."
        ),
    )

    @model_validator(mode="after")
    def _budget_fits_a_message(self) -> LimitsConfig:
        if (
            self.max_bytes_in_flight is not None
            and self.max_bytes_in_flight < self.max_message_size
        ):
            raise ValueError(
                f"max_bytes_in_flight ({self.max_bytes_in_flight}) must be at least "
                f"max_message_size ({self.max_message_size}), or no message of the largest "
                "size could ever be accepted"
            )
        return self


class SpoolConfig(_Model):
    """The durable queue on disk."""

    directory: Path = Field(description="Spool directory; holds tmp/, queue/ and deadletter/.")
    min_free_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=0,
        description="Below this much free disk space, MAIL is answered 452 4.3.1.",
    )


class RetryPolicy(_Model):
    """How temporary failures are retried."""

    initial_backoff_seconds: float = Field(
        default=60, gt=0, description="Delay before the first retry."
    )
    max_backoff_seconds: float = Field(
        default=3600, gt=0, description="Upper bound of the doubling delay."
    )
    max_age_seconds: float = Field(
        default=432_000,
        gt=0,
        description="A recipient still undelivered this long after receipt is bounced.",
    )
    jitter: float = Field(
        default=0.2, ge=0, le=1, description="Random spread applied to each delay, as a fraction."
    )

    @model_validator(mode="after")
    def _ordered(self) -> RetryPolicy:
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise ValueError("max_backoff_seconds must be >= initial_backoff_seconds")
        return self


class DeliveryConfig(_Model):
    """The delivery engine's knobs."""

    concurrency: int = Field(default=32, ge=1, description="Deliveries in flight per process.")
    poll_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often the spool is scanned for due retries."
    )


class MetricsConfig(_Model):
    """The HTTP port for /metrics, /healthz and /readyz."""

    host: str = Field(default="0.0.0.0", description="Address the metrics server binds to.")
    port: int = Field(default=9090, ge=0, le=65535, description="Metrics and health port.")


class HandoffListen(_Model):
    """Where the peer hand-off listener binds."""

    host: str = Field(
        default="",
        description="Address to bind; empty: every address of both families.",
    )
    port: int = Field(default=2526, ge=0, le=65535, description="Hand-off port.")


_PEER_RE = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?))"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)


def parse_peer(value: str) -> tuple[str, int | None]:
    """`name`, `name:port`, `[v6]` or `[v6]:port` as (host, port or None)."""
    match = _PEER_RE.match(value)
    port = None if match is None or match["port"] is None else int(match["port"])
    if match is None or (port is not None and not 0 < port < 65536):
        raise ValueError(
            f"peer {value!r} is not a DNS name with an optional :port, such as "
            "relay-headless.mail.svc.cluster.local or [fd00::1]:2526"
        )
    return (match["v6"] or match["name"]), port


def _peer_list(value: object) -> object:
    if isinstance(value, str):
        return [value]
    return value


class HandoffConfig(_Model):
    """Hand-off of the queue to peer relays when this one leaves (docs/relay-delivery.md)."""

    listen: HandoffListen = Field(
        default_factory=HandoffListen, description="The listener peers hand mail to."
    )
    token_file: Path = Field(
        description="File holding the shared secret that signs hand-off requests (a Secret)."
    )
    peers: Annotated[list[str], BeforeValidator(_peer_list)] = Field(
        min_length=1,
        description=(
            "DNS name resolving to the ready peer relays (A and AAAA), e.g. the headless "
            "Service; a list of names is allowed. `name:port` overrides `listen.port`."
        ),
    )
    deadline_seconds: float = Field(
        default=60,
        gt=0,
        description="How long a leaving relay hands off before keeping the rest on its spool.",
    )

    @field_validator("peers")
    @classmethod
    def _peers_parse(cls, value: list[str]) -> list[str]:
        for peer in value:
            parse_peer(peer)
        return value

    def peer_targets(self) -> list[tuple[str, int]]:
        """Each peer name with the port to reach it on."""
        out = []
        for peer in self.peers:
            host, port = parse_peer(peer)
            out.append((host, self.listen.port if port is None else port))
        return out


class RateLimit(_Model):
    """A token bucket per route."""

    per_second: float = Field(gt=0, description="Sustained messages per second.")
    burst: int = Field(ge=1, description="Bucket size: messages allowed at once.")
    on_exceed: Literal["defer", "reject"] = Field(
        default="defer",
        description="`defer` keeps mail queued for later; `reject` answers 450 4.7.0 at RCPT.",
    )


def network_problem(value: str) -> str | None:
    """Why `value` is not a network in CIDR notation, in words; None if it is one.

    One rule for the relay config and the operator's MailRelay spec.
    """
    try:
        ipaddress.ip_network(value)
    except ValueError:
        pass
    else:
        return None
    try:
        meant = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not a network; write it in CIDR notation, like 10.0.0.0/8 or fd00::/8"
    return f"{value} has host bits set; did you mean {meant}?"


def _network(value: object) -> object:
    """A CIDR string as a network, with a message that says what is wrong."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a network in CIDR notation, like 10.0.0.0/8 or fd00::/8")
    problem = network_problem(value.strip())
    if problem is not None:
        raise ValueError(problem)
    return ipaddress.ip_network(value.strip())


def _check_domain_patterns(values: list[str]) -> list[str]:
    out, bad = [], []
    for raw in values:
        value = raw.strip().lower()
        bare = value[2:] if value.startswith("*.") else value
        if "*" in bare or not _DOMAIN_RE.match(bare):
            bad.append(repr(raw))
        out.append(value)
    if bad:
        what = "is not a domain pattern" if len(bad) == 1 else "are not domain patterns"
        raise ValueError(f"{', '.join(bad)} {what}; use `example.com` or `*.example.com`")
    return out


class RouteMatch(_Model):
    """Which mail a route takes; an empty list matches anything."""

    sender_domains: list[str] = Field(
        default_factory=list,
        description="Envelope sender domains: `example.com` exactly, `*.example.com` subdomains.",
    )
    recipient_domains: list[str] = Field(
        default_factory=list,
        description="Recipient domains, same syntax as `sender_domains`.",
    )

    _validate = field_validator("sender_domains", "recipient_domains")(_check_domain_patterns)


_WORDS = upstream_rules.messages()


class OAuth2Config(_Model):
    """SASL XOAUTH2 or OAUTHBEARER (RFC 7628) with a token from an OAuth2 token endpoint.

    See docs/oauth2.md. The token is fetched with the refresh_token or client_credentials
    grant (RFC 6749 sections 6 and 4.4), cached per upstream and refreshed before it
    expires; the files are re-read at every refresh, so a rotated Secret is picked up.
    """

    mechanism: Literal["xoauth2", "oauthbearer"] = Field(
        default="xoauth2",
        description="SASL mechanism: `xoauth2` (Gmail, Microsoft 365) or `oauthbearer` (RFC 7628).",
    )
    grant: Literal["refresh_token", "client_credentials"] = Field(
        description="How a token is obtained: a user's refresh token, or the client's own "
        "credentials (Microsoft 365 app-only access)."
    )
    token_endpoint: str = Field(
        description="The token endpoint URL (https://; http:// only with "
        "`insecure_allow_local_endpoint`)."
    )
    client_id_file: Path = Field(description="File holding the OAuth2 client id.")
    client_secret_file: Path = Field(description="File holding the OAuth2 client secret.")
    refresh_token_file: Path | None = Field(
        default=None,
        description="File holding the refresh token; required for grant `refresh_token`.",
    )
    scopes: list[Annotated[str, Field(min_length=1, pattern=r"^[!#-\[\]-~]+$")]] = Field(
        default_factory=list,
        description="Scopes asked for (space-joined `scope` parameter); none: the grant's own.",
    )
    client_auth: Literal["post", "basic"] = Field(
        default="post",
        description="How the client authenticates to the token endpoint: `post` "
        "(client_secret_post, in the form) or `basic` (client_secret_basic, RFC 6749 2.3.1).",
    )
    refresh_skew_seconds: float = Field(
        default=300,
        ge=0,
        le=3600,
        description="A token is refreshed this long before `expires_in` runs out.",
    )
    timeout_seconds: float = Field(default=30, gt=0, description="Timeout of one token request.")
    ca_file: Path | None = Field(
        default=None, description="CA bundle to verify the token endpoint; default: system CAs."
    )
    insecure_allow_local_endpoint: bool = Field(
        default=False,
        description="Allow `token_endpoint` to reach loopback, link-local and metadata "
        "addresses (and plain http://), for a token server on the pod's own loopback.",
    )

    @model_validator(mode="after")
    def _rules(self) -> OAuth2Config:
        """The rules of ``relay/upstream_rules.py``, which the operator applies too."""
        problems = upstream_rules.oauth2_problems(
            token_endpoint=self.token_endpoint,
            grant=self.grant,
            has_refresh_token=self.refresh_token_file is not None,
            allow_local_endpoint=self.insecure_allow_local_endpoint,
            words=_WORDS,
        )
        if problems:
            raise ValueError(problems[0])
        return self

    def files(self) -> list[Path]:
        """The files this section reads."""
        return [
            p
            for p in (
                self.client_id_file,
                self.client_secret_file,
                self.refresh_token_file,
                self.ca_file,
            )
            if p is not None
        ]


class SmtpUpstream(_Model):
    """An SMTP server the relay forwards to."""

    type: Literal["smtp"] = Field(description="Selects the SMTP transport.")
    name: str = Field(min_length=1, description="Unique name; a metrics label.")
    host: str = Field(min_length=1, description="Server host name or address.")
    port: int = Field(default=587, ge=1, le=65535, description="Server port.")
    tls: Literal["starttls", "implicit", "none"] = Field(
        default="starttls",
        description="`starttls` is required (never a silent downgrade), `implicit` is TLS "
        "from the first byte, `none` is plain text.",
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle to verify the server; default: system CAs."
    )
    username_file: Path | None = Field(default=None, description="File holding the AUTH user.")
    password_file: Path | None = Field(default=None, description="File holding the AUTH password.")
    connect_timeout_seconds: float = Field(default=30, gt=0, description="Connect timeout.")
    timeout_seconds: float = Field(default=120, gt=0, description="Per-command timeout.")
    pool_size: int = Field(default=4, ge=1, description="Connections kept open and reused.")
    insecure_allow_plaintext: bool = Field(
        default=False,
        description="Explicit opt-in to `tls: none` (mail and credentials unencrypted).",
    )
    oauth2: OAuth2Config | None = Field(
        default=None,
        description="Authenticate with an OAuth2 token (XOAUTH2 or OAUTHBEARER) instead of a "
        "password; `username_file` names the mailbox.",
    )

    @model_validator(mode="after")
    def _credentials_pair(self) -> SmtpUpstream:
        if self.oauth2 is not None:
            if self.username_file is None or self.password_file is not None:
                raise ValueError(f"upstream {self.name!r}: {_WORDS.oauth2_password}")
            return self
        if (self.username_file is None) != (self.password_file is None):
            raise ValueError(
                f"upstream {self.name!r}: set both username_file and password_file, or neither"
            )
        return self

    @model_validator(mode="after")
    def _plaintext_opt_in(self) -> SmtpUpstream:
        # The same rule and words as the MailRoute's (upstream_rules), in snake_case.
        if self.tls == "none" and not self.insecure_allow_plaintext:
            raise ValueError(f"upstream {self.name!r}: {_WORDS.smtp_plaintext}")
        return self


class ApiUpstream(_Model):
    """An HTTP mail provider; `docs/providers.md` lists each provider's fields and files."""

    type: Literal["api"] = Field(description="Selects an HTTP provider transport.")
    name: str = Field(min_length=1, description="Unique name; a metrics label.")
    provider: upstream_rules.Provider = Field(description="Which provider API to call.")
    endpoint: str | None = Field(default=None, description="Override of the API base URL.")
    region: str | None = Field(default=None, description="Provider region (SES, Mailgun EU).")
    domain: str | None = Field(default=None, description="Sending domain (Mailgun).")
    credentials_dir: Path | None = Field(
        default=None, description="Directory of credential files (a mounted Secret)."
    )
    connect_timeout_seconds: float = Field(default=10, gt=0, description="HTTP connect timeout.")
    timeout_seconds: float = Field(
        default=60, gt=0, description="HTTP read/write timeout for one API request."
    )
    concurrency: int = Field(default=8, ge=1, description="API requests in flight at once.")
    ca_file: Path | None = Field(
        default=None, description="CA bundle to verify the endpoint; default: system CAs."
    )
    message_stream: str | None = Field(
        default=None, description="Postmark message stream (default: the server's outbound)."
    )
    configuration_set: str | None = Field(
        default=None, description="SES configuration set name for event publishing."
    )
    insecure_allow_local_endpoint: bool = Field(
        default=False,
        description="Allow `endpoint` to reach loopback, link-local, unspecified and cloud "
        "metadata addresses (refused by default, also after DNS resolution).",
    )
    signing_keys: list[str] | None = Field(
        default=None,
        description="Webhook only: ids of up to two HMAC keys, each in the file "
        "`signing_key_<id>` of credentials_dir (rotation: the active one and the next or "
        "previous one). Unset: the one key in `signing_secret` or `api_key`, id `default`.",
    )
    active_signing_key: str | None = Field(
        default=None,
        description="Webhook only: the id of the key that signs (required with two keys).",
    )

    @model_validator(mode="after")
    def _provider_fields(self) -> ApiUpstream:
        """The rules of ``relay/upstream_rules.py``, which the operator applies too."""
        problems = upstream_rules.api_upstream_problems(
            provider=self.provider,
            endpoint=self.endpoint,
            region=self.region,
            domain=self.domain,
            configuration_set=self.configuration_set,
            message_stream=self.message_stream,
            allow_local_endpoint=self.insecure_allow_local_endpoint,
            has_credentials=None,
            words=_WORDS,
            signing_key_ids=self.signing_keys or (),
            active_signing_key=self.active_signing_key,
        )
        if problems:
            raise ValueError(f"upstream {self.name!r}: {problems[0]}")
        return self


Upstream = Annotated[SmtpUpstream | ApiUpstream, Field(discriminator="type")]


class RouteConfig(_Model):
    """One way out: which mail it takes and where it goes."""

    name: str = Field(min_length=1, description="Unique route name; a metrics label.")
    priority: int = Field(default=0, description="Higher priority routes are considered first.")
    match: RouteMatch = Field(
        default_factory=RouteMatch, description="Sender and recipient domains taken."
    )
    upstream: Upstream = Field(description="Primary upstream.")
    fallbacks: list[Upstream] = Field(
        default_factory=list,
        description="Tried in order when the primary fails temporarily.",
    )
    rate_limit: RateLimit | None = Field(default=None, description="Optional token bucket.")
    max_message_size: int | None = Field(
        default=None, ge=1, description="Lower size limit for mail taking this route."
    )
    held: str | None = Field(
        default=None,
        max_length=300,
        pattern=r"^[ -~]+$",
        description=(
            "Set (to why, in plain ASCII): the route neither takes new mail (451 4.7.5 with "
            "this text at RCPT) nor delivers what is queued for it (kept queued, never "
            "expired), so its mail never goes out another way. The operator holds a signing "
            "route whose DKIM key is not usable yet (docs/dkim.md)."
        ),
    )
    dkim: list[DkimSigningConfig] = Field(
        default_factory=list,
        description=(
            "Sign each message with the key of the domain its From header is at or below "
            "(else its envelope sender's, else the first); empty: no signing."
        ),
    )

    @model_validator(mode="after")
    def _signable(self) -> RouteConfig:
        domains = [signing.domain for signing in self.dkim]
        if len(set(domains)) != len(domains):
            raise ValueError(f"route {self.name!r}: dkim lists a domain twice")
        ups = (self.upstream, *self.fallbacks)
        providers = [u.provider for u in ups if isinstance(u, ApiUpstream)]
        problem = upstream_rules.dkim_provider_problem(
            signs=bool(self.dkim), providers=providers, words=_WORDS
        )
        if problem is not None:
            raise ValueError(f"route {self.name!r}: {problem}")
        return self


class DkimSigningConfig(_Model):
    """One signing domain of a route: its selector and key (docs/dkim.md)."""

    domain: str = Field(description="The signing domain (d=); a From domain at or below it.")
    selector: str = Field(
        pattern=dkim.SELECTOR_PATTERN,
        description="The selector (s=); its key is published at <selector>._domainkey.<domain>.",
    )
    private_key_file: Path = Field(
        description=(
            "PEM private key (RSA of 2048 bits or more: rsa-sha256; Ed25519: ed25519-sha256), "
            "a mounted Secret key; the algorithm follows the key."
        )
    )
    headers: list[Annotated[str, Field(pattern=dkim.HEADER_NAME_PATTERN)]] | None = Field(
        default=None,
        min_length=1,
        description="Header fields to sign; unset: RFC 6376's list (From, To, Subject, ...).",
    )
    canonicalization: dkim.Canonicalization = Field(
        default="relaxed/relaxed", description="Header/body canonicalisation."
    )

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        value = value.strip().lower().rstrip(".")
        if not _DOMAIN_RE.match(value):
            raise ValueError(f"{value!r} is not a domain name")
        return value

    @field_validator("headers")
    @classmethod
    def _with_from(cls, value: list[str] | None) -> list[str] | None:
        problem = None if value is None else dkim.headers_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


_UPSTREAM = TypeAdapter[SmtpUpstream | ApiUpstream](Upstream)
Loc = tuple[int | str, ...]


@dataclass(frozen=True)
class _Facts:
    """What the rules across fields look at; None where the input does not say (validly)."""

    route_names: list[tuple[Loc, str]]
    upstreams: list[tuple[Loc, SmtpUpstream | ApiUpstream]]
    users_file: bool | None
    tls: bool | None
    implicit_tls_port: bool | None
    auth_required: bool | None
    allowed_networks: bool | None
    public_networks: list[str] = field(default_factory=list)
    public_networks_allowed: bool | None = None

    @classmethod
    def from_config(cls, config: RelayConfig) -> _Facts:
        """The facts of a config whose fields all validated."""
        upstreams: list[tuple[Loc, SmtpUpstream | ApiUpstream]] = []
        for i, route in enumerate(config.routes):
            upstreams.append((("routes", i, "upstream", "name"), route.upstream))
            upstreams += [
                (("routes", i, "fallbacks", j, "name"), up) for j, up in enumerate(route.fallbacks)
            ]
        return cls(
            route_names=[(("routes", i, "name"), r.name) for i, r in enumerate(config.routes)],
            upstreams=upstreams,
            users_file=config.auth.users_file is not None,
            tls=config.listener.tls is not None,
            implicit_tls_port=config.listener.implicit_tls_port is not None,
            auth_required=config.auth.required,
            allowed_networks=bool(config.allowed_networks),
            public_networks=[str(n) for n in netguard.public_networks(config.allowed_networks)],
            public_networks_allowed=config.insecure_allow_public_networks,
        )

    @classmethod
    def from_input(cls, data: object) -> _Facts:
        """The facts the raw input states validly, when some other field did not validate."""
        root = data if isinstance(data, Mapping) else {}
        routes = root.get("routes")
        route_names: list[tuple[Loc, str]] = []
        upstreams: list[tuple[Loc, SmtpUpstream | ApiUpstream]] = []
        for i, route in enumerate(routes if isinstance(routes, list) else []):
            if not isinstance(route, Mapping):
                continue
            if isinstance(route.get("name"), str) and route["name"]:
                route_names.append((("routes", i, "name"), route["name"]))
            fallbacks = route.get("fallbacks")
            candidates = [(("routes", i, "upstream", "name"), route.get("upstream"))] + [
                (("routes", i, "fallbacks", j, "name"), up)
                for j, up in enumerate(fallbacks if isinstance(fallbacks, list) else [])
            ]
            for loc, raw in candidates:
                with contextlib.suppress(ValidationError):  # reported by its own field
                    upstreams.append((loc, _UPSTREAM.validate_python(raw)))
        auth = _section(root, "auth")
        listener = _section(root, "listener")
        networks = root.get("allowed_networks", [])
        required = auth.get("required", True) if auth is not None else None
        return cls(
            route_names=route_names,
            upstreams=upstreams,
            users_file=None if auth is None else auth.get("users_file") is not None,
            tls=None if listener is None else listener.get("tls") is not None,
            implicit_tls_port=(
                None if listener is None else listener.get("implicit_tls_port") is not None
            ),
            auth_required=required if isinstance(required, bool) else None,
            allowed_networks=bool(networks) if isinstance(networks, list) else None,
            public_networks=_public_networks_of(networks),
            public_networks_allowed=(
                acknowledged
                if isinstance(
                    acknowledged := root.get("insecure_allow_public_networks", False), bool
                )
                else None
            ),
        )


def _public_networks_of(raw: object) -> list[str]:
    """The valid entries of a raw allowed_networks list that reach beyond private ranges."""
    networks = []
    for value in raw if isinstance(raw, list) else []:
        with contextlib.suppress(ValueError, TypeError):  # reported by the field itself
            network = _network(value)
            assert isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network)
            networks.append(network)
    return [str(network) for network in netguard.public_networks(networks)]


def _section(root: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    value = root.get(name, {})
    if value is None:
        return {}
    return value if isinstance(value, Mapping) else None


def _consistency_problems(facts: _Facts) -> list[tuple[Loc, str]]:
    """Every rule across fields that `facts` break (one source for both paths)."""
    problems: list[tuple[Loc, str]] = []
    first_route: dict[str, Loc] = {}
    for loc, name in facts.route_names:
        if name in first_route:
            where = f"routes[{first_route[name][1]}]"
            message = f"route name {name!r} is already used by {where}; names must be unique"
            problems.append((loc, message))
        else:
            first_route[name] = loc
    seen: dict[str, SmtpUpstream | ApiUpstream] = {}
    for loc, upstream in facts.upstreams:
        other = seen.setdefault(upstream.name, upstream)
        if other != upstream:
            problems.append(
                (
                    loc,
                    f"upstream name {upstream.name!r} is used for two different upstreams; "
                    "give each upstream its own name",
                )
            )
    if facts.users_file and facts.tls is False:
        problems.append(
            (
                ("auth", "users_file"),
                "auth.users_file is set but listener.tls is not: AUTH is only offered after "
                "TLS, so configure listener.tls (cert_file, key_file)",
            )
        )
    if facts.implicit_tls_port and facts.tls is False:
        problems.append(
            (("listener", "implicit_tls_port"), "listener.implicit_tls_port needs listener.tls")
        )
    if facts.auth_required and facts.users_file is False:
        problems.append(
            (
                ("auth", "required"),
                "auth.required is true but auth.users_file is not set; set users_file, "
                "or required: false for a relay that only trusts allowed_networks",
            )
        )
    if facts.public_networks and facts.public_networks_allowed is False:
        problems.append(
            (
                ("allowed_networks",),
                netguard.open_relay_message(
                    "allowed_networks",
                    "insecure_allow_public_networks",
                    ", ".join(facts.public_networks),
                ),
            )
        )
    if facts.users_file is False and facts.allowed_networks is False:
        problems.append(
            (
                ("allowed_networks",),
                "no auth.users_file and no allowed_networks: no client could ever send; "
                "add a users file or allowed networks",
            )
        )
    return problems


def _problem(loc: Loc, message: str) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError("value_error", "{message}", {"message": message}),
        loc=loc,
        input=None,
    )


def _init_details(error: ErrorDetails) -> InitErrorDetails:
    """A reported error as pydantic takes it back, to merge with more problems."""
    kind: str | PydanticCustomError = error["type"]
    ctx = dict(error.get("ctx") or {})
    if kind in ("value_error", "assertion_error") or "error" in ctx:
        # Errors raised by validators carry an exception object pydantic cannot rebuild.
        kind = PydanticCustomError(error["type"], "{message}", {"message": error["msg"]})
        ctx = {}
    details = InitErrorDetails(type=kind, loc=error["loc"], input=error.get("input"))
    if ctx:
        details["ctx"] = ctx
    return details


class RelayConfig(_Model):
    """The whole relay configuration."""

    hostname: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$",
        description="Our name in the SMTP greeting and Received header (a DNS name).",
    )
    listener: ListenerConfig = Field(default_factory=ListenerConfig, description="SMTP listeners.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="SMTP AUTH.")
    allowed_networks: list[
        Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]
    ] = Field(
        default_factory=list,
        description="Client networks allowed to send without AUTH. Empty: none.",
    )
    insecure_allow_public_networks: bool = Field(
        default=False,
        description="Acknowledge that `allowed_networks` reach beyond private addresses "
        "(an open relay for those internet clients); refused without it.",
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Limits.")
    spool: SpoolConfig = Field(description="The durable spool.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="Retry policy.")
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig, description="Delivery engine.")
    routes: list[RouteConfig] = Field(description="Routes; a recipient no route takes is refused.")
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig, description="Metrics and health HTTP server."
    )
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format.")
    shutdown_grace_seconds: float = Field(
        default=30, ge=0, description="Time deliveries in flight get to finish on SIGTERM."
    )
    handoff: HandoffConfig | None = Field(
        default=None,
        description="Hand-off of queued mail to peers on shutdown, and the drain command; "
        "absent: off.",
    )
    postmaster: str | None = Field(
        default=None,
        max_length=254,
        description=(
            "Address that `RCPT TO:<Postmaster>` (no domain, RFC 5321 4.5.1) is rewritten to "
            "and routed like any recipient; default `postmaster@` the relay's hostname."
        ),
    )

    @field_validator("postmaster")
    @classmethod
    def _postmaster_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        local, at, domain = value.rpartition("@")
        if not at or not _DOT_ATOM_RE.fullmatch(local) or not _DOMAIN_RE.match(domain.lower()):
            raise ValueError(
                f"postmaster {value!r} is not a plain address; use local@domain, such as "
                "postmaster@example.com"
            )
        return value

    @property
    def postmaster_address(self) -> str:
        """Where `RCPT TO:<Postmaster>` goes."""
        return self.postmaster or f"postmaster@{self.hostname}"

    @model_validator(mode="wrap")
    @classmethod
    def _consistent(cls, data: Any, handler: ModelWrapValidatorHandler[RelayConfig]) -> RelayConfig:
        """Rules across fields, checked even when some field is invalid, so that a file's
        problems are all listed at once (a bad domain pattern must not hide a repeated
        route name)."""
        try:
            config = handler(data)
        except ValidationError as exc:
            extra = _consistency_problems(_Facts.from_input(data))
            if not extra:
                raise
            details = [_init_details(e) for e in exc.errors()]
            raise ValidationError.from_exception_data(
                cls.__name__, details + [_problem(loc, msg) for loc, msg in extra]
            ) from None
        problems = _consistency_problems(_Facts.from_config(config))
        if problems:
            raise ValidationError.from_exception_data(
                cls.__name__, [_problem(loc, msg) for loc, msg in problems]
            )
        return config

    def upstreams(self) -> dict[str, SmtpUpstream | ApiUpstream]:
        """Every distinct upstream by name (primaries and fallbacks)."""
        out: dict[str, SmtpUpstream | ApiUpstream] = {}
        for route in self.routes:
            for upstream in (route.upstream, *route.fallbacks):
                out.setdefault(upstream.name, upstream)
        return out

    def referenced_files(self) -> list[Path]:
        """Files whose content the running relay depends on, so a change means a reload."""
        files: list[Path] = []
        if self.listener.tls is not None:
            files += [self.listener.tls.cert_file, self.listener.tls.key_file]
        if self.auth.users_file is not None:
            files.append(self.auth.users_file)
        files += [app.password_hash_file for app in self.auth.app_credentials]
        if self.handoff is not None:
            files.append(self.handoff.token_file)
        files += [signing.private_key_file for r in self.routes for signing in r.dkim]
        for upstream in self.upstreams().values():
            if isinstance(upstream, SmtpUpstream):
                files += [
                    p
                    for p in (upstream.ca_file, upstream.username_file, upstream.password_file)
                    if p is not None
                ]
                if upstream.oauth2 is not None:
                    files += upstream.oauth2.files()
            else:
                files += [p for p in (upstream.credentials_dir, upstream.ca_file) if p is not None]
        return files

    def restart_settings(self) -> dict[str, Any]:
        """The settings a hot reload keeps (they apply after a restart), by section name.

        The one rule for both sides: the relay logs a reload that changes any of them, and the
        operator rolls the pods when they change (anything else reaches running pods by reload).
        """
        settings: dict[str, Any] = {
            "listener": self.listener.model_copy(update={"tls": None}).model_dump(mode="json"),
            "metrics": self.metrics.model_dump(mode="json"),
            "spool.directory": str(self.spool.directory),
        }
        if self.handoff is not None:
            # Only when set, so relays without the block keep their digest.
            settings["handoff.listen"] = self.handoff.listen.model_dump(mode="json")
        return settings


def _format_validation_error(source: str, exc: ValidationError, data: object) -> str:
    problems = validation_problems(exc, data)
    lines = [f"{source}: invalid relay configuration ({len(problems)} problem(s)):"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


def _resolve_paths(config: RelayConfig, base: Path) -> RelayConfig:
    """Relative paths in the file are relative to the file's directory, like most daemons."""

    def fix(value: object) -> object:
        if isinstance(value, Path) and not value.is_absolute():
            return base / value
        if isinstance(value, BaseModel):
            updates = {name: fix(getattr(value, name)) for name in type(value).model_fields}
            return value.model_copy(update=updates)
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    fixed = fix(config)
    assert isinstance(fixed, RelayConfig)
    return fixed


def parse_config(
    text: str, *, source: str = "<config>", base_dir: Path | None = None
) -> RelayConfig:
    """Parse YAML text into a validated config, or raise ConfigError with a readable message."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    try:
        config = RelayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc, data)) from None
    return _resolve_paths(config, base_dir) if base_dir is not None else config


def load_config(path: Path | str) -> RelayConfig:
    """Read and validate the config file; relative paths inside resolve against its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    return parse_config(text, source=str(path), base_dir=path.parent.absolute())
