"""Typed models of the MailRelay and MailRoute custom resources (group mailrelay.dev).

These models are the single source of truth for the API: the operator validates every spec
with them (``MailRelaySpec.model_validate(spec)``) and ``crdgen`` turns their JSON schema into
the CRDs' structural ``openAPIV3Schema``.

Shape of the module:

* ``KubeModel``: the base class (camelCase on the wire, unknown fields refused, no coercion
  of ``"yes"`` into ``True``), and the reusable string types (names, ports, durations, CIDRs,
  domain patterns) with their patterns and bounds.
* Shared parts: object references, ``Condition``, label selectors, pod knobs.
* ``MailRelaySpec`` / ``MailRelayStatus`` and their parts (listener, auth, limits, queue, ...).
* ``MailRouteSpec`` / ``MailRouteStatus`` and their parts (match, upstreams, rate limit).

Cross-field rules live twice, side by side on the model they constrain: as a CEL rule in
``json_schema_extra`` (checked by the API server, copied into the CRD by ``crdgen``) and as a
pydantic validator (checked by the operator). Both use the same message constant, and the
tests feed both the same table of invalid manifests so the two cannot drift apart.

Rules the relay applies too are not written here but imported: the upstream provider rules
(provider names, region/domain/stream/configuration-set per provider, the endpoint grammar
and its messages) from ``mailrelay.relay.upstream_rules``, the open-relay and SSRF tables
from ``mailrelay.relay.netguard``. The pydantic validators call the relay's functions; the
CEL rules are built from the same constants, and ``tests/crd/test_upstream_rules.py``
checks the operator, the relay (through ``relay_config``) and the API server against each
other on generated upstreams. How to add a provider: the module docstring of
``relay/upstream_rules.py``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from mailrelay.relay import dkim, netguard, upstream_rules

GROUP = "mailrelay.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Regular expressions shared by pydantic (``pattern=``) and the API server (OpenAPI ``pattern``
# and CEL ``matches``). They stay within the RE2 subset so both engines read them alike.
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
HOSTNAME = (
    r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$"
)
DOMAIN_PATTERN = (
    r"^(\*\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
)
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
# A plain local@domain address: a dot-atom local part (RFC 5322 atext, less the quote,
# which cannot appear in a CEL raw string) and a DNS name.
_ATEXT = r"[A-Za-z0-9!#$%&*+/=?^_`{|}~-]+"
MAILBOX = rf"^{_ATEXT}(\.{_ATEXT})*@{HOSTNAME[1:]}"
DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# A quantity without a sign: sizes cannot be negative.
SIZE = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
PERCENT = r"^[0-9]+%$"
CONDITION_TYPE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
# A label or annotation key: an optional DNS subdomain prefix and '/', then a name of at most
# 63 characters (the prefix's own limit of 253 is a CEL size check beside the pattern).
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
# A container image reference as the distribution grammar defines it: an optional registry
# (host[:port]/), lowercase path components, an optional :tag and an optional @digest.
IMAGE_REFERENCE = (
    r"^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*"
    r"(:[0-9]+)?/)?[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[a-z0-9]+([+._-][a-z0-9]+)*:[a-fA-F0-9]{32,})?$"
)

MIB = 1024 * 1024


def cel(
    rule: str,
    message: str,
    *,
    field_path: str | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry; ``field_path`` points the error at a subfield."""
    entry = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """The ``json_schema_extra`` that carries CEL rules into the generated CRD."""
    return {"x-kubernetes-validations": list(rules)}


def regex_rule(pattern: str, message: str, *, int_or_string: bool = False) -> dict[str, Any]:
    """A CEL ``matches`` rule in place of an OpenAPI ``pattern``, so a refusal says what is
    expected (a bare pattern only prints the regular expression)."""
    rule = f"self.matches(r'{pattern}')"
    return validations(cel(f"type(self) != string || {rule}" if int_or_string else rule, message))


def regex_check(pattern: str, message: str) -> AfterValidator:
    """The pydantic twin of ``regex_rule``: the same pattern, the same message."""

    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


class KubeModel(BaseModel):
    """Base of every resource part: the wire format of a Kubernetes object."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        frozen=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _plain_mapping(cls, data: Any) -> Any:
        """kopf hands handlers read-only Mapping views (kopf.Spec); strict mode wants a dict."""
        if isinstance(data, Mapping) and not isinstance(data, dict):
            return dict(data)
        return data


# --- Reusable scalar types -------------------------------------------------------------------


def _check_cidr(value: str) -> str:
    """Accept what the API server's CEL ``isCIDR`` accepts: an address, a slash, a length."""
    address, slash, length = value.partition("/")
    if not slash or not length.isdigit():
        raise ValueError(f"{value!r} is not a CIDR: write it as 10.0.0.0/8 or fd00::/8")
    try:
        ipaddress.ip_network(f"{address}/{length}", strict=False)
    except ValueError as error:
        raise ValueError(f"{value!r} is not a CIDR: {error}") from None
    return value


def _check_host(value: str) -> str:
    """A host is a DNS name or an IP address that CEL's ``isIP`` takes too (no %zone, not
    IPv4-mapped), as the CEL rule beside the field says."""
    if not upstream_rules.is_plain_ip(value) and not re.fullmatch(HOSTNAME, value):
        raise ValueError(HOST_MESSAGE)
    return value


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


def parse_duration(value: str) -> timedelta:
    """Parse the Go-style durations the API server's CEL ``duration()`` also reads (``90s``)."""
    if not re.fullmatch(DURATION[1:-1], value):
        raise ValueError(f"{value!r} is not a duration: use Go syntax such as 30s, 5m, 1h30m")
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    seconds = sum(
        float(number) * units[unit]
        for number, _, unit in re.findall(r"([0-9]+(\.[0-9]+)?)(ms|s|m|h)", value)
    )
    return timedelta(seconds=seconds)


CIDR_MESSAGE = "must be a CIDR such as 10.0.0.0/8 or fd00::/8"
HOST_MESSAGE = "must be a DNS name such as smtp.example.com or an IP address"
NAME_MESSAGE = (
    "must be a lowercase DNS-1123 name such as relay-tls: lowercase letters, digits, '-' "
    "and '.', starting and ending with a letter or digit"
)
SECRET_KEY_MESSAGE = (
    "must be a Secret key such as tls.crt or users.yaml: letters, digits, '-', '_' or '.'"
)
DURATION_MESSAGE = "must be a Go duration such as 30s, 5m, 1h30m or 500ms"
MAILBOX_MESSAGE = "must be a plain address such as mail-admins@example.com (local@domain)"
QUANTITY_MESSAGE = "must be a Kubernetes quantity such as 500m, 256Mi, 1Gi or 2"
SIZE_MESSAGE = "must be a size such as 1Gi, 512Mi or 0 (a quantity without a sign)"
PERCENT_MESSAGE = "must be a number such as 1 or a percentage such as 25%"
HOSTNAME_MESSAGE = (
    "must be a DNS name such as mail.example.com: letters, digits and '-' in labels of at "
    "most 63 characters, separated by dots"
)
DOMAIN_PATTERN_MESSAGE = (
    "must be a lowercase domain such as example.com, or *.example.com for all of its "
    "subdomains (a '*' only as the whole first label)"
)
LABEL_KEY_MESSAGE = (
    "label keys must be a name such as tier or an optional DNS prefix and a name such as "
    "example.com/tier (name: at most 63 letters, digits, '-', '_' or '.')"
)
LABEL_VALUE_MESSAGE = (
    "label values must be at most 63 letters, digits, '-', '_' or '.', starting and ending "
    "with a letter or digit, such as gold (or empty)"
)
ANNOTATION_KEY_MESSAGE = (
    "annotation keys must be a name such as note or an optional DNS prefix and a name such "
    "as example.com/note (name: at most 63 letters, digits, '-', '_' or '.')"
)
IMAGE_MESSAGE = (
    "must be a container image reference such as ghcr.io/example/mailrelay:1.2.0 or "
    "registry.example.com:5000/mailrelay@sha256:<64 hex digits> (lowercase repository path, "
    "no spaces)"
)


def _no_duplicates(values: list[Any]) -> list[Any]:
    """Lists marked x-kubernetes-list-type: set refuse repeats at the API server; so do we."""
    repeated = sorted({str(value) for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"duplicate values: {', '.join(repeated)}")
    return values


# Marks a list as a set: uniqueness checked here, `x-kubernetes-list-type: set` in the CRD.
SET = AfterValidator(_no_duplicates)
LIST_TYPE_SET: dict[str, Any] = {"x-kubernetes-list-type": "set"}
Port = Annotated[int, Field(ge=1, le=65535)]
ObjectName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        json_schema_extra=regex_rule(DNS1123_SUBDOMAIN, NAME_MESSAGE),
    ),
    regex_check(DNS1123_SUBDOMAIN, NAME_MESSAGE),
]
SecretKey = Annotated[
    str,
    Field(
        min_length=1, max_length=253, json_schema_extra=regex_rule(SECRET_KEY, SECRET_KEY_MESSAGE)
    ),
    regex_check(SECRET_KEY, SECRET_KEY_MESSAGE),
]
Duration = Annotated[
    str,
    Field(max_length=32, json_schema_extra=regex_rule(DURATION, DURATION_MESSAGE)),
    regex_check(DURATION, DURATION_MESSAGE),
    AfterValidator(_check_duration),
]
Quantity = Annotated[
    int
    | Annotated[
        str,
        Field(
            max_length=64,
            json_schema_extra=regex_rule(QUANTITY, QUANTITY_MESSAGE, int_or_string=True),
        ),
        regex_check(QUANTITY, QUANTITY_MESSAGE),
    ],
    Field(description="A Kubernetes quantity such as 500m, 256Mi or 2."),
]
Size = Annotated[
    str,
    Field(max_length=64, json_schema_extra=regex_rule(SIZE, SIZE_MESSAGE)),
    regex_check(SIZE, SIZE_MESSAGE),
]
IntOrPercent = (
    Annotated[int, Field(ge=0)]
    | Annotated[
        str,
        Field(
            max_length=4,
            json_schema_extra=regex_rule(PERCENT, PERCENT_MESSAGE, int_or_string=True),
        ),
        regex_check(PERCENT, PERCENT_MESSAGE),
    ]
)
Hostname = Annotated[
    str,
    Field(max_length=253, json_schema_extra=regex_rule(HOSTNAME, HOSTNAME_MESSAGE)),
    regex_check(HOSTNAME, HOSTNAME_MESSAGE),
]
DnsName = Annotated[
    str,
    Field(max_length=253, json_schema_extra=regex_rule(DNS1123_SUBDOMAIN, NAME_MESSAGE)),
    regex_check(DNS1123_SUBDOMAIN, NAME_MESSAGE),
]
ImageReference = Annotated[
    str,
    Field(
        min_length=1, max_length=512, json_schema_extra=regex_rule(IMAGE_REFERENCE, IMAGE_MESSAGE)
    ),
    regex_check(IMAGE_REFERENCE, IMAGE_MESSAGE),
]
Cidr = Annotated[
    str,
    Field(
        min_length=3,
        max_length=64,
        description="A network in CIDR notation.",
        json_schema_extra=validations(cel("isCIDR(self)", CIDR_MESSAGE)),
    ),
    AfterValidator(_check_cidr),
]
Host = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        json_schema_extra=validations(
            cel(f"isIP(self) || self.matches(r'{HOSTNAME}')", HOST_MESSAGE),
        ),
    ),
    AfterValidator(_check_host),
]
DomainPattern = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        description=(
            "A lowercase domain (example.com) or a subdomain wildcard (*.example.com, which "
            "matches every subdomain but not example.com itself)."
        ),
        json_schema_extra=regex_rule(DOMAIN_PATTERN, DOMAIN_PATTERN_MESSAGE),
    ),
    regex_check(DOMAIN_PATTERN, DOMAIN_PATTERN_MESSAGE),
]


