"""Fair share per client address (Postfix's anvil): pure bookkeeping, no I/O.

The SMTP front asks `ClientLimiter` at three moments and acts on the answer:

* `admit(ip)` when a connection arrives: refused if the client already holds
  `max_connections`, has opened more than `connection_rate_per_minute` lately, or is blocked
  for AUTH failures. An admitted connection is counted until `release(key)`.
* `auth_blocked(ip)` before a password is checked, and `auth_failed(ip)` after a wrong one:
  more than `auth_failures` failures within the window block the client (every session
  from it, new and open) until the oldest failure leaves the window.

A client is an IPv4 address (an IPv4-mapped IPv6 address counts as its IPv4 address), or
the IPv6 network of `ipv6_prefix_length` bits around an IPv6 address: one host or site
on the internet owns a whole /64. Clients in `exempt_networks` are never tracked.

Memory is bounded: a client's entry is dropped as soon as it holds no connection, its
rate bucket is full again and no AUTH failure is left in the window (an idle entry holds
nothing a new one would not), checked a few entries at a time in least-recently-used
order; beyond `max_tracked` entries the least recently seen ones without a connection
are dropped even if not idle. Connections per client are bounded by the front's
`max_connections`, so live entries are too.

The clock is injected so tests move time by hand; `configure` applies a reload and keeps
the counts (a reload cannot be used to reset them), except rate buckets whose rate changed.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from mailrelay.relay.config import ClientLimitsConfig
from mailrelay.relay.ratelimit import TokenBucket

__all__ = [
    "CLIENT_LIMIT_REASONS",
    "MAX_TRACKED_CLIENTS",
    "Admission",
    "ClientLimiter",
    "Refusal",
    "client_key",
]

RefusalReason = Literal["connections", "connection_rate", "auth_failures"]
CLIENT_LIMIT_REASONS: Final[tuple[RefusalReason, ...]] = (
    "connections",
    "connection_rate",
    "auth_failures",
)
MAX_TRACKED_CLIENTS: Final = 16_384
# Entries looked at per call for idleness: enough to keep up with any arrival rate, since
# every call adds at most one entry.
_PRUNE_STEPS: Final = 4


@dataclass(frozen=True)
class Refusal:
    """Why a client is refused, and when it may try again (0: when a connection ends)."""

    reason: RefusalReason
    retry_after: float

    def reply(self, hostname: str, client: str) -> str:
        """The 421 reply (RFC 5321 4.2.3: the server closes the channel after it)."""
        what = {
            "connections": "too many connections",
            "connection_rate": "too many connections per minute",
            "auth_failures": "too many authentication failures",
        }[self.reason]
        text = f"421 4.7.0 {hostname} Error: {what} from {client}"
        if self.retry_after > 0:
            text += f", try again in {max(1, round(self.retry_after))} seconds"
        return text


@dataclass(frozen=True)
class Admission:
    """The answer to a new connection: the key to `release` later, or a refusal.

    `key` is None for a refused or exempt client (nothing to release).
    """

    key: str | None
    refusal: Refusal | None = None


class _Client:
    __slots__ = ("auth_failures", "bucket", "connections")

    def __init__(self) -> None:
        self.connections = 0
        self.bucket: TokenBucket | None = None
        self.auth_failures: list[float] = []  # newest last, at most `auth_failures` kept


@functools.lru_cache(maxsize=4096)  # parsing an IPv6 address costs tens of microseconds
def client_key(ip: str, ipv6_prefix_length: int) -> str | None:
    """The client an address belongs to (`203.0.113.9`, `2001:db8:1:2::/64`), or None for
    something that is not an IP address (a Unix socket peer)."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, ipv6_prefix_length), strict=False)
        return str(network)
    return str(address)


