"""Fixtures for tests on real pods: the chart installed once, upstream pods per namespace."""

from __future__ import annotations

from collections.abc import Iterator

import incluster
import pytest
import trustme
from localnode import LocalNode


@pytest.fixture(scope="session")
def operator_release(node: LocalNode) -> Iterator[str]:
    """`helm install` of the chart (operator pod from the built image) for the session."""
    incluster.install_operator(node)
    yield incluster.RELEASE


@pytest.fixture
def upstreams(node: LocalNode, node_namespace: str) -> trustme.CA:
    """The SMTP (STARTTLS + AUTH) and Mailgun upstream pods in the test's namespace."""
    assert node.images is not None
    ca = trustme.CA()
    node.kubectl(
        "apply",
        "-n",
        node_namespace,
        "-f",
        "-",
        input=incluster.yaml_stream(
            incluster.upstream_manifests(ca, node_namespace, node.images.peers)
        ),
    )
    for name in ("smtp-upstream", "mailgun"):
        incluster.wait_rollout(node, node_namespace, f"deployment/{name}")
    return ca
