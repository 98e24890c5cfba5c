"""Generated app credentials: one Secret per app of ``spec.auth.appCredentials``.

Apps are machines: they do not need a password a person can remember, and a bcrypt check
per login costs a relay a quarter of a second of CPU. For each app the operator keeps a
Secret ``<relay>-app-<name>`` with ``username``, ``password`` (256 random bits) and
``password_hash`` (``mailrelay.relay.machinehash``: a salted HMAC-SHA256 the relay checks in
microseconds). The app mounts ``username`` and ``password``; the relay mounts only
``password_hash`` (``relay_config.app_credential_mounts``).

The password is random, so this is the one child that is not rendered from the spec: it
is made once, with ``create`` (never apply), and then left alone. Gather, decide, act:

* gather: which keys each app Secret has, from the Secret index (never the values);
* decide (``plan_app_secrets``, pure): which Secrets to create, which exist but lack keys;
* act (``ensure_app_secrets``): create the missing ones; a 409 means one exists already
  (the index lagged behind), which is kept, so a password never changes behind an app's
  back. Rotation is deleting the Secret: the next pass makes a new one.

The operator never reads a Secret's values, and no value is logged or put in a condition.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any, cast

from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Secret

from mailrelay.operator import models
from mailrelay.operator.metrics import OperatorMetrics
from mailrelay.operator.relay_config import (
    APP_HASH_KEY,
    APP_PASSWORD_KEY,
    APP_USERNAME_KEY,
    app_secret_name,
)
from mailrelay.operator.render import RelayInputs, labels, owner_reference
from mailrelay.operator.routes import SecretKeys
from mailrelay.relay.machinehash import hash_machine_secret, new_machine_secret

__all__ = ["AppSecretPlan", "ensure_app_secrets", "plan_app_secrets", "render_app_secret"]

log = logging.getLogger(__name__)

APP_KEYS = frozenset({APP_USERNAME_KEY, APP_PASSWORD_KEY, APP_HASH_KEY})
APP_COMPONENT = "app-credentials"
APP_LABEL = "mailrelay.dev/app"


@dataclass(frozen=True)
class AppSecretPlan:
    """What a pass must do about the app Secrets of one relay."""

    create: tuple[models.AppCredential, ...]
    incomplete: tuple[tuple[str, tuple[str, ...]], ...]  # (Secret name, missing keys)


def selector_labels(selector: str) -> dict[str, str]:
    """Labels that put a Secret inside an equality selector such as ``a=b,c==d`` (pure).

    The operator watches only the Secrets its selector matches; its own Secrets carry
    these labels so it sees them. Terms other than equalities are left out.
    """
    found: dict[str, str] = {}
    for term in selector.split(","):
        key, sep, value = term.strip().replace("==", "=").partition("=")
        if sep and key and "!" not in key and " " not in key:
            found[key] = value
    return found


def plan_app_secrets(
    relay_name: str, spec: models.MailRelaySpec, secret_keys: SecretKeys
) -> AppSecretPlan:
    """Which app Secrets are missing, and which exist without every key (pure)."""
    create: list[models.AppCredential] = []
    incomplete: list[tuple[str, tuple[str, ...]]] = []
    for app in sorted(spec.auth.app_credentials, key=lambda a: a.name):
        name = app_secret_name(relay_name, app.name)
        keys = secret_keys(name)
        if not isinstance(keys, frozenset):
            # Not in the watch cache: absent (or made by an earlier pass the cache has not
            # shown yet: the create then answers 409 and the Secret is kept).
            create.append(app)
        elif not keys >= APP_KEYS:
            incomplete.append((name, tuple(sorted(APP_KEYS - keys))))
    return AppSecretPlan(tuple(create), tuple(incomplete))


def render_app_secret(
    relay: RelayInputs,
    app: models.AppCredential,
    password: str,
    password_hash: str,
    selector: str = "",
) -> dict[str, Any]:
    """The Secret of one app, for the given generated password and its hash (pure).

    It carries the labels of the operator's Secret ``selector``, so the watch sees it.
    """

    def b64(value: str) -> str:
        return base64.b64encode(value.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": app_secret_name(relay.name, app.name),
            "namespace": relay.namespace,
            "labels": {
                **selector_labels(selector),
                **labels(relay, APP_COMPONENT),
                APP_LABEL: app.name,
            },
            "ownerReferences": [owner_reference(relay)],
        },
        "data": {
            APP_USERNAME_KEY: b64(app.name),
            APP_PASSWORD_KEY: b64(password),
            APP_HASH_KEY: b64(password_hash),
        },
    }


async def ensure_app_secrets(
    client: AsyncClient,
    relay: RelayInputs,
    secret_keys: SecretKeys,
    *,
    selector: str = "",
    metrics: OperatorMetrics | None = None,
) -> list[str]:
    """Create missing app Secrets; the problems left, in words (empty when all is well)."""
    plan = plan_app_secrets(relay.name, relay.spec, secret_keys)
    problems = [
        f"Secret {name} lacks key(s) {', '.join(missing)}: delete it and the operator "
        "generates new credentials"
        for name, missing in plan.incomplete
    ]
    for app in plan.create:
        password = new_machine_secret()
        body = render_app_secret(
            relay, app, password, hash_machine_secret(password), selector=selector
        )
        name = body["metadata"]["name"]
        try:
            await client.create(cast(Secret, Secret.from_dict(body)))
        except ApiError as error:
            if error.status.code == 409:
                continue  # made by an earlier pass the index has not shown yet: keep it
            problems.append(f"could not create Secret {name}: {error.status.message}")
            continue
        if metrics is not None:
            metrics.children.labels("Secret", "created").inc()
        log.info(
            "Created Secret %s/%s with generated credentials for app %s of MailRelay %s/%s",
            relay.namespace,
            name,
            app.name,
            relay.namespace,
            relay.name,
        )
    return problems