def _check_keys(pattern: str, message: str) -> AfterValidator:
    """Map keys must match ``pattern`` and carry a prefix of at most 253 characters."""

    def check(values: dict[str, str]) -> dict[str, str]:
        for key in values:
            if not re.fullmatch(pattern, key) or len(key.rpartition("/")[0]) > 253:
                raise ValueError(f"{key!r}: {message}")
        return values

    return AfterValidator(check)


def _check_label_values(values: dict[str, str]) -> dict[str, str]:
    for key, value in values.items():
        if not re.fullmatch(LABEL_VALUE, value):
            raise ValueError(f"{key}={value!r}: {LABEL_VALUE_MESSAGE}")
    return values


def _key_rule(message: str) -> dict[str, str]:
    return cel(
        f"self.all(k, k.matches(r'{QUALIFIED_NAME}')"
        " && (k.indexOf('/') < 0 || k.indexOf('/') <= 253))",
        message,
    )


Labels = Annotated[
    dict[str, Annotated[str, Field(max_length=63)]],
    Field(
        max_length=64,
        json_schema_extra=validations(
            _key_rule(LABEL_KEY_MESSAGE),
            cel(f"self.all(k, self[k].matches(r'{LABEL_VALUE}'))", LABEL_VALUE_MESSAGE),
        ),
    ),
    _check_keys(QUALIFIED_NAME, LABEL_KEY_MESSAGE),
    AfterValidator(_check_label_values),
]
Annotations = Annotated[
    dict[str, Annotated[str, Field(max_length=4096)]],
    Field(max_length=64, json_schema_extra=validations(_key_rule(ANNOTATION_KEY_MESSAGE))),
    _check_keys(QUALIFIED_NAME, ANNOTATION_KEY_MESSAGE),
]


# --- Shared parts ----------------------------------------------------------------------------


class LocalObjectReference(KubeModel):
    """A reference to an object of a known kind in the same namespace."""

    name: ObjectName = Field(description="Name of the referenced object, in this namespace.")


class SecretKeyReference(KubeModel):
    """One key of a Secret in the same namespace."""

    name: ObjectName = Field(description="Name of the Secret, in this namespace.")
    key: SecretKey = Field(description="Key inside the Secret's data.")


class Condition(KubeModel):
    """The standard Kubernetes condition (metav1.Condition), as kubectl and tools expect it."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE,
        description="Type of condition in CamelCase, such as Ready.",
    )
    status: Literal["True", "False", "Unknown"] = Field(
        description="Status of the condition: True, False or Unknown."
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON,
        description="A CamelCase, machine-readable reason for the last transition.",
    )
    message: str = Field(
        default="",
        max_length=32768,
        description="A human-readable message about the transition; may be empty.",
    )
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The .metadata.generation the condition was set for.",
    )
    last_transition_time: datetime = Field(
        strict=False,
        description="When the condition last changed status (RFC 3339).",
    )


SELECTOR_VALUES_MESSAGE = (
    "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist"
)


class LabelSelectorRequirement(KubeModel):
    """One expression of a label selector, as in metav1.LabelSelectorRequirement."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(self.operator in ['In', 'NotIn']) == (size(self.values) > 0)",
                SELECTOR_VALUES_MESSAGE,
                field_path=".values",
            )
        )
    )

    key: str = Field(min_length=1, max_length=317, description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to the values."
    )
    values: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list,
        max_length=64,
        description="Label values for In and NotIn; empty for Exists and DoesNotExist.",
    )

    @model_validator(mode="after")
    def _values_fit_operator(self) -> Self:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError(SELECTOR_VALUES_MESSAGE)
        return self


class LabelSelector(KubeModel):
    """A label selector, as in metav1.LabelSelector; all terms must match."""

    match_labels: Labels = Field(
        default_factory=dict, description="Labels that must all be present with these values."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list,
        max_length=16,
        description="Expressions that must all hold.",
    )


class ResourceRequirements(KubeModel):
    """CPU and memory for the relay container, as in core/v1 ResourceRequirements."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=16,
        description="Minimum resources the scheduler reserves, such as cpu: 100m.",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=16,
        description="Maximum resources the container may use, such as memory: 256Mi.",
    )


class Toleration(KubeModel):
    """A pod toleration, as in core/v1 Toleration."""

    key: str | None = Field(
        default=None, max_length=317, description="Taint key; empty with Exists matches all."
    )
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="Equal compares the value; Exists matches any value."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; unset tolerates every effect."
    )
    toleration_seconds: int | None = Field(
        default=None,
        ge=0,
        description="For NoExecute: how long the pod stays bound after the taint appears.",
    )


# The labels and annotation the operator sets on every relay pod: the Service, the PDB and
# the StatefulSet select pods by these labels, so a user's podLabels may not change them.
OPERATOR_POD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)
RESTART_HASH_ANNOTATION = "mailrelay.dev/restart-hash"
POD_LABELS_MESSAGE = (
    "podLabels may not set the labels the operator selects its pods by: "
    + ", ".join(OPERATOR_POD_LABELS)
)
POD_ANNOTATIONS_MESSAGE = (
    f"podAnnotations may not set {RESTART_HASH_ANNOTATION}: the operator sets it to roll the "
    "pods when their configuration changes"
)


def _refuse_keys(keys: tuple[str, ...], message: str) -> AfterValidator:
    def check(values: dict[str, str]) -> dict[str, str]:
        if any(key in values for key in keys):
            raise ValueError(message)
        return values

    return AfterValidator(check)


def _keys_rule(keys: tuple[str, ...], message: str) -> dict[str, str]:
    listed = ", ".join(f"'{key}'" for key in keys)
    return cel(f"!self.exists(k, k in [{listed}])", message)


PodLabels = Annotated[
    dict[str, Annotated[str, Field(max_length=63)]],
    Field(
        max_length=64,
        json_schema_extra=validations(
            _key_rule(LABEL_KEY_MESSAGE),
            cel(f"self.all(k, self[k].matches(r'{LABEL_VALUE}'))", LABEL_VALUE_MESSAGE),
            _keys_rule(OPERATOR_POD_LABELS, POD_LABELS_MESSAGE),
        ),
    ),
    _check_keys(QUALIFIED_NAME, LABEL_KEY_MESSAGE),
    AfterValidator(_check_label_values),
    _refuse_keys(OPERATOR_POD_LABELS, POD_LABELS_MESSAGE),
]
PodAnnotations = Annotated[
    dict[str, Annotated[str, Field(max_length=4096)]],
    Field(
        max_length=64,
        json_schema_extra=validations(
            _key_rule(ANNOTATION_KEY_MESSAGE),
            _keys_rule((RESTART_HASH_ANNOTATION,), POD_ANNOTATIONS_MESSAGE),
        ),
    ),
    _check_keys(QUALIFIED_NAME, ANNOTATION_KEY_MESSAGE),
    _refuse_keys((RESTART_HASH_ANNOTATION,), POD_ANNOTATIONS_MESSAGE),
]

SPREAD_KEY_MESSAGE = (
    "topologyKey must be a node label key such as kubernetes.io/hostname or "
    "topology.kubernetes.io/zone"
)


class TopologySpreadConstraint(KubeModel):
    """How relay pods spread across a topology, as in core/v1 TopologySpreadConstraint."""

    max_skew: int = Field(
        ge=1, le=100, description="Most the pod count may differ between two domains."
    )
    topology_key: Annotated[
        str,
        Field(max_length=317, json_schema_extra=regex_rule(QUALIFIED_NAME, SPREAD_KEY_MESSAGE)),
        regex_check(QUALIFIED_NAME, SPREAD_KEY_MESSAGE),
    ] = Field(
        description="Node label whose values are the domains, such as kubernetes.io/hostname."
    )
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"] = Field(
        description="DoNotSchedule keeps a pod pending; ScheduleAnyway only prefers the spread."
    )
    label_selector: LabelSelector | None = Field(
        default=None,
        description="Pods counted in each domain; this relay's own pods when unset.",
    )
    min_domains: int | None = Field(
        default=None, ge=1, le=1000, description="Minimum eligible domains (DoNotSchedule only)."
    )
    node_affinity_policy: Literal["Honor", "Ignore"] | None = Field(
        default=None, description="Whether nodeSelector and affinity limit the domains."
    )
    node_taints_policy: Literal["Honor", "Ignore"] | None = Field(
        default=None, description="Whether node taints limit the domains."
    )


SECCOMP_MESSAGE = "localhostProfile is required with type Localhost and refused otherwise"


class SeccompProfile(KubeModel):
    """A seccomp profile; Unconfined is not offered."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(self.type == 'Localhost') == has(self.localhostProfile)",
                SECCOMP_MESSAGE,
                field_path=".localhostProfile",
            )
        )
    )

    type: Literal["RuntimeDefault", "Localhost"] = Field(
        description="RuntimeDefault (the default) or a Localhost profile file on the node."
    )
    localhost_profile: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        default=None, description="Path of the profile under the kubelet's seccomp directory."
    )

    @model_validator(mode="after")
    def _profile_fits_type(self) -> Self:
        if (self.type == "Localhost") != (self.localhost_profile is not None):
            raise ValueError(SECCOMP_MESSAGE)
        return self


