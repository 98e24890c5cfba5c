"""The operator's conditions and Events say what is wrong in the relay's words.

A MailRelay the CRD accepts but the relay would refuse (a network with host bits set)
gets `ConfigRendered=False`, reason `ConfigRejected`, whose message and Event come from
the same formatter as the relay's `--check-config`: the path, the problem and the network
that was meant, and no pydantic internals.
"""

from __future__ import annotations

import pytest

from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, apply, condition, get, wait_for
from tests.operator import manifests as m
from tests.operator.test_reconcile import _events, _has_condition
from tests.relay.test_problems import INTERNALS

pytestmark = pytest.mark.kube


def test_config_rejected_condition_and_event_speak_human(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str
) -> None:
    kube, ns = crds, op_namespace
    spec = {"auth": {"required": False}, "allowedNetworks": ["10.1.2.3/16"]}
    apply(kube, ns, m.relay("hostbits", **spec))
    wait_for(
        lambda: _has_condition(
            kube, "mailrelay", "hostbits", ns, ("ConfigRendered", "False", "ConfigRejected")
        ),
        what="ConfigRendered=False ConfigRejected",
    )
    found = condition(get(kube, "mailrelay", "hostbits", ns), "ConfigRendered")
    assert found is not None
    wanted = "allowed_networks[0]: 10.1.2.3/16 has host bits set; did you mean 10.1.0.0/16?"
    assert wanted in found["message"]
    wait_for(lambda: any(e["reason"] == "ConfigRejected" for e in _events(kube, ns, "hostbits")))
    for event in _events(kube, ns, "hostbits"):
        for word in INTERNALS:
            assert word not in event["message"]
    for word in INTERNALS:
        assert word not in found["message"]
