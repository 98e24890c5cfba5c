"""Pure renderers: one function per child of a MailRelay, each returning a manifest dict.

Every renderer takes a ``RelayInputs`` (the typed spec plus the object's identity), whatever
else it needs (the rendered config, the Secret mounts) and the ``OperatorSettings``, and
returns a fresh dict; nothing here talks to the API or mutates its inputs. Each child:

* is named after the relay (``<name>``, ``<name>-config``, ``<name>-headless``),
* carries the ``app.kubernetes.io/*`` labels and a controller owner reference to the relay,
* mounts Secrets as volumes at fixed paths (``relay_config.SecretMount``); no Secret value is
  ever copied into a ConfigMap, an annotation or a log line.

The pod template carries ``mailrelay.dev/restart-hash``, the hash of the settings the relay
applies only at start (``RelayConfig.restart_settings``): a change to them rolls the pods.
Every other config change (routes, users, limits) and credential rotation (Secret content)
reaches the running pods by the relay's hot reload (``podsync`` makes kubelet refresh the
mounted ConfigMap at once).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailrelay.operator import models
from mailrelay.operator.relay_config import (
    CONFIG_DIR,
    CONFIG_KEY,
    HANDOFF_PORT,
    HANDOFF_PORT_NAME,
    SPOOL_DIR,
    SecretMount,
    headless_service_name,
)
from mailrelay.operator.settings import OperatorSettings

RESTART_HASH_ANNOTATION = models.RESTART_HASH_ANNOTATION
MANAGED_BY = "mailrelay-operator"
RELAY_UID = 65532
PRESTOP_SLEEP_SECONDS = 5
SMTP_PORT_NAME = "submission"
SMTPS_PORT_NAME = "submissions"
METRICS_PORT_NAME = "metrics"


@dataclass(frozen=True)
class RelayInputs:
    """What every renderer knows about the MailRelay: identity and typed spec."""

    name: str
    namespace: str
    uid: str
    spec: models.MailRelaySpec


@dataclass(frozen=True)
class NetworkPeer:
    """One allowed source of SMTP traffic: a namespace selector, a pod selector, or both."""

    namespace_selector: Mapping[str, Any] | None = None
    pod_selector: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class NetworkPolicyInputs:
    """Who may reach the SMTP ports; an empty list lets nobody in (metrics stay open)."""

    peers: Sequence[NetworkPeer] = field(default_factory=tuple)


def config_map_name(relay: str) -> str:
    return f"{relay}-config"


def service_account_name(relay: str) -> str:
    """The relay pods' own ServiceAccount. Never the relay's bare name: a relay may be called
    ``default``, and the namespace's own ``default`` account must never be taken over."""
    return f"{relay}-relay"


HEADLESS_COMPONENT = "relay-peers"
DRAIN_COMPONENT = "drain"
# The drain Jobs' pods must never be selected by the relay's Services or its PDB (which select
# app.kubernetes.io/name=mailrelay): a drain pod serves no client.
DRAIN_APP_NAME = "mailrelay-drain"
# kubelet's own margin after the relay's drain and hand-off deadlines (process exit, logs).
GRACE_MARGIN_SECONDS = 10


def selector_labels(relay: RelayInputs) -> dict[str, str]:
    """The labels that select this relay's pods (stable across upgrades)."""
    return {"app.kubernetes.io/name": "mailrelay", "app.kubernetes.io/instance": relay.name}