class PodSecurityContext(KubeModel):
    """What of the relay pods' security context may change; the pods always run as non-root
    (runAsUser and runAsGroup at least 1) with a confined seccomp profile."""

    run_as_user: int | None = Field(
        default=None, ge=1, le=2147483647, description="UID the relay runs as; 10001 by default."
    )
    run_as_group: int | None = Field(
        default=None, ge=1, le=2147483647, description="Primary GID; 10001 by default."
    )
    fs_group: int | None = Field(
        default=None,
        ge=1,
        le=2147483647,
        description="Group owning the spool volume; 10001 by default.",
    )
    fs_group_change_policy: Literal["OnRootMismatch", "Always"] | None = Field(
        default=None, description="When the kubelet re-owns the spool volume's files."
    )
    supplemental_groups: list[Annotated[int, Field(ge=1, le=2147483647)]] = Field(
        default_factory=list, max_length=32, description="Extra GIDs of the relay process."
    )
    seccomp_profile: SeccompProfile | None = Field(
        default=None, description="Seccomp profile; RuntimeDefault by default."
    )


PDB_EXCLUSIVE_MESSAGE = "set at most one of minAvailable and maxUnavailable"


class PodDisruptionBudget(KubeModel):
    """How many relay pods voluntary disruptions (drains, upgrades) may take down at once."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("!(has(self.minAvailable) && has(self.maxUnavailable))", PDB_EXCLUSIVE_MESSAGE)
        )
    )

    enabled: bool = Field(
        default=True, description="Create a PodDisruptionBudget when replicas is above 1."
    )
    min_available: IntOrPercent | None = Field(
        default=None, description="Pods that must stay available, as a number or a percentage."
    )
    max_unavailable: IntOrPercent | None = Field(
        default=None,
        description=(
            "Pods that may be unavailable, as a number or a percentage; "
            "1 when neither this nor minAvailable is set."
        ),
    )

    @model_validator(mode="after")
    def _one_bound(self) -> Self:
        if self.min_available is not None and self.max_unavailable is not None:
            raise ValueError(PDB_EXCLUSIVE_MESSAGE)
        return self


NETWORK_PEER_MESSAGE = "set namespaceSelector, podSelector or both"
NETWORK_POLICY_PEERS_MESSAGE = (
    "networkPolicy.allowedFrom must list at least one peer when the policy is enabled, "
    "or no client could reach the relay"
)


class NetworkPolicyPeer(KubeModel):
    """Pods allowed to reach the SMTP ports, as in networking/v1 NetworkPolicyPeer."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.namespaceSelector) || has(self.podSelector)", NETWORK_PEER_MESSAGE)
        )
    )

    namespace_selector: LabelSelector | None = Field(
        default=None,
        description=(
            "Namespaces whose pods may connect; {} selects every namespace. With podSelector, "
            "only the matching pods in those namespaces."
        ),
    )
    pod_selector: LabelSelector | None = Field(
        default=None,
        description=(
            "Pods that may connect; alone it selects pods in the relay's namespace, {} all of them."
        ),
    )

    @model_validator(mode="after")
    def _some_selector(self) -> Self:
        if self.namespace_selector is None and self.pod_selector is None:
            raise ValueError(NETWORK_PEER_MESSAGE)
        return self


class NetworkPolicySettings(KubeModel):
    """A NetworkPolicy that lets only the listed peers reach the relay's SMTP ports."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!self.enabled || size(self.allowedFrom) > 0",
                NETWORK_POLICY_PEERS_MESSAGE,
                field_path=".allowedFrom",
                reason="FieldValueRequired",
            )
        )
    )

    enabled: bool = Field(
        default=False,
        description=(
            "Create a NetworkPolicy for the relay pods: SMTP ports only from allowedFrom, the "
            "metrics port from anywhere (for scrapers). Needs a CNI that enforces policies."
        ),
    )
    allowed_from: list[NetworkPolicyPeer] = Field(
        default_factory=list,
        max_length=32,
        description="Peers that may connect to the SMTP ports; any one of them suffices.",
    )

    @model_validator(mode="after")
    def _peers_when_enabled(self) -> Self:
        if self.enabled and not self.allowed_from:
            raise ValueError(NETWORK_POLICY_PEERS_MESSAGE)
        return self


# --- MailRelay -------------------------------------------------------------------------------


class ListenerTls(KubeModel):
    """The certificate the relay presents for STARTTLS and implicit TLS."""

    secret_name: ObjectName = Field(
        description=(
            "Name of a kubernetes.io/tls Secret (tls.crt, tls.key) in this namespace, "
            "such as the one cert-manager writes for a Certificate."
        )
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        default="TLSv1.2", description="Oldest TLS version clients may negotiate."
    )


IMPLICIT_TLS_NEEDS_CERT_MESSAGE = (
    "implicitTlsPort needs tls.secretName: implicit TLS needs a certificate"
)
IMPLICIT_TLS_PORT_CLASH_MESSAGE = "implicitTlsPort must differ from port"


class Listener(KubeModel):
    """Where and how the relay accepts mail from clients."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.implicitTlsPort) || has(self.tls)",
                IMPLICIT_TLS_NEEDS_CERT_MESSAGE,
                field_path=".tls",
                reason="FieldValueRequired",
            ),
            cel(
                "!has(self.implicitTlsPort) || self.implicitTlsPort != self.port",
                IMPLICIT_TLS_PORT_CLASH_MESSAGE,
                field_path=".implicitTlsPort",
            ),
        )
    )

    port: Port = Field(default=587, description="Submission port (SMTP with STARTTLS, RFC 6409).")
    implicit_tls_port: Port | None = Field(
        default=None,
        description="Optional implicit-TLS submission port (RFC 8314), usually 465.",
    )
    hostname: Hostname | None = Field(
        default=None,
        description=(
            "Name the relay announces in its greeting and Received headers; "
            "defaults to the Service's DNS name."
        ),
    )
    tls: ListenerTls | None = Field(
        default=None,
        description="Certificate for STARTTLS and implicit TLS; required while auth is required.",
    )

    @model_validator(mode="after")
    def _implicit_tls(self) -> Self:
        if self.implicit_tls_port is not None:
            if self.tls is None:
                raise ValueError(IMPLICIT_TLS_NEEDS_CERT_MESSAGE)
            if self.implicit_tls_port == self.port:
                raise ValueError(IMPLICIT_TLS_PORT_CLASH_MESSAGE)
        return self


class UsersSecretRef(KubeModel):
    """Where the relay reads its SMTP users from."""

    name: ObjectName = Field(description="Name of the Secret, in this namespace.")
    key: SecretKey = Field(
        default="users.yaml",
        description=(
            "Key holding the relay's users file: YAML with a users list of {username, "
            "password_hash, allowed_sender_domains}, where password_hash is bcrypt ($2b$) or "
            "argon2id ($argon2id$); never plain passwords."
        ),
    )


SaslMechanism = Literal["PLAIN", "LOGIN"]
DEFAULT_MECHANISMS: tuple[SaslMechanism, ...] = ("PLAIN", "LOGIN")
AUTH_USERS_MESSAGE = "usersSecretRef is required while auth.required is true"


AUTH_CACHE_TTL_MESSAGE = "ttl must be between 1s and 24h"


