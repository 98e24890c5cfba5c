"""MailRelay spec + bound, resolved MailRoutes -> the relay's own ``RelayConfig``.

Pure functions only. The operator never invents a config format: it builds
``mailrelay.relay.config.RelayConfig`` objects, so pydantic validation of the relay itself
refuses anything the relay would refuse, and ``render_config_yaml`` dumps exactly what
``load_config`` reads back.

Secrets are never read here. Every secret the relay needs is a file under a fixed mount path
(``SecretMount`` below, shared with ``render.py``): the TLS keypair, the users file, and one
directory per route upstream whose Secret keys are projected to the file names the relay's
transports expect (``username``, ``password``, ``ca.crt``, ``api_key``,
``aws_access_key_id``, ``aws_secret_access_key``, a webhook's ``signing_key_<id>``,
and for OAuth2 ``client_id``, ``client_secret``, ``refresh_token``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml
from pydantic import ValidationError

from mailrelay.operator import models
from mailrelay.operator.dkim import DkimChoice
from mailrelay.relay import config as relay
from mailrelay.relay import upstream_rules
from mailrelay.relay.problems import validation_problems

CONFIG_DIR = PurePosixPath("/etc/mailrelay/config")
CONFIG_KEY = "relay.yaml"
TLS_DIR = PurePosixPath("/etc/mailrelay/tls")
USERS_DIR = PurePosixPath("/etc/mailrelay/users")
USERS_FILE = "users.yaml"
UPSTREAMS_DIR = PurePosixPath("/etc/mailrelay/upstreams")
APPS_DIR = PurePosixPath("/etc/mailrelay/apps")
DKIM_DIR = PurePosixPath("/etc/mailrelay/dkim")
# Keys of an app credential Secret (the operator writes them; see app_credential_secret).
APP_USERNAME_KEY = "username"
APP_PASSWORD_KEY = "password"
APP_HASH_KEY = "password_hash"
SPOOL_DIR = PurePosixPath("/var/spool/mailrelay")
# Queue hand-off between the relay's pods (docs/scaling.md): the operator-generated token,
# mounted read-only from the Secret <relay>-handoff, and the peers' listener.
HANDOFF_DIR = PurePosixPath("/etc/mailrelay/handoff")
HANDOFF_KEY = "token"
HANDOFF_PORT = 2526
HANDOFF_PORT_NAME = "handoff"

# File names the relay's transports read inside an upstream's directory.
SMTP_USERNAME_FILE = "username"
SMTP_PASSWORD_FILE = "password"
CA_FILE = "ca.crt"
API_KEY_FILE = "api_key"
AWS_ACCESS_KEY_ID_FILE = "aws_access_key_id"
AWS_SECRET_ACCESS_KEY_FILE = "aws_secret_access_key"
OAUTH2_CLIENT_ID_FILE = "client_id"
OAUTH2_CLIENT_SECRET_FILE = "client_secret"
OAUTH2_REFRESH_TOKEN_FILE = "refresh_token"


class RelayConfigError(ValueError):
    """The spec and routes do not make a config the relay accepts; the message says why."""


@dataclass(frozen=True)
class BoundRoute:
    """A MailRoute bound to the relay whose Secrets and keys all exist."""

    name: str
    spec: models.MailRouteSpec
    # The selector each DKIM domain signs with (judged against DNS by operator/dkim.py).
    dkim: tuple[DkimChoice, ...] = ()
    # Why a signing route that cannot sign yet is held (rendered without Secrets).
    held: str | None = None


@dataclass(frozen=True)
class SecretMount:
    """One Secret volume: which keys go to which file names, and where it is mounted."""

    volume: str
    secret_name: str
    mount_path: str
    items: tuple[tuple[str, str], ...]  # (secret key, file name), sorted

    def files(self) -> dict[str, str]:
        """File path -> secret key, for tests and for the demo's kubelet-like layout."""
        return {f"{self.mount_path}/{path}": key for key, path in self.items}


def _volume_name(prefix: str, *parts: str) -> str:
    """A stable, DNS-1123 label volume name (names may be up to 253 characters)."""
    digest = hashlib.sha256("/".join(parts).encode()).hexdigest()[:12]
    return f"{prefix}-{digest}"