class ClientLimiter:
    """Per-client counters for connections, connection rate and AUTH failures."""

    def __init__(
        self,
        limits: ClientLimitsConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self._clock = clock
        self._max_tracked = max_tracked
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self.limits = limits
        self._exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        self.configure(limits)

    def __len__(self) -> int:
        return len(self._clients)

    def configure(self, limits: ClientLimitsConfig) -> None:
        """Adopt reloaded limits; counts carry over (rate buckets restart if the rate changed)."""
        old = self.limits
        self.limits = limits
        self._exempt = tuple(limits.exempt_networks)
        if limits.connection_rate_per_minute != old.connection_rate_per_minute:
            for client in self._clients.values():
                client.bucket = None
        if limits.auth_failures < old.auth_failures:
            for client in self._clients.values():
                del client.auth_failures[: max(0, len(client.auth_failures) - limits.auth_failures)]

    # -- queries and events -------------------------------------------------------------

    def key_for(self, ip: str) -> str | None:
        """The tracked client key of `ip`, or None when exempt (or not an IP address)."""
        key = client_key(ip, self.limits.ipv6_prefix_length)
        if key is None or self._is_exempt(ip):
            return None
        return key

    def admit(self, ip: str) -> Admission:
        """A new connection from `ip`: count it, or say why not."""
        key = self.key_for(ip)
        if key is None:
            return Admission(None)
        now = self._clock()
        self._prune(now)
        limits = self.limits
        client = self._touch(key)
        refusal = self._auth_refusal(client, now)
        if refusal is None and 0 < limits.max_connections <= client.connections:
            refusal = Refusal("connections", 0.0)
        if refusal is None and limits.connection_rate_per_minute > 0:
            rate = limits.connection_rate_per_minute
            if client.bucket is None:
                client.bucket = TokenBucket(rate / 60.0, rate, clock=self._clock)
            if not client.bucket.try_acquire():
                refusal = Refusal("connection_rate", client.bucket.seconds_until())
        if refusal is not None:
            return Admission(None, refusal)
        client.connections += 1
        return Admission(key)

    def release(self, key: str | None) -> None:
        """A connection admitted under `key` ended."""
        if key is None:
            return
        client = self._clients.get(key)
        if client is not None and client.connections > 0:
            client.connections -= 1

    def auth_blocked(self, ip: str) -> Refusal | None:
        """Whether `ip` is blocked for AUTH failures now (checked before each AUTH)."""
        key = self.key_for(ip)
        client = self._clients.get(key) if key is not None else None
        return None if client is None else self._auth_refusal(client, self._clock())

    def auth_failed(self, ip: str) -> Refusal | None:
        """Record a failed AUTH; the refusal if this failure reached the limit."""
        limit = self.limits.auth_failures
        key = self.key_for(ip)
        if key is None or limit == 0:
            return None
        now = self._clock()
        self._prune(now)
        client = self._touch(key)
        failures = client.auth_failures
        failures.append(now)
        del failures[: max(0, len(failures) - limit)]
        return self._auth_refusal(client, now)

    # -- internals ----------------------------------------------------------------------

    def _is_exempt(self, ip: str) -> bool:
        if not self._exempt:
            return False
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._exempt)

    def _auth_refusal(self, client: _Client, now: float) -> Refusal | None:
        limit = self.limits.auth_failures
        failures = client.auth_failures
        if limit == 0 or len(failures) < limit:
            return None
        # The `limit` newest failures are kept: blocked while the oldest is in the window.
        ends = failures[-limit] + self.limits.auth_failure_window_seconds
        return Refusal("auth_failures", ends - now) if ends > now else None

    def _touch(self, key: str) -> _Client:
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client()
        else:
            self._clients.move_to_end(key)
        return client

    def _idle(self, client: _Client, now: float) -> bool:
        if client.connections:
            return False
        if client.bucket is not None and client.bucket.tokens < client.bucket.burst:
            return False
        window = self.limits.auth_failure_window_seconds
        return not client.auth_failures or client.auth_failures[-1] + window <= now

    def _prune(self, now: float) -> None:
        clients = self._clients
        for _ in range(_PRUNE_STEPS):
            if not clients:
                return
            key, client = next(iter(clients.items()))
            if self._idle(client, now):
                del clients[key]
            else:
                clients.move_to_end(key)
        # Over the bound (many distinct clients at once): forget the least recently seen
        # ones without a connection, even if that forgets their rate or failures.
        while len(clients) >= self._max_tracked:
            victim = next((k for k, c in clients.items() if c.connections == 0), None)
            if victim is None:
                return
            del clients[victim]
