"""The operator's DKIM decisions: keys from Secrets, TXT records from a real DNS server on
loopback, the DKIMReady condition, the records in status, and the relay config it renders.

The DNS answers come from ``DnsChecker`` asking a dnslib server over UDP (tests/dkimtools);
the decisions are pure (``judge_dkim``, ``judge_routes``), the rendered config is read back
by the relay's own loader, and the chosen key signs mail that dkimpy verifies.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailrelay.operator import models
from mailrelay.operator.conditions import find_condition
from mailrelay.operator.dkim import DnsChecker, KeyFacts, TxtAnswer, judge_dkim, key_facts
from mailrelay.operator.relay_config import (
    build_relay_config,
    render_config_yaml,
    required_secret_keys,
    secret_mounts,
)
from mailrelay.operator.routes import (
    ObjectInfo,
    bound_routes,
    judge_routes,
    route_status,
    write_route_status,
)
from mailrelay.relay import dkim
from mailrelay.relay.config import parse_config
from tests.dkimtools import LoopbackDns, pem_ed25519, pem_rsa, verify_dkimpy

NAME_A = "mail2026a._domainkey.example.com"
NAME_B = "mail2026b._domainkey.example.com"

RELAY_SPEC = models.MailRelaySpec.model_validate(
    {"listener": {"tls": {"secretName": "relay-tls"}}, "auth": {"usersSecretRef": {"name": "u"}}}
)


def _route_spec(**dkim_fields: Any) -> dict[str, Any]:
    domain = {
        "domain": "example.com",
        "active": {"selector": "mail2026a", "secretRef": {"name": "dkim-a"}},
        "next": {"selector": "mail2026b", "secretRef": {"name": "dkim-b", "key": "next.pem"}},
    }
    domain.update(dkim_fields)
    return {
        "relayRef": {"name": "outbound"},
        "upstream": {"smtp": {"host": "smtp.example.net"}},
        "dkim": [domain],
    }


def _encoded(value: bytes) -> str:
    return base64.b64encode(value).decode()


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {"a": pem_rsa(), "b": pem_ed25519()}


@pytest.fixture
def dns_server() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


class Cluster:
    """The Secrets a test has (as the operator's indices would see them)."""

    def __init__(self, secrets: dict[str, dict[str, bytes]]) -> None:
        self.secrets = secrets
        # What the dkim key index keeps: public facts of key-shaped values only.
        self.facts = {
            name: key_facts({k: _encoded(v) for k, v in data.items()})
            for name, data in secrets.items()
        }

    def secret_keys(self, name: str) -> frozenset[str] | None:
        data = self.secrets.get(name)
        return None if data is None else frozenset(data)

    def key(self, secret: str, key: str) -> KeyFacts | None:
        if key not in (self.secret_keys(secret) or ()):
            return None
        return self.facts.get(secret, {}).get(key) or KeyFacts(problem="is not a private key")


def _cluster(keys: dict[str, bytes]) -> Cluster:
    return Cluster({"dkim-a": {"dkim.key": keys["a"]}, "dkim-b": {"next.pem": keys["b"]}})


def _record(pem: bytes) -> str:
    return dkim.txt_record(dkim.parse_private_key(pem))


async def _answers(dns_server: LoopbackDns, spec: models.MailRouteSpec) -> dict[str, TxtAnswer]:
    from mailrelay.operator.dkim import record_names  # noqa: PLC0415

    checker = DnsChecker(dns_server.address, cache_seconds=60)
    return await checker.lookup_all(record_names(spec))


# -- the index keeps public facts only ---------------------------------------------------


def test_index_keeps_public_facts_never_the_key(keys: dict[str, bytes]) -> None:
    facts = key_facts(
        {
            "dkim.key": _encoded(keys["a"]),
            "api_key": _encoded(b"sk_live_not_a_key"),
            "seed": _encoded(base64.b64encode(bytes(range(32)))),
        }
    )
    assert set(facts) == {"dkim.key", "seed"}
    assert facts["dkim.key"].algorithm == "rsa-sha256" and facts["dkim.key"].bits == 2048
    assert facts["seed"].algorithm == "ed25519-sha256"
    private_b64 = _encoded(keys["a"])
    assert private_b64 not in repr(facts) and b"PRIVATE" not in repr(facts).encode()


# -- DNS: a real server on loopback -------------------------------------------------------


async def test_dns_checker_reads_split_records_nxdomain_and_keeps_the_last_answer_on_failure(
    keys: dict[str, bytes],
) -> None:
    record = _record(keys["a"])  # over 255 bytes: served as several strings
    assert len(record) > 255
    now = [0.0]
    with LoopbackDns() as server:
        server.publish(NAME_A, record)
        checker = DnsChecker(
            server.address, cache_seconds=10, timeout_seconds=1, clock=lambda: now[0]
        )
        assert (await checker.txt(NAME_A)).records == (record,)
        assert await checker.txt(NAME_B) == TxtAnswer()  # NXDOMAIN: no records, no error
        server.withdraw(NAME_A)
        assert (await checker.txt(NAME_A)).records == (record,)  # cached
        now[0] = 11
        assert (await checker.txt(NAME_A)).records == ()  # withdrawn, noticed after the cache
        server.publish(NAME_A, record)
        now[0] = 22
        assert (await checker.txt(NAME_A)).records == (record,)
        address = server.address
    # The server is gone: the lookup fails, and the last good answer stands.
    now[0] = 33
    assert (await checker.txt(NAME_A)).records == (record,)
    fresh = DnsChecker(address, timeout_seconds=0.5)
    failed = await fresh.txt(NAME_A)
    assert failed.records == () and failed.error is not None


# -- judging -------------------------------------------------------------------------------


async def test_active_published_signs_with_active_and_is_ready(
    keys: dict[str, bytes], dns_server: LoopbackDns
) -> None:
    spec = models.MailRouteSpec.model_validate(_route_spec())
    dns_server.publish(NAME_A, _record(keys["a"]))
    dns_server.publish(NAME_B, _record(keys["b"]))
    verdict = judge_dkim(spec, _cluster(keys).key, await _answers(dns_server, spec))
    assert verdict is not None and verdict.usable
    assert verdict.condition.status == "True" and verdict.condition.reason == "Published"
    assert [(c.selector, c.secret, c.key) for c in verdict.choices] == [
        ("mail2026a", "dkim-a", "dkim.key")
    ]
    assert [(r["role"], r["published"], r.get("signing", False)) for r in verdict.records] == [
        ("active", True, True),
        ("next", True, False),
    ]


async def test_unpublished_active_falls_back_to_a_published_next(
    keys: dict[str, bytes], dns_server: LoopbackDns
) -> None:
    spec = models.MailRouteSpec.model_validate(_route_spec())
    dns_server.publish(NAME_B, _record(keys["b"]))
    dns_server.publish(NAME_A, _record(pem_rsa()))  # another key: a mismatch
    verdict = judge_dkim(spec, _cluster(keys).key, await _answers(dns_server, spec))
    assert verdict is not None and verdict.usable
    assert [c.selector for c in verdict.choices] == ["mail2026b"]
    assert verdict.condition.status == "False"
    assert verdict.condition.reason == "DNSRecordMismatch"
    assert "none with this key" in verdict.condition.message
    # The exact record to publish, in the message and in the status records.
    assert f"{NAME_A}. IN TXT" in verdict.condition.message
    assert verdict.records[0]["record"] == _record(keys["a"])


async def test_nothing_published_leaves_the_route_out_and_shows_the_txt_to_publish(
    keys: dict[str, bytes], dns_server: LoopbackDns
) -> None:
    spec = models.MailRouteSpec.model_validate(_route_spec())
    verdict = judge_dkim(spec, _cluster(keys).key, await _answers(dns_server, spec))
    assert verdict is not None and not verdict.usable and verdict.choices == ()
    assert (verdict.condition.status, verdict.condition.reason) == ("False", "DNSRecordMissing")
    record = _record(keys["a"])
    chunks = [record[i : i + 250] for i in range(0, len(record), 250)]
    assert " ".join(f'"{c}"' for c in chunks) in verdict.condition.message
    assert "DNS has no record there" in verdict.condition.message
    assert {r["name"]: r["record"] for r in verdict.records} == {
        NAME_A: record,
        NAME_B: _record(keys["b"]),
    }


def _short_rsa() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (b"short", "1024 bits"),
        (b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n", "not a readable PEM"),
        (b"hunter2", "is not a private key"),
    ],
)
async def test_bad_key_is_invalid_and_leaves_the_route_out(
    value: bytes, words: str, keys: dict[str, bytes], dns_server: LoopbackDns
) -> None:
    if value == b"short":
        value = _short_rsa()
    cluster = Cluster({"dkim-a": {"dkim.key": value}, "dkim-b": {"next.pem": keys["b"]}})
    dns_server.publish(NAME_B, _record(keys["b"]))
    spec = models.MailRouteSpec.model_validate(_route_spec())
    verdict = judge_dkim(spec, cluster.key, await _answers(dns_server, spec))
    assert verdict is not None and not verdict.usable
    assert (verdict.condition.status, verdict.condition.reason) == ("False", "DKIMKeyInvalid")
    assert words in verdict.condition.message
    assert "Secret 'dkim-a', key 'dkim.key'" in verdict.condition.message
    assert "hunter2" not in verdict.condition.message


