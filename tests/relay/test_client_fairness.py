"""Fair share per client address (like Postfix's anvil), on a real relay over loopback.

Distinct loopback addresses are distinct clients: 127.0.0.2 floods or guesses passwords,
127.0.0.3 is the innocent neighbour that must still be served.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiosmtplib
import pytest

from tests.relay.conftest import RelayFactory, RelayHandle
from tests.relay.test_smtp_accept import ALICE, accept_only, message

FLOODER, NEIGHBOUR = "127.0.0.2", "127.0.0.3"
REFUSALS = "mailrelay_client_limit_refusals_total"


async def greeting_from(relay: RelayHandle, source: str) -> tuple[bytes, asyncio.StreamWriter]:
    """Connect from `source` and read the greeting; the writer keeps the socket open."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", relay.smtp_port, local_addr=(source, 0)
    )
    return await asyncio.wait_for(reader.readline(), 5), writer


@contextlib.asynccontextmanager
async def client_from(
    relay: RelayHandle, source: str, login: tuple[str, str] | None = None
) -> AsyncIterator[aiosmtplib.SMTP]:
    assert relay.ca_file is not None
    context = ssl.create_default_context(cafile=str(relay.ca_file))
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.smtp_port,
        source_address=(source, 0),
        start_tls=False,
        tls_context=context,
        timeout=10,
        local_hostname="client.test",
    )
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.starttls(tls_context=context)
        await smtp.ehlo()
        if login is not None:
            await smtp.login(*login)
        yield smtp
    finally:
        with contextlib.suppress(Exception):
            await smtp.quit()
        smtp.close()


async def sends_mail(relay: RelayHandle, source: str) -> bool:
    async with client_from(relay, source, login=ALICE) as smtp:
        errors, _ = await smtp.sendmail("a@example.com", ["b@d.test"], message())
    return errors == {}


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()


async def test_a_flood_from_one_address_leaves_another_client_served(
    relay_factory: RelayFactory,
) -> None:
    """The default per-client limit (50) keeps one address from taking every slot."""
    relay = await accept_only(relay_factory, limits={"max_connections": 60})
    greetings, writers = [], []
    try:
        for _ in range(60):
            greeting, writer = await greeting_from(relay, FLOODER)
            greetings.append(greeting)
            writers.append(writer)
        assert sum(g.startswith(b"220 ") for g in greetings) == 50
        refused = [g for g in greetings if not g.startswith(b"220 ")]
        assert (
            refused == [b"421 4.7.0 relay.test Error: too many connections from 127.0.0.2\r\n"] * 10
        )
        assert await sends_mail(relay, NEIGHBOUR)
    finally:
        close_all(writers)
    assert relay.metric(REFUSALS, {"reason": "connections"}) == 10
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "client_limit"}) == 10


async def test_connection_rate_per_client(relay_factory: RelayFactory) -> None:
    relay = await accept_only(
        relay_factory, limits={"per_client": {"connection_rate_per_minute": 3}}
    )
    for _ in range(3):
        greeting, writer = await greeting_from(relay, FLOODER)
        assert greeting.startswith(b"220 ")
        writer.close()
    greeting, writer = await greeting_from(relay, FLOODER)
    writer.close()
    assert greeting.startswith(b"421 4.7.0 relay.test Error: too many connections per minute")
    assert b"try again in 20 seconds" in greeting
    assert await sends_mail(relay, NEIGHBOUR)
    assert relay.metric(REFUSALS, {"reason": "connection_rate"}) == 1


async def test_auth_failures_across_sessions_block_the_client(relay_factory: RelayFactory) -> None:
    """Per-session throttling alone let 50 guesses through in under a minute; the default
    allows 10 failures per client in 5 minutes, however many sessions they come in."""
    relay = await accept_only(relay_factory)
    async with client_from(relay, FLOODER) as waiting:  # opened before the block
        for _ in range(4):
            async with client_from(relay, FLOODER) as guessing:
                for _ in range(2):
                    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                        await guessing.auth_plain("alice", "guess")
        async with client_from(relay, FLOODER) as last:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await last.auth_plain("alice", "guess")
            with pytest.raises(aiosmtplib.SMTPResponseException) as blocked:
                await last.auth_plain("alice", "guess")
            assert blocked.value.code == 421
            assert blocked.value.message.startswith(
                "4.7.0 relay.test Error: too many authentication failures from 127.0.0.2"
            )
        # Even the right password is not checked for a blocked client.
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await waiting.auth_plain(*ALICE)
        assert refused.value.code == 421
    greeting, writer = await greeting_from(relay, FLOODER)
    writer.close()
    assert greeting.startswith(b"421 4.7.0 relay.test Error: too many authentication failures")
    assert b"try again in 29" in greeting  # when the oldest failure leaves the 300 s window
    assert await sends_mail(relay, NEIGHBOUR)
    assert relay.metric("mailrelay_smtp_auth_failures_total") == 10
    assert relay.metric(REFUSALS, {"reason": "auth_failures"}) == 3


