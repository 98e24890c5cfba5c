"""The operator's RBAC rules, as data: the one place they are defined.

Tests bind exactly these rules to a client-certificate user and run the operator as that
user, so a missing rule fails a test; the chart renders the same ClusterRole
(``python -m mailrelay.operator.rbac`` prints it as YAML). Every rule says why it exists.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import yaml

CLUSTER_ROLE_NAME = "mailrelay-operator"
READ = ("get", "list", "watch")


@dataclass(frozen=True)
class Rule:
    """One PolicyRule, with the reason it is needed."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "apiGroups": list(self.api_groups),
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }


RULES: tuple[Rule, ...] = (
    Rule(
        ("mailrelay.dev",),
        ("mailrelays",),
        (*READ, "patch"),
        "watch relays; kopf's finalizer for the per-relay resync timer",
    ),
    Rule(("mailrelay.dev",), ("mailroutes",), READ, "index routes per relay"),
    Rule(
        ("mailrelay.dev",),
        ("mailrelays/status", "mailroutes/status"),
        ("patch",),
        "write conditions, replicas, routes, endpoint and configHash",
    ),
    Rule(
        ("mailrelay.dev",),
        ("mailrelays/finalizers",),
        ("update",),
        "owner references with blockOwnerDeletion on the children",
    ),
    Rule(
        ("",),
        ("configmaps", "services"),
        (*READ, "create", "patch"),
        "relay config and the Services (server-side apply; watched to put back edits)",
    ),
    Rule(("apps",), ("statefulsets",), (*READ, "create", "patch"), "the relay pods"),
    Rule(
        ("policy",),
        ("poddisruptionbudgets",),
        (*READ, "create", "patch", "delete"),
        "the optional PodDisruptionBudget (deleted when turned off)",
    ),
    Rule(
        ("",),
        ("serviceaccounts",),
        (*READ, "create", "patch", "delete"),
        "the relay pods' own ServiceAccount (deleted when spec.serviceAccountName names one)",
    ),
    Rule(
        ("networking.k8s.io",),
        ("networkpolicies",),
        (*READ, "create", "patch", "delete"),
        "the optional NetworkPolicy (deleted when turned off)",
    ),
    Rule(
        ("monitoring.coreos.com",),
        ("servicemonitors",),
        (*READ, "create", "patch", "delete"),
        "the optional ServiceMonitor (deleted when turned off)",
    ),
    Rule(
        ("",),
        ("secrets",),
        (*READ, "create"),
        "watch the Secrets labelled mailrelay.dev/watch=true for their key names (never values);"
        " get a referenced Secret the watch lacks, to report it unlabelled; create the generated"
        " app credential Secrets (spec.auth.appCredentials)",
    ),
    Rule(
        ("",),
        ("persistentvolumeclaims",),
        (*READ, "delete"),
        "find the spool volumes of removed pods (scale-down); delete one once its drain Job"
        " emptied it (spec.queue.onScaleDown: Drain)",
    ),
    Rule(
        ("batch",),
        ("jobs",),
        (*READ, "create", "delete"),
        "the drain Jobs <relay>-drain-<ordinal> that empty the spool volume of a removed pod",
    ),
    Rule(
        ("",),
        ("pods",),
        ("list", "patch"),
        "after a config change, annotate the relay's pods with the config hash so kubelet"
        " refreshes their mounted ConfigMap at once; list a relay's pods (are removed pods"
        " gone?) and a finished drain Job's pod (its report) (no get, watch, create or delete)",
    ),
    Rule(("",), ("events",), ("create",), "Events for users (kopf posts core/v1 Events)"),
    Rule(
        ("kopf.dev",),
        ("clusterkopfpeerings", "kopfpeerings"),
        ("get", "list", "watch", "patch"),
        "kopf peering: only one operator acts",
    ),
    Rule(
        ("apiextensions.k8s.io",),
        ("customresourcedefinitions",),
        ("list", "watch"),
        "kopf notices CRDs installed later (the ServiceMonitor CRD)",
    ),
    Rule(("",), ("namespaces",), ("list", "watch"), "kopf follows namespaces to watch"),
)


def cluster_role(name: str = CLUSTER_ROLE_NAME) -> dict[str, Any]:
    """The ClusterRole manifest holding exactly ``RULES``."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "mailrelay-operator",
                "app.kubernetes.io/part-of": "mailrelay",
            },
        },
        "rules": [rule.as_dict() for rule in RULES],
    }


def cluster_role_binding(
    *, role: str = CLUSTER_ROLE_NAME, subject: dict[str, str], name: str | None = None
) -> dict[str, Any]:
    """A ClusterRoleBinding of the role to one subject (a ServiceAccount, or a test user)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name or role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [subject],
    }


def main() -> int:
    """Print the ClusterRole, with each rule's reason as a comment."""
    print("# Generated by `python -m mailrelay.operator.rbac` from operator/rbac.py.")
    for rule in RULES:
        print(f"# - {'/'.join(rule.resources)}: {rule.why}")
    print(yaml.safe_dump(cluster_role(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
