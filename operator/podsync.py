"""Make kubelet refresh a relay's mounted config at once, without rolling its pods.

A config change that the relay can hot reload (routes, users, limits: everything but
``RelayConfig.restart_settings``) does not change the pod template, so the pods keep
running. Kubelet copies a changed ConfigMap into the pods' volumes only when it syncs a
pod, which without a pod event happens on its periodic resync (``syncFrequency``, one
minute by default, plus the ConfigMap cache's own delay). An update of the pod object is
such an event: the operator patches ``mailrelay.dev/config-hash`` on each running pod of
the relay with the new config's hash, kubelet syncs the pod and refreshes its volumes, and
the relay (which polls its files every second) reloads.

Deciding which pods need the patch is pure (``pods_to_touch``); ``touch_pods`` lists the
relay's pods by its selector and patches those. The patch is metadata only: the
StatefulSet controller ignores pod annotations, so nothing restarts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

log = logging.getLogger(__name__)

POD_CONFIG_HASH_ANNOTATION = "mailrelay.dev/config-hash"
_DONE_PHASES = frozenset({"Succeeded", "Failed"})


def pods_to_touch(pods: Iterable[Mapping[str, Any]], config_hash: str) -> list[str]:
    """Names of the live pods whose ``mailrelay.dev/config-hash`` is not ``config_hash``.

    A pod going away (deletionTimestamp set) or finished is left alone: its replacement
    mounts the current ConfigMap from its start.
    """
    names = []
    for pod in pods:
        metadata = pod.get("metadata") or {}
        if metadata.get("deletionTimestamp") is not None:
            continue
        if (pod.get("status") or {}).get("phase") in _DONE_PHASES:
            continue
        annotations = metadata.get("annotations") or {}
        if annotations.get(POD_CONFIG_HASH_ANNOTATION) != config_hash:
            names.append(str(metadata["name"]))
    return sorted(names)


def touch_patch(config_hash: str) -> dict[str, Any]:
    """The merge patch that records the hash on a pod (and makes kubelet sync it)."""
    return {"metadata": {"annotations": {POD_CONFIG_HASH_ANNOTATION: config_hash}}}


async def touch_pods(
    client: AsyncClient, namespace: str, selector: Mapping[str, str], config_hash: str
) -> list[str]:
    """Patch the hash onto each live pod of the selector that lacks it; the names patched.

    A pod deleted between the list and its patch is skipped (404); other API errors raise.
    """
    pods = [
        pod.to_dict() async for pod in client.list(Pod, namespace=namespace, labels=dict(selector))
    ]
    names = pods_to_touch(pods, config_hash)

    async def patch(name: str) -> bool:
        try:
            await client.patch(
                Pod, name, touch_patch(config_hash), namespace=namespace, patch_type=PatchType.MERGE
            )
        except ApiError as error:
            if error.status.code == 404:
                return False
            raise
        return True

    done = await asyncio.gather(*(patch(name) for name in names))
    touched = [name for name, ok in zip(names, done, strict=True) if ok]
    if touched:
        log.info("Config %s: asked kubelet to refresh pods %s/%s", config_hash, namespace, touched)
    return touched
