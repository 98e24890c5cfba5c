"""One DKIM provider rule, three judges: the operator's model, the relay's config model and
the CRD's CEL rule agree on which routes may sign.

Every provider as the upstream or as a fallback, with and without ``dkim``: the operator's
``MailRouteSpec``, the relay's ``RouteConfig`` (the same upstreams as the operator renders
them) and the real kube-apiserver (server dry run) accept exactly the same routes, and refuse
the others with the same words (``upstream_rules.Messages.dkim_self_signing``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from mailrelay.operator import models, relay_config
from mailrelay.operator.crdgen import build_crds, crd_filename
from mailrelay.relay import config as relay
from mailrelay.relay import upstream_rules
from mailrelay.support.localkube import LocalKube
from tests.crd.cases import CRD_DIR

PROVIDER_FIELDS: dict[str, dict[str, Any]] = {
    "mailgun": {"domain": "mg.example.com"},
    "ses": {"region": "eu-west-1"},
    "webhook": {"endpoint": "https://hooks.example.com/in"},
}
DKIM = [{"domain": "example.com", "active": {"selector": "s1", "secretRef": {"name": "dkim"}}}]
SMTP = {"smtp": {"host": "smtp.example.net"}}
WORDS = upstream_rules.messages().dkim_self_signing


def _api(provider: str) -> dict[str, Any]:
    return {
        "api": {
            "provider": provider,
            "credentialsSecretRef": {"name": "creds"},
            **PROVIDER_FIELDS.get(provider, {}),
        }
    }


CASES = [
    (provider, position, signs)
    for provider in upstream_rules.PROVIDERS
    for position in ("upstream", "fallback")
    for signs in (True, False)
]


def _spec(provider: str, position: str, signs: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"relayRef": {"name": "outbound"}}
    if position == "upstream":
        spec["upstream"] = _api(provider)
    else:
        spec["upstream"] = SMTP
        spec["fallbacks"] = [_api(provider)]
    if signs:
        spec["dkim"] = DKIM
    return spec


def _operator(spec: dict[str, Any]) -> str | None:
    try:
        models.MailRouteSpec.model_validate(spec)
    except ValidationError as error:
        return str(error)
    return None


def _relay(spec: dict[str, Any]) -> str | None:
    """The relay's verdict on the route with the upstreams as the operator renders them."""
    upstreams = [models.Upstream.model_validate(spec["upstream"])] + [
        models.Upstream.model_validate(u) for u in spec.get("fallbacks", [])
    ]
    rendered = [relay_config._upstream_config("r", i, u) for i, u in enumerate(upstreams)]
    route: dict[str, Any] = {"name": "r", "upstream": rendered[0], "fallbacks": rendered[1:]}
    if "dkim" in spec:
        route["dkim"] = [{"domain": "example.com", "selector": "s1", "private_key_file": "/k"}]
    try:
        relay.RouteConfig.model_validate(route)
    except ValidationError as error:
        return str(error)
    return None


@pytest.mark.parametrize(("provider", "position", "signs"), CASES)
def test_operator_and_relay_agree(provider: str, position: str, signs: bool) -> None:
    spec = _spec(provider, position, signs)
    refused = signs and provider in upstream_rules.SELF_SIGNING_PROVIDERS
    operator, relay_verdict = _operator(spec), _relay(spec)
    assert (operator is not None) is refused, operator
    assert (relay_verdict is not None) is refused, relay_verdict
    if refused:
        assert operator is not None and WORDS in operator
        assert relay_verdict is not None and WORDS in relay_verdict


@pytest.fixture(scope="module")
def crds(kube: LocalKube) -> LocalKube:
    kube.install_crds([CRD_DIR / crd_filename(crd) for crd in build_crds()])
    return kube


@pytest.fixture(scope="module")
def namespace(crds: LocalKube) -> Iterator[str]:
    name = crds.create_namespace("t-dkim-rules")
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.kube
def test_api_server_agrees(crds: LocalKube, namespace: str) -> None:
    items = [
        {
            "apiVersion": models.API_VERSION,
            "kind": "MailRoute",
            "metadata": {"name": f"dkim-{index:02d}"},
            "spec": _spec(*case),
        }
        for index, case in enumerate(CASES)
    ]
    result = crds.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        check=False,
    )
    accepted = set(re.findall(r"mailroute\.mailrelay\.dev/(dkim-\d+) created", result.stdout))
    errors = {
        name: line
        for line in result.stderr.splitlines()
        for name in re.findall(r'"(dkim-\d+)" is invalid', line)
    }
    for index, (provider, position, signs) in enumerate(CASES):
        name = f"dkim-{index:02d}"
        refused = signs and provider in upstream_rules.SELF_SIGNING_PROVIDERS
        assert (name in errors) is refused, (provider, position, signs, result.stderr[-1000:])
        assert (name in accepted) is not refused
        if refused:
            assert WORDS[:60] in errors[name], errors[name]
