"""DKIM through the raw-MIME providers: the stand-in receives the exact signed bytes.

Mail is submitted to an in-process relay whose route signs and sends to a provider
stand-in (tests/providers/servers.py); the bytes the stand-in recorded are verified with
dkimpy and OpenDKIM against a DNS server on loopback. The JSON providers cannot carry a
signature: a signing route towards one is refused, and every provider's transport agrees
with the rule's list.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from mailrelay.relay import dkim, upstream_rules
from mailrelay.relay.upstreams.providers.registry import transport_class
from mailrelay.support.provider_servers import ProviderServer, raw_sent
from tests.dkimtools import DkimEnv, assert_verifies, dkim_dns_server, pem_rsa
from tests.providers.conftest import JSON_PROVIDERS, RAW_PROVIDERS, upstream_fields
from tests.relay.conftest import USERS, RelayFactory
from tests.relay.test_dkim import dot_lines, eight_bit, long_headers, multipart

ServerFactory = Callable[[str], Awaitable[ProviderServer]]
ALICE = ("alice", USERS["alice"])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[DkimEnv]:
    with dkim_dns_server() as server:
        yield DkimEnv(server, tmp_path)


def test_self_signing_providers_are_exactly_those_that_rebuild_the_message() -> None:
    assert set(upstream_rules.SELF_SIGNING_PROVIDERS) == set(JSON_PROVIDERS)
    assert set(upstream_rules.PROVIDERS) == set(JSON_PROVIDERS) | set(RAW_PROVIDERS)
    for provider in upstream_rules.PROVIDERS:
        raw = transport_class(provider).sends_raw_message
        assert raw is (provider not in upstream_rules.SELF_SIGNING_PROVIDERS), provider


@pytest.mark.parametrize("provider", ["mailgun", "ses", "sparkpost"])
async def test_raw_provider_receives_the_signed_bytes(
    provider: str,
    env: DkimEnv,
    provider_server: ServerFactory,
    credentials_dir: Path,
    relay_factory: RelayFactory,
) -> None:
    pem = pem_rsa()
    env.dns.publish("s2026._domainkey.example.com", dkim.txt_record(dkim.parse_private_key(pem)))
    key_file = env.key_file("dkim.key", pem)
    server = await provider_server(provider)
    route = {
        "name": f"via-{provider}",
        "upstream": upstream_fields(provider, server, credentials_dir),
        "dkim": [{"domain": "example.com", "selector": "s2026", "private_key_file": str(key_file)}],
    }
    relay = await relay_factory(routes=[route])
    messages = [eight_bit(), multipart(), long_headers(), dot_lines()]
    async with relay.client(login=ALICE) as smtp:
        for data in messages:
            errors, _ = await smtp.sendmail(
                "alice@example.com", ["bob@example.org"], data, mail_options=["BODY=8BITMIME"]
            )
            assert dict(errors) == {}
    deadline = time.monotonic() + 15
    while len(server.sent) < len(messages):
        assert time.monotonic() < deadline, f"{provider} got {len(server.sent)} message(s)"
        await asyncio.sleep(0.02)
    for request in server.sent:
        data, recipients = raw_sent(provider, request)
        assert recipients == ["bob@example.org"]
        assert data.startswith(b"DKIM-Signature: ")
        assert any(data.endswith(m) for m in messages)
        print(f"{provider}: {assert_verifies(data, env.dns)}")
