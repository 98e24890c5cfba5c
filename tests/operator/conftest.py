"""Fixtures for the operator tests: CRDs installed, the least-privilege user, one operator.

The shared operator watches namespaces matching ``op-*`` only (tests that start their own
operators, such as the peering test, use other namespaces), runs standalone, and resyncs every
2 seconds so hand-made damage is repaired quickly.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import (
    CRDS,
    OperatorProcess,
    bind_operator_role,
    running_operator,
)

RESYNC_SECONDS = "2"


@pytest.fixture(scope="session")
def crds(kube: LocalKube) -> LocalKube:
    """The MailRelay, MailRoute and kopf peering CRDs, established."""
    kube.install_crds(CRDS)
    return kube


@pytest.fixture(scope="session")
def operator_kubeconfig(crds: LocalKube) -> Path:
    """A kubeconfig for a user holding exactly the rules of operator/rbac.py."""
    return bind_operator_role(crds)


@pytest.fixture(scope="session")
def operator(
    crds: LocalKube, operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator under test, as its least-privilege user, for the whole session."""
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    with running_operator(
        crds,
        operator_kubeconfig,
        "--standalone",
        "--namespace",
        "op-*",
        "--resync-seconds",
        RESYNC_SECONDS,
        log_path=log_path,
    ) as process:
        yield process


@pytest.fixture
def op_namespace(crds: LocalKube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace the shared operator watches."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    name = crds.create_namespace(f"op-{stem}-{secrets.token_hex(3)}")
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Attach the shared operator's log tail to a failing test's report."""
    report = yield
    if (
        call.when == "call"
        and call.excinfo is not None
        and "operator" in getattr(item, "funcargs", {})
    ):
        process = item.funcargs["operator"]  # type: ignore[attr-defined]
        if isinstance(process, OperatorProcess):
            report.sections.append(("operator log", process.log_tail(80)))  # type: ignore[attr-defined]
    return report