def secret_mounts(spec: models.MailRelaySpec, routes: Sequence[BoundRoute]) -> list[SecretMount]:
    """Every Secret volume the relay pod needs, in a stable order."""
    mounts: list[SecretMount] = []
    if spec.listener.tls is not None:
        mounts.append(
            SecretMount(
                "tls",
                spec.listener.tls.secret_name,
                str(TLS_DIR),
                (("tls.crt", "tls.crt"), ("tls.key", "tls.key")),
            )
        )
    if spec.auth.users_secret_ref is not None:
        ref = spec.auth.users_secret_ref
        mounts.append(SecretMount("users", ref.name, str(USERS_DIR), ((ref.key, USERS_FILE),)))
    shared: dict[str, SecretMount] = {}
    for route in sorted(routes, key=lambda r: r.name):
        if route.held is not None:
            continue  # its Secrets may not exist: a held route mounts none
        for upstream in (route.spec.upstream, *route.spec.fallbacks):
            for mount in _upstream_mounts(upstream):
                shared.setdefault(mount.volume, mount)
        for mount in _dkim_mounts(route.spec):
            shared.setdefault(mount.volume, mount)
    return mounts + sorted(shared.values(), key=lambda mount: mount.volume)


def headless_service_name(relay: str) -> str:
    """The StatefulSet's governing Service; its DNS name resolves to the ready relay pods."""
    return f"{relay}-headless"


def handoff_secret_name(relay: str) -> str:
    """The Secret holding the relay pods' shared hand-off token (generated once)."""
    return f"{relay}-handoff"


def handoff_mount(relay_name: str) -> SecretMount:
    """The hand-off token, for the relay pods and the drain Jobs alike."""
    return SecretMount(
        "handoff",
        handoff_secret_name(relay_name),
        str(HANDOFF_DIR),
        ((HANDOFF_KEY, HANDOFF_KEY),),
    )


def _dkim_file(key: str) -> str:
    """A file name for a Secret key (keys may be any [-._a-zA-Z0-9]+, even ``..``)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16] + ".key"


def _dkim_mounts(spec: models.MailRouteSpec) -> list[SecretMount]:
    """One volume per DKIM key Secret, with the keys of both selectors (active and next):
    switching between them changes only the config, which the relay reloads in place."""
    by_secret: dict[str, set[tuple[str, str]]] = {}
    for domain in spec.dkim:
        for _, selector in domain.selectors():
            ref = selector.secret_ref
            by_secret.setdefault(ref.name, set()).add((ref.key, _dkim_file(ref.key)))
    mounts = []
    for secret, items in sorted(by_secret.items()):
        files = tuple(sorted(items))
        volume = _volume_name("dkim", secret, *(f"{key}={name}" for key, name in files))
        directory = DKIM_DIR / volume.removeprefix("dkim-")
        mounts.append(SecretMount(volume, secret, str(directory), files))
    return mounts


def app_secret_name(relay_name: str, app: str) -> str:
    """The Secret the operator keeps an app's generated credentials in."""
    return f"{relay_name}-app-{app}"


def app_credential_mounts(relay_name: str, spec: models.MailRelaySpec) -> list[SecretMount]:
    """One volume per app credential: only its hash, never the password, reaches the relay."""
    return [
        SecretMount(
            f"app-{app.name}",
            app_secret_name(relay_name, app.name),
            str(APPS_DIR / app.name),
            ((APP_HASH_KEY, APP_HASH_KEY),),
        )
        for app in sorted(spec.auth.app_credentials, key=lambda a: a.name)
    ]