class AuthCache(KubeModel):
    """The relay's cache of successful password checks (docs/relay-config.md, "AUTH cache")."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "duration(self.ttl) >= duration('1s') && duration(self.ttl) <= duration('24h')",
                AUTH_CACHE_TTL_MESSAGE,
                field_path=".ttl",
            ),
        )
    )

    enabled: bool = Field(
        default=True,
        description=(
            "Keep a keyed digest (never the password) of each username and password that "
            "verified, so a repeated login skips the slow bcrypt/argon2 check. Failures are "
            "never cached; the cache empties whenever the users Secret changes."
        ),
    )
    ttl: Duration = Field(
        default="1h", description="How long a verified login stays cached (1s to 24h)."
    )
    max_entries: int = Field(
        default=10000,
        ge=1,
        le=1_000_000,
        description="Most logins cached per relay process; the least recently used goes first.",
    )

    @model_validator(mode="after")
    def _ttl_range(self) -> Self:
        if not timedelta(seconds=1) <= parse_duration(self.ttl) <= timedelta(hours=24):
            raise ValueError(AUTH_CACHE_TTL_MESSAGE)
        return self


APP_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DUPLICATE_APP_NAMES = "appCredentials names must be unique"


class AppCredential(KubeModel):
    """An app that gets a generated, high-entropy SMTP login (docs/relay-config.md)."""

    name: Annotated[str, Field(min_length=1, max_length=40, pattern=APP_NAME_PATTERN)] = Field(
        description=(
            "The app's SMTP username, and part of the name of its Secret "
            "(<relay>-app-<name>, keys username, password and password_hash). Must not also "
            "be a username of the users Secret."
        )
    )
    allowed_sender_domains: Annotated[list[DomainPattern], SET] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra=LIST_TYPE_SET,
        description="Envelope sender domains the app may use; empty: any.",
    )


class Auth(KubeModel):
    """SMTP AUTH for submission clients."""

    # "usersSecretRef while required" is checked on MailRelaySpec: the API server validates
    # this object's default ({required: true}) against its own rules, so they cannot live here.

    required: bool = Field(
        default=True,
        description=(
            "When true, clients outside allowedNetworks must authenticate before sending. "
            "When false, the relay offers no AUTH and accepts mail only from allowedNetworks."
        ),
    )
    users_secret_ref: UsersSecretRef | None = Field(
        default=None, description="Secret holding the users and their password hashes."
    )
    mechanisms: Annotated[list[SaslMechanism], SET] = Field(
        default_factory=lambda: list(DEFAULT_MECHANISMS),
        min_length=1,
        max_length=2,
        json_schema_extra=LIST_TYPE_SET,
        description="SASL mechanisms offered after TLS is up.",
    )
    cache: AuthCache = Field(
        default_factory=AuthCache, description="Cache of successful password checks."
    )
    app_credentials: list[AppCredential] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
        description=(
            "Apps that get a generated 256-bit password, kept by the operator in a Secret "
            "per app and checked by the relay with a fast keyed hash. Use these for "
            "machines; keep bcrypt/argon2 in the users Secret for passwords people choose."
        ),
    )

    @field_validator("app_credentials")
    @classmethod
    def _unique_apps(cls, value: list[AppCredential]) -> list[AppCredential]:
        names = [app.name for app in value]
        if len(set(names)) != len(names):
            raise ValueError(DUPLICATE_APP_NAMES)
        return value


AUTH_FAILURE_WINDOW_MESSAGE = "authFailureWindow must be longer than 0s, such as 5m"


class PerClientLimits(KubeModel):
    """Fair share per client address, like Postfix's anvil (docs/relay-config.md).

    A client is an IPv4 address or an IPv6 network of ipv6PrefixLength bits; counts are
    kept per pod. Refusals answer 421 4.7.0.
    """

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "duration(self.authFailureWindow) > duration('0s')",
                AUTH_FAILURE_WINDOW_MESSAGE,
                field_path=".authFailureWindow",
            )
        )
    )

    max_connections: int = Field(
        default=50,
        ge=0,
        le=100000,
        description="Concurrent connections one client may hold per pod; 0: no limit.",
    )
    connection_rate_per_minute: int = Field(
        default=0,
        ge=0,
        le=1000000,
        description=(
            "New connections one client may open per minute per pod; 0 (the default): no "
            "limit. Many applications open one connection per message: set it above their peak."
        ),
    )
    auth_failures: int = Field(
        default=10,
        ge=0,
        le=100000,
        description=(
            "Failed AUTH attempts one client may make within authFailureWindow, in any number "
            "of sessions; then it is refused until the oldest failure leaves the window. "
            "0: no limit."
        ),
    )
    auth_failure_window: Duration = Field(
        default="5m", description="Window over which AUTH failures count (such as 5m)."
    )
    exempt_networks: Annotated[list[Cidr], SET] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra=LIST_TYPE_SET,
        description=(
            "Client networks (CIDRs) no per-client limit applies to, such as a monitoring "
            "probe. allowedNetworks are not exempt unless listed here."
        ),
    )
    ipv6_prefix_length: int = Field(
        default=64,
        ge=32,
        le=128,
        description=(
            "IPv6 clients are grouped by this prefix: 64 as on the internet, 128 when clients "
            "are pods of an IPv6 pod network."
        ),
    )

    @model_validator(mode="after")
    def _window(self) -> Self:
        if parse_duration(self.auth_failure_window) <= timedelta(0):
            raise ValueError(AUTH_FAILURE_WINDOW_MESSAGE)
        return self


class Limits(KubeModel):
    """Per-message and per-pod limits the relay enforces during the SMTP dialogue."""

    max_message_size: int = Field(
        default=25 * MIB,
        ge=1024,
        le=150 * MIB,
        description="Largest message in bytes, advertised with SIZE; larger ones get 552.",
    )
    max_recipients: int = Field(
        default=100, ge=1, le=10000, description="Most RCPT TO commands accepted per message."
    )
    max_connections: int = Field(
        default=200, ge=1, le=100000, description="Most concurrent client connections per pod."
    )
    max_bytes_in_flight: int | None = Field(
        default=None,
        ge=1024,
        le=64 * 1024 * MIB,
        description=(
            "Message bytes each relay process may hold in flight (from DATA to the end of the"
            " first delivery attempt); a message that does not fit gets 452 4.3.1 and is sent"
            " again later. Unset: a quarter of the container's memory limit per worker, or 4x"
            " maxMessageSize without a limit. At least maxMessageSize."
        ),
    )
    per_client: PerClientLimits = Field(
        default_factory=PerClientLimits,
        description="Limits per client address: connections, connection rate, AUTH failures.",
    )


RETRY_ORDER_MESSAGE = "retry durations must satisfy initialBackoff <= maxBackoff <= maxAge"
RETRY_MINIMUM_MESSAGE = "initialBackoff must be at least 1s"


class Retry(KubeModel):
    """How deferred mail is retried: exponential backoff, then a bounce after maxAge."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "duration(self.initialBackoff) <= duration(self.maxBackoff)"
                " && duration(self.maxBackoff) <= duration(self.maxAge)",
                RETRY_ORDER_MESSAGE,
            ),
            cel(
                "duration(self.initialBackoff) >= duration('1s')",
                RETRY_MINIMUM_MESSAGE,
                field_path=".initialBackoff",
            ),
        )
    )

    initial_backoff: Duration = Field(
        default="5m", description="Delay before the first retry (Go duration, such as 5m)."
    )
    max_backoff: Duration = Field(
        default="1h", description="Longest delay between retries; the delay doubles up to it."
    )
    max_age: Duration = Field(
        default="120h",
        description="How long a message may stay queued before it bounces (120h is 5 days).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        initial = parse_duration(self.initial_backoff)
        if not initial <= parse_duration(self.max_backoff) <= parse_duration(self.max_age):
            raise ValueError(RETRY_ORDER_MESSAGE)
        if initial < timedelta(seconds=1):
            raise ValueError(RETRY_MINIMUM_MESSAGE)
        return self


STORAGE_CLASS_IMMUTABLE_MESSAGE = (
    "storageClassName cannot change once the spool volumes exist; create a new MailRelay instead"
)


class Queue(KubeModel):
    """The durable spool each relay pod writes accepted mail to before it answers 250.

    The storage class is fixed at creation (a StatefulSet's volume claim templates cannot
    change). That is a transition rule, so only the API server can check it: pydantic never
    sees the old object.
    """

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.storageClassName) == has(oldSelf.storageClassName)"
                " && (!has(self.storageClassName)"
                " || self.storageClassName == oldSelf.storageClassName)",
                STORAGE_CLASS_IMMUTABLE_MESSAGE,
                field_path=".storageClassName",
                reason="FieldValueForbidden",
            )
        )
    )

    size: Size = Field(
        default="1Gi",
        description=(
            "Size of each pod's spool volume (a quantity such as 1Gi). 0 keeps the spool in an "
            "emptyDir, which loses queued mail with the pod: for tests only."
        ),
    )
    storage_class_name: DnsName | None = Field(
        default=None,
        description="StorageClass of the spool volumes; the cluster default when unset.",
    )
    retry: Retry = Field(default_factory=Retry, description="Retry schedule for deferred mail.")
    on_scale_down: Literal["Drain", "DrainAndRetain", "Retain"] = Field(
        default="Drain",
        description=(
            "What happens to the spool volume of a pod removed by a scale-down once the pod is "
            "gone (its mail is normally handed to the other pods as it leaves): Drain runs a "
            "drain Job that hands off, delivers or dead-letters what is left on it, then "
            "deletes the volume; DrainAndRetain drains it and keeps the empty volume; Retain "
            "keeps it untouched until the relay scales back up (docs/scaling.md)."
        ),
    )


EXTERNAL_TRAFFIC_POLICY_MESSAGE = (
    "externalTrafficPolicy is only used by Services of type NodePort or LoadBalancer"
)
SOURCE_RANGES_MESSAGE = "loadBalancerSourceRanges is only used by Services of type LoadBalancer"


class ServiceSettings(KubeModel):
    """The Service in front of the relay pods."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.externalTrafficPolicy) || self.type != 'ClusterIP'",
                EXTERNAL_TRAFFIC_POLICY_MESSAGE,
                field_path=".externalTrafficPolicy",
                reason="FieldValueForbidden",
            ),
            cel(
                "!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0"
                " || self.type == 'LoadBalancer'",
                SOURCE_RANGES_MESSAGE,
                field_path=".loadBalancerSourceRanges",
                reason="FieldValueForbidden",
            ),
        )
    )

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="Service type; ClusterIP keeps the relay in-cluster."
    )
    annotations: Annotations = Field(
        default_factory=dict,
        description="Annotations for the Service, such as a cloud load balancer's settings.",
    )
    external_traffic_policy: Literal["Cluster", "Local"] | None = Field(
        default=None,
        description=(
            "For NodePort and LoadBalancer: Local keeps each client's own address (nodes "
            "forward only to relay pods on themselves), so allowedNetworks sees who really "
            "connects; Cluster (Kubernetes' default) replaces it with a node's address. "
            "Required (or loadBalancerSourceRanges) while allowedNetworks is not empty."
        ),
    )
    load_balancer_source_ranges: Annotated[list[Cidr], SET] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra=LIST_TYPE_SET,
        description=(
            "For LoadBalancer: the client networks the load balancer lets in at all; "
            "everyone when empty."
        ),
    )

    @model_validator(mode="after")
    def _fields_fit_type(self) -> Self:
        if self.external_traffic_policy is not None and self.type == "ClusterIP":
            raise ValueError(EXTERNAL_TRAFFIC_POLICY_MESSAGE)
        if self.load_balancer_source_ranges and self.type != "LoadBalancer":
            raise ValueError(SOURCE_RANGES_MESSAGE)
        return self


class ServiceMonitorSettings(KubeModel):
    """A prometheus-operator ServiceMonitor for the relay's metrics."""

    enabled: bool = Field(
        default=False, description="Create a ServiceMonitor (needs the prometheus-operator CRDs)."
    )
    interval: Duration = Field(default="30s", description="Scrape interval.")
    labels: Labels = Field(
        default_factory=dict,
        description="Extra labels on the ServiceMonitor, so a Prometheus selects it.",
    )


class Metrics(KubeModel):
    """The Prometheus endpoint of each relay pod."""

    enabled: bool = Field(default=True, description="Serve Prometheus metrics on /metrics.")
    port: Port = Field(default=9090, description="Port of the metrics endpoint.")
    service_monitor: ServiceMonitorSettings = Field(
        default_factory=ServiceMonitorSettings, description="ServiceMonitor settings."
    )


RELAY_TLS_MESSAGE = (
    "listener.tls is required while auth.required is true: AUTH is only offered over TLS"
)
RELAY_OPEN_MESSAGE = (
    "allowedNetworks must list at least one network when auth.required is false, "
    "or nobody could send"
)
RELAY_METRICS_PORT_MESSAGE = "metrics.port must differ from the listener ports"
OPEN_RELAY_MESSAGE = netguard.open_relay_message("allowedNetworks", "insecureAllowPublicNetworks")
EXPOSED_TRUST_MESSAGE = (
    "a NodePort or LoadBalancer Service with externalTrafficPolicy Cluster hands the relay "
    "internet clients with a node's address, which allowedNetworks trusts: set "
    "service.externalTrafficPolicy: Local (the relay sees real client addresses), or for a "
    "LoadBalancer service.loadBalancerSourceRanges (only those networks get in at all)"
)


