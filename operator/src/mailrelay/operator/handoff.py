"""The hand-off token: one Secret ``<relay>-handoff`` per MailRelay, generated once.

The relay pods hand their queue to each other when one leaves (docs/scaling.md); a peer
accepts a hand-off only when the request is proven with this shared token. Like the app
credentials (``appcredentials.py``) the token is random, so the Secret is not rendered from
the spec but made once with ``create`` (never apply) and then left alone: no pass rotates it.
Deleting it makes the next pass generate a new one, which reaches the running pods through
their mounted Secret (``podsync`` touches them when its resourceVersion changes).

Gather, decide, act:

* gather: the Secret's key names and resourceVersion from the watch indices (never values);
* decide (``handoff_secret_action``, pure): nothing to do, look at the live Secret, or create;
* act (``ensure_handoff_secret``): one GET when the cache cannot tell (absent, or a version
  not yet checked): a Secret of that name that this MailRelay does not own is reported and
  left alone (no takeover), one without the key is reported; a missing one is created (409:
  made meanwhile, kept).

The token never appears in a log line, a condition or an Event.
"""

from __future__ import annotations

import base64
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Literal, cast

from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Secret

from mailrelay.operator.appcredentials import selector_labels
from mailrelay.operator.metrics import OperatorMetrics
from mailrelay.operator.relay_config import HANDOFF_KEY, handoff_secret_name
from mailrelay.operator.render import RelayInputs, labels, owner_reference

log = logging.getLogger(__name__)

HANDOFF_COMPONENT = "handoff"
TOKEN_BYTES = 32

Action = Literal["none", "check", "create"]


def new_token() -> str:
    """32 random bytes, URL-safe base64 (the contract with the relay)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).decode()


def render_handoff_secret(relay: RelayInputs, token: str, selector: str = "") -> dict[str, Any]:
    """The hand-off Secret for ``token`` (pure), labelled so the operator's watch sees it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": handoff_secret_name(relay.name),
            "namespace": relay.namespace,
            "labels": {**selector_labels(selector), **labels(relay, HANDOFF_COMPONENT)},
            "ownerReferences": [owner_reference(relay)],
        },
        "data": {HANDOFF_KEY: base64.b64encode(token.encode()).decode()},
    }


def handoff_secret_action(
    cached_keys: frozenset[str] | None, version: str, checked_version: str | None
) -> Action:
    """What a pass must do about the hand-off Secret (pure).

    ``cached_keys`` are its key names in the watch cache (None: not there), ``version`` its
    cached resourceVersion, ``checked_version`` the version a pass last found owned by this
    relay and complete. Only a version not yet checked costs a GET.
    """
    if cached_keys is None:
        return "check"  # absent, or made an instant ago and not in the cache yet
    if version and version == checked_version:
        return "none"
    return "check"


@dataclass(frozen=True)
class HandoffSecretResult:
    """The outcome of one pass: the problem in words (None: in place) and the checked version."""

    problem: str | None
    checked_version: str | None


async def ensure_handoff_secret(
    client: AsyncClient,
    relay: RelayInputs,
    cached_keys: frozenset[str] | None,
    version: str,
    checked_version: str | None,
    *,
    selector: str = "",
    metrics: OperatorMetrics | None = None,
) -> HandoffSecretResult:
    """Make sure the relay's hand-off Secret exists and is its own; never rotate it."""
    name = handoff_secret_name(relay.name)
    if handoff_secret_action(cached_keys, version, checked_version) == "none":
        return HandoffSecretResult(None, checked_version)
    try:
        live = (await client.get(Secret, name, namespace=relay.namespace)).to_dict()
    except ApiError as error:
        if error.status.code != 404:
            raise
    else:
        metadata = live.get("metadata") or {}
        owners = [ref.get("uid") for ref in metadata.get("ownerReferences") or ()]
        if relay.uid not in owners:
            return HandoffSecretResult(
                f"Secret {name} exists and is not owned by this MailRelay; the operator does "
                "not take it over: delete or rename it, and the operator generates the "
                "relay's hand-off token",
                None,
            )
        if HANDOFF_KEY not in (live.get("data") or {}):
            return HandoffSecretResult(
                f"Secret {name} lacks key {HANDOFF_KEY}: delete it and the operator generates "
                "a new hand-off token",
                None,
            )
        return HandoffSecretResult(None, str(metadata.get("resourceVersion") or "") or None)
    body = render_handoff_secret(relay, new_token(), selector)
    try:
        await client.create(cast(Secret, Secret.from_dict(body)))
    except ApiError as error:
        if error.status.code == 409:
            # Made meanwhile (by an earlier pass the cache had not shown): kept, checked next.
            return HandoffSecretResult(None, None)
        return HandoffSecretResult(f"could not create Secret {name}: {error.status.message}", None)
    if metrics is not None:
        metrics.children.labels("Secret", "created").inc()
    log.info(
        "Created Secret %s/%s with the hand-off token of MailRelay %s/%s",
        relay.namespace,
        name,
        relay.namespace,
        relay.name,
    )
    return HandoffSecretResult(None, None)