def drain_pod_labels(relay: RelayInputs) -> dict[str, str]:
    """The drain Jobs' pods: this relay's instance, but not selected as relay pods."""
    return {
        "app.kubernetes.io/name": DRAIN_APP_NAME,
        "app.kubernetes.io/instance": relay.name,
        "app.kubernetes.io/component": DRAIN_COMPONENT,
        "app.kubernetes.io/part-of": "mailrelay",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def termination_grace_seconds(settings: OperatorSettings) -> int:
    """A relay pod's grace period: the preStop sleep, then finishing sessions and deliveries in
    flight (``drain_seconds``), then handing the queue to peers (``handoff_seconds``)."""
    return (
        PRESTOP_SLEEP_SECONDS
        + settings.drain_seconds
        + settings.handoff_seconds
        + GRACE_MARGIN_SECONDS
    )


def labels(relay: RelayInputs, component: str = "relay") -> dict[str, str]:
    """Labels of every child."""
    return {
        **selector_labels(relay),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "mailrelay",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def topology_spread(relay: RelayInputs) -> list[dict[str, Any]]:
    """The pods' spread: the spec's own constraints (this relay's pods counted when a
    constraint names no selector), else one preferred spread over nodes.

    The default does not depend on spec.replicas (with one pod it constrains nothing): the
    pod template must stay the same when only the scale changes, or every `kubectl scale`
    or HPA step across 1 <-> 2 would roll the pods that stay, in the middle of the removed
    pods handing their queues to them."""
    spec = relay.spec
    own = {"matchLabels": selector_labels(relay)}
    if spec.topology_spread_constraints is not None:
        spread = []
        for constraint in spec.topology_spread_constraints:
            rendered = constraint.model_dump(by_alias=True, exclude_none=True)
            rendered.setdefault("labelSelector", own)
            spread.append(rendered)
        return spread
    return [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": own,
        }
    ]


def owner_reference(relay: RelayInputs) -> dict[str, Any]:
    """A controller reference to the MailRelay, so deleting it deletes the children."""
    return {
        "apiVersion": models.API_VERSION,
        "kind": "MailRelay",
        "name": relay.name,
        "uid": relay.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(relay: RelayInputs, name: str, component: str = "relay") -> dict[str, Any]:
    return {
        "name": name,
        "namespace": relay.namespace,
        "labels": labels(relay, component),
        "ownerReferences": [owner_reference(relay)],
    }


def endpoint(relay: RelayInputs, settings: OperatorSettings) -> str:
    """Where clients submit mail: the Service's DNS name and submission port."""
    return (
        f"{relay.name}.{relay.namespace}.svc.{settings.cluster_domain}:{relay.spec.listener.port}"
    )


def wants_persistence(spec: models.MailRelaySpec) -> bool:
    """A spool volume per pod unless ``queue.size`` is zero (then an emptyDir)."""
    number = re.match(r"^\+?([0-9]*\.?[0-9]*)", spec.queue.size)
    return number is not None and float(number.group(1) or 0) > 0


def render_configmap(
    relay: RelayInputs, config_yaml: str, settings: OperatorSettings
) -> dict[str, Any]:
    """The relay's config file (secret-free: only paths to mounted Secrets)."""
    del settings  # same shape for every operator configuration
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(relay, config_map_name(relay.name)),
        "data": {CONFIG_KEY: config_yaml},
    }


def _ports(spec: models.MailRelaySpec) -> list[tuple[str, int]]:
    ports = [(SMTP_PORT_NAME, spec.listener.port)]
    if spec.listener.implicit_tls_port is not None:
        ports.append((SMTPS_PORT_NAME, spec.listener.implicit_tls_port))
    return ports


def _service_ports(spec: models.MailRelaySpec) -> list[dict[str, Any]]:
    ports = [
        {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
        for name, port in _ports(spec)
    ]
    ports.append(
        {
            "name": METRICS_PORT_NAME,
            "port": spec.metrics.port,
            "targetPort": METRICS_PORT_NAME,
            "protocol": "TCP",
        }
    )
    return ports


def render_service(relay: RelayInputs, settings: OperatorSettings) -> dict[str, Any]:
    """The Service clients submit to: submission, optional implicit TLS, and metrics."""
    del settings
    metadata = _metadata(relay, relay.name)
    if relay.spec.service.annotations:
        metadata["annotations"] = dict(relay.spec.service.annotations)
    spec: dict[str, Any] = {
        "type": relay.spec.service.type,
        # IPv4 and IPv6 where the cluster has both; a single-stack cluster picks its one.
        "ipFamilyPolicy": "PreferDualStack",
        "selector": selector_labels(relay),
        "ports": _service_ports(relay.spec),
    }
    if relay.spec.service.external_traffic_policy is not None:
        spec["externalTrafficPolicy"] = relay.spec.service.external_traffic_policy
    if relay.spec.service.load_balancer_source_ranges:
        spec["loadBalancerSourceRanges"] = list(relay.spec.service.load_balancer_source_ranges)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


def render_headless_service(relay: RelayInputs, settings: OperatorSettings) -> dict[str, Any]:
    """The StatefulSet's governing Service, and the peers of the queue hand-off.

    Its DNS name (``handoff.peers`` of the relay config) resolves to the READY relay pods
    only: a pod that is leaving (not ready, or terminating) or not started yet must never be
    handed mail, so not-ready addresses are not published. It carries the ``handoff`` port,
    which the client Service does not.

    Its own component label keeps the ServiceMonitor (which selects component=relay) from
    scraping every pod twice, once through each Service.
    """
    del settings
    ports = _service_ports(relay.spec)
    ports.append(
        {
            "name": HANDOFF_PORT_NAME,
            "port": HANDOFF_PORT,
            "targetPort": HANDOFF_PORT_NAME,
            "protocol": "TCP",
        }
    )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(relay, headless_service_name(relay.name), HEADLESS_COMPONENT),
        "spec": {
            "clusterIP": "None",
            "ipFamilyPolicy": "PreferDualStack",
            "publishNotReadyAddresses": False,
            "selector": selector_labels(relay),
            "ports": ports,
        },
    }


def render_serviceaccount(relay: RelayInputs) -> dict[str, Any] | None:
    """The relay pods' own ServiceAccount (for workload identity bindings), or None when the
    spec names one. No token is mounted: the relay never calls the Kubernetes API."""
    if relay.spec.service_account_name is not None:
        return None
    metadata = _metadata(relay, service_account_name(relay.name))
    if relay.spec.service_account_annotations:
        metadata["annotations"] = dict(relay.spec.service_account_annotations)
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata,
        "automountServiceAccountToken": False,
    }