def _cel_strings(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


# CEL twin of netguard.is_private_network, from the same tuple.
PRIVATE_NETWORK_RULE = (
    f"self.allowedNetworks.all(n, {_cel_strings(netguard.PRIVATE_NETWORKS)}"
    ".exists(p, cidr(p).containsCIDR(cidr(n))))"
)


AWS_ROLE_ARN_PATTERN = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$"
AWS_ROLE_ARN_MESSAGE = "roleArn must be an IAM role ARN such as arn:aws:iam::123456789012:role/mail"
STS_ENDPOINT_MESSAGE = "stsEndpoint" + upstream_rules.messages().endpoint.removeprefix("endpoint")


class AwsWebIdentity(KubeModel):
    """AWS credentials from the pod's ServiceAccount token (AssumeRoleWithWebIdentity).

    For SES routes without static keys: the operator projects a ServiceAccount token with
    this audience into the relay pods and sets AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE,
    which botocore's credential chain exchanges at STS for temporary credentials (what the
    EKS pod identity webhook does for IRSA, without the webhook). See docs/providers.md.
    """

    role_arn: Annotated[
        str,
        Field(
            max_length=2048,
            json_schema_extra=regex_rule(AWS_ROLE_ARN_PATTERN, AWS_ROLE_ARN_MESSAGE),
        ),
        regex_check(AWS_ROLE_ARN_PATTERN, AWS_ROLE_ARN_MESSAGE),
    ] = Field(
        description="The IAM role to assume, whose trust policy names the cluster's OIDC issuer."
    )
    audience: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="sts.amazonaws.com",
        description="Audience of the projected token; what the role's trust policy expects.",
    )
    expiration_seconds: int = Field(
        default=86400,
        ge=600,
        le=86400 * 2,
        description="Lifetime of the projected token; kubelet renews it at 80% of it.",
    )
    sts_endpoint: (
        Annotated[
            str,
            Field(
                max_length=2048,
                json_schema_extra=regex_rule(upstream_rules.ENDPOINT_PATTERN, STS_ENDPOINT_MESSAGE),
            ),
            regex_check(upstream_rules.ENDPOINT_PATTERN, STS_ENDPOINT_MESSAGE),
        ]
        | None
    ) = Field(
        default=None,
        description=(
            "STS endpoint URL (AWS_ENDPOINT_URL_STS), such as a VPC endpoint; botocore's "
            "default when unset."
        ),
    )


class MailRelaySpec(KubeModel):
    """Desired state of a MailRelay: an SMTP submission relay run as a StatefulSet."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!self.auth.required || has(self.auth.usersSecretRef)",
                AUTH_USERS_MESSAGE,
                field_path=".auth.usersSecretRef",
                reason="FieldValueRequired",
            ),
            cel(
                "!self.auth.required || has(self.listener.tls)",
                RELAY_TLS_MESSAGE,
                field_path=".listener.tls",
                reason="FieldValueRequired",
            ),
            cel(
                "self.auth.required || size(self.allowedNetworks) > 0",
                RELAY_OPEN_MESSAGE,
                field_path=".allowedNetworks",
                reason="FieldValueRequired",
            ),
            cel(
                "!self.metrics.enabled || (self.metrics.port != self.listener.port"
                " && (!has(self.listener.implicitTlsPort)"
                " || self.metrics.port != self.listener.implicitTlsPort))",
                RELAY_METRICS_PORT_MESSAGE,
                field_path=".metrics.port",
            ),
            cel(
                f"self.insecureAllowPublicNetworks || {PRIVATE_NETWORK_RULE}",
                OPEN_RELAY_MESSAGE,
                field_path=".allowedNetworks",
            ),
            cel(
                "size(self.allowedNetworks) == 0 || self.service.type == 'ClusterIP'"
                " || (has(self.service.externalTrafficPolicy)"
                " && self.service.externalTrafficPolicy == 'Local')"
                " || (self.service.type == 'LoadBalancer'"
                " && has(self.service.loadBalancerSourceRanges)"
                " && size(self.service.loadBalancerSourceRanges) > 0)",
                EXPOSED_TRUST_MESSAGE,
                field_path=".service.externalTrafficPolicy",
                reason="FieldValueRequired",
            ),
        )
    )

    replicas: int = Field(
        default=2, ge=0, le=100, description="Number of relay pods; 0 stops the relay."
    )
    image: ImageReference | None = Field(
        default=None, description="Relay container image; the operator's default when unset."
    )
    listener: Listener = Field(
        default_factory=Listener, description="Ports, hostname and TLS for clients."
    )
    auth: Auth = Field(default_factory=Auth, description="SMTP AUTH for clients.")
    allowed_networks: Annotated[list[Cidr], SET] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra=LIST_TYPE_SET,
        description=(
            "Client networks (CIDRs) that may send without AUTH. Empty by default: no network "
            "is trusted unless listed. Only private ranges (10.0.0.0/8, 172.16.0.0/12, "
            "192.168.0.0/16, 100.64.0.0/10, fc00::/7, loopback, link-local) unless "
            "insecureAllowPublicNetworks is set."
        ),
    )
    insecure_allow_public_networks: bool = Field(
        default=False,
        description=(
            "Acknowledge that allowedNetworks lists networks beyond private addresses, whose "
            "clients may then send without AUTH from the internet (an open relay for them); "
            "refused without it."
        ),
    )
    limits: Limits = Field(default_factory=Limits, description="Message and connection limits.")
    postmaster: (
        Annotated[
            str,
            Field(max_length=254, json_schema_extra=regex_rule(MAILBOX, MAILBOX_MESSAGE)),
            regex_check(MAILBOX, MAILBOX_MESSAGE),
        ]
        | None
    ) = Field(
        default=None,
        description=(
            "Address that RCPT TO:<Postmaster> (no domain, RFC 5321 4.5.1) is rewritten to "
            "and routed like any recipient, such as mail-admins@example.com; default "
            "postmaster@ the relay's hostname."
        ),
    )
    queue: Queue = Field(default_factory=Queue, description="Spool volume and retry schedule.")
    route_selector: LabelSelector | None = Field(
        default=None,
        description=(
            "Which of the MailRoutes naming this relay in relayRef may bind: only those whose "
            "labels match (the others get Accepted=False, NotSelected). When unset, every "
            "route in this namespace whose relayRef names this relay binds."
        ),
    )
    service: ServiceSettings = Field(
        default_factory=ServiceSettings, description="The Service clients connect to."
    )
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus metrics.")
    resources: ResourceRequirements | None = Field(
        default=None, description="CPU and memory requests and limits of the relay container."
    )
    node_selector: Labels = Field(
        default_factory=dict, description="Node labels the relay pods must be scheduled on."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the relay pods tolerate."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="A core/v1 Affinity, copied into the pod spec unchanged.",
    )
    priority_class_name: DnsName | None = Field(
        default=None, description="PriorityClass of the relay pods."
    )
    pod_labels: PodLabels = Field(
        default_factory=dict,
        description=(
            "Extra labels on the relay pods; the operator's app.kubernetes.io/ selector "
            "labels are refused."
        ),
    )
    pod_annotations: PodAnnotations = Field(
        default_factory=dict,
        description=(
            f"Extra annotations on the relay pods; {RESTART_HASH_ANNOTATION} is the "
            "operator's and refused."
        ),
    )
    topology_spread_constraints: list[TopologySpreadConstraint] | None = Field(
        default=None,
        max_length=8,
        description=(
            "How relay pods spread over nodes or zones. Unset: one preferred spread by "
            "kubernetes.io/hostname (maxSkew 1, ScheduleAnyway), at any replica count so "
            "scaling never rolls the pods; an empty list turns that default off."
        ),
    )
    service_account_name: DnsName | None = Field(
        default=None,
        description=(
            "ServiceAccount the relay pods run as (for cloud workload identity); when unset, "
            "one of their own the operator creates, named like the relay. No token is mounted."
        ),
    )
    service_account_annotations: Annotations = Field(
        default_factory=dict,
        description=(
            "Annotations on the relay's own ServiceAccount (<relay>-relay), such as "
            "eks.amazonaws.com/role-arn for EKS IRSA; unused when serviceAccountName is set."
        ),
    )
    aws_web_identity: AwsWebIdentity | None = Field(
        default=None,
        description=(
            "Give SES routes without static keys the pod's AWS role: a projected "
            "ServiceAccount token and AWS_ROLE_ARN (only while such a route is bound)."
        ),
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list,
        max_length=16,
        description="Secrets holding registry credentials to pull the relay image.",
    )
    pod_security_context: PodSecurityContext | None = Field(
        default=None,
        description=(
            "Overrides of the pod security context (user, groups, seccomp profile); the pods "
            "stay non-root, and the container keeps no capabilities, no privilege escalation "
            "and a read-only root filesystem."
        ),
    )
    pod_disruption_budget: PodDisruptionBudget = Field(
        default_factory=PodDisruptionBudget,
        description="Disruption budget that keeps mail flowing during drains.",
    )
    network_policy: NetworkPolicySettings = Field(
        default_factory=NetworkPolicySettings,
        description="Restrict who may reach the relay's SMTP ports (off by default).",
    )

    @model_validator(mode="after")
    def _relay_rules(self) -> Self:
        if self.auth.required and self.auth.users_secret_ref is None:
            raise ValueError(AUTH_USERS_MESSAGE)
        if self.auth.required and self.listener.tls is None:
            raise ValueError(RELAY_TLS_MESSAGE)
        if not self.auth.required and not self.allowed_networks:
            raise ValueError(RELAY_OPEN_MESSAGE)
        if self.metrics.enabled and self.metrics.port in (
            self.listener.port,
            self.listener.implicit_tls_port,
        ):
            raise ValueError(RELAY_METRICS_PORT_MESSAGE)
        networks = [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]
        if netguard.public_networks(networks) and not self.insecure_allow_public_networks:
            raise ValueError(OPEN_RELAY_MESSAGE)
        service = self.service
        if (
            self.allowed_networks
            and service.type != "ClusterIP"
            and service.external_traffic_policy != "Local"
            and not (service.type == "LoadBalancer" and service.load_balancer_source_ranges)
        ):
            raise ValueError(EXPOSED_TRUST_MESSAGE)
        return self


class MailRelayStatus(KubeModel):
    """Observed state of a MailRelay, written by the operator only."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
        description="Ready, RoutesResolved, SecretsResolved and other conditions.",
    )
    replicas: int | None = Field(default=None, ge=0, description="Relay pods that exist.")
    ready_replicas: int | None = Field(default=None, ge=0, description="Relay pods ready.")
    routes: int | None = Field(default=None, ge=0, description="Number of bound MailRoutes.")
    endpoint: Annotated[str, Field(max_length=512)] | None = Field(
        default=None,
        description="Where clients submit mail: the Service DNS name and port, host:port.",
    )
    config_hash: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="Hash of the rendered relay configuration the pods run."
    )
    selector: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="Label selector of the relay pods, for the scale subresource."
    )


