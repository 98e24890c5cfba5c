"""Manifests for the CRD tests: valid bases, the examples, and a table of invalid specs.

Each invalid case is one small edit of a valid base spec, with two expectations: the text the
API server's refusal must contain (field path and reason) and the text pydantic's
ValidationError must contain. ``test_models`` checks the second, ``test_api`` the first, so the
CEL rules in the CRD and the validators in the models are held to the same table.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
EXAMPLES_DIR = REPO_ROOT / "examples"

Kind = Literal["MailRelay", "MailRoute"]

BASE_RELAY_SPEC: dict[str, Any] = {
    "listener": {"tls": {"secretName": "relay-tls"}},
    "auth": {"usersSecretRef": {"name": "relay-users"}},
}
BASE_ROUTE_SPEC: dict[str, Any] = {
    "relayRef": {"name": "outbound"},
    "upstream": {"smtp": {"host": "smtp.example.net"}},
}
MAILGUN = {"provider": "mailgun", "domain": "mg.example.com", "credentialsSecretRef": {"name": "k"}}


class _Remove:
    """Marks a key an edit deletes."""


REMOVE = _Remove()


def edited(base: dict[str, Any], edits: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with each dotted path set (or removed with ``REMOVE``)."""
    result = copy.deepcopy(base)
    for path, value in edits.items():
        *parents, leaf = path.split(".")
        node = result
        for key in parents:
            node = node.setdefault(key, {})
        if isinstance(value, _Remove):
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)
    return result


@dataclass(frozen=True)
class Invalid:
    """One manifest the API server and the models must both refuse."""

    id: str
    kind: Kind
    edits: dict[str, Any]
    api_error: tuple[str, ...]
    """Substrings of kubectl's error output: the field path and what is wrong."""
    model_error: str | None
    """Substring of pydantic's error; None when the rule is about metadata, not the spec."""
    name: str = "example"

    @property
    def spec(self) -> dict[str, Any]:
        return edited(BASE_RELAY_SPEC if self.kind == "MailRelay" else BASE_ROUTE_SPEC, self.edits)

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": self.kind,
            "metadata": {"name": self.name},
            "spec": self.spec,
        }


def _api_edit(provider: str, **fields: Any) -> dict[str, Any]:
    """Edits that make the base route's upstream a provider API with credentials."""
    return {
        "upstream": {"api": {"provider": provider, "credentialsSecretRef": {"name": "k"}, **fields}}
    }


DKIM_DOMAIN: dict[str, Any] = {
    "domain": "example.com",
    "active": {"selector": "mail2026a", "secretRef": {"name": "dkim-a"}},
    "next": {"selector": "mail2026b", "secretRef": {"name": "dkim-b", "key": "private.pem"}},
}