def _upstream_mounts(upstream: models.Upstream) -> list[SecretMount]:
    """The Secret volumes of one upstream: one per Secret it reads, mounted at
    ``upstreams/<digest of the Secret's name and the files taken from it>`` (the config
    names paths only, never a Secret).

    Upstreams that read the same files of the same Secret share one volume, so a new route
    reusing credentials already mounted leaves the pod template (and the running pods) as
    they are: the relay reloads it in place. Volumes are never nested (Secret volumes are
    read-only, no mount point could be made inside one).
    """
    by_secret: dict[str, list[tuple[str, str]]] = {}
    if upstream.smtp is not None:
        creds = upstream.smtp.credentials_secret_ref
        if creds is not None:
            by_secret.setdefault(creds.name, []).extend(
                [(creds.username_key, SMTP_USERNAME_FILE), (creds.password_key, SMTP_PASSWORD_FILE)]
            )
        ca = upstream.smtp.ca_secret_ref
        if ca is not None:
            by_secret.setdefault(ca.name, []).append((ca.key, CA_FILE))
        oauth = upstream.smtp.oauth2
        if oauth is not None:
            oauth_ref = oauth.secret_ref
            items = [
                (oauth_ref.username_key, SMTP_USERNAME_FILE),
                (oauth_ref.client_id_key, OAUTH2_CLIENT_ID_FILE),
                (oauth_ref.client_secret_key, OAUTH2_CLIENT_SECRET_FILE),
            ]
            if oauth.grant == "refresh_token":
                items.append((oauth_ref.refresh_token_key, OAUTH2_REFRESH_TOKEN_FILE))
            by_secret.setdefault(oauth_ref.name, []).extend(items)
    elif upstream.api is not None and upstream.api.credentials_secret_ref is not None:
        ref = upstream.api.credentials_secret_ref
        by_secret[ref.name] = api_secret_files(upstream.api)
    mounts = []
    for secret, items in sorted(by_secret.items()):
        files = tuple(sorted(set(items)))
        volume = _volume_name("up", secret, *(f"{key}={name}" for key, name in files))
        directory = UPSTREAMS_DIR / volume.removeprefix("up-")
        mounts.append(SecretMount(volume, secret, str(directory), files))
    return mounts


def api_secret_files(api: models.ApiUpstream) -> list[tuple[str, str]]:
    """(Secret key, file name) of an API upstream's credentials Secret: the AWS key pair
    for SES, each signing key for a webhook that names them, else the API key."""
    ref = api.credentials_secret_ref
    assert ref is not None
    if api.provider == "ses":
        return [
            (ref.access_key_id_key, AWS_ACCESS_KEY_ID_FILE),
            (ref.secret_access_key_key, AWS_SECRET_ACCESS_KEY_FILE),
        ]
    if api.signing_keys:
        return [(k.secret_key, upstream_rules.signing_key_file(k.id)) for k in api.signing_keys]
    return [(ref.api_key_key, API_KEY_FILE)]


def uses_ambient_aws(routes: Sequence[BoundRoute]) -> bool:
    """Whether a bound route has an SES upstream without static keys (the pod's AWS identity)."""
    return any(
        upstream.api is not None
        and upstream.api.provider in models.AMBIENT_CREDENTIAL_PROVIDERS
        and upstream.api.credentials_secret_ref is None
        for route in routes
        for upstream in (route.spec.upstream, *route.spec.fallbacks)
    )


def required_secret_keys(
    spec: models.MailRelaySpec, routes: Sequence[BoundRoute]
) -> dict[str, set[str]]:
    """Secret name -> keys the relay's mounts need (for the resolver and the tests)."""
    needed: dict[str, set[str]] = {}
    for mount in secret_mounts(spec, routes):
        needed.setdefault(mount.secret_name, set()).update(key for key, _ in mount.items)
    return needed


def _file_for(mounts: Sequence[SecretMount], secret: str, key: str) -> str:
    for mount in mounts:
        if mount.secret_name == secret:
            for item_key, file_name in mount.items:
                if item_key == key:
                    return f"{mount.mount_path}/{file_name}"
    raise AssertionError(f"no mount for {secret}/{key}")  # _upstream_mounts() covers every ref


def _seconds(duration: str) -> float:
    return models.parse_duration(duration).total_seconds()


def upstream_name(route: str, index: int) -> str:
    """The relay config's name of a route's upstream: index 0 is the primary."""
    return route if index == 0 else f"{route}-fallback-{index}"


def _upstream_config(route: str, index: int, upstream: models.Upstream) -> dict[str, Any]:
    name = upstream_name(route, index)
    mounts = _upstream_mounts(upstream)
    if upstream.smtp is not None:
        smtp = upstream.smtp
        out: dict[str, Any] = {
            "type": "smtp",
            "name": name,
            "host": smtp.host,
            "port": smtp.port,
            "tls": smtp.tls,
        }
        if smtp.insecure_allow_plaintext:
            out["insecure_allow_plaintext"] = True
        if smtp.credentials_secret_ref is not None:
            creds = smtp.credentials_secret_ref
            out["username_file"] = _file_for(mounts, creds.name, creds.username_key)
            out["password_file"] = _file_for(mounts, creds.name, creds.password_key)
        if smtp.ca_secret_ref is not None:
            ca = smtp.ca_secret_ref
            out["ca_file"] = _file_for(mounts, ca.name, ca.key)
        if smtp.oauth2 is not None:
            out.update(_oauth2_config(smtp.oauth2, mounts))
        return out
    assert upstream.api is not None
    api = upstream.api
    out = {"type": "api", "name": name, "provider": api.provider}
    for field in ("endpoint", "region", "domain", "message_stream", "configuration_set"):
        value = getattr(api, field)
        if value is not None:
            out[field] = value
    if api.credentials_secret_ref is not None:
        (mount,) = mounts
        out["credentials_dir"] = mount.mount_path
    if api.signing_keys:
        out["signing_keys"] = [k.id for k in api.signing_keys]
    if api.active_signing_key is not None:
        out["active_signing_key"] = api.active_signing_key
    if api.insecure_allow_local_endpoint:
        out["insecure_allow_local_endpoint"] = True
    return out