# --- MailRoute -------------------------------------------------------------------------------


class RouteMatch(KubeModel):
    """Which messages a route carries; empty lists match every message."""

    sender_domains: Annotated[list[DomainPattern], SET] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra=LIST_TYPE_SET,
        description="Envelope sender (MAIL FROM) domains; empty matches every sender.",
    )
    recipient_domains: Annotated[list[DomainPattern], SET] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra=LIST_TYPE_SET,
        description="Envelope recipient (RCPT TO) domains; empty matches every recipient.",
    )


class SmtpCredentialsSecretRef(KubeModel):
    """A Secret holding the username and password for the upstream's AUTH."""

    name: ObjectName = Field(description="Name of the Secret, in this namespace.")
    username_key: SecretKey = Field(default="username", description="Key holding the username.")
    password_key: SecretKey = Field(default="password", description="Key holding the password.")


class CaSecretRef(KubeModel):
    """A Secret holding extra CA certificates to verify the upstream with."""

    name: ObjectName = Field(description="Name of the Secret, in this namespace.")
    key: SecretKey = Field(default="ca.crt", description="Key holding PEM CA certificates.")


SMTP_OAUTH2_PASSWORD_MESSAGE = (
    "set one of oauth2 (a token) or credentialsSecretRef (a password), not both"
)
SMTP_PLAINTEXT_MESSAGE = upstream_rules.messages(to_camel).smtp_plaintext


class SmtpUpstream(KubeModel):
    """Delivery to an SMTP server (a smarthost or a provider's SMTP endpoint)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.tls != 'none' || self.insecureAllowPlaintext",
                SMTP_PLAINTEXT_MESSAGE,
                field_path=".tls",
            ),
            cel(
                "!has(self.oauth2) || !has(self.credentialsSecretRef)",
                SMTP_OAUTH2_PASSWORD_MESSAGE,
                field_path=".oauth2",
                reason="FieldValueForbidden",
            ),
        )
    )

    host: Host = Field(description="DNS name or IP address of the SMTP server.")
    port: Port = Field(default=587, description="Port of the SMTP server.")
    tls: Literal["starttls", "implicit", "none"] = Field(
        default="starttls",
        description=(
            "starttls upgrades the connection and fails if the server cannot; implicit "
            "speaks TLS from the first byte (usually port 465); none needs "
            "insecureAllowPlaintext."
        ),
    )
    insecure_allow_plaintext: bool = Field(
        default=False, description="Explicit opt-in to tls: none (unencrypted delivery)."
    )
    credentials_secret_ref: SmtpCredentialsSecretRef | None = Field(
        default=None, description="Username and password for AUTH; no AUTH when unset."
    )
    ca_secret_ref: CaSecretRef | None = Field(
        default=None,
        description="Extra CA certificates to verify the server; system roots when unset.",
    )
    oauth2: SmtpOAuth2 | None = Field(
        default=None,
        description=(
            "Authenticate with an OAuth2 token (XOAUTH2 or OAUTHBEARER) instead of a "
            "password; excludes credentialsSecretRef. See docs/oauth2.md."
        ),
    )

    @model_validator(mode="after")
    def _plaintext_opt_in(self) -> Self:
        if self.tls == "none" and not self.insecure_allow_plaintext:
            raise ValueError(SMTP_PLAINTEXT_MESSAGE)
        if self.oauth2 is not None and self.credentials_secret_ref is not None:
            raise ValueError(SMTP_OAUTH2_PASSWORD_MESSAGE)
        return self


class ApiCredentialsSecretRef(KubeModel):
    """A Secret holding a provider's API credentials; each provider reads the keys it needs."""

    name: ObjectName = Field(description="Name of the Secret, in this namespace.")
    api_key_key: SecretKey = Field(
        default="apiKey",
        description=(
            "Key holding the API key or token (Mailgun, SparkPost, SendGrid, Postmark, "
            "Resend), or the HMAC-SHA256 secret a webhook request is signed with."
        ),
    )
    access_key_id_key: SecretKey = Field(
        default="accessKeyId", description="Key holding the AWS access key id (SES)."
    )
    secret_access_key_key: SecretKey = Field(
        default="secretAccessKey", description="Key holding the AWS secret access key (SES)."
    )


# The provider rules live in relay/upstream_rules.py (the relay applies them too); here they
# are spelled for a MailRoute and turned into CEL.
Provider = upstream_rules.Provider
REGIONAL_PROVIDERS = upstream_rules.REGIONAL_PROVIDERS
AMBIENT_CREDENTIAL_PROVIDERS = upstream_rules.AMBIENT_CREDENTIAL_PROVIDERS
_WORDS = upstream_rules.messages(to_camel)
MAILGUN_DOMAIN_MESSAGE = _WORDS.mailgun_domain
DOMAIN_ONLY_MAILGUN_MESSAGE = _WORDS.domain_only_mailgun
SES_REGION_MESSAGE = _WORDS.ses_region
SES_REGION_FORMAT_MESSAGE = _WORDS.ses_region_format
REGION_US_EU_MESSAGE = _WORDS.region_us_eu
REGION_UNUSED_MESSAGE = _WORDS.region_unused
WEBHOOK_ENDPOINT_MESSAGE = _WORDS.webhook_endpoint
API_CREDENTIALS_MESSAGE = _WORDS.credentials
CONFIGURATION_SET_MESSAGE = _WORDS.configuration_set
MESSAGE_STREAM_MESSAGE = _WORDS.message_stream
SIGNING_KEYS_ONLY_WEBHOOK_MESSAGE = _WORDS.signing_keys_only_webhook
SIGNING_KEY_ID_MESSAGE = _WORDS.signing_key_id
SIGNING_KEYS_UNIQUE_MESSAGE = _WORDS.signing_keys_unique
ACTIVE_SIGNING_KEY_REQUIRED_MESSAGE = _WORDS.active_signing_key_required
ACTIVE_SIGNING_KEY_UNKNOWN_MESSAGE = _WORDS.active_signing_key_unknown
ENDPOINT_MESSAGE = _WORDS.endpoint
ENDPOINT_PORT_MESSAGE = _WORDS.endpoint_port
LOCAL_ENDPOINT_MESSAGE = _WORDS.local_endpoint
IPV6_LITERAL_MESSAGE = _WORDS.ipv6_literal

# CEL twins of upstream_rules.endpoint_problem. The grammar is one regular expression both
# engines read alike; the host and port are split out with the same string operations as
# upstream_rules.endpoint_host/endpoint_port (url(...).getHostname() would do, but the API
# server cannot bound the size of its result, so every function applied to it exceeds the
# cost budget; split() of a string with a maxLength stays bounded). Every rule that splits
# first checks the grammar, so the splits never see an unexpected shape.
_VALID_ENDPOINT = (
    f"has(self.endpoint) && self.endpoint.matches(r'{upstream_rules.ENDPOINT_PATTERN}')"
)
_HOST_PORT = "self.endpoint.split('/')[2].split('?')[0]"
_BRACKETED = f"{_HOST_PORT}.startsWith('[')"
_HOST = (
    f"({_BRACKETED} ? {_HOST_PORT}.substring(1, {_HOST_PORT}.indexOf(']'))"
    f" : {_HOST_PORT}.split(':')[0])"
)
_PORT = (
    f"({_BRACKETED} ? {_HOST_PORT}.substring({_HOST_PORT}.indexOf(']') + 1)"
    f" : ({_HOST_PORT}.contains(':') ? ':' + {_HOST_PORT}.split(':')[1] : ''))"
)
# One trailing dot removed (the grammar allows no more), lower case: netguard's reading.
_BARE_HOST = (
    f"({_HOST}.endsWith('.') ? {_HOST}.substring(0, size({_HOST}) - 1) : {_HOST}).lowerAscii()"
)
ENDPOINT_PORT_RULE = (
    f"!({_VALID_ENDPOINT}) || size({_PORT}) == 0"
    f" || (int({_PORT}.substring(1)) >= 1 && int({_PORT}.substring(1)) <= 65535)"
)
# The API server's ip() refuses zones and IPv4-mapped addresses, so it cannot judge them.
IPV6_LITERAL_RULE = (
    f"!({_VALID_ENDPOINT}) || !{_BRACKETED} || ({_HOST}.contains(':') && isIP({_HOST}))"
)
# CEL twin of netguard.local_host_reason (literal addresses and the known names only; the
# relay checks every resolved address when it connects).
LOCAL_ENDPOINT_RULE = (
    f"!({_VALID_ENDPOINT}) || self.insecureAllowLocalEndpoint"
    f" || !(isIP({_BARE_HOST})"
    f" ? {_cel_strings(tuple(n for n, _ in netguard.LOCAL_NETWORKS))}"
    f".exists(c, cidr(c).containsIP({_BARE_HOST}))"
    f" : ({_BARE_HOST} in {_cel_strings(netguard.LOCAL_HOST_NAMES)}"
    f" || {_BARE_HOST}.endsWith('{netguard.LOCAL_NAME_SUFFIX}')))"
)


class WebhookSigningKey(KubeModel):
    """One HMAC secret a webhook can sign with, and the id sent beside its signatures."""

    id: Annotated[str, Field(min_length=1, max_length=63)] = Field(
        description=(
            "Key id sent as X-Mailrelay-Key-Id: letters, digits, '-' or '_' (such as "
            "2026-12); receivers pick the secret to verify with by it."
        )
    )
    secret_key: SecretKey = Field(
        description="Key of credentialsSecretRef's Secret that holds this HMAC secret."
    )