AWS_TOKEN_DIR = "/var/run/secrets/mailrelay/aws"
AWS_TOKEN_FILE = "token"
AWS_TOKEN_VOLUME = "aws-web-identity"


def aws_web_identity(
    spec: models.MailRelaySpec, wanted: bool
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
    """(volume, mount, env) of the projected ServiceAccount token botocore exchanges at STS
    (AssumeRoleWithWebIdentity), or None unless the spec opts in and `wanted` (an SES
    route without static keys is bound)."""
    identity = spec.aws_web_identity
    if identity is None or not wanted:
        return None
    volume: dict[str, Any] = {
        "name": AWS_TOKEN_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": identity.audience,
                        "expirationSeconds": identity.expiration_seconds,
                        "path": AWS_TOKEN_FILE,
                    }
                }
            ]
        },
    }
    mount: dict[str, Any] = {"name": AWS_TOKEN_VOLUME, "mountPath": AWS_TOKEN_DIR, "readOnly": True}
    env: list[dict[str, Any]] = [
        {"name": "AWS_ROLE_ARN", "value": identity.role_arn},
        {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": f"{AWS_TOKEN_DIR}/{AWS_TOKEN_FILE}"},
        {
            "name": "AWS_ROLE_SESSION_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        },
    ]
    if identity.sts_endpoint is not None:
        env.append({"name": "AWS_ENDPOINT_URL_STS", "value": identity.sts_endpoint})
    return volume, mount, env


def render_pdb(relay: RelayInputs, settings: OperatorSettings) -> dict[str, Any] | None:
    """A PodDisruptionBudget, or None when turned off or pointless (fewer than 2 replicas).

    ``unhealthyPodEvictionPolicy: AlwaysAllow``: a relay pod that is not ready serves no
    client, and its queue is safe either way (on SIGTERM it hands its mail to the ready pods,
    or keeps it on its spool volume for its successor or a drain Job). With the default
    (``IfHealthyBudget``) a crash-looping relay would block every node drain while the budget
    is used up; evicting it loses nothing and lets the drain go on (docs/scaling.md).
    """
    del settings
    budget = relay.spec.pod_disruption_budget
    if not budget.enabled or relay.spec.replicas < 2:
        return None
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(relay)},
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    if budget.min_available is not None:
        spec["minAvailable"] = budget.min_available
    else:
        spec["maxUnavailable"] = budget.max_unavailable if budget.max_unavailable is not None else 1
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(relay, relay.name),
        "spec": spec,
    }