def _oauth2_config(oauth: models.SmtpOAuth2, mounts: Sequence[SecretMount]) -> dict[str, Any]:
    """The SMTP upstream's ``username_file`` and ``oauth2`` section."""
    ref = oauth.secret_ref
    section: dict[str, Any] = {
        "mechanism": oauth.mechanism,
        "grant": oauth.grant,
        "token_endpoint": oauth.token_endpoint,
        "client_id_file": _file_for(mounts, ref.name, ref.client_id_key),
        "client_secret_file": _file_for(mounts, ref.name, ref.client_secret_key),
        "scopes": list(oauth.scopes),
        "client_auth": oauth.client_auth,
        "insecure_allow_local_endpoint": oauth.insecure_allow_local_endpoint,
    }
    if oauth.grant == "refresh_token":
        section["refresh_token_file"] = _file_for(mounts, ref.name, ref.refresh_token_key)
    return {"username_file": _file_for(mounts, ref.name, ref.username_key), "oauth2": section}


def _without_secrets(upstream: models.Upstream) -> models.Upstream:
    """The upstream with no Secret references (a held route names no files)."""
    if upstream.smtp is not None:
        smtp = upstream.smtp.model_copy(
            update={"credentials_secret_ref": None, "ca_secret_ref": None, "oauth2": None}
        )
        return upstream.model_copy(update={"smtp": smtp})
    assert upstream.api is not None
    api = upstream.api.model_copy(update={"credentials_secret_ref": None})
    return upstream.model_copy(update={"api": api})


def _route_config(route: BoundRoute) -> dict[str, Any]:
    spec = route.spec
    upstreams = [spec.upstream, *spec.fallbacks]
    if route.held is not None:
        upstreams = [_without_secrets(upstream) for upstream in upstreams]
    out: dict[str, Any] = {
        "name": route.name,
        "priority": spec.priority,
        "match": {
            "sender_domains": list(spec.match.sender_domains),
            "recipient_domains": list(spec.match.recipient_domains),
        },
        "upstream": _upstream_config(route.name, 0, upstreams[0]),
        "fallbacks": [
            _upstream_config(route.name, index, upstream)
            for index, upstream in enumerate(upstreams[1:], start=1)
        ],
    }
    if route.held is not None:
        out["held"] = route.held
    if spec.rate_limit is not None:
        limit = spec.rate_limit
        out["rate_limit"] = {
            "per_second": limit.per_second,
            "burst": limit.burst if limit.burst is not None else math.ceil(limit.per_second),
            "on_exceed": limit.on_exceed,
        }
    if spec.max_message_size is not None:
        out["max_message_size"] = spec.max_message_size
    if route.dkim:
        mounts = _dkim_mounts(spec)
        out["dkim"] = [
            {
                "domain": choice.domain,
                "selector": choice.selector,
                "private_key_file": _file_for(mounts, choice.secret, choice.key),
                "canonicalization": choice.canonicalization,
                **({"headers": list(choice.headers)} if choice.headers is not None else {}),
            }
            for choice in route.dkim
        ]
    return out


def _per_client_limits(limits: models.PerClientLimits) -> dict[str, Any]:
    return {
        "max_connections": limits.max_connections,
        "connection_rate_per_minute": limits.connection_rate_per_minute,
        "auth_failures": limits.auth_failures,
        "auth_failure_window_seconds": _seconds(limits.auth_failure_window),
        "exempt_networks": list(limits.exempt_networks),
        "ipv6_prefix_length": limits.ipv6_prefix_length,
    }


# Every address of both families the pod has: asyncio binds "" as one socket per family
# (IPv4 0.0.0.0 and IPv6 ::), so the relay serves IPv4-only, IPv6-only and dual-stack pods.
# "::" alone would drop IPv4 (asyncio sets IPV6_V6ONLY) and "0.0.0.0" drops IPv6.
ALL_ADDRESSES = ""