_NO_SIGNING_KEYS = "(!has(self.signingKeys) || size(self.signingKeys) == 0)"


def _token_endpoint(rule: str) -> str:
    """An endpoint CEL rule of ApiUpstream, for OAuth2's tokenEndpoint."""
    return rule.replace("self.endpoint", "self.tokenEndpoint")


def _token_words(message: str) -> str:
    return "tokenEndpoint" + message.removeprefix("endpoint")


TOKEN_ENDPOINT_MESSAGE = _token_words(ENDPOINT_MESSAGE)
TOKEN_ENDPOINT_PORT_MESSAGE = _token_words(ENDPOINT_PORT_MESSAGE)
TOKEN_IPV6_LITERAL_MESSAGE = _token_words(IPV6_LITERAL_MESSAGE)
TOKEN_LOCAL_ENDPOINT_MESSAGE = _token_words(LOCAL_ENDPOINT_MESSAGE)
TOKEN_ENDPOINT_HTTPS_MESSAGE = _WORDS.token_endpoint_https


class OAuth2SecretRef(KubeModel):
    """A Secret holding the mailbox and the OAuth2 client's credentials."""

    name: ObjectName = Field(description="Name of the Secret, in this namespace.")
    username_key: SecretKey = Field(
        default="username", description="Key holding the mailbox (the SASL user)."
    )
    client_id_key: SecretKey = Field(default="clientId", description="Key holding the client id.")
    client_secret_key: SecretKey = Field(
        default="clientSecret", description="Key holding the client secret."
    )
    refresh_token_key: SecretKey = Field(
        default="refreshToken",
        description="Key holding the refresh token (grant refresh_token only).",
    )


class SmtpOAuth2(KubeModel):
    """OAuth2 for an SMTP upstream: the token endpoint, the grant and the Secret."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                _token_endpoint(ENDPOINT_PORT_RULE),
                TOKEN_ENDPOINT_PORT_MESSAGE,
                field_path=".tokenEndpoint",
            ),
            cel(
                _token_endpoint(IPV6_LITERAL_RULE),
                TOKEN_IPV6_LITERAL_MESSAGE,
                field_path=".tokenEndpoint",
            ),
            cel(
                _token_endpoint(LOCAL_ENDPOINT_RULE),
                TOKEN_LOCAL_ENDPOINT_MESSAGE,
                field_path=".tokenEndpoint",
            ),
            cel(
                "self.insecureAllowLocalEndpoint"
                " || self.tokenEndpoint.lowerAscii().startsWith('https://')",
                TOKEN_ENDPOINT_HTTPS_MESSAGE,
                field_path=".tokenEndpoint",
            ),
        )
    )

    mechanism: Literal["xoauth2", "oauthbearer"] = Field(
        default="xoauth2",
        description="SASL mechanism: xoauth2 (Gmail, Microsoft 365) or oauthbearer (RFC 7628).",
    )
    grant: Literal["refresh_token", "client_credentials"] = Field(
        description=(
            "refresh_token: a user's refresh token from the Secret; client_credentials: the "
            "client's own credentials (Microsoft 365 app-only access)."
        )
    )
    token_endpoint: Annotated[
        str,
        Field(
            max_length=2048,
            json_schema_extra=regex_rule(upstream_rules.ENDPOINT_PATTERN, TOKEN_ENDPOINT_MESSAGE),
        ),
    ] = Field(
        description=(
            "The token endpoint, such as https://oauth2.googleapis.com/token or "
            "https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token."
        )
    )
    scopes: list[Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[!#-\[\]-~]+$")]] = (
        Field(
            default_factory=list,
            max_length=32,
            description=(
                "Scopes asked for, such as https://mail.google.com/ or "
                "https://outlook.office365.com/.default; none when empty."
            ),
        )
    )
    client_auth: Literal["post", "basic"] = Field(
        default="post",
        description="Client authentication at the token endpoint: in the form, or HTTP Basic.",
    )
    secret_ref: OAuth2SecretRef = Field(
        description="The Secret with the mailbox, client id, client secret and refresh token."
    )
    insecure_allow_local_endpoint: bool = Field(
        default=False,
        description=(
            "Let tokenEndpoint be a local address (and http://): for a token server on the "
            "pod's own loopback only."
        ),
    )

    @model_validator(mode="after")
    def _rules(self) -> Self:
        """The rules of ``relay/upstream_rules.py``; the CEL rules above are their twins."""
        problems = upstream_rules.oauth2_problems(
            token_endpoint=self.token_endpoint,
            grant=self.grant,
            has_refresh_token=None,
            allow_local_endpoint=self.insecure_allow_local_endpoint,
            words=_WORDS,
            field="tokenEndpoint",
        )
        if problems:
            raise ValueError(problems[0])
        return self


class ApiUpstream(KubeModel):
    """Delivery through an email provider's HTTP API."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.provider != 'mailgun' || has(self.domain)",
                MAILGUN_DOMAIN_MESSAGE,
                field_path=".domain",
                reason="FieldValueRequired",
            ),
            cel(
                "!has(self.domain) || self.provider == 'mailgun'",
                DOMAIN_ONLY_MAILGUN_MESSAGE,
                field_path=".domain",
                reason="FieldValueForbidden",
            ),
            cel(
                "self.provider != 'ses' || has(self.region)",
                SES_REGION_MESSAGE,
                field_path=".region",
                reason="FieldValueRequired",
            ),
            cel(
                "!has(self.region) || self.provider != 'ses'"
                f" || self.region.matches(r'{upstream_rules.AWS_REGION}')",
                SES_REGION_FORMAT_MESSAGE,
                field_path=".region",
            ),
            cel(
                "!has(self.region)"
                f" || !(self.provider in {_cel_strings(upstream_rules.REGIONAL_PROVIDERS)})"
                f" || self.region in {_cel_strings(upstream_rules.REGIONAL_REGIONS)}",
                REGION_US_EU_MESSAGE,
                field_path=".region",
            ),
            cel(
                "!has(self.region)"
                f" || self.provider in {_cel_strings(upstream_rules.REGION_PROVIDERS)}",
                REGION_UNUSED_MESSAGE,
                field_path=".region",
                reason="FieldValueForbidden",
            ),
            cel(
                "self.provider != 'webhook' || has(self.endpoint)",
                WEBHOOK_ENDPOINT_MESSAGE,
                field_path=".endpoint",
                reason="FieldValueRequired",
            ),
            cel(
                f"self.provider in {_cel_strings(AMBIENT_CREDENTIAL_PROVIDERS)}"
                " || has(self.credentialsSecretRef)",
                API_CREDENTIALS_MESSAGE,
                field_path=".credentialsSecretRef",
                reason="FieldValueRequired",
            ),
            cel(
                "!has(self.configurationSet) || self.provider == 'ses'",
                CONFIGURATION_SET_MESSAGE,
                field_path=".configurationSet",
                reason="FieldValueForbidden",
            ),
            cel(
                "!has(self.messageStream) || self.provider == 'postmark'",
                MESSAGE_STREAM_MESSAGE,
                field_path=".messageStream",
                reason="FieldValueForbidden",
            ),
            cel(
                f"self.provider == 'webhook' || ({_NO_SIGNING_KEYS}"
                " && !has(self.activeSigningKey))",
                SIGNING_KEYS_ONLY_WEBHOOK_MESSAGE,
                field_path=".signingKeys",
                reason="FieldValueForbidden",
            ),
            cel(
                "!has(self.signingKeys) || self.signingKeys.all(k, "
                f"k.id.matches(r'{upstream_rules.SIGNING_KEY_ID_PATTERN}'))",
                SIGNING_KEY_ID_MESSAGE,
                field_path=".signingKeys",
            ),
            cel(
                "!has(self.signingKeys)"
                " || self.signingKeys.all(a, self.signingKeys.exists_one(b, b.id == a.id))",
                SIGNING_KEYS_UNIQUE_MESSAGE,
                field_path=".signingKeys",
            ),
            cel(
                "!has(self.signingKeys) || size(self.signingKeys) < 2"
                " || has(self.activeSigningKey)",
                ACTIVE_SIGNING_KEY_REQUIRED_MESSAGE,
                field_path=".activeSigningKey",
                reason="FieldValueRequired",
            ),
            cel(
                "!has(self.activeSigningKey) || (has(self.signingKeys)"
                " && self.signingKeys.exists(k, k.id == self.activeSigningKey))",
                ACTIVE_SIGNING_KEY_UNKNOWN_MESSAGE,
                field_path=".activeSigningKey",
            ),
            cel(ENDPOINT_PORT_RULE, ENDPOINT_PORT_MESSAGE, field_path=".endpoint"),
            cel(IPV6_LITERAL_RULE, IPV6_LITERAL_MESSAGE, field_path=".endpoint"),
            cel(LOCAL_ENDPOINT_RULE, LOCAL_ENDPOINT_MESSAGE, field_path=".endpoint"),
        )
    )

    provider: Provider = Field(
        description="Which provider API to call; webhook POSTs the raw message to endpoint."
    )
    region: Annotated[str, Field(min_length=2, max_length=32)] | None = Field(
        default=None,
        description=(
            "Provider region: us or eu for mailgun, sparkpost and sendgrid (us when unset); "
            "an AWS region such as eu-west-1 for ses."
        ),
    )
    endpoint: (
        Annotated[
            str,
            Field(
                max_length=2048,
                json_schema_extra=regex_rule(upstream_rules.ENDPOINT_PATTERN, ENDPOINT_MESSAGE),
            ),
        ]
        | None
    ) = Field(
        default=None,
        description=(
            "Base URL that replaces the provider's public API (a proxy, a regional or test "
            "endpoint); the full URL to POST to for webhook. http(s)://host[:port][/path]"
            "[?query], without credentials or a #fragment."
        ),
    )

    domain: DnsName | None = Field(
        default=None, description="Sending domain registered with Mailgun (mailgun only)."
    )
    configuration_set: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        default=None, description="SES configuration set to send with (ses only)."
    )
    message_stream: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        default=None, description="Postmark message stream, outbound when unset (postmark only)."
    )
    credentials_secret_ref: ApiCredentialsSecretRef | None = Field(
        default=None,
        description=(
            "Secret with the API credentials. Optional only for ses (the pod's AWS identity "
            "is used); a webhook needs it for its signing secret."
        ),
    )
    insecure_allow_local_endpoint: bool = Field(
        default=False,
        description=(
            "Let endpoint reach loopback, link-local (169.254.0.0/16, fe80::/10), unspecified "
            "and cloud metadata addresses, which are refused by default (here for literal "
            "addresses and names such as localhost, and by the relay for every address a name "
            "resolves to): for a test server or a proxy on the pod's own loopback only."
        ),
    )

    signing_keys: list[WebhookSigningKey] = Field(
        default_factory=list,
        max_length=upstream_rules.MAX_SIGNING_KEYS,
        description=(
            "Webhook only: up to two HMAC secrets from credentialsSecretRef's Secret, for "
            "rotation (the active one and the next or previous one). Unset: the Secret's "
            "apiKeyKey signs, with key id 'default'."
        ),
    )
    active_signing_key: Annotated[str, Field(min_length=1, max_length=63)] | None = Field(
        default=None,
        description=(
            "Webhook only: the id of the signing key that signs; required with two keys. "
            "Switch it to rotate (receivers trust both ids meanwhile)."
        ),
    )

    @model_validator(mode="after")
    def _provider_rules(self) -> Self:
        """The rules of ``relay/upstream_rules.py``; the CEL rules above are their twins."""
        problems = upstream_rules.api_upstream_problems(
            provider=self.provider,
            endpoint=self.endpoint,
            region=self.region,
            domain=self.domain,
            configuration_set=self.configuration_set,
            message_stream=self.message_stream,
            allow_local_endpoint=self.insecure_allow_local_endpoint,
            has_credentials=self.credentials_secret_ref is not None,
            words=_WORDS,
            signing_key_ids=[k.id for k in self.signing_keys],
            active_signing_key=self.active_signing_key,
        )
        if problems:
            raise ValueError(problems[0])
        return self


