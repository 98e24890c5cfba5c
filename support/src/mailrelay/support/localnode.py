"""A real single-node cluster on this machine: the control plane of `localkube` plus a node.

`LocalNode` extends `LocalKube` (etcd + kube-apiserver) with containerd, kubelet,
kube-controller-manager, kube-scheduler, kube-proxy (iptables), CoreDNS and Rancher's
local-path-provisioner, so pods run, Services carry connections and PVCs are real
directories. The binaries come from `hack/build-node.sh`, the images from
`hack/nodeimages.py` (no registry: everything is imported into containerd).

Network, all of it on this machine:
- a bridge (`mailrelay0`) holding the node address 10.244.0.1/24 and fd6d:6169:6c00::1/64;
  the CNI bridge plugin attaches pods to it, host-local hands out both families;
- Services in 10.96.0.0/24 and fd6d:6169:6c01::/112, the API server on the node address;
- pods get no route off the machine: forwarding between the bridge and any other interface
  is dropped (chain MAILRELAY-ISOLATE), and nothing masquerades them.

Only one node runs on a machine at a time (bridge, iptables and port 53 are machine-wide):
`start` takes an exclusive lock and waits for another run to finish. `teardown` kills the
processes, unmounts what kubelet and containerd mounted, and deletes the bridge, the
iptables rules and the state directories; `cli_down`/`make cluster-down` runs the same
teardown from the state file, and `up` runs it first if a previous run died.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mailrelay.support import nodeimages
from mailrelay.support.localkube import (
    CLI_STATE_DIR,
    REPO_ROOT,
    ControlPlaneError,
    LocalKube,
    ensure_binaries,
    pid_alive,
    stop_process_group,
)
from mailrelay.support.ports import free_port

NODE_BUILD_SCRIPT = REPO_ROOT / "hack" / "build-node.sh"
NODE_NAME = "mailrelay-node"
BRIDGE = "mailrelay0"
NODE_IP = "10.244.0.1"
NODE_IP6 = "fd6d:6169:6c00::1"
POD_CIDR = "10.244.0.0/24"
POD_CIDR6 = "fd6d:6169:6c00::/64"
SERVICE_CIDR = "10.96.0.0/24"
SERVICE_CIDR6 = "fd6d:6169:6c01::/112"
KUBERNETES_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
ISOLATION_CHAIN = "MAILRELAY-ISOLATE"
LOCK_FILE = Path("/run/lock/mailrelay-node.lock")
STORAGE_CLASS = "local-path"
CNI_BIN_DIR = "/usr/lib/cni"
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/ipv6/conf/all/forwarding": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/bridge/bridge-nf-call-ip6tables": "1",
}
STATE_FILE = "node-state.json"


def log(message: str) -> None:
    print(f"[node] {message}", file=sys.stderr, flush=True)


def ensure_node_binaries() -> Path:
    """Build (or reuse the cached) node binaries and Debian packages; return the bin dir."""
    result = subprocess.run(
        [str(NODE_BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=None, text=True, check=False
    )
    if result.returncode != 0:
        raise ControlPlaneError(f"{NODE_BUILD_SCRIPT} failed with exit code {result.returncode}")
    return Path(result.stdout.strip().splitlines()[-1])


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise ControlPlaneError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


# --- network: bridge, sysctls, isolation (pure data first, then the commands) ----------------


def isolation_rules() -> list[list[str]]:
    """FORWARD rules keeping pod traffic on the bridge: nothing leaves or enters from outside."""
    return [
        ["-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP"],
        ["-o", BRIDGE, "!", "-i", BRIDGE, "-j", "DROP"],
    ]


def network_up() -> dict[str, str]:
    """Create the bridge and isolation rules, set sysctls; return the sysctls' old values."""
    network_down({})
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    _run("ip", "-6", "addr", "add", f"{NODE_IP6}/64", "dev", BRIDGE, "nodad")
    _run("ip", "link", "set", BRIDGE, "up")
    for tool in ("iptables", "ip6tables"):
        _run(tool, "-N", ISOLATION_CHAIN)
        for rule in isolation_rules():
            _run(tool, "-A", ISOLATION_CHAIN, *rule)
        _run(tool, "-I", "FORWARD", "1", "-j", ISOLATION_CHAIN)
    previous = {}
    for key, value in SYSCTLS.items():
        path = Path("/proc/sys") / key
        previous[key] = path.read_text().strip()
        path.write_text(value)
    return previous