def render_networkpolicy(
    relay: RelayInputs, policy: NetworkPolicyInputs | None, settings: OperatorSettings
) -> dict[str, Any] | None:
    """Ingress to the SMTP ports only from the listed peers; metrics open to scrapers."""
    del settings
    if policy is None:
        return None
    peers = []
    for peer in policy.peers:
        entry: dict[str, Any] = {}
        if peer.namespace_selector is not None:
            entry["namespaceSelector"] = dict(peer.namespace_selector)
        if peer.pod_selector is not None:
            entry["podSelector"] = dict(peer.pod_selector)
        peers.append(entry)
    ingress: list[dict[str, Any]] = []
    smtp_ports = [{"protocol": "TCP", "port": port} for _, port in _ports(relay.spec)]
    if peers:
        ingress.append({"from": peers, "ports": smtp_ports})
    # The queue hand-off: only from this relay's own pods and its drain Jobs' pods.
    ingress.append(
        {
            "from": [
                {"podSelector": {"matchLabels": selector_labels(relay)}},
                {"podSelector": {"matchLabels": _selector_of(drain_pod_labels(relay))}},
            ],
            "ports": [{"protocol": "TCP", "port": HANDOFF_PORT}],
        }
    )
    ingress.append({"ports": [{"protocol": "TCP", "port": relay.spec.metrics.port}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(relay, relay.name),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(relay)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def _selector_of(pod_labels: Mapping[str, str]) -> dict[str, str]:
    keys = ("app.kubernetes.io/name", "app.kubernetes.io/instance")
    return {key: pod_labels[key] for key in keys}


def render_servicemonitor(relay: RelayInputs, settings: OperatorSettings) -> dict[str, Any] | None:
    """A prometheus-operator ServiceMonitor, or None unless metrics and the monitor are on."""
    del settings
    metrics = relay.spec.metrics
    if not (metrics.enabled and metrics.service_monitor.enabled):
        return None
    metadata = _metadata(relay, relay.name)
    metadata["labels"] = {**metrics.service_monitor.labels, **metadata["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": labels(relay)},
            "namespaceSelector": {"matchNames": [relay.namespace]},
            "endpoints": [
                {
                    "port": METRICS_PORT_NAME,
                    "path": "/metrics",
                    "interval": metrics.service_monitor.interval,
                }
            ],
        },
    }


def _resources(relay: RelayInputs, settings: OperatorSettings) -> dict[str, Any]:
    if relay.spec.resources is None:
        return {kind: dict(values) for kind, values in settings.default_resources.items()}
    out: dict[str, Any] = {}
    if relay.spec.resources.requests:
        out["requests"] = {k: str(v) for k, v in relay.spec.resources.requests.items()}
    if relay.spec.resources.limits:
        out["limits"] = {k: str(v) for k, v in relay.spec.resources.limits.items()}
    return out


def _secret_volume(mount: SecretMount) -> dict[str, Any]:
    return {
        "name": mount.volume,
        "secret": {
            "secretName": mount.secret_name,
            "items": [{"key": key, "path": path} for key, path in mount.items],
            "defaultMode": 0o440,
        },
    }


UNPRIVILEGED_PORT_SYSCTL = "net.ipv4.ip_unprivileged_port_start"
FIRST_UNPRIVILEGED_PORT = 1024


def pod_sysctls(spec: models.MailRelaySpec) -> list[dict[str, str]]:
    """Let the relay (uid 65532, no capabilities) bind its ports below 1024 (587, 465).

    `net.ipv4.ip_unprivileged_port_start` is a namespaced, "safe" sysctl (Kubernetes allows it
    in every pod since 1.22, Pod Security's restricted profile included): it lowers the bound
    in the pod's own network namespace only, to the lowest port the relay listens on. It
    applies to IPv6 sockets too. Without it the relay depends on the runtime's default.
    """
    lowest = min([port for _, port in _ports(spec)] + [spec.metrics.port])
    if lowest >= FIRST_UNPRIVILEGED_PORT:
        return []
    return [{"name": UNPRIVILEGED_PORT_SYSCTL, "value": str(lowest)}]


def _tolerations(spec: models.MailRelaySpec) -> list[dict[str, Any]]:
    return [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]


def render_statefulset(
    relay: RelayInputs,
    *,
    restart_hash: str,
    mounts: Sequence[SecretMount],
    settings: OperatorSettings,
    ambient_aws: bool = False,
    replicas: int | None = None,
) -> dict[str, Any]:
    """The relay pods: hardened container, probes, drain on stop, spool per pod; with
    `ambient_aws` (an SES route without keys is bound) the AWS web identity, if opted in.

    ``replicas`` overrides ``spec.replicas`` while a drain Job holds the spool volume of an
    ordinal the spec asks for again (``drain.capped_replicas``).
    """
    spec = relay.spec
    persistent = wants_persistence(spec)
    container_ports = [
        {"name": name, "containerPort": port, "protocol": "TCP"} for name, port in _ports(spec)
    ]
    container_ports.append(
        {"name": METRICS_PORT_NAME, "containerPort": spec.metrics.port, "protocol": "TCP"}
    )
    container_ports.append(
        {"name": HANDOFF_PORT_NAME, "containerPort": HANDOFF_PORT, "protocol": "TCP"}
    )
    volume_mounts = [
        {"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
        {"name": "spool", "mountPath": str(SPOOL_DIR)},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volume_mounts += [
        {"name": m.volume, "mountPath": m.mount_path, "readOnly": True} for m in mounts
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(relay.name)}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    if not persistent:
        volumes.append({"name": "spool", "emptyDir": {}})
    volumes += [_secret_volume(m) for m in mounts]
    identity = aws_web_identity(spec, ambient_aws)
    if identity is not None:
        volumes.append(identity[0])
        volume_mounts.append(identity[1])
    probe_port = METRICS_PORT_NAME
    container: dict[str, Any] = {
        "name": "relay",
        "image": spec.image or settings.relay_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "mailrelay.relay"],
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        "ports": container_ports,
        # Probed every 2 s: a new pod serves about 3 s sooner than at kubelet's usual 5 s
        # (the probe is one local GET), and a draining pod leaves the Service within 6 s.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": probe_port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": probe_port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        # The sleep lets endpoints drop the pod before SIGTERM; the relay then stops
        # accepting, finishes deliveries in flight (shutdown_grace_seconds), hands its queue
        # to the ready pods (handoff.deadline_seconds) and exits.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "resources": _resources(relay, settings),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": volume_mounts,
    }
    if identity is not None:
        container["env"] = identity[2]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(settings),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RELAY_UID,
            "runAsGroup": RELAY_UID,
            "fsGroup": RELAY_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if sysctls := pod_sysctls(spec):
        pod_spec["securityContext"]["sysctls"] = sysctls
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = _tolerations(spec)
    if spec.affinity is not None:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.priority_class_name is not None:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spread := topology_spread(relay):
        pod_spec["topologySpreadConstraints"] = spread
    pod_spec["serviceAccountName"] = spec.service_account_name or service_account_name(relay.name)
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": ref.name} for ref in spec.image_pull_secrets]
    if spec.pod_security_context is not None:
        pod_spec["securityContext"].update(
            spec.pod_security_context.model_dump(by_alias=True, exclude_defaults=True)
        )
    statefulset: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(relay, relay.name),
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "serviceName": headless_service_name(relay.name),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(relay)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {
                    "labels": {**spec.pod_labels, **labels(relay)},
                    "annotations": {
                        **spec.pod_annotations,
                        RESTART_HASH_ANNOTATION: restart_hash,
                    },
                },
                "spec": pod_spec,
            },
        },
    }
    if persistent:
        claim_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": spec.queue.size}},
        }
        if spec.queue.storage_class_name is not None:
            claim_spec["storageClassName"] = spec.queue.storage_class_name
        statefulset["spec"]["volumeClaimTemplates"] = [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "spool", "labels": labels(relay)},
                "spec": claim_spec,
            }
        ]
        statefulset["spec"]["persistentVolumeClaimRetentionPolicy"] = {
            "whenDeleted": "Retain",
            "whenScaled": "Retain",
        }
    return statefulset
