"""Make kubelet refresh a relay's mounted config at once, without rolling its pods.

A config change that the relay can hot reload (routes, users, limits: everything but
``RelayConfig.restart_settings``) does not change the pod template, so the pods keep
running. Kubelet copies a changed ConfigMap into the pods' volumes only when it syncs a
pod, which without a pod event happens on its periodic resync (``syncFrequency``, one
minute by default, plus the ConfigMap cache's own delay). An update of the pod object is
such an event: the operator patches ``mailrelay.dev/config-hash`` on each running pod of
the relay with the new config's hash, kubelet syncs the pod and refreshes its volumes, and
the relay (which polls its files every second) reloads. The same holds for the Secrets
the pods mount (TLS certificate, users file, upstream credentials): a second annotation,
``mailrelay.dev/secrets-hash``, digests the resourceVersion of each watched Secret
(``reload_marks``), so a rotated certificate or a changed password reaches the pods
within seconds too. Secrets outside the operator's label selector are not watched, so a
change to them waits for kubelet's periodic resync.

Deciding which pods need the patch is pure (``pods_to_touch``); ``touch_pods`` lists the
relay's pods by its selector and patches those. The patch is metadata only: the
StatefulSet controller ignores pod annotations, so nothing restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

log = logging.getLogger(__name__)

POD_CONFIG_HASH_ANNOTATION = "mailrelay.dev/config-hash"
POD_SECRETS_HASH_ANNOTATION = "mailrelay.dev/secrets-hash"
_DONE_PHASES = frozenset({"Succeeded", "Failed"})


def reload_marks(config_hash: str, secret_versions: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The annotations that say what a pod should have loaded.

    ``mailrelay.dev/config-hash`` is the config's hash (the relay's ``status.configHash``);
    ``mailrelay.dev/secrets-hash`` digests the resourceVersion of each mounted Secret the
    operator watches (a version is "" when it does not), absent when there is none.
    """
    marks = {POD_CONFIG_HASH_ANNOTATION: config_hash}
    versions = sorted((name, version) for name, version in secret_versions if version)
    if versions:
        digest = hashlib.sha256()
        for name, version in versions:
            digest.update(f"{name}\0{version}\0".encode())
        marks[POD_SECRETS_HASH_ANNOTATION] = digest.hexdigest()[:16]
    return marks


def pods_to_touch(pods: Iterable[Mapping[str, Any]], marks: Mapping[str, str]) -> list[str]:
    """Names of the live pods whose annotations differ from ``marks`` in any of its keys.

    A pod going away (deletionTimestamp set) or finished is left alone: its replacement
    mounts the current ConfigMap and Secrets from its start.
    """
    names = []
    for pod in pods:
        metadata = pod.get("metadata") or {}
        if metadata.get("deletionTimestamp") is not None:
            continue
        if (pod.get("status") or {}).get("phase") in _DONE_PHASES:
            continue
        annotations = metadata.get("annotations") or {}
        if any(annotations.get(key) != value for key, value in marks.items()):
            names.append(str(metadata["name"]))
    return sorted(names)


def touch_patch(marks: Mapping[str, str]) -> dict[str, Any]:
    """The merge patch that records the marks on a pod (and makes kubelet sync it)."""
    return {"metadata": {"annotations": dict(marks)}}


async def touch_pods(
    client: AsyncClient, namespace: str, selector: Mapping[str, str], marks: Mapping[str, str]
) -> list[str]:
    """Patch the marks onto each live pod of the selector that lacks them; the names patched.

    A pod deleted between the list and its patch is skipped (404); other API errors raise.
    """
    pods = [
        pod.to_dict() async for pod in client.list(Pod, namespace=namespace, labels=dict(selector))
    ]
    names = pods_to_touch(pods, marks)

    async def patch(name: str) -> bool:
        try:
            await client.patch(
                Pod, name, touch_patch(marks), namespace=namespace, patch_type=PatchType.MERGE
            )
        except ApiError as error:
            if error.status.code == 404:
                return False
            raise
        return True

    done = await asyncio.gather(*(patch(name) for name in names))
    touched = [name for name, ok in zip(names, done, strict=True) if ok]
    if touched:
        log.info("%s: asked kubelet to refresh pods %s/%s", dict(marks), namespace, touched)
    return touched
