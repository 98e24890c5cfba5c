"""The relay listens on IPv4 and IPv6 with the listener address the operator renders.

A pod may be IPv4-only, IPv6-only or dual-stack; the operator renders one config for all of
them, so the relay must bind every address of both families from it. `0.0.0.0` (the old
rendering) leaves IPv6 clients and kubelet's IPv6 probes unanswered; `::` alone would drop
IPv4 because asyncio sets IPV6_V6ONLY.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket

import pytest

from mailrelay.operator import models
from mailrelay.operator.relay_config import build_relay_config
from tests.relay.conftest import RelayFactory, http_get

SPEC = models.MailRelaySpec.model_validate(
    {"listener": {"port": 587}, "auth": {"required": False}, "allowedNetworks": ["10.0.0.0/8"]}
)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _port_free_on_both_families() -> int:
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as probe6:
            probe6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe6.bind(("::", port))
            return port
    raise RuntimeError("no port free on both families")


async def _greeting(host: str, port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_relay_serves_both_families_from_the_rendered_listener(
    relay_factory: RelayFactory,
) -> None:
    rendered = build_relay_config(name="outbound", namespace="mail", spec=SPEC, routes=[])
    # Fixed ports (port 0 would give each family its own); another process may take one
    # between the probe and the bind, so pick again then.
    for attempt in range(5):
        smtp_port, health_port = _port_free_on_both_families(), _port_free_on_both_families()
        if smtp_port == health_port:
            continue
        try:
            await relay_factory(
                listener={"host": rendered.listener.host, "submission_port": smtp_port},
                metrics={"host": rendered.metrics.host, "port": health_port},
            )
            break
        except OSError as error:
            if error.errno != errno.EADDRINUSE or attempt == 4:
                raise
    for host in ("127.0.0.1", "::1"):
        assert (await _greeting(host, smtp_port)).startswith(b"220 "), host
        status, _ = await http_get(host, health_port, "/readyz")
        assert status == 200, host
