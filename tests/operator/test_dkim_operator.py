"""DKIMReady for real: the operator process, a real kube-apiserver, a DNS server on loopback.

The operator runs with ``MAILRELAY_OPERATOR_DNS_RESOLVER`` pointing at a dnslib server the
test publishes records on. A signing route stays out of the relay's ConfigMap, with the TXT
record to publish in its status, until DNS answers with it; then it goes in, signing with
its active selector. A route whose key is too short gets DKIMKeyInvalid and a Warning
Event, while the other routes keep their place in the config.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailrelay.operator.models import API_VERSION
from mailrelay.relay import dkim
from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import (
    OperatorProcess,
    apply,
    condition,
    get,
    running_operator,
    wait_for,
)
from tests.dkimtools import LoopbackDns, pem_rsa
from tests.operator import manifests as m

pytestmark = pytest.mark.kube


@pytest.fixture
def dns_server() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def dkim_operator(
    crds: LocalKube, operator_kubeconfig: Path, dns_server: LoopbackDns, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """An operator of its own (namespaces dkim-*) asking the loopback DNS server."""
    env = {
        "MAILRELAY_OPERATOR_DNS_RESOLVER": dns_server.address,
        "MAILRELAY_OPERATOR_DKIM_DNS_CACHE_SECONDS": "0.5",
    }
    with running_operator(
        crds,
        operator_kubeconfig,
        "--standalone",
        "--namespace",
        "dkim-*",
        "--resync-seconds",
        "1",
        log_path=tmp_path / "operator.log",
        env=env,
    ) as process:
        yield process


def _signing_route(name: str, secret: str, senders: list[str]) -> dict[str, Any]:
    route = m.smtp_route(name, senders=senders, credentials=None)
    route["spec"]["dkim"] = [
        {
            "domain": "example.com",
            "active": {"selector": f"{name}-a", "secretRef": {"name": secret}},
        }
    ]
    return route


def _relay_config(kube: LocalKube, ns: str) -> dict[str, Any]:
    config = get(kube, "configmap", "outbound-config", ns)
    assert config is not None
    loaded = yaml.safe_load(config["data"]["relay.yaml"])
    assert isinstance(loaded, dict)
    return loaded


def _route_names(kube: LocalKube, ns: str) -> set[str]:
    config = get(kube, "configmap", "outbound-config", ns)
    if config is None:
        return set()
    return {r["name"] for r in yaml.safe_load(config["data"]["relay.yaml"])["routes"]}


def _held(kube: LocalKube, ns: str) -> set[str] | None:
    config = get(kube, "configmap", "outbound-config", ns)
    if config is None:
        return None
    routes = yaml.safe_load(config["data"]["relay.yaml"])["routes"]
    return {r["name"] for r in routes if r.get("held")}


def _warnings(kube: LocalKube, ns: str, name: str) -> dict[str, str]:
    result = kube.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    items = json.loads(result.stdout)["items"]
    return {e["reason"]: e["message"] for e in items if e["type"] == "Warning"}


def _dkim_ready(kube: LocalKube, ns: str, name: str) -> tuple[str, str] | None:
    found = condition(get(kube, "mailroute", name, ns), "DKIMReady")
    return None if found is None else (found["status"], found["reason"])


def test_route_signs_only_once_dns_publishes_its_key_and_a_bad_key_is_reported(
    crds: LocalKube, dkim_operator: OperatorProcess, dns_server: LoopbackDns
) -> None:
    kube = crds
    ns = kube.create_namespace(f"dkim-e2e-{secrets.token_hex(3)}")
    pem = pem_rsa()
    record = dkim.txt_record(dkim.parse_private_key(pem))
    apply(
        kube,
        ns,
        m.tls_secret(),
        m.users_secret(),
        m.secret("dkim-key", {"dkim.key": pem.decode()}),
        m.relay(),
        m.smtp_route("plain", senders=["other.example"], credentials=None),
        _signing_route("news", "dkim-key", ["news.example.com"]),
    )

    # Not published: the route is out of the config, its status says what to publish.
    wait_for(
        lambda: _dkim_ready(kube, ns, "news") == ("False", "DNSRecordMissing"),
        what="DKIMReady=False DNSRecordMissing",
        timeout=60,
    )
    route = get(kube, "mailroute", "news", ns)
    assert route is not None
    [entry] = route["status"]["dkim"]
    assert entry == {
        "domain": "example.com",
        "selector": "news-a",
        "role": "active",
        "name": "news-a._domainkey.example.com",
        "record": record,
        "published": False,
        "signing": False,
    }
    accepted = condition(route, "Accepted")
    assert accepted is not None and accepted["status"] == "False"
    assert "news-a._domainkey.example.com. IN TXT" in accepted["message"]
    wait_for(lambda: _held(kube, ns) == {"news"}, what="the signing route rendered held")
    wait_for(
        lambda: "DNSRecordMissing" in _warnings(kube, ns, "news"),
        what="a DNSRecordMissing Warning Event",
    )

    # Published: within the cache period and a resync, it signs with the active selector.
    dns_server.publish("news-a._domainkey.example.com", record)
    wait_for(
        lambda: _dkim_ready(kube, ns, "news") == ("True", "Published"),
        what="DKIMReady=True once DNS has the record",
        timeout=60,
    )
    wait_for(
        lambda: _held(kube, ns) == set() and _route_names(kube, ns) == {"plain", "news"},
        what="the route rendered, no longer held",
    )
    # Settled: passes every second (resync, DNS re-checked) write nothing more.
    version = _version(kube, ns, "news")
    time.sleep(4)
    assert _version(kube, ns, "news") == version
    [news] = [r for r in _relay_config(kube, ns)["routes"] if r["name"] == "news"]
    assert [(d["domain"], d["selector"]) for d in news["dkim"]] == [("example.com", "news-a")]
    statefulset = get(kube, "statefulset", "outbound", ns)
    assert statefulset is not None
    volumes = statefulset["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("secret", {}).get("secretName") == "dkim-key" for v in volumes)

    # A 1024-bit key: invalid, reported, left out; the other routes keep serving.
    short = m.secret("short-key", {"dkim.key": _short_key()})
    apply(kube, ns, short, _signing_route("weak", "short-key", ["weak.example.com"]))
    wait_for(
        lambda: _dkim_ready(kube, ns, "weak") == ("False", "DKIMKeyInvalid"),
        what="DKIMReady=False DKIMKeyInvalid",
        timeout=60,
    )
    found = condition(get(kube, "mailroute", "weak", ns), "DKIMReady")
    assert found is not None
    message = found["message"]
    assert "1024 bits" in message and "Secret 'short-key', key 'dkim.key'" in message
    assert "PRIVATE KEY" not in message
    wait_for(
        lambda: "DKIMKeyInvalid" in _warnings(kube, ns, "weak"),
        what="a DKIMKeyInvalid Warning Event",
    )
    assert _route_names(kube, ns) == {"plain", "news", "weak"} and _held(kube, ns) == {"weak"}
    assert API_VERSION.startswith("mailrelay.dev/")


def _short_key() -> str:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _version(kube: LocalKube, ns: str, name: str) -> str:
    route = get(kube, "mailroute", name, ns)
    assert route is not None
    return str(route["metadata"]["resourceVersion"])