def _info(
    spec: dict[str, Any], name: str = "signed", status: dict[str, Any] | None = None
) -> ObjectInfo:
    return ObjectInfo(
        kind="MailRoute",
        namespace="mail",
        name=name,
        uid=f"uid-{name}",
        generation=1,
        spec=spec,
        status=status or {},
        created="2026-01-01T00:00:00Z",
    )


RELAY = ObjectInfo("MailRelay", "mail", "outbound", "uid-r", 1, created="2026-01-01T00:00:00Z")


def _plain_route() -> dict[str, Any]:
    return {
        "relayRef": {"name": "outbound"},
        "priority": 5,
        "upstream": {"smtp": {"host": "smtp.example.org"}},
    }


async def test_route_left_out_until_dns_matches_then_rendered_with_the_key_mounted(
    keys: dict[str, bytes], dns_server: LoopbackDns, tmp_path: Path
) -> None:
    cluster = _cluster(keys)
    routes = [_info(_route_spec()), _info(_plain_route(), "plain")]
    spec = models.MailRouteSpec.model_validate(_route_spec())

    def judge(answers: dict[str, TxtAnswer]) -> list[Any]:
        return judge_routes(
            RELAY,
            RELAY_SPEC,
            routes,
            cluster.secret_keys,
            dkim_keys=cluster.key,
            dns_answers=answers,
        )

    # Not in DNS: the signing route is out, the other one serves.
    verdicts = judge(await _answers(dns_server, spec))
    by_name = {v.route.name: v for v in verdicts}
    assert not by_name["signed"].included and by_name["plain"].included
    assert by_name["signed"].accepted.reason == "DNSRecordMissing"
    status = route_status(by_name["signed"], relay_name="outbound", relay_ready=True, clock=_clock)
    dkim_ready = find_condition(status["conditions"], "DKIMReady")
    assert dkim_ready is not None and dkim_ready["status"] == "False"
    assert status["dkim"][0]["record"] == _record(keys["a"])
    models.MailRouteStatus.model_validate(status)  # what the CRD's status schema takes
    held = bound_routes(verdicts)
    config = build_relay_config(name="outbound", namespace="mail", spec=RELAY_SPEC, routes=held)
    # Held, not left out: a broader route would otherwise send its mail unsigned.
    assert {r.name: r.held is not None for r in config.routes} == {"plain": False, "signed": True}
    [held_route] = [r for r in config.routes if r.name == "signed"]
    assert held_route.dkim == [] and "DKIM signing for example.com is not ready" in str(
        held_route.held
    )
    assert not any(m.secret_name.startswith("dkim-") for m in secret_mounts(RELAY_SPEC, held))

    # Published: the route goes in, signing with active; both selectors' keys are mounted.
    dns_server.publish(NAME_A, _record(keys["a"]))
    dns_server.publish(NAME_B, _record(keys["b"]))
    verdicts = judge(await _answers(dns_server, spec))
    bound = bound_routes(verdicts)
    assert {b.name for b in bound} == {"signed", "plain"}
    config = build_relay_config(name="outbound", namespace="mail", spec=RELAY_SPEC, routes=bound)
    [signed] = [r for r in config.routes if r.name == "signed"]
    [signing] = signed.dkim
    assert (signing.domain, signing.selector) == ("example.com", "mail2026a")
    mounts = {m.secret_name: m for m in secret_mounts(RELAY_SPEC, bound)}
    assert set(mounts["dkim-a"].files().values()) == {"dkim.key"}
    assert set(mounts["dkim-b"].files().values()) == {"next.pem"}
    assert required_secret_keys(RELAY_SPEC, bound)["dkim-b"] == {"next.pem"}
    assert str(signing.private_key_file) in mounts["dkim-a"].files()

    # The relay reads the rendered config back; laid out like the kubelet mounts the
    # Secrets, the chosen key signs mail that verifies against the published record.
    root = tmp_path / "root"
    for mount in mounts.values():
        for path, key in mount.files().items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(cluster.secrets.get(mount.secret_name, {}).get(key, b""))
    text = render_config_yaml(config).replace("/etc/mailrelay/", f"{root}/etc/mailrelay/")
    loaded = parse_config(text)
    [loaded_route] = [r for r in loaded.routes if r.name == "signed"]
    loaded_key = dkim.parse_private_key(loaded_route.dkim[0].private_key_file.read_bytes())
    message = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    signed_message = dkim.sign_message(
        message, dkim.Signer("example.com", "mail2026a", loaded_key, None)
    )
    assert verify_dkimpy(signed_message, dns_server)

    # Rotation: swap active and next by editing the route; the next pass signs with b.
    swapped = _route_spec(
        active={"selector": "mail2026b", "secretRef": {"name": "dkim-b", "key": "next.pem"}},
        next={"selector": "mail2026a", "secretRef": {"name": "dkim-a"}},
    )
    routes[0] = _info(swapped)
    verdicts = judge(await _answers(dns_server, models.MailRouteSpec.model_validate(swapped)))
    bound = bound_routes(verdicts)
    config = build_relay_config(name="outbound", namespace="mail", spec=RELAY_SPEC, routes=bound)
    [signed] = [r for r in config.routes if r.name == "signed"]
    assert signed.dkim[0].selector == "mail2026b"
    # Same Secrets mounted: the pods reload the config in place, no restart.
    assert {m.volume for m in secret_mounts(RELAY_SPEC, bound)} == {
        m.volume for m in mounts.values()
    }


