"""The connect-time SSRF guard of HTTP upstreams: every address is checked before a connect.

A URL's host is only a name; what it reaches is decided when it is resolved, and DNS can
answer anything (a webhook's domain pointing at 169.254.169.254, a name that changes between
a check and the connect). So the check lives where aiohttp makes connections:

- ``GuardedResolver``, the connector's resolver, resolves a name itself and refuses it as a
  whole when any address is local (``netguard.local_address_reason``). aiohttp connects to
  the addresses a resolver returns, as numeric addresses, never resolving again; its DNS
  cache only holds answers this resolver gave. TLS still verifies the certificate against
  the URL's host name (aiohttp passes it as ``server_hostname``).
- ``GuardedConnector.connect`` judges hosts that need no resolver: aiohttp skips the
  resolver for IP literals (``127.0.0.1``, ``[::1]``), and the numeric forms the C library
  would turn into an address (``127.1``, ``2130706433``, ``0x7f.1``) are judged by what they
  mean (``socket.inet_aton``) before aiohttp sees them.

A proxy from the environment passes the same guard (its name through the resolver, a
literal through ``connect``); behind it, the endpoint's name is resolved by the proxy.

This module is the only place that relies on how aiohttp's ``TCPConnector`` calls these
two hooks (the resolver is public API; ``connect(req, ...)`` is the connector's entry point
for every request). The version range is pinned in ``pyproject.toml`` and
``tests/providers/test_ssrf.py`` fails on a version outside it and on one where either hook
is bypassed.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from mailrelay.relay import netguard

__all__ = ["SUPPORTED_AIOHTTP", "BlockedDestination", "GuardedResolver", "connector"]

SUPPORTED_AIOHTTP = ("3.14.",)

# What aiohttp's own resolver marks its results with: numeric, so no second lookup.
_NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


class BlockedDestination(Exception):
    """The host is, or resolves to, an address HTTP upstreams may not reach."""


def _refusal(host: str, address: str, reason: str) -> BlockedDestination:
    shown = host if host == address else f"{host!r} (resolved to {address})"
    return BlockedDestination(
        netguard.local_endpoint_message(
            f"refused to connect to {shown}: it is {reason}", "insecure_allow_local_endpoint"
        )
    )


def check_address(host: str, address: str) -> None:
    """Raise ``BlockedDestination`` when ``address`` (what ``host`` means) is local."""
    reason = netguard.local_address_reason(address.partition("%")[0])
    if reason is not None:
        raise _refusal(host, address, reason)


@functools.lru_cache(maxsize=256)
def _numeric_address(host: str) -> str | None:
    """The address a host means without DNS (a literal or a legacy numeric IPv4 form)."""
    try:
        return str(ipaddress.ip_address(host.partition("%")[0]))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def check_numeric_host(host: str) -> None:
    """Refuse a host that is a local address without any lookup; names pass through."""
    address = _numeric_address(host)
    if address is not None:
        check_address(host, address)


class GuardedResolver(AbstractResolver):
    """Resolves, checks every address, and returns only checked numeric addresses."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[ResolveResult]:
        """Every address of ``host``, refused as a whole if any is local.

        A lookup failure stays a ``socket.gaierror`` (aiohttp reports it as a DNS error).
        """
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, family=family
        )
        results: dict[tuple[str, int], ResolveResult] = {}
        for info_family, _, proto, _, sockaddr in infos:
            address, resolved_port = str(sockaddr[0]), int(sockaddr[1])
            check_address(host, address)
            results.setdefault(
                (address, info_family),
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=resolved_port,
                    family=info_family,
                    proto=proto,
                    flags=_NUMERIC_FLAGS,
                ),
            )
        return list(results.values())

    async def close(self) -> None:
        """Nothing to release: lookups run in the loop's default executor."""


class GuardedConnector(aiohttp.TCPConnector):
    """A connector that judges numeric hosts before every request (see the module doc)."""

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's interface
    ) -> Connection:
        """Refuse a local numeric host (the endpoint's, and a proxy's: the connection goes
        there), then get a pooled or new connection as usual."""
        for url in (req.url, req.proxy):
            if url is not None and url.raw_host:
                check_numeric_host(url.raw_host)
        return await super().connect(req, traces, timeout)


def connector(
    *,
    ssl_context: ssl.SSLContext,
    limit: int,
    keepalive_timeout: float,
    allow_local: bool,
) -> aiohttp.TCPConnector:
    """A keep-alive pool of ``limit`` connections that pass the SSRF guard unless
    ``allow_local``."""
    if allow_local:
        return aiohttp.TCPConnector(
            ssl=ssl_context, limit=limit, limit_per_host=0, keepalive_timeout=keepalive_timeout
        )
    return GuardedConnector(
        ssl=ssl_context,
        limit=limit,
        limit_per_host=0,
        keepalive_timeout=keepalive_timeout,
        resolver=GuardedResolver(),
    )
