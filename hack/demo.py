"""`make demo`: the main job, end to end on this machine with nothing but the repo.

It starts a real local control plane, installs the MailRelay/MailRoute CRDs,
applies the examples, shows what the API server stored, and cleans up.
"""

from __future__ import annotations

import sys

from localkube import REPO_ROOT, LocalKube, running_cluster

CRD_DIR = REPO_ROOT / "crds"
EXAMPLES_DIR = REPO_ROOT / "examples"
DEMO_NAMESPACE = "mail"


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def show(cluster: LocalKube, *args: str) -> None:
    print(cluster.kubectl(*args).stdout.rstrip(), flush=True)


def run_demo(cluster: LocalKube) -> None:
    step(f"Local control plane: kube-apiserver {cluster.k8s_version} at {cluster.server}")
    step("Installing the MailRelay and MailRoute CRDs")
    crds = sorted(CRD_DIR.glob("*.yaml"))
    cluster.install_crds(crds)
    show(cluster, "get", "crds", "-l", "app.kubernetes.io/part-of=mailrelay")
    step(f"Applying the examples into namespace {DEMO_NAMESPACE}")
    cluster.create_namespace(DEMO_NAMESPACE)
    for manifest in sorted(EXAMPLES_DIR.glob("*.yaml")):
        show(cluster, "apply", "-n", DEMO_NAMESPACE, "-f", str(manifest))
    step("kubectl get mailrelays,mailroutes")
    show(cluster, "get", "mailrelays,mailroutes", "-n", DEMO_NAMESPACE)
    step("Defaults the API server filled in for the relay (kubectl get mailrelay -o yaml)")
    first_relay = cluster.kubectl(
        "get", "mailrelays", "-n", DEMO_NAMESPACE, "-o", "name"
    ).stdout.split()[0]
    show(cluster, "get", first_relay, "-n", DEMO_NAMESPACE, "-o", "jsonpath={.spec}")
    print()


def main() -> int:
    with running_cluster() as cluster:
        run_demo(cluster)
    step("Stopped the local control plane and removed its files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