INVALID: list[Invalid] = [
    # --- MailRoute: DKIM ----------------------------------------------------------------------
    Invalid(
        "dkim-with-sendgrid",
        "MailRoute",
        {**_api_edit("sendgrid"), "dkim": [DKIM_DOMAIN]},
        ("spec.dkim: Invalid value", "dkim cannot be used with providers sendgrid"),
        "they rebuild the message from JSON",
    ),
    Invalid(
        "dkim-with-postmark-fallback",
        "MailRoute",
        {
            "fallbacks": [{"api": {"provider": "postmark", "credentialsSecretRef": {"name": "k"}}}],
            "dkim": [DKIM_DOMAIN],
        },
        ("spec.dkim: Invalid value", "those providers sign with the DKIM keys"),
        "dkim cannot be used with providers",
    ),
    Invalid(
        "dkim-same-selector-twice",
        "MailRoute",
        {"dkim": [{**DKIM_DOMAIN, "next": {**DKIM_DOMAIN["active"]}}]},
        ("spec.dkim[0].next.selector: Invalid value", "next must name a different selector"),
        "next must name a different selector than active",
    ),
    Invalid(
        "dkim-headers-without-from",
        "MailRoute",
        {"dkim": [{**DKIM_DOMAIN, "headers": ["To", "Subject"]}]},
        ("spec.dkim[0].headers: Invalid value", "headers must include From"),
        "headers must include From",
    ),
    Invalid(
        "dkim-selector-not-a-label",
        "MailRoute",
        {
            "dkim": [
                {**DKIM_DOMAIN, "active": {"selector": "Mail_2026", "secretRef": {"name": "a"}}}
            ]
        },
        ("spec.dkim[0].active.selector: Invalid value", "selector must be one or more"),
        "selector must be one or more lower-case DNS labels",
    ),
    Invalid(
        "dkim-domain-twice",
        "MailRoute",
        {"dkim": [DKIM_DOMAIN, {k: v for k, v in DKIM_DOMAIN.items() if k != "next"}]},
        ("spec.dkim[1]: Duplicate value",),
        "dkim lists a domain twice",
    ),
    # --- MailRoute: the upstream ------------------------------------------------------------
    Invalid(
        "no-upstream",
        "MailRoute",
        {"upstream": {}},
        ("spec.upstream: Invalid value", "set exactly one of smtp or api"),
        "set exactly one of smtp or api",
    ),
    Invalid(
        "upstream-missing",
        "MailRoute",
        {"upstream": REMOVE},
        ("spec.upstream: Required value",),
        "upstream\n  Field required",
    ),
    Invalid(
        "both-smtp-and-api",
        "MailRoute",
        {"upstream.api": MAILGUN},
        ("spec.upstream: Invalid value", "set exactly one of smtp or api"),
        "set exactly one of smtp or api",
    ),
    Invalid(
        "tls-none-without-opt-in",
        "MailRoute",
        {"upstream.smtp.tls": "none"},
        ("spec.upstream.smtp.tls: Invalid value", "set insecureAllowPlaintext: true"),
        "set insecureAllowPlaintext: true",
    ),
    Invalid(
        "bad-port",
        "MailRoute",
        {"upstream.smtp.port": 70000},
        ("spec.upstream.smtp.port: Invalid value: 70000", "less than or equal to 65535"),
        "less than or equal to 65535",
    ),
    Invalid(
        "port-zero",
        "MailRoute",
        {"upstream.smtp.port": 0},
        ("spec.upstream.smtp.port: Invalid value: 0", "greater than or equal to 1"),
        "greater than or equal to 1",
    ),
    Invalid(
        "bad-tls-enum",
        "MailRoute",
        {"upstream.smtp.tls": "ssl"},
        ('spec.upstream.smtp.tls: Unsupported value: "ssl"', '"starttls", "implicit", "none"'),
        "Input should be 'starttls', 'implicit' or 'none'",
    ),
    Invalid(
        "bad-host",
        "MailRoute",
        {"upstream.smtp.host": "smtp_relay!.example.net"},
        ("spec.upstream.smtp.host: Invalid value", "must be a DNS name"),
        "must be a DNS name",
    ),
    Invalid(
        "bad-provider-enum",
        "MailRoute",
        {"upstream": {"api": {"provider": "mandrill"}}},
        ('spec.upstream.api.provider: Unsupported value: "mandrill"', '"mailgun", "ses"'),
        "Input should be 'mailgun', 'ses'",
    ),
    Invalid(
        "mailgun-without-domain",
        "MailRoute",
        {"upstream": {"api": MAILGUN}, "upstream.api.domain": REMOVE},
        ("spec.upstream.api.domain: Required value", "domain is required for provider mailgun"),
        "domain is required for provider mailgun",
    ),
    Invalid(
        "ses-without-region",
        "MailRoute",
        {"upstream": {"api": {"provider": "ses"}}},
        ("spec.upstream.api.region: Required value", "provider ses needs a region"),
        "provider ses needs a region",
    ),
    Invalid(
        "ses-bad-region",
        "MailRoute",
        {"upstream": {"api": {"provider": "ses", "region": "europe"}}},
        ("spec.upstream.api.region: Invalid value", "must be an AWS region"),
        "must be an AWS region",
    ),
    Invalid(
        "region-for-postmark",
        "MailRoute",
        {"upstream": {"api": {"provider": "postmark", "region": "eu"}}},
        ("spec.upstream.api.region: Forbidden", "region is only used by"),
        "region is only used by",
    ),
    Invalid(
        "webhook-without-endpoint",
        "MailRoute",
        {"upstream": {"api": {"provider": "webhook"}}},
        ("spec.upstream.api.endpoint: Required value", "provider webhook needs an endpoint"),
        "provider webhook needs an endpoint",
    ),
    Invalid(
        "endpoint-not-http",
        "MailRoute",
        {"upstream": {"api": {"provider": "webhook", "endpoint": "ftp://hooks.example.org/x"}}},
        ("spec.upstream.api.endpoint: Invalid value", "must be an absolute http:// or https://"),
        "must be an absolute http:// or https://",
    ),
    Invalid(
        "webhook-without-signing-secret",
        "MailRoute",
        {"upstream": {"api": {"provider": "webhook", "endpoint": "https://hooks.example.org/in"}}},
        (
            "spec.upstream.api.credentialsSecretRef: Required value",
            "credentialsSecretRef is required",
        ),
        "credentialsSecretRef is required",
    ),
    Invalid(
        "api-key-provider-without-credentials",
        "MailRoute",
        {"upstream": {"api": {"provider": "sendgrid"}}},
        (
            "spec.upstream.api.credentialsSecretRef: Required value",
            "credentialsSecretRef is required",
        ),
        "credentialsSecretRef is required",
    ),
    Invalid(
        "fallback-with-both-kinds",
        "MailRoute",
        {"fallbacks": [{"smtp": {"host": "smtp.example.org"}, "api": MAILGUN}]},
        ("spec.fallbacks[0]: Invalid value", "set exactly one of smtp or api"),
        "set exactly one of smtp or api",
    ),
    Invalid(
        "too-many-fallbacks",
        "MailRoute",
        {"fallbacks": [{"smtp": {"host": f"smtp{i}.example.org"}} for i in range(5)]},
        ("spec.fallbacks: Too many: 5: must have at most 4 items",),
        "List should have at most 4 items",
    ),
    # --- MailRoute: match, rate limit, the rest --------------------------------------------
    Invalid(
        "bad-domain-pattern",
        "MailRoute",
        {"match.senderDomains": ["example..com"]},
        ("spec.match.senderDomains[0]: Invalid value", "such as example.com, or *.example.com"),
        "such as example.com, or *.example.com",
    ),
    Invalid(
        "wildcard-inside-domain",
        "MailRoute",
        {"match.recipientDomains": ["mail.*.example.com"]},
        ("spec.match.recipientDomains[0]: Invalid value", "a '*' only as the whole first label"),
        "a '*' only as the whole first label",
    ),
    Invalid(
        "rate-limit-zero",
        "MailRoute",
        {"rateLimit": {"perSecond": 0}},
        ("spec.rateLimit.perSecond: Invalid value: 0", "should be greater than 0"),
        "Input should be greater than 0",
    ),
    Invalid(
        "rate-limit-burst-below-rate",
        "MailRoute",
        {"rateLimit": {"perSecond": 10, "burst": 2}},
        ("spec.rateLimit.burst: Invalid value", "burst must be at least perSecond"),
        "burst must be at least perSecond",
    ),
    Invalid(
        "rate-limit-bad-on-exceed",
        "MailRoute",
        {"rateLimit": {"perSecond": 10, "onExceed": "drop"}},
        ('spec.rateLimit.onExceed: Unsupported value: "drop"', '"defer", "reject"'),
        "Input should be 'defer' or 'reject'",
    ),
    Invalid(
        "negative-priority",
        "MailRoute",
        {"priority": -1},
        ("spec.priority: Invalid value: -1", "greater than or equal to 0"),
        "greater than or equal to 0",
    ),
    Invalid(
        "route-unknown-field",
        "MailRoute",
        {"upstream.smtp.hostname": "smtp.example.net"},
        ('unknown field "spec.upstream.smtp.hostname"',),
        "hostname\n  Extra inputs are not permitted",
    ),
    Invalid(
        "domain-pattern-with-uppercase",
        "MailRoute",
        {"match.senderDomains": ["Example.com"]},
        ("spec.match.senderDomains[0]: Invalid value", "must be a lowercase domain"),
        "must be a lowercase domain",
    ),
    Invalid(
        "bad-secret-name",
        "MailRoute",
        {"upstream.smtp.credentialsSecretRef": {"name": "Smart_Host"}},
        (
            "spec.upstream.smtp.credentialsSecretRef.name: Invalid value",
            "must be a lowercase DNS-1123 name such as relay-tls",
        ),
        "must be a lowercase DNS-1123 name such as relay-tls",
    ),
    Invalid(
        "bad-secret-key",
        "MailRoute",
        {"upstream.smtp.credentialsSecretRef": {"name": "smarthost", "passwordKey": "pass word"}},
        (
            "spec.upstream.smtp.credentialsSecretRef.passwordKey: Invalid value",
            "must be a Secret key such as tls.crt",
        ),
        "must be a Secret key such as tls.crt",
    ),
    # --- MailRoute: SSRF --------------------------------------------------------------------
    Invalid(
        "webhook-to-metadata-service",
        "MailRoute",
        _api_edit("webhook", endpoint="http://169.254.169.254/latest/meta-data/"),
        ("spec.upstream.api.endpoint: Invalid value", "may not reach loopback, link-local"),
        "may not reach loopback, link-local",
    ),
    Invalid(
        "endpoint-on-loopback",
        "MailRoute",
        _api_edit("sparkpost", endpoint="http://127.0.0.1:8080"),
        ("spec.upstream.api.endpoint: Invalid value", "set insecureAllowLocalEndpoint: true"),
        "set insecureAllowLocalEndpoint: true",
    ),
    Invalid(
        "endpoint-localhost-name",
        "MailRoute",
        _api_edit("postmark", endpoint="https://LocalHost:8443/"),
        ("spec.upstream.api.endpoint: Invalid value", "may not reach loopback"),
        "may not reach loopback",
    ),
    Invalid(
        "endpoint-gcp-metadata-name",
        "MailRoute",
        _api_edit("webhook", endpoint="http://metadata.google.internal/computeMetadata/v1/"),
        ("spec.upstream.api.endpoint: Invalid value", "cloud metadata addresses"),
        "cloud metadata addresses",
    ),
    Invalid(
        "endpoint-ipv6-link-local",
        "MailRoute",
        _api_edit("resend", endpoint="https://[fe80::1]/"),
        ("spec.upstream.api.endpoint: Invalid value", "may not reach loopback, link-local"),
        "may not reach loopback, link-local",
    ),
    Invalid(
        "endpoint-unspecified-in-fallback",
        "MailRoute",
        {"fallbacks": [_api_edit("sendgrid", endpoint="http://0.0.0.0:80")["upstream"]]},
        ("spec.fallbacks[0].api.endpoint: Invalid value", "may not reach loopback"),
        "may not reach loopback",
    ),
    # --- MailRelay --------------------------------------------------------------------------
    Invalid(
        "open-relay-everyone",
        "MailRelay",
        {"auth": {"required": False}, "allowedNetworks": ["0.0.0.0/0"]},
        ("spec.allowedNetworks: Invalid value", "open relay for the internet"),
        "open relay for the internet",
    ),
    Invalid(
        "open-relay-ipv6-everyone-with-auth",
        "MailRelay",
        {"allowedNetworks": ["10.0.0.0/8", "::/0"]},
        ("spec.allowedNetworks: Invalid value", "set insecureAllowPublicNetworks: true"),
        "set insecureAllowPublicNetworks: true",
    ),
    Invalid(
        "open-relay-range-wider-than-private",
        "MailRelay",
        {"auth": {"required": False}, "allowedNetworks": ["10.0.0.0/7"]},
        ("spec.allowedNetworks: Invalid value", "reaches beyond private addresses"),
        "reaches beyond private addresses",
    ),
    Invalid(
        "open-relay-public-slash-24",
        "MailRelay",
        {"allowedNetworks": ["203.0.113.0/24"]},
        ("spec.allowedNetworks: Invalid value", "reaches beyond private addresses"),
        "reaches beyond private addresses",
    ),
    Invalid(
        "load-balancer-trusting-node-addresses",
        "MailRelay",
        {"allowedNetworks": ["10.0.0.0/8"], "service": {"type": "LoadBalancer"}},
        (
            "spec.service.externalTrafficPolicy: Required value",
            "set service.externalTrafficPolicy: Local",
        ),
        "set service.externalTrafficPolicy: Local",
    ),
    Invalid(
        "node-port-trusting-node-addresses",
        "MailRelay",
        {
            "allowedNetworks": ["10.0.0.0/8"],
            "service": {"type": "NodePort", "externalTrafficPolicy": "Cluster"},
        },
        ("spec.service.externalTrafficPolicy: Required value", "with a node's address"),
        "with a node's address",
    ),
    Invalid(
        "node-port-source-ranges-do-not-apply",
        "MailRelay",
        {
            "allowedNetworks": ["10.0.0.0/8"],
            "service": {"type": "NodePort", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
        },
        (
            "spec.service.loadBalancerSourceRanges: Forbidden",
            "only used by Services of type LoadBalancer",
        ),
        "only used by Services of type LoadBalancer",
    ),
    Invalid(
        "external-traffic-policy-on-cluster-ip",
        "MailRelay",
        {"service": {"externalTrafficPolicy": "Local"}},
        ("spec.service.externalTrafficPolicy: Forbidden", "NodePort or LoadBalancer"),
        "NodePort or LoadBalancer",
    ),
    Invalid(
        "bad-image-reference",
        "MailRelay",
        {"image": "ghcr.io/Example/mailrelay:1.0"},
        ("spec.image: Invalid value", "must be a container image reference such as"),
        "must be a container image reference such as",
    ),
    Invalid(
        "image-with-space",
        "MailRelay",
        {"image": "mailrelay:1.0 "},
        ("spec.image: Invalid value", "must be a container image reference such as"),
        "must be a container image reference such as",
    ),
    Invalid(
        "bad-node-selector-key",
        "MailRelay",
        {"nodeSelector": {"disk type": "ssd"}},
        ("spec.nodeSelector: Invalid value", "label keys must be a name such as tier"),
        "label keys must be a name such as tier",
    ),
    Invalid(
        "bad-node-selector-value",
        "MailRelay",
        {"nodeSelector": {"disktype": "fast ssd"}},
        ("spec.nodeSelector: Invalid value", "label values must be at most 63"),
        "label values must be at most 63",
    ),
    Invalid(
        "bad-pod-annotation-key",
        "MailRelay",
        {"podAnnotations": {"example.com/a/b": "x"}},
        ("spec.podAnnotations: Invalid value", "annotation keys must be a name"),
        "annotation keys must be a name",
    ),
    Invalid(
        "bad-service-annotation-key",
        "MailRelay",
        {"service": {"annotations": {"-lb-": "x"}}},
        ("spec.service.annotations: Invalid value", "annotation keys must be a name"),
        "annotation keys must be a name",
    ),
    Invalid(
        "bad-priority-class-name",
        "MailRelay",
        {"priorityClassName": "High_Priority"},
        ("spec.priorityClassName: Invalid value", "must be a lowercase DNS-1123 name"),
        "must be a lowercase DNS-1123 name",
    ),
    Invalid(
        "bad-storage-class-name",
        "MailRelay",
        {"queue": {"storageClassName": "Fast SSD"}},
        ("spec.queue.storageClassName: Invalid value", "must be a lowercase DNS-1123 name"),
        "must be a lowercase DNS-1123 name",
    ),
    Invalid(
        "bad-listener-hostname",
        "MailRelay",
        {"listener.hostname": "mail_relay.example.com"},
        ("spec.listener.hostname: Invalid value", "must be a DNS name such as mail.example.com"),
        "must be a DNS name such as mail.example.com",
    ),
    Invalid(
        "bad-resource-quantity",
        "MailRelay",
        {"resources": {"limits": {"memory": "1 GB"}}},
        ("spec.resources.limits[memory]: Invalid value", "must be a Kubernetes quantity such as"),
        "must be a Kubernetes quantity such as",
    ),
    Invalid(
        "bad-pdb-percentage",
        "MailRelay",
        {"podDisruptionBudget": {"maxUnavailable": "half"}},
        ("spec.podDisruptionBudget.maxUnavailable: Invalid value", "a percentage such as 25%"),
        "a percentage such as 25%",
    ),
    Invalid(
        "negative-replicas",
        "MailRelay",
        {"replicas": -1},
        ("spec.replicas: Invalid value: -1", "greater than or equal to 0"),
        "greater than or equal to 0",
    ),
    Invalid(
        "bad-cidr-prefix",
        "MailRelay",
        {"allowedNetworks": ["10.0.0.0/33"]},
        ('spec.allowedNetworks[0]: Invalid value: "10.0.0.0/33"', "must be a CIDR"),
        "is not a CIDR",
    ),
    Invalid(
        "cidr-without-prefix",
        "MailRelay",
        {"allowedNetworks": ["192.168.1.10"]},
        ('spec.allowedNetworks[0]: Invalid value: "192.168.1.10"', "must be a CIDR"),
        "is not a CIDR",
    ),
    Invalid(
        "auth-without-users",
        "MailRelay",
        {"auth": {}},
        ("spec.auth.usersSecretRef: Required value", "usersSecretRef is required"),
        "usersSecretRef is required",
    ),
    Invalid(
        "auth-without-tls",
        "MailRelay",
        {"listener": {}},
        ("spec.listener.tls: Required value", "AUTH is only offered over TLS"),
        "AUTH is only offered over TLS",
    ),
    Invalid(
        "no-auth-and-no-networks",
        "MailRelay",
        {"auth": {"required": False}},
        ("spec.allowedNetworks: Required value", "allowedNetworks must list at least one"),
        "allowedNetworks must list at least one",
    ),
    Invalid(
        "implicit-tls-port-clash",
        "MailRelay",
        {"listener.implicitTlsPort": 587},
        ("spec.listener.implicitTlsPort: Invalid value", "implicitTlsPort must differ from port"),
        "implicitTlsPort must differ from port",
    ),
    Invalid(
        "metrics-port-clash",
        "MailRelay",
        {"metrics": {"port": 587}},
        ("spec.metrics.port: Invalid value", "metrics.port must differ"),
        "metrics.port must differ",
    ),
    Invalid(
        "retry-out-of-order",
        "MailRelay",
        {"queue": {"retry": {"initialBackoff": "2h", "maxBackoff": "1h"}}},
        ("spec.queue.retry: Invalid value", "initialBackoff <= maxBackoff <= maxAge"),
        "initialBackoff <= maxBackoff <= maxAge",
    ),
    Invalid(
        "postmaster-not-an-address",
        "MailRelay",
        {"postmaster": "Postmaster"},
        ("spec.postmaster: Invalid value", "must be a plain address such as"),
        "must be a plain address such as",
    ),
    Invalid(
        "auth-failure-window-zero",
        "MailRelay",
        {"limits": {"perClient": {"authFailureWindow": "0s"}}},
        (
            "spec.limits.perClient.authFailureWindow: Invalid value",
            "authFailureWindow must be longer than 0s",
        ),
        "authFailureWindow must be longer than 0s",
    ),
    Invalid(
        "auth-cache-ttl-too-long",
        "MailRelay",
        {"auth.cache": {"ttl": "25h"}},
        ("spec.auth.cache.ttl: Invalid value", "ttl must be between 1s and 24h"),
        "ttl must be between 1s and 24h",
    ),
    Invalid(
        "auth-cache-too-big",
        "MailRelay",
        {"auth.cache": {"maxEntries": 2000000}},
        ("spec.auth.cache.maxEntries: Invalid value",),
        "less than or equal to 1000000",
    ),
    Invalid(
        "app-credentials-duplicate",
        "MailRelay",
        {"auth.appCredentials": [{"name": "billing"}, {"name": "billing"}]},
        ("spec.auth.appCredentials[1]: Duplicate value",),
        "appCredentials names must be unique",
    ),
    Invalid(
        "app-credentials-bad-name",
        "MailRelay",
        {"auth.appCredentials": [{"name": "Billing_App"}]},
        ('spec.auth.appCredentials[0].name: Invalid value: "Billing_App"',),
        "String should match pattern",
    ),
    Invalid(
        "bad-duration",
        "MailRelay",
        {"queue": {"retry": {"maxAge": "5 days"}}},
        ("spec.queue.retry.maxAge: Invalid value", "must be a Go duration such as 30s"),
        "must be a Go duration such as 30s",
    ),
    Invalid(
        "bad-tls-version",
        "MailRelay",
        {"listener.tls.minVersion": "TLSv1.0"},
        ('spec.listener.tls.minVersion: Unsupported value: "TLSv1.0"',),
        "Input should be 'TLSv1.2' or 'TLSv1.3'",
    ),
    Invalid(
        "bad-queue-size",
        "MailRelay",
        {"queue": {"size": "lots"}},
        ("spec.queue.size: Invalid value", "must be a size such as 1Gi"),
        "must be a size such as 1Gi",
    ),
    Invalid(
        "pdb-both-bounds",
        "MailRelay",
        {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": "50%"}},
        ("spec.podDisruptionBudget: Invalid value", "at most one of minAvailable"),
        "at most one of minAvailable",
    ),
    Invalid(
        "network-policy-without-peers",
        "MailRelay",
        {"networkPolicy": {"enabled": True}},
        ("spec.networkPolicy.allowedFrom: Required value", "at least one peer"),
        "at least one peer",
    ),
    Invalid(
        "network-policy-peer-without-selector",
        "MailRelay",
        {"networkPolicy": {"enabled": True, "allowedFrom": [{}]}},
        (
            "spec.networkPolicy.allowedFrom[0]: Invalid value",
            "set namespaceSelector, podSelector or both",
        ),
        "set namespaceSelector, podSelector or both",
    ),
    Invalid(
        "selector-in-without-values",
        "MailRelay",
        {"routeSelector": {"matchExpressions": [{"key": "team", "operator": "In"}]}},
        (
            "spec.routeSelector.matchExpressions[0].values: Invalid value",
            "values must be non-empty",
        ),
        "values must be non-empty",
    ),
    Invalid(
        "pod-labels-displace-the-operators-selector",
        "MailRelay",
        {"podLabels": {"team": "mail", "app.kubernetes.io/instance": "other"}},
        ("spec.podLabels: Invalid value", "may not set the labels the operator selects"),
        "may not set the labels the operator selects",
    ),
    Invalid(
        "pod-labels-bad-value",
        "MailRelay",
        {"podLabels": {"team": "mail team"}},
        ("spec.podLabels: Invalid value", "label values must be"),
        "label values must be",
    ),
    Invalid(
        "pod-annotations-set-the-restart-hash",
        "MailRelay",
        {"podAnnotations": {"mailrelay.dev/restart-hash": "0"}},
        ("spec.podAnnotations: Invalid value", "may not set mailrelay.dev/restart-hash"),
        "may not set mailrelay.dev/restart-hash",
    ),
    Invalid(
        "pod-security-context-root",
        "MailRelay",
        {"podSecurityContext": {"runAsUser": 0}},
        ("spec.podSecurityContext.runAsUser: Invalid value: 0",),
        "greater than or equal to 1",
    ),
    Invalid(
        "pod-security-context-unconfined-seccomp",
        "MailRelay",
        {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
        ('spec.podSecurityContext.seccompProfile.type: Unsupported value: "Unconfined"',),
        "Input should be 'RuntimeDefault' or 'Localhost'",
    ),
    Invalid(
        "pod-security-context-localhost-without-profile",
        "MailRelay",
        {"podSecurityContext": {"seccompProfile": {"type": "Localhost"}}},
        (
            "spec.podSecurityContext.seccompProfile.localhostProfile: Invalid value",
            "localhostProfile is required with type Localhost",
        ),
        "localhostProfile is required with type Localhost",
    ),
    Invalid(
        "spread-bad-topology-key",
        "MailRelay",
        {
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "not a key", "whenUnsatisfiable": "ScheduleAnyway"}
            ]
        },
        (
            "spec.topologySpreadConstraints[0].topologyKey: Invalid value",
            "topologyKey must be a node label key",
        ),
        "topologyKey must be a node label key",
    ),
    Invalid(
        "spread-zero-skew",
        "MailRelay",
        {
            "topologySpreadConstraints": [
                {"maxSkew": 0, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}
            ]
        },
        ("spec.topologySpreadConstraints[0].maxSkew: Invalid value: 0",),
        "greater than or equal to 1",
    ),
    Invalid(
        "service-account-name-not-a-name",
        "MailRelay",
        {"serviceAccountName": "Mail_Relay"},
        ("spec.serviceAccountName: Invalid value",),
        "serviceAccountName",
    ),
    Invalid(
        "relay-unknown-field",
        "MailRelay",
        {"replica": 3},
        ('unknown field "spec.replica"',),
        "replica\n  Extra inputs are not permitted",
    ),
    Invalid(
        "relay-name-not-a-dns-label",
        "MailRelay",
        {},
        ('metadata.name: Invalid value: "1st.relay"', "should match"),
        None,
        name="1st.relay",
    ),
    Invalid(
        "relay-name-too-long-for-its-statefulset",
        "MailRelay",
        {},
        ("metadata.name: Too long: may not be more than 52 bytes",),
        None,
        name="r" * 53,
    ),
]
INVALID_IDS = [case.id for case in INVALID]


_api = _api_edit


# Edge cases on both sides of a rule: (edits of the base spec, whether it is accepted).
ROUTE_FIELD_RULES: list[tuple[dict[str, Any], bool]] = [
    ({"dkim": [DKIM_DOMAIN]}, True),
    ({**_api_edit("mailgun", domain="mg.example.com"), "dkim": [DKIM_DOMAIN]}, True),
    ({**_api_edit("ses", region="eu-west-1"), "dkim": [DKIM_DOMAIN]}, True),
    ({**_api_edit("sparkpost"), "dkim": [DKIM_DOMAIN]}, True),
    ({**_api_edit("resend"), "dkim": []}, True),
    ({**_api_edit("resend"), "dkim": [DKIM_DOMAIN]}, False),
    ({"dkim": [{**DKIM_DOMAIN, "headers": ["from", "To"]}]}, True),
    ({"dkim": [{**DKIM_DOMAIN, "canonicalization": "simple/simple"}]}, True),
    ({"dkim": [{**DKIM_DOMAIN, "canonicalization": "relaxed"}]}, False),
    ({"dkim": [{**DKIM_DOMAIN, "headers": ["Bad:Name", "From"]}]}, False),
    ({"upstream.smtp.host": "2001:db8::25"}, True),
    ({"upstream.smtp.host": "192.0.2.25"}, True),
    ({"upstream.smtp.host": "-smtp.example.net"}, False),
    ({"upstream.smtp.host": "smtp.example.net\n"}, False),  # `$` must not match before \n
    ({"match.senderDomains": ["*.example.com", "example.com"]}, True),
    ({"match.senderDomains": ["*example.com"]}, False),
    ({"match.recipientDomains": ["example.com", "example.com"]}, False),  # a set
    ({"match.senderDomains": ["Example.com"]}, False),
    ({"upstream.smtp.tls": "none", "upstream.smtp.insecureAllowPlaintext": True}, True),
    ({"upstream.smtp.insecureAllowPlaintext": "yes"}, False),  # no truthy-string coercion
    ({"upstream.smtp.port": "587"}, False),  # strict, as the API server is
    ({"rateLimit": {"perSecond": 0.5}}, True),
    ({"rateLimit": {"perSecond": 0.5, "burst": 1}}, True),
    ({"upstream": {"api": {"provider": "ses", "region": "eu-west-1"}}}, True),
    ({"upstream": {"api": {"provider": "ses", "region": "eu-west-1\n"}}}, False),
    (_api("sendgrid", region="eu"), True),
    (_api("mailgun", region="ap", domain="mg.example.com"), False),
    (_api("resend", domain="example.com"), False),
    (_api("resend", messageStream="x"), False),
    (_api("webhook", endpoint="https://hooks.example.org/in"), True),
    (_api("webhook", endpoint="https:///no-host"), False),
    (_api("sparkpost", endpoint="http://127.0.0.1:8080"), False),
    (_api("sparkpost", endpoint="http://127.0.0.1:8080", insecureAllowLocalEndpoint=True), True),
    (_api("webhook", endpoint="http://169.254.169.254/", insecureAllowLocalEndpoint=True), True),
    (_api("webhook", endpoint="http://10.0.0.5:8080/hook"), True),  # in-cluster: private is fine
    (_api("webhook", endpoint="https://hooks.svc.cluster.local/in"), True),
    (_api("webhook", endpoint="http://169.254.169.254:80/"), False),
    (_api("webhook", endpoint="http://169.255.0.1/"), True),  # just outside link-local
    (_api("webhook", endpoint="http://[::1]:8080/"), False),
    (_api("webhook", endpoint="http://[fd00:ec2::254]/"), False),  # AWS metadata over IPv6
    (_api("webhook", endpoint="http://[fd00:ec2::253]/"), True),
    (_api("webhook", endpoint="http://127.255.255.254/"), False),
    (_api("webhook", endpoint="http://localhost./"), False),
    (_api("webhook", endpoint="http://api.localhost/"), False),
    (_api("webhook", endpoint="http://notlocalhost.example/"), True),
    (_api("webhook", endpoint="http://metadata.google.internal./"), False),
    (_api("webhook", endpoint="http://100.100.100.200/"), False),
    (_api("webhook", endpoint="http://100.100.100.201/"), True),
    (_api("webhook", endpoint="http://u:p@LocalHost:80/x"), False),
    (_api("webhook", endpoint="http://localhost?x=1"), False),
    (_api("webhook", endpoint="http://localhost#top"), False),
    (_api("webhook", endpoint="http://127.0.0.1.example.com/"), True),  # a name, not 127/8
    (_api("webhook", endpoint="https://[2001:db8::1]:8443/in"), True),
    (_api("webhook", endpoint="https://[FD00:EC2::254]/"), False),
    (_api("webhook", endpoint="http://[::]/"), False),
    (_api("webhook", endpoint="http://[::ffff:127.0.0.1]/"), False),  # IPv4-mapped: refused
    (_api("webhook", endpoint="http://[::ffff:8.8.8.8]/"), False),  # even when not local
    (_api("webhook", endpoint="http://[fe80::1%25eth0]/"), False),  # zones too
    (_api("webhook", endpoint="http://[fe80::1%25eth0]/", insecureAllowLocalEndpoint=True), False),
    (_api("webhook", endpoint="http://127.1/"), True),  # not an address literal: the relay's job
    ({"upstream.smtp.host": "127.0.0.1"}, True),  # SMTP upstreams: a local sidecar is fine
    ({"match.senderDomains": ["xn--bcher-kva.example"]}, True),
    ({"upstream.smtp.credentialsSecretRef": {"name": "smart.host-1"}}, True),
]
RELAY_FIELD_RULES: list[tuple[dict[str, Any], bool]] = [
    (
        {
            "podLabels": {"team": "mail", "app.kubernetes.io/version": "1"},
            "podAnnotations": {"example.com/note": "x"},
            "serviceAccountName": "relay-identity",
            "imagePullSecrets": [{"name": "registry"}],
            "priorityClassName": "mail-critical",
            "podSecurityContext": {
                "runAsUser": 2000,
                "runAsGroup": 2000,
                "fsGroup": 2000,
                "fsGroupChangePolicy": "OnRootMismatch",
                "supplementalGroups": [3000],
                "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/relay.json"},
            },
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "DoNotSchedule",
                    "minDomains": 2,
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "x"}},
                }
            ],
        },
        True,
    ),
    ({"topologySpreadConstraints": []}, True),
    ({"podSecurityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}, True),
    (
        {
            "podSecurityContext": {
                "seccompProfile": {"type": "RuntimeDefault", "localhostProfile": "p.json"}
            }
        },
        False,
    ),
    ({"podSecurityContext": {"runAsGroup": 0}}, False),
    ({"podSecurityContext": {"supplementalGroups": [0]}}, False),
    ({"podLabels": {"app.kubernetes.io/managed-by": "me"}}, False),
    ({"imagePullSecrets": [{"name": "Bad_Name"}]}, False),
    ({"allowedNetworks": ["fd00::/8", "10.0.0.0/8", "192.168.1.0/24"]}, True),
    ({"allowedNetworks": ["10.0.0.0/255.0.0.0"]}, False),  # netmask form: isCIDR refuses it
    ({"allowedNetworks": ["10.0.0.0/8x"]}, False),
    ({"allowedNetworks": ["10.0.0.0/8", "10.0.0.0/8"]}, False),  # a set
    ({"auth.mechanisms": ["PLAIN", "PLAIN"]}, False),
    ({"auth": {"required": False}, "allowedNetworks": ["10.0.0.0/8"]}, True),
    ({"listener.implicitTlsPort": 465}, True),
    (  # implicit TLS without a certificate
        {
            "listener": {"implicitTlsPort": 465},
            "auth": {"required": False},
            "allowedNetworks": ["10.0.0.0/8"],
        },
        False,
    ),
    ({"metrics": {"enabled": False, "port": 587}}, True),
    ({"queue": {"retry": {"initialBackoff": "500ms", "maxBackoff": "1s"}}}, False),
    ({"queue": {"retry": {"initialBackoff": "1m30s", "maxBackoff": "2h", "maxAge": "72h"}}}, True),
    ({"auth.cache": {"ttl": "500ms"}}, False),
    ({"auth.cache": {"ttl": "24h", "maxEntries": 1}}, True),
    ({"auth.cache": {"enabled": False}}, True),
    (
        {
            "auth.appCredentials": [
                {"name": "billing", "allowedSenderDomains": ["billing.example.com"]},
                {"name": "web-1"},
            ]
        },
        True,
    ),
    ({"auth.appCredentials": [{"name": "x" * 41}]}, False),
    ({"queue": {"size": "0"}}, True),
    ({"postmaster": "mail-admins@example.com"}, True),
    ({"postmaster": "Postmaster"}, False),  # an address, not a local part
    ({"postmaster": "a b@example.com"}, False),
    ({"postmaster": "<pm@example.com>"}, False),
    ({"limits": {"perClient": {"maxConnections": 0, "exemptNetworks": ["fd00::/8"]}}}, True),
    ({"limits": {"perClient": {"ipv6PrefixLength": 129}}}, False),
    ({"limits": {"perClient": {"authFailureWindow": "90s", "authFailures": 3}}}, True),
    ({"queue": {"size": "-1Gi"}}, False),
    ({"resources": {"requests": {"cpu": 1, "memory": "128Mi"}}}, True),
    ({"resources": {"requests": {"cpu": "one"}}}, False),
    ({"podDisruptionBudget": {"maxUnavailable": "25%"}}, True),
    ({"podDisruptionBudget": {"maxUnavailable": "25"}}, False),
    ({"networkPolicy": {"allowedFrom": []}}, True),  # off: no peers needed
    ({"networkPolicy": {"enabled": True, "allowedFrom": [{"podSelector": {}}]}}, True),
    (
        {
            "networkPolicy": {
                "enabled": True,
                "allowedFrom": [
                    {
                        "namespaceSelector": {"matchLabels": {"team": "shop"}},
                        "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
                    }
                ],
            }
        },
        True,
    ),
    ({"networkPolicy": {"enabled": True, "allowedFrom": [{"ipBlock": {}}]}}, False),
    ({"affinity": {"nodeAffinity": {"anything": ["goes", 1]}}}, True),
    # Open relay: private ranges are fine, anything reaching beyond needs the acknowledgement.
    (
        {
            "allowedNetworks": [
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "127.0.0.0/8",
                "169.254.0.0/16",
                "fc00::/7",
                "::1/128",
                "fe80::/10",
            ]
        },
        True,
    ),
    ({"allowedNetworks": ["172.16.0.0/11"]}, False),
    ({"allowedNetworks": ["172.31.255.0/24"]}, True),
    ({"allowedNetworks": ["100.128.0.0/16"]}, False),  # just past carrier-grade NAT
    ({"allowedNetworks": ["fd12:3456::/48"]}, True),
    ({"allowedNetworks": ["2001:db8::/32"]}, False),
    ({"allowedNetworks": ["0.0.0.0/0"], "insecureAllowPublicNetworks": True}, True),
    (
        {
            "auth": {"required": False},
            "allowedNetworks": ["203.0.113.0/24"],
            "insecureAllowPublicNetworks": True,
        },
        True,
    ),
    ({"insecureAllowPublicNetworks": "true"}, False),  # strict booleans
    # Exposed Services of a relay that trusts networks.
    ({"service": {"type": "LoadBalancer"}}, True),  # trusts nobody: AUTH for everyone
    (
        {
            "allowedNetworks": ["10.0.0.0/8"],
            "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"},
        },
        True,
    ),
    (
        {
            "allowedNetworks": ["10.0.0.0/8"],
            "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
        },
        True,
    ),
    (
        {
            "allowedNetworks": ["10.0.0.0/8"],
            "service": {"type": "NodePort", "externalTrafficPolicy": "Local"},
        },
        True,
    ),
    ({"allowedNetworks": ["10.0.0.0/8"], "service": {"type": "ClusterIP"}}, True),
    ({"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/2"]}}, True),
    ({"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["nope"]}}, False),
    ({"service": {"type": "NodePort", "externalTrafficPolicy": "Nearest"}}, False),
    # Fields the API server would otherwise refuse only in the StatefulSet.
    ({"image": "mailrelay"}, True),
    ({"image": "ghcr.io/example/mailrelay:1.2.0"}, True),
    ({"image": "localhost:5000/team/mail_relay/relay:v1.2-rc.1"}, True),
    ({"image": "registry.example.com/mailrelay@sha256:" + "a" * 64}, True),
    ({"image": "mailrelay:1.0@sha256:" + "0" * 64}, True),
    ({"image": "mailrelay:"}, False),
    ({"image": "https://ghcr.io/example/mailrelay"}, False),
    ({"nodeSelector": {"kubernetes.io/os": "linux", "node.example.com/pool": "mail-1"}}, True),
    ({"nodeSelector": {"kubernetes.io/os": ""}}, True),
    ({"nodeSelector": {"/os": "linux"}}, False),
    ({"nodeSelector": {"a" * 64: "x"}}, False),
    ({"nodeSelector": {"os": "x" * 64}}, False),
    ({"nodeSelector": {"os": "-linux"}}, False),
    ({"nodeSelector": {"a" * 254 + "/os": "linux"}}, False),  # prefix over 253 characters
    ({"podAnnotations": {"prometheus.io/scrape": "true", "note": "any value at all !"}}, True),
    ({"podAnnotations": {"Example.com/note": "x"}}, False),
    ({"routeSelector": {"matchLabels": {"team": "a b"}}}, False),
    ({"metrics": {"serviceMonitor": {"labels": {"release": "kube-prometheus"}}}}, True),
    ({"priorityClassName": "system-cluster-critical"}, True),
    ({"queue": {"storageClassName": "fast.ssd-1"}}, True),
    ({"listener.hostname": "Mail.Example.com"}, True),
    ({"listener.hostname": "mail.example.com."}, False),
    ({"resources": {"limits": {"memory": "1.5Gi", "cpu": "250m"}}}, True),
    ({"tolerations": [{"key": "mail", "operator": "Exists", "effect": "NoSchedule"}]}, True),
    ({"routeSelector": {"matchExpressions": [{"key": "t", "operator": "Exists"}]}}, True),
    (
        {
            "routeSelector": {
                "matchExpressions": [{"key": "t", "operator": "Exists", "values": ["a"]}]
            }
        },
        False,
    ),
]


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a manifest file."""
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def example_files() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.yaml"))


def example_resources(kind: Kind) -> list[dict[str, Any]]:
    """Every object of ``kind`` across the example files."""
    return [
        document
        for path in example_files()
        for document in load_documents(path)
        if document.get("kind") == kind
    ]
