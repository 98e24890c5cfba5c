"""The image built from the Dockerfile, run as it ships (podman, no passwd help)."""

from __future__ import annotations

import pytest

from mailrelay.support import nodeimages
from mailrelay.support.localnode import LocalNode

pytestmark = [pytest.mark.node, pytest.mark.slow]


def test_image_user_has_a_passwd_entry_for_kopf_peering_identity(node: LocalNode) -> None:
    """kopf's peering identity outside a pod calls getpass.getuser(); without a passwd entry
    for uid 65532 it raised KeyError and the operator crash-looped. `--passwd=false` stops
    podman from adding an entry of its own, as containerd never does."""
    assert node.images is not None
    output = nodeimages.podman(
        "run", "--rm", "--passwd=false", "--network=none", node.images.project,
        "python", "-c", "import getpass, os; print(os.getuid(), os.getgid(), getpass.getuser())",
    )  # fmt: skip
    assert output.split() == ["65532", "65532", "mailrelay"]