ONE_UPSTREAM_MESSAGE = "set exactly one of smtp or api"


class Upstream(KubeModel):
    """Where a route delivers: exactly one of an SMTP server or a provider API."""

    model_config = ConfigDict(
        json_schema_extra=validations(cel("has(self.smtp) != has(self.api)", ONE_UPSTREAM_MESSAGE))
    )

    smtp: SmtpUpstream | None = Field(default=None, description="Deliver over SMTP.")
    api: ApiUpstream | None = Field(default=None, description="Deliver through a provider API.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.smtp is None) == (self.api is None):
            raise ValueError(ONE_UPSTREAM_MESSAGE)
        return self

    def describe(self) -> str:
        """A short label for status and logs: ``smtp://host:port`` or ``api/provider``."""
        if self.smtp is not None:
            return f"smtp://{self.smtp.host}:{self.smtp.port}"
        assert self.api is not None  # guaranteed by _exactly_one
        return f"api/{self.api.provider}"


RATE_BURST_MESSAGE = "burst must be at least perSecond"


class RateLimit(KubeModel):
    """A token bucket on the messages a route hands to its upstream."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.burst) || double(self.burst) >= self.perSecond",
                RATE_BURST_MESSAGE,
                field_path=".burst",
            )
        )
    )

    per_second: float = Field(
        gt=0, le=100000, description="Sustained messages per second (may be below 1)."
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        le=1000000,
        description=(
            "Messages that may go at once after a quiet spell; perSecond rounded up when unset."
        ),
    )
    on_exceed: Literal["defer", "reject"] = Field(
        default="defer",
        description=(
            "defer keeps excess mail queued until tokens free up; reject answers the client "
            "with a temporary 4.7.0 refusal so it retries later."
        ),
    )

    @model_validator(mode="after")
    def _burst_covers_rate(self) -> Self:
        if self.burst is not None and self.burst < self.per_second:
            raise ValueError(RATE_BURST_MESSAGE)
        return self


class DkimKeySecretRef(KubeModel):
    """A Secret key holding a DKIM private key (PEM: RSA of 2048 bits or more, or Ed25519)."""

    name: ObjectName = Field(description="Name of the Secret, in this namespace.")
    key: SecretKey = Field(default="dkim.key", description="Key holding the PEM private key.")


DkimSelectorName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        json_schema_extra=regex_rule(dkim.SELECTOR_PATTERN, dkim.SELECTOR_MESSAGE),
    ),
    regex_check(dkim.SELECTOR_PATTERN, dkim.SELECTOR_MESSAGE),
]
HEADER_NAME_MESSAGE = "must be a header field name such as From or List-Unsubscribe"
HeaderName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        json_schema_extra=regex_rule(dkim.HEADER_NAME_PATTERN, HEADER_NAME_MESSAGE),
    ),
    regex_check(dkim.HEADER_NAME_PATTERN, HEADER_NAME_MESSAGE),
]


class DkimSelector(KubeModel):
    """A selector and its key; the public key goes in DNS at <selector>._domainkey.<domain>."""

    selector: DkimSelectorName = Field(description="The selector (s=), such as mail2026a.")
    secret_ref: DkimKeySecretRef = Field(
        description="The private key; its type picks the algorithm (rsa-sha256 or ed25519-sha256)."
    )


class DkimDomain(KubeModel):
    """Signing for one domain: the active selector, and the next one for rotation."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.next) || self.next.selector != self.active.selector",
                dkim.TWO_SELECTORS_MESSAGE,
                field_path=".next.selector",
            ),
            cel(
                "!has(self.headers) || self.headers.exists(h, h.lowerAscii() == 'from')",
                dkim.HEADERS_NEED_FROM,
                field_path=".headers",
            ),
        )
    )

    domain: DnsName = Field(
        description="The signing domain (d=); mail whose From is at or below it is signed for it."
    )
    active: DkimSelector = Field(
        description="The selector mail is signed with once its DNS record matches the key."
    )
    next: DkimSelector | None = Field(
        default=None,
        description=(
            "The selector to rotate to: checked in DNS beside active, signed with only while "
            "active's record does not match. Swap active and next to rotate."
        ),
    )
    headers: list[HeaderName] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Header fields to sign (must include From); RFC 6376's list when unset.",
    )
    canonicalization: Literal[
        "relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"
    ] = Field(default="relaxed/relaxed", description="Header/body canonicalisation.")

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if self.next is not None and self.next.selector == self.active.selector:
            raise ValueError(dkim.TWO_SELECTORS_MESSAGE)
        if self.headers is not None and (problem := dkim.headers_problem(self.headers)):
            raise ValueError(problem)
        return self

    def selectors(self) -> list[tuple[str, DkimSelector]]:
        """(role, selector): active first."""
        return [("active", self.active)] + ([("next", self.next)] if self.next else [])


_SELF_SIGNING = _cel_strings(upstream_rules.SELF_SIGNING_PROVIDERS)
DKIM_PROVIDER_RULE = (
    "!has(self.dkim) || size(self.dkim) == 0 || ("
    f"(!has(self.upstream.api) || !(self.upstream.api.provider in {_SELF_SIGNING}))"
    " && (!has(self.fallbacks) || self.fallbacks.all(f, "
    f"!has(f.api) || !(f.api.provider in {_SELF_SIGNING}))))"
)
DKIM_PROVIDER_MESSAGE = _WORDS.dkim_self_signing


class MailRouteSpec(KubeModel):
    """Desired state of a MailRoute: which mail a relay sends where."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(DKIM_PROVIDER_RULE, DKIM_PROVIDER_MESSAGE, field_path=".dkim")
        )
    )

    relay_ref: LocalObjectReference = Field(
        description="The MailRelay, in this namespace, that carries this route."
    )
    priority: int = Field(
        default=100,
        ge=0,
        le=1000,
        description=(
            "When several routes match a message the highest priority wins; ties go to the "
            "route whose name sorts first."
        ),
    )
    match: RouteMatch = Field(
        default_factory=RouteMatch, description="Which messages this route carries."
    )
    upstream: Upstream = Field(description="Where matching mail is delivered.")
    fallbacks: list[Upstream] = Field(
        default_factory=list,
        max_length=4,
        description=(
            "Upstreams tried in order when the upstream fails temporarily (connection "
            "errors, 4xx, 429, 5xx responses); permanent refusals are not retried elsewhere."
        ),
    )
    rate_limit: RateLimit | None = Field(
        default=None, description="Rate limit towards the upstream; unlimited when unset."
    )
    max_message_size: int | None = Field(
        default=None,
        ge=1024,
        le=150 * MIB,
        description="Largest message in bytes this route accepts; the relay's limit when unset.",
    )
    dkim: list[DkimDomain] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["domain"],
        },
        description=(
            "DKIM signing per sender domain (docs/dkim.md). Not with sendgrid, postmark or "
            "resend, which sign themselves."
        ),
    )

    @model_validator(mode="after")
    def _dkim_rules(self) -> Self:
        domains = [d.domain for d in self.dkim]
        if len(set(domains)) != len(domains):
            raise ValueError("dkim lists a domain twice")
        providers = [u.api.provider for u in (self.upstream, *self.fallbacks) if u.api is not None]
        problem = upstream_rules.dkim_provider_problem(
            signs=bool(self.dkim), providers=providers, words=_WORDS
        )
        if problem is not None:
            raise ValueError(problem)
        return self


class DkimRecordStatus(KubeModel):
    """One selector's TXT record as the operator checked it."""

    domain: Annotated[str, Field(max_length=253)] = Field(description="The signing domain.")
    selector: Annotated[str, Field(max_length=253)] = Field(description="The selector.")
    role: Literal["active", "next"] = Field(description="Its place in the rotation.")
    name: Annotated[str, Field(max_length=512)] = Field(
        description="The record's name: <selector>._domainkey.<domain>."
    )
    record: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None, description="The TXT value to publish there (absent if the key is bad)."
    )
    published: bool = Field(description="Whether DNS answers with a record carrying this key.")
    signing: bool = Field(default=False, description="Whether the relay signs with it now.")


class MailRouteStatus(KubeModel):
    """Observed state of a MailRoute, written by the operator only."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
        description="Accepted, ResolvedRefs, Ready and (for a signing route) DKIMReady conditions.",
    )
    relay: Annotated[str, Field(max_length=253)] | None = Field(
        default=None, description="Name of the MailRelay this route is bound to."
    )
    dkim: list[DkimRecordStatus] = Field(
        default_factory=list,
        max_length=32,
        description="Each DKIM selector's DNS record: where, what to publish, and whether it does.",
    )