def build_relay_config(
    *,
    name: str,
    namespace: str,
    spec: models.MailRelaySpec,
    routes: Sequence[BoundRoute],
    log_format: str = "text",
    drain_seconds: float = 60.0,
    cluster_domain: str = "cluster.local",
    handoff_seconds: float = 60.0,
) -> relay.RelayConfig:
    """The relay's config for this spec and these routes; RelayConfigError if it refuses."""
    listener: dict[str, Any] = {
        "host": ALL_ADDRESSES,
        "submission_port": spec.listener.port,
        "implicit_tls_port": spec.listener.implicit_tls_port,
    }
    if spec.listener.tls is not None:
        listener["tls"] = {
            "cert_file": str(TLS_DIR / "tls.crt"),
            "key_file": str(TLS_DIR / "tls.key"),
        }
    retry = spec.queue.retry
    data: dict[str, Any] = {
        "hostname": spec.listener.hostname or f"{name}.{namespace}.svc.{cluster_domain}",
        "listener": listener,
        "auth": {
            "required": spec.auth.required,
            "users_file": (
                str(USERS_DIR / USERS_FILE) if spec.auth.users_secret_ref is not None else None
            ),
            "app_credentials": [
                {
                    "username": app.name,
                    "password_hash_file": str(APPS_DIR / app.name / APP_HASH_KEY),
                    "allowed_sender_domains": list(app.allowed_sender_domains),
                }
                for app in sorted(spec.auth.app_credentials, key=lambda a: a.name)
            ],
            "cache": {
                "enabled": spec.auth.cache.enabled,
                "ttl_seconds": _seconds(spec.auth.cache.ttl),
                "max_entries": spec.auth.cache.max_entries,
            },
        },
        "allowed_networks": list(spec.allowed_networks),
        "insecure_allow_public_networks": spec.insecure_allow_public_networks,
        "limits": {
            "max_message_size": spec.limits.max_message_size,
            "max_recipients": spec.limits.max_recipients,
            "max_connections": spec.limits.max_connections,
            **(
                {"max_bytes_in_flight": spec.limits.max_bytes_in_flight}
                if spec.limits.max_bytes_in_flight is not None
                else {}
            ),
            "per_client": _per_client_limits(spec.limits.per_client),
        },
        "spool": {"directory": str(SPOOL_DIR)},
        "retry": {
            "initial_backoff_seconds": _seconds(retry.initial_backoff),
            "max_backoff_seconds": _seconds(retry.max_backoff),
            "max_age_seconds": _seconds(retry.max_age),
        },
        "routes": [_route_config(route) for route in sorted(routes, key=lambda r: r.name)],
        "metrics": {"host": ALL_ADDRESSES, "port": spec.metrics.port},
        "log_format": log_format,
        "shutdown_grace_seconds": drain_seconds,
        "handoff": {
            "listen": {"host": ALL_ADDRESSES, "port": HANDOFF_PORT},
            "token_file": str(HANDOFF_DIR / HANDOFF_KEY),
            "peers": f"{headless_service_name(name)}.{namespace}.svc.{cluster_domain}",
            "deadline_seconds": handoff_seconds,
        },
        "postmaster": spec.postmaster,
    }
    try:
        return relay.RelayConfig.model_validate(data)
    except ValidationError as error:
        raise RelayConfigError("; ".join(validation_problems(error, data))) from None


# libyaml's emitter when PyYAML has it: the pure-Python one dominates a reconcile pass.
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def render_config_yaml(config: relay.RelayConfig) -> str:
    """The YAML text ``mailrelay.relay.config.load_config`` reads back into ``config``."""
    data = config.model_dump(mode="json", exclude_none=True)
    for route in data.get("routes", []):
        # Routes that do not sign render as before DKIM existed: no config (and no pod)
        # changes on an operator upgrade.
        if not route.get("dkim"):
            route.pop("dkim", None)
    return _yaml_of(json.dumps(data, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _yaml_of(json_text: str) -> str:
    """YAML for a JSON document; cached, as most passes re-render an unchanged config."""
    return yaml.dump(
        json.loads(json_text), Dumper=_DUMPER, sort_keys=True, default_flow_style=False
    )


def config_hash(*parts: str) -> str:
    """A short, stable hash of the rendered config (and anything else that should roll pods)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
