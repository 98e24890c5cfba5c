"""Manifests the operator tests apply: a relay with TLS and AUTH, routes, their Secrets."""

from __future__ import annotations

import base64
from functools import cache
from typing import Any

import bcrypt
import trustme

from mailrelay.operator.settings import WATCH_LABEL

API_VERSION = "mailrelay.dev/v1alpha1"


@cache
def _relay_cert() -> tuple[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.example.test", "127.0.0.1")
    return cert.cert_chain_pems[0].bytes().decode(), cert.private_key_pem.bytes().decode()


def secret(name: str, data: dict[str, str], type_: str = "Opaque") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        # The operator watches only Secrets with this label (docs/operator.md).
        "metadata": {"name": name, "labels": {WATCH_LABEL: "true"}},
        "type": type_,
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def tls_secret(name: str = "relay-tls") -> dict[str, Any]:
    cert, key = _relay_cert()
    return secret(name, {"tls.crt": cert, "tls.key": key}, "kubernetes.io/tls")


def users_secret(name: str = "relay-users", password: str = "s3cret-pass") -> dict[str, Any]:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    users = f'users:\n  - username: app\n    password_hash: "{hashed}"\n'
    return secret(name, {"users.yaml": users})


def smtp_credentials(name: str = "smarthost") -> dict[str, Any]:
    return secret(name, {"username": "relay", "password": "upstream-pass"})


def relay(name: str = "outbound", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "replicas": 2,
        "listener": {"port": 587, "tls": {"secretName": "relay-tls"}},
        "auth": {"required": True, "usersSecretRef": {"name": "relay-users", "key": "users.yaml"}},
        "metrics": {"port": 9090},
    }
    body.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": "MailRelay",
        "metadata": {"name": name},
        "spec": body,
    }


def smtp_route(
    name: str,
    *,
    relay_name: str = "outbound",
    host: str = "smtp.example.net",
    port: int = 587,
    priority: int = 100,
    senders: list[str] | None = None,
    credentials: str | None = "smarthost",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    smtp: dict[str, Any] = {"host": host, "port": port, "tls": "starttls"}
    if credentials is not None:
        smtp["credentialsSecretRef"] = {"name": credentials}
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    return {
        "apiVersion": API_VERSION,
        "kind": "MailRoute",
        "metadata": metadata,
        "spec": {
            "relayRef": {"name": relay_name},
            "priority": priority,
            "match": {"senderDomains": senders or []},
            "upstream": {"smtp": smtp},
        },
    }
