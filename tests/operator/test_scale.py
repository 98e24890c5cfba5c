"""The operator in a real-sized cluster: start-up and restart with thousands of objects present.

Each test runs its own operator on a namespace of its own (not ``op-*``), against the session's
API server, and creates its objects with concurrent API calls, as many users applying at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig, codecs

from mailrelay.operator.apply import MailRelayResource
from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, wait_for
from tests.operator import manifests as m

pytestmark = [pytest.mark.kube, pytest.mark.slow]

UNLABELLED_SECRETS = 2000  # Secrets of other applications: never read
LABELLED_SECRETS = 300  # more than 256 of one watched kind
RELAYS = 300


def unrelated_secret(index: int) -> dict[str, Any]:
    body = m.secret(f"other-{index:05d}", {"token": secrets.token_hex(8)})
    body["metadata"].pop("labels")
    return body


async def create_all(kube: LocalKube, namespace: str, items: Iterable[dict[str, Any]]) -> int:
    """POST every object, 32 at a time, as the admin; returns how many were created."""
    client = AsyncClient(config=KubeConfig.from_file(str(kube.kubeconfig)))
    limit = asyncio.Semaphore(32)

    async def create(item: dict[str, Any]) -> None:
        async with limit:
            await client.create(codecs.from_dict(item), namespace=namespace)  # type: ignore[call-overload]

    try:
        objects = list(items)
        await asyncio.gather(*(create(item) for item in objects))
        return len(objects)
    finally:
        await client.close()


async def relay_statuses(kube: LocalKube, namespace: str) -> dict[str, dict[str, Any]]:
    """Every relay's status by name (an empty dict for none written yet)."""
    client = AsyncClient(config=KubeConfig.from_file(str(kube.kubeconfig)))
    try:
        statuses: dict[str, dict[str, Any]] = {}
        async for relay in client.list(MailRelayResource, namespace=namespace):
            body = relay.to_dict()  # type: ignore[no-untyped-call]
            statuses[body["metadata"]["name"]] = dict(body.get("status") or {})
        return statuses
    finally:
        await client.close()


def reconciled(status: dict[str, Any]) -> bool:
    """Whether a pass wrote the relay's status, including its one route."""
    return status.get("routes") == 1 and bool(status.get("conditions"))


def relay_and_route(index: int) -> list[dict[str, Any]]:
    name = f"relay-{index:03d}"
    route = m.smtp_route(
        f"{name}-out", relay_name=name, senders=[f"d{index}.example.com"], credentials="smarthost"
    )
    return [m.relay(name), route]


def kill(operator: OperatorProcess) -> None:
    """SIGKILL, as the kernel's OOM killer or a node loss would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(operator.process.pid, signal.SIGKILL)
    operator.process.wait(timeout=10)
    operator.stop()


def start_operator(kube: LocalKube, kubeconfig: Path, namespace: str, log: Path) -> OperatorProcess:
    operator = OperatorProcess(
        kube, kubeconfig, "--standalone", "--namespace", namespace, log_path=log
    )
    operator.wait_live(timeout=60)
    return operator


def test_start_and_restart_with_thousands_of_secrets_and_hundreds_of_relays(
    crds: LocalKube, operator_kubeconfig: Path, tmp_path: Path
) -> None:
    kube = crds
    ns = kube.create_namespace(f"scale-{secrets.token_hex(3)}")
    shared = [m.tls_secret(), m.users_secret(), m.smtp_credentials()]
    labelled = [m.secret(f"mine-{i:04d}", {"key": "value"}) for i in range(LABELLED_SECRETS)]
    others = [unrelated_secret(i) for i in range(UNLABELLED_SECRETS)]
    asyncio.run(create_all(kube, ns, [*shared, *labelled, *others]))

    # Start-up with thousands of Secrets present: a new relay is reconciled.
    first = start_operator(kube, operator_kubeconfig, ns, tmp_path / "first.log")
    try:
        asyncio.run(create_all(kube, ns, relay_and_route(0)))
        wait_for(
            lambda: reconciled(asyncio.run(relay_statuses(kube, ns)).get("relay-000", {})),
            timeout=60,
            what="the first relay's status, with 2,300 Secrets present",
        )

        # Killed while hundreds of relays are being created.
        created: list[int] = []
        creating = threading.Thread(
            target=lambda: created.append(
                asyncio.run(
                    create_all(
                        kube, ns, (obj for i in range(1, RELAYS) for obj in relay_and_route(i))
                    )
                )
            )
        )
        creating.start()
        wait_for(
            lambda: len(asyncio.run(relay_statuses(kube, ns))) >= RELAYS // 3,
            timeout=120,
            interval=0.1,
            what="a third of the relays created",
        )
    finally:
        kill(first)
    creating.join(timeout=300)
    assert created == [2 * (RELAYS - 1)]
    statuses = asyncio.run(relay_statuses(kube, ns))
    assert len(statuses) == RELAYS
    pending_at_restart = sum(not reconciled(s) for s in statuses.values())
    assert pending_at_restart > 0  # the kill did interrupt the work

    # Restart with every object present: each relay gets its status.
    second = start_operator(kube, operator_kubeconfig, ns, tmp_path / "second.log")
    try:
        started = time.monotonic()

        def pending() -> list[str]:
            return sorted(
                name
                for name, status in asyncio.run(relay_statuses(kube, ns)).items()
                if not reconciled(status)
            )

        wait_for(lambda: not pending(), timeout=240, interval=2, what="every relay reconciled")
        print(
            f"{pending_at_restart} relays without status at the restart were reconciled "
            f"{time.monotonic() - started:.0f}s after it"
        )
        health = second.health()
        assert health["live"] is True and health["indicesReady"] is True
    except BaseException:
        print(second.log_tail(80))
        raise
    finally:
        second.stop()
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