def network_down(previous_sysctls: dict[str, str]) -> None:
    """Undo `network_up` and kube-proxy's rules; safe to run when nothing is there."""
    for tool in ("iptables", "ip6tables"):
        while _run(tool, "-D", "FORWARD", "-j", ISOLATION_CHAIN, check=False).returncode == 0:
            pass
        _run(tool, "-F", ISOLATION_CHAIN, check=False)
        _run(tool, "-X", ISOLATION_CHAIN, check=False)
    _cleanup_kube_proxy_rules()
    _run("ip", "link", "del", BRIDGE, check=False)
    for key, value in previous_sysctls.items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / key).write_text(value)


def _cleanup_kube_proxy_rules() -> None:
    """Remove every KUBE-* chain and the jumps to them (what `kube-proxy --cleanup` does)."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            listing = _run(tool, "-t", table, "-S", check=False).stdout.splitlines()
            for line in listing:
                parts = shlex.split(line)
                if (
                    parts[:1] == ["-A"]
                    and "-j" in parts
                    and parts[parts.index("-j") + 1].startswith("KUBE-")
                    and not parts[1].startswith("KUBE-")
                ):
                    _run(tool, "-t", table, "-D", *parts[1:], check=False)
            chains = [line.split()[1] for line in listing if line.startswith("-N KUBE-")]
            for chain in chains:
                _run(tool, "-t", table, "-F", chain, check=False)
            for chain in chains:
                _run(tool, "-t", table, "-X", chain, check=False)


def unmount_under(*roots: Path) -> None:
    """Unmount (lazily, deepest first) everything mounted below `roots`."""
    prefixes = tuple(str(root.resolve()) + "/" for root in roots if root.exists())
    if not prefixes:
        return
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target.startswith(prefixes):
            mounts.append(target)
    for target in sorted(set(mounts), key=len, reverse=True):
        _run("umount", "-l", target, check=False)


# --- configuration files (pure functions returning text/data) --------------------------------


def containerd_config(root: Path, state: Path, socket: Path, cni_conf: Path, pause: str) -> str:
    return f"""version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  # Root here may not lower oom_score_adj below its own (pod sandboxes ask for -998).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  # Like most runtimes, do not lower ip_unprivileged_port_start for pods: the relay must not
  # depend on it (the chart's pods set the sysctl themselves, see docs/relay-config.md).
  enable_unprivileged_ports = false
  enable_unprivileged_icmp = false
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which("runc") or "/usr/sbin/runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"""


