"""The connect-time SSRF guard of HTTP upstreams: every resolved address is checked.

A URL's host is only a name; what it reaches is decided when it is resolved, and DNS can
answer anything (a webhook's domain pointing at 169.254.169.254, a name that changes between
a check and the connect). So the check lives where the connection is made: a network backend
for httpcore that resolves the host itself, refuses the connection when any address is local
(``netguard.local_address_reason``), and connects to an address it checked, never resolving
again. TLS still verifies the certificate against the URL's host name (httpcore passes it as
``server_hostname``).

This module is the only place that reaches into httpx's private API (``_pool``): an
``httpx.AsyncHTTPTransport`` does not take a network backend. The versions are pinned in
``pyproject.toml`` and ``tests/relay/test_http_guard.py`` fails on a version that moved it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from mailrelay.relay import netguard

SUPPORTED_HTTPCORE = ("1.",)


class BlockedDestination(httpcore.ConnectError):
    """The host resolves to an address HTTP upstreams may not reach."""


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address, then connects to a checked address."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self.inner = inner

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses ``host`` resolves to, refused as a whole if any is local."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except socket.gaierror as error:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {error.strerror}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            reason = netguard.local_address_reason(address.partition("%")[0])
            if reason is not None:
                shown = host if host == address else f"{host!r} (resolved to {address})"
                raise BlockedDestination(
                    netguard.local_endpoint_message(
                        f"refused to connect to {shown}: it is {reason}",
                        "insecure_allow_local_endpoint",
                    )
                )
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):  # the connect timeout covers the lookup too
                addresses = await self.resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        last: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        assert last is not None  # getaddrinfo returns at least one address or raises
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedDestination("HTTP upstreams never connect to Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def transport(
    *, verify: ssl.SSLContext, limits: httpx.Limits, allow_local: bool
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections pass the SSRF guard unless ``allow_local``."""
    made = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
    if not allow_local:
        pool = made._pool
        assert isinstance(pool, httpcore.AsyncConnectionPool)
        pool._network_backend = GuardedBackend(pool._network_backend)
    return made


def blocked(error: BaseException) -> BlockedDestination | None:
    """The guard's refusal behind an httpx error (httpx re-raises it as ConnectError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, BlockedDestination):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