def _clock() -> Any:
    from datetime import UTC, datetime  # noqa: PLC0415

    return datetime(2026, 12, 8, tzinfo=UTC)


async def test_missing_key_secret_is_a_resolved_refs_problem(
    keys: dict[str, bytes], dns_server: LoopbackDns
) -> None:
    cluster = Cluster({"dkim-a": {"dkim.key": keys["a"]}})  # dkim-b absent
    routes = [_info(_route_spec())]
    [verdict] = judge_routes(
        RELAY, RELAY_SPEC, routes, cluster.secret_keys, dkim_keys=cluster.key, dns_answers={}
    )
    assert not verdict.included
    assert verdict.resolved_refs.reason == "SecretNotFound"
    assert "dkim[0].next.secretRef" in verdict.resolved_refs.message
    assert verdict.dkim is not None and verdict.dkim.condition.status == "Unknown"


async def test_condition_flip_posts_an_event(
    keys: dict[str, bytes], dns_server: LoopbackDns
) -> None:
    cluster = Cluster({"dkim-a": {"dkim.key": _short_rsa()}, "dkim-b": {"next.pem": keys["b"]}})
    [verdict] = judge_routes(
        RELAY,
        RELAY_SPEC,
        [_info(_route_spec())],
        cluster.secret_keys,
        dkim_keys=cluster.key,
        dns_answers={},
    )
    status = route_status(verdict, relay_name="outbound", relay_ready=True, clock=_clock)
    patched: list[Any] = []
    events: list[tuple[str, str, str]] = []

    async def patch_status(*args: Any) -> None:
        patched.append(args)

    def post_event(target: ObjectInfo, type_: str, reason: str, message: str) -> None:
        events.append((type_, reason, message))

    assert await write_route_status(
        verdict, status, patch_status=patch_status, post_event=post_event
    )
    assert ("Warning", "DKIMKeyInvalid") in {(t, r) for t, r, _ in events}
    assert all("PRIVATE" not in m for _, _, m in events)
    await asyncio.sleep(0)