def cni_conflist(ipam_dir: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "mailrelay",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [
                        [{"subnet": POD_CIDR, "rangeStart": "10.244.0.10", "gateway": NODE_IP}],
                        [
                            {
                                "subnet": POD_CIDR6,
                                "rangeStart": "fd6d:6169:6c00::10",
                                "gateway": NODE_IP6,
                            }
                        ],
                    ],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(pki: Path, resolv_conf: Path, port: int, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        # This machine kind runs cgroup v1 (hybrid); 1.36 refuses it unless told otherwise.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(resolv_conf),
        "failSwapOn": False,
        "protectKernelDefaults": False,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "syncFrequency": "10s",
        "fileCheckFrequency": "5s",
        # A ConfigMap/Secret change reaches mounted files without waiting for the TTL cache.
        "configMapAndSecretChangeDetectionStrategy": "Watch",
        "allowedUnsafeSysctls": [],
        "maxPods": 60,
        "podPidsLimit": 4096,
        "containerLogMaxSize": "5Mi",
        "tlsCertFile": str(pki / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet.key"),
    }


def kube_proxy_config(kubeconfig: Path, metrics_port: int, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": f"{POD_CIDR},{POD_CIDR6}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        # Leave the machine's conntrack sysctls alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "nodePortAddresses": [f"{NODE_IP}/32"],
    }


COREFILE = f""".:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    reload
}}
"""


def addon_manifests(images: nodeimages.NodeImages, volumes_dir: Path) -> list[dict[str, Any]]:
    """CoreDNS and local-path-provisioner, with their RBAC, as plain objects."""
    labels_dns = {"k8s-app": "kube-dns"}
    labels_lpp = {"app": "local-path-provisioner"}
    helper_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "helper-pod"},
        "spec": {
            "priorityClassName": "system-node-critical",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/disk-pressure",
                    "operator": "Exists",
                    "effect": "NoSchedule",
                }
            ],
            "containers": [
                {"name": "helper-pod", "image": images.base, "imagePullPolicy": "Never"}
            ],
        },
    }
    lpp_config = {
        "nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [str(volumes_dir)]}]
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": COREFILE},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels_dns},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels_dns},
                "template": {
                    "metadata": {"labels": labels_dns},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "priorityClassName": "system-cluster-critical",
                        "dnsPolicy": "Default",
                        "containers": [
                            {
                                "name": "coredns",
                                "image": images.coredns,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                ],
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                                    "readOnlyRootFilesystem": True,
                                },
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 2,
                                },
                                "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}},
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels_dns},
            "spec": {
                "selector": labels_dns,
                "clusterIP": DNS_SERVICE_IP,
                "ipFamilyPolicy": "PreferDualStack",
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        },
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "local-path-storage"}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "local-path-provisioner", "namespace": "local-path-storage"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "local-path-provisioner"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": [
                        "nodes",
                        "persistentvolumeclaims",
                        "configmaps",
                        "pods",
                        "pods/log",
                    ],
                    "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["persistentvolumes"],
                    "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"],
                },
                {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
                {
                    "apiGroups": ["storage.k8s.io"],
                    "resources": ["storageclasses"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["endpoints"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "local-path-provisioner"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "local-path-provisioner",
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": "local-path-provisioner",
                    "namespace": "local-path-storage",
                }
            ],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "local-path-config", "namespace": "local-path-storage"},
            "data": {
                "config.json": json.dumps(lpp_config),
                "setup": '#!/bin/sh\nset -eu\nmkdir -m 0777 -p "$VOL_DIR"\n',
                "teardown": '#!/bin/sh\nset -eu\nrm -rf "$VOL_DIR"\n',
                "helperPod.yaml": json.dumps(helper_pod),
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "local-path-provisioner", "namespace": "local-path-storage"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels_lpp},
                "template": {
                    "metadata": {"labels": labels_lpp},
                    "spec": {
                        "serviceAccountName": "local-path-provisioner",
                        "containers": [
                            {
                                "name": "local-path-provisioner",
                                "image": images.provisioner,
                                "imagePullPolicy": "Never",
                                "command": [
                                    "/local-path-provisioner",
                                    "start",
                                    "--config",
                                    "/etc/config/config.json",
                                    "--service-account-name",
                                    "local-path-provisioner",
                                    "--helper-image",
                                    images.base,
                                    "--configmap-name",
                                    "local-path-config",
                                ],
                                "env": [
                                    {
                                        "name": "POD_NAMESPACE",
                                        "valueFrom": {
                                            "fieldRef": {"fieldPath": "metadata.namespace"}
                                        },
                                    },
                                    {"name": "CONFIG_MOUNT_PATH", "value": "/etc/config/"},
                                ],
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/config/"}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "local-path-config"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": "rancher.io/local-path",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
        },
    ]


# --- the cluster -----------------------------------------------------------------------------


@dataclass
class LocalNode(LocalKube):
    """etcd, kube-apiserver and a real node (containerd, kubelet, ...) with CoreDNS and storage."""

    node_bin: Path = field(default_factory=Path)
    images: nodeimages.NodeImages | None = None
    previous_sysctls: dict[str, str] = field(default_factory=dict)
    lock: TextIO | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return NODE_IP

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def containerd_root(self) -> Path:
        """Kept across runs (image content and snapshots), so warm starts import nothing."""
        return nodeimages.CACHE_ROOT / "containerd-root"

    @property
    def volumes_dir(self) -> Path:
        return self.workdir / "volumes"

    def serving_names(self) -> list[str]:
        return [
            *super().serving_names(),
            NODE_IP,
            KUBERNETES_SERVICE_IP,
            f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
        ]

    def apiserver_args(self) -> list[str]:
        pki = self.workdir / "pki"
        return [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={NODE_IP}",
            f"--advertise-address={NODE_IP}",
            f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}",
            "--allow-privileged=true",
            f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--cert-dir={pki}",
            "--endpoint-reconciler-type=lease",
            "--v=0",
        ]

    def _prepare(self) -> None:
        self.timings["network"] = time.monotonic()
        self.previous_sysctls = network_up()
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        pairs = {
            "apiserver-kubelet-client": self.ca.issue(
                "kube-apiserver-kubelet-client", organizations=["system:masters"]
            ),
            "kubelet": self.ca.issue(NODE_NAME, server_names=[NODE_IP, NODE_IP6, NODE_NAME]),
        }
        for name, pair in pairs.items():
            (pki / f"{name}.crt").write_bytes(pair.cert_pem)
            (pki / f"{name}.key").write_bytes(pair.key_pem)
            (pki / f"{name}.key").chmod(0o600)

    def _component_kubeconfig(self, name: str, user: str, groups: list[str]) -> Path:
        path = self.workdir / f"kubeconfig-{name}"
        self._write_kubeconfig(path, user, self.ca.issue(user, organizations=groups))
        return path

    def start_node(self) -> None:
        """After the control plane is up: containerd, images, kubelet, controllers, add-ons."""
        assert self.images is not None
        began = time.monotonic()
        self._start_containerd()
        self._remove_stale_pods()
        nodeimages.import_into_containerd(
            self.images.all(), self.node_bin / "ctr", self.containerd_socket
        )
        self.timings["images imported"] = time.monotonic() - began
        self._start_controllers()
        self._start_kubelet()
        self._start_kube_proxy()
        self._wait_for_node()
        self.timings["node ready"] = time.monotonic() - began
        self.kubectl(
            "apply", "-f", "-", input=_yaml_stream(addon_manifests(self.images, self.volumes_dir))
        )
        self.kubectl(
            "rollout", "status", "-n", "kube-system", "deployment/coredns", "--timeout=120s"
        )
        self.kubectl(
            "rollout",
            "status",
            "-n",
            "local-path-storage",
            "deployment/local-path-provisioner",
            "--timeout=120s",
        )
        self.timings["add-ons ready"] = time.monotonic() - began

    def _start_containerd(self) -> None:
        base = self.workdir / "containerd"
        cni_conf = base / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-mailrelay.conflist").write_text(
            json.dumps(cni_conflist(base / "ipam"), indent=2)
        )
        assert self.images is not None
        config = base / "config.toml"
        config.write_text(
            containerd_config(
                self.containerd_root,
                base / "state",
                self.containerd_socket,
                cni_conf,
                self.images.pause,
            )
        )
        env = dict(os.environ)
        # containerd 2 starts its own shim: ours must come before anything else on PATH.
        env["PATH"] = f"{self.node_bin}{os.pathsep}{env.get('PATH', '')}"
        self._spawn(
            "containerd", [str(self.node_bin / "containerd"), "--config", str(config)], env=env
        )
        deadline = time.monotonic() + 30
        while not self.containerd_socket.exists():
            if self.processes["containerd"].poll() is not None or time.monotonic() > deadline:
                raise ControlPlaneError(f"containerd did not start:\n{self.log_tail('containerd')}")
            time.sleep(0.1)

    def _remove_stale_pods(self) -> None:
        """Sandboxes and containers a previous run left in the kept containerd root."""
        ctr = [str(self.node_bin / "ctr"), "--address", str(self.containerd_socket), "-n", "k8s.io"]
        for kind in ("containers", "sandboxes"):
            ids = _run(*ctr, kind, "list", "--quiet", check=False).stdout.split()
            for identifier in ids:
                extra = ["--force"] if kind == "sandboxes" else []
                _run(*ctr, kind, "rm", *extra, identifier, check=False)

    def _start_controllers(self) -> None:
        pki = self.workdir / "pki"
        kcm = self._component_kubeconfig("controller-manager", "system:kube-controller-manager", [])
        self._spawn(
            "kube-controller-manager",
            [
                str(self.node_bin / "kube-controller-manager"),
                f"--kubeconfig={kcm}",
                f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}",
                "--controllers=*",
                "--node-monitor-grace-period=20s",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
        )
        sched = self._component_kubeconfig("scheduler", "system:kube-scheduler", [])
        self._spawn(
            "kube-scheduler",
            [
                str(self.node_bin / "kube-scheduler"),
                f"--kubeconfig={sched}",
                f"--authentication-kubeconfig={sched}",
                f"--authorization-kubeconfig={sched}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--v=1",
            ],
        )

    def _start_kubelet(self) -> None:
        pki = self.workdir / "pki"
        kubeconfig = self._component_kubeconfig(
            "kubelet", f"system:node:{NODE_NAME}", ["system:nodes"]
        )
        resolv = self.workdir / "resolv.conf"
        # Pods with dnsPolicy Default (CoreDNS) get no resolver off the machine.
        resolv.write_text(f"nameserver {NODE_IP}\noptions ndots:1\n")
        config = self.workdir / "kubelet-config.json"
        config.write_text(
            json.dumps(kubelet_config(pki, resolv, free_port(), free_port()), indent=2)
        )
        env = dict(os.environ)
        env["PATH"] = f"{self.node_bin}{os.pathsep}{env.get('PATH', '')}"
        self._spawn(
            "kubelet",
            [
                str(self.node_bin / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--container-runtime-endpoint=unix://{self.containerd_socket}",
                f"--root-dir={self.workdir / 'kubelet'}",
                f"--cert-dir={pki}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP},{NODE_IP6}",
                "--v=1",
            ],
            env=env,
        )

    def _start_kube_proxy(self) -> None:
        kubeconfig = self._component_kubeconfig("kube-proxy", "system:kube-proxy", [])
        config = self.workdir / "kube-proxy-config.json"
        config.write_text(
            json.dumps(kube_proxy_config(kubeconfig, free_port(), free_port()), indent=2)
        )
        self._spawn(
            "kube-proxy", [str(self.node_bin / "kube-proxy"), f"--config={config}", "--v=1"]
        )

    def _wait_for_node(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with {process.returncode}:\n{self.log_tail(name)}"
                    )
            result = self.kubectl(
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}/{.spec.taints}",
                check=False,
            )
            status, _, taints = result.stdout.partition("/")
            if status == "True" and "not-ready" not in taints:
                return
            time.sleep(0.5)
        raise ControlPlaneError(
            f"The node did not become Ready in {timeout:.0f}s:\n{self.log_tail('kubelet')}"
        )

    def _write_pki(self) -> None:
        super()._write_pki()
        pki = self.workdir / "pki"
        from mailrelay.support.localkube import _key_pem  # noqa: PLC0415

        (pki / "ca.key").write_bytes(_key_pem(self.ca.key))
        (pki / "ca.key").chmod(0o600)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log_file = (self.workdir / f"{name}.log").open("ab")
        # containerd inherits the machine's node lock, so it stays held while the node runs
        # even after `make cluster-up` has returned.
        keep = (self.lock.fileno(),) if name == "containerd" and self.lock is not None else ()
        self.processes[name] = subprocess.Popen(
            argv,
            pass_fds=keep,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=_die_with_parent_fn() if self.die_with_parent else None,  # noqa: PLW1509
        )
        log_file.close()

    def stop_order(self) -> list[str]:
        return [
            "kubelet",
            "kube-proxy",
            "kube-scheduler",
            "kube-controller-manager",
            "kube-apiserver",
            "etcd",
            "containerd",
        ]

    def stop(self) -> None:
        self.stop_processes()
        teardown(self.workdir, self.previous_sysctls)
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _die_with_parent_fn() -> Any:
    from mailrelay.support.localkube import _die_with_parent  # noqa: PLC0415

    return _die_with_parent


def _yaml_stream(objects: list[dict[str, Any]]) -> str:
    return "\n---\n".join(json.dumps(obj) for obj in objects)


KUBEPODS_CGROUPS = tuple(
    Path("/sys/fs/cgroup") / controller / "kubepods"
    for controller in (
        "pids",
        "memory",
        "cpu",
        "cpuacct",
        "cpuset",
        "blkio",
        "devices",
        "freezer",
        "hugetlb",
        "net_cls",
        "perf_event",
        "systemd",
        "unified",
    )
)


def kill_pods_and_shims(workdir: Path) -> None:
    """SIGKILL every process in kubelet's pod cgroups and our containerd's shims, then
    remove the empty pod cgroups. Only one node runs per machine (the lock), so whatever
    sits in `kubepods` belongs to this node or to a dead earlier one."""
    for _ in range(3):
        pids: set[int] = set()
        for root in KUBEPODS_CGROUPS:
            if root.exists():
                for procs in root.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError):
                        pids.update(int(p) for p in procs.read_text().split())
        marker = str(workdir / "containerd")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
                if "containerd-shim-runc-v2" in cmdline and marker in cmdline:
                    pids.add(int(proc.name))
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    for root in KUBEPODS_CGROUPS:
        if root.exists():
            for directory in sorted(
                (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()


def teardown(workdir: Path, previous_sysctls: dict[str, str]) -> None:
    """Everything a node leaves behind: shims and containers, mounts, network, files."""
    kill_pods_and_shims(workdir)
    unmount_under(workdir)
    network_down(previous_sysctls)
    unmount_under(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


def acquire_node_lock() -> TextIO:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    handle = LOCK_FILE.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log("Another local node runs on this machine (one at a time); waiting for it to stop...")
        fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def prepare_node() -> tuple[Path, Path, nodeimages.NodeImages]:
    """Binaries (control plane and node) and images, built or reused from the caches."""
    began = time.monotonic()
    cp_bin = ensure_binaries()
    node_bin = ensure_node_binaries()
    images = nodeimages.build_all(node_bin)
    log(f"Binaries and images ready in {time.monotonic() - began:.1f}s")
    return cp_bin, node_bin, images


def start_node(workdir: Path, *, die_with_parent: bool = True) -> LocalNode:
    cp_bin, node_bin, images = prepare_node()
    lock = acquire_node_lock()
    node = LocalNode(
        bin_dir=cp_bin,
        workdir=workdir,
        die_with_parent=die_with_parent,
        node_bin=node_bin,
        images=images,
        lock=lock,
    )
    began = time.monotonic()
    try:
        # Whatever a run that died left behind (we hold the machine's node lock now).
        teardown(workdir, {})
        node.start(attempts=1)
        node.start_node()
    except BaseException:
        node.stop()
        raise
    log(
        f"Cluster up in {time.monotonic() - began:.1f}s "
        + ", ".join(f"{k} {v:.1f}s" for k, v in node.timings.items() if k != "network")
    )
    return node


@contextlib.contextmanager
def running_node(workdir: Path | None = None) -> Iterator[LocalNode]:
    directory = workdir or Path(tempfile.mkdtemp(prefix="mailrelay-node-"))
    node = start_node(directory)
    try:
        yield node
    finally:
        node.stop()


# --- CLI: make cluster-up / cluster-down -----------------------------------------------------


def cli_up() -> int:
    state_file = CLI_STATE_DIR / STATE_FILE
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if all(pid_alive(pid) for pid in state["pids"].values()):
            print(f"A local cluster is already running: export KUBECONFIG={state['kubeconfig']}")
            return 0
        cli_down()
    CLI_STATE_DIR.mkdir(parents=True, exist_ok=True)
    node = start_node(CLI_STATE_DIR / "node", die_with_parent=False)
    state = {
        "kubeconfig": str(node.kubeconfig),
        "server": node.server,
        "workdir": str(node.workdir),
        "pids": {name: process.pid for name, process in node.processes.items()},
        "order": node.stop_order(),
        "sysctls": node.previous_sysctls,
        "bin_dir": str(node.bin_dir),
    }
    state_file.write_text(json.dumps(state, indent=2))
    print(f"Started a single-node cluster (kube-apiserver {node.k8s_version} at {node.server})")
    print(f"export KUBECONFIG={node.kubeconfig}")
    print(f"export PATH={node.bin_dir}:$PATH")
    return 0


def cli_down() -> int:
    state_file = CLI_STATE_DIR / STATE_FILE
    if not state_file.exists():
        print("No local cluster is running.")
        return 0
    state = json.loads(state_file.read_text())
    for name in state["order"]:
        if pid := state["pids"].get(name):
            stop_process_group(pid)
    teardown(Path(state["workdir"]), state["sysctls"])
    state_file.unlink()
    print("Stopped the local cluster and removed its bridge, iptables rules and files.")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="Run a single-node cluster on this machine.")
    parser.add_argument("command", choices=["up", "down", "build"])
    args = parser.parse_args(argv)
    if args.command == "up":
        return cli_up()
    if args.command == "down":
        return cli_down()
    prepare_node()
    return 0


if __name__ == "__main__":
    sys.exit(main())