async def test_trusted_networks_are_exempt(relay_factory: RelayFactory) -> None:
    relay = await accept_only(
        relay_factory,
        limits={"per_client": {"max_connections": 2, "exempt_networks": [f"{FLOODER}/32"]}},
    )
    writers = []
    try:
        for _ in range(5):
            greeting, writer = await greeting_from(relay, FLOODER)
            writers.append(writer)
            assert greeting.startswith(b"220 ")
        for _ in range(2):
            greeting, writer = await greeting_from(relay, NEIGHBOUR)
            writers.append(writer)
            assert greeting.startswith(b"220 ")
        greeting, writer = await greeting_from(relay, NEIGHBOUR)
        writers.append(writer)
        assert greeting.startswith(b"421 4.7.0")
    finally:
        close_all(writers)


async def wait_reloads(relay: RelayHandle, count: int) -> None:
    name = "mailrelay_config_reloads_total"
    for _ in range(200):
        if relay.metric(name, {"result": "success"}) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the relay did not reload its config")


def config_with(relay: RelayHandle, per_client: dict[str, Any]) -> dict[str, Any]:
    data = relay.config.model_dump(mode="json", exclude_none=True)
    data["limits"]["per_client"] = per_client
    return data


async def test_limits_follow_a_hot_reload(relay_factory: RelayFactory) -> None:
    relay = await accept_only(relay_factory, limits={"per_client": {"max_connections": 10}})
    writers = []
    try:
        for _ in range(3):
            greeting, writer = await greeting_from(relay, FLOODER)
            writers.append(writer)
            assert greeting.startswith(b"220 ")
        # Lowered below what the client holds: its open sessions count against it.
        relay.write_config(config_with(relay, {"max_connections": 2}))
        await wait_reloads(relay, 1)
        greeting, writer = await greeting_from(relay, FLOODER)
        writers.append(writer)
        assert greeting.startswith(b"421 4.7.0")
        relay.write_config(
            config_with(relay, {"max_connections": 2, "exempt_networks": ["127.0.0.0/30"]})
        )
        await wait_reloads(relay, 2)
        greeting, writer = await greeting_from(relay, FLOODER)
        writers.append(writer)
        assert greeting.startswith(b"220 ")
    finally:
        close_all(writers)
    assert await sends_mail(relay, NEIGHBOUR)


async def test_implicit_tls_port_refuses_over_limit_before_the_handshake(
    relay_factory: RelayFactory,
) -> None:
    relay = await accept_only(
        relay_factory,
        listener={"implicit_tls_port": 0},
        limits={"per_client": {"max_connections": 1}},
    )
    assert relay.implicit_tls_port is not None and relay.ca_file is not None
    context = ssl.create_default_context(cafile=str(relay.ca_file))
    held = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.implicit_tls_port,
        source_address=(FLOODER, 0),
        use_tls=True,
        tls_context=context,
        timeout=10,
    )
    await held.connect()
    try:
        # The second connection from the same client is closed at once: no TLS, no reply.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.implicit_tls_port, local_addr=(FLOODER, 0)
        )
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert relay.metric(REFUSALS, {"reason": "connections"}) == 1
        other = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=relay.implicit_tls_port,
            source_address=(NEIGHBOUR, 0),
            use_tls=True,
            tls_context=context,
            timeout=10,
        )
        await other.connect()
        assert (await other.noop()).code == 250
        await other.quit()
    finally:
        with contextlib.suppress(Exception):
            await held.quit()
        held.close()
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "tls_handshake"}) == 0
