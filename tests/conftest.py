"""Session-wide fixtures: the real local control plane, the real single-node cluster, and a
namespace per test on each.

`kube` is etcd + kube-apiserver only (fast; no pods). `node` is a whole single-node
cluster (mailrelay.support.localnode): containerd, kubelet, controller-manager, scheduler,
kube-proxy, CoreDNS, local-path-provisioner, with the project image imported. It starts
only when a test asks for it (marker `node`), once per session.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from mailrelay.support.localkube import LocalKube, running_cluster
from mailrelay.support.localnode import LocalNode, running_node


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKube]:
    """A real kube-apiserver + etcd for the whole test session, stopped even when tests fail."""
    with running_cluster(tmp_path_factory.mktemp("localkube")) as cluster:
        yield cluster


@pytest.fixture
def namespace(kube: LocalKube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, so tests never see each other's objects."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = kube.create_namespace(f"t-{stem}-{secrets.token_hex(3)}")
    yield name
    # Without a controller manager a deleted namespace stays Terminating; the cluster is
    # thrown away at the end of the session anyway, so deletion is only a courtesy.
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    """A real single-node cluster for the whole session, torn down even when tests fail."""
    with running_node(tmp_path_factory.mktemp("localnode")) as cluster:
        yield cluster


@pytest.fixture
def node_namespace(node: LocalNode, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace on the real cluster; deleted (with its pods) after the test."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = node.create_namespace(f"n-{stem}-{secrets.token_hex(3)}")
    yield name
    node.kubectl("delete", "namespace", name, "--wait=false", check=False)
