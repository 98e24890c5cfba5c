"""Which networks count as private, and which addresses an HTTP upstream must not reach.

The one source of truth for two rules that the API server (CEL rules the operator derives
from these tuples), the operator (its pydantic models) and the relay (config validation and
the connect-time check) all apply:

* **Open relay.** ``allowed_networks`` skip AUTH. A network that reaches beyond
  ``PRIVATE_NETWORKS`` lets internet clients send without a password, so it needs an explicit
  acknowledgement (``is_private_network``).
* **SSRF.** An HTTP upstream (a provider endpoint, a webhook) must not reach the relay pod
  itself, the node or the cloud's metadata service unless explicitly allowed: loopback,
  link-local, unspecified addresses and the metadata services' addresses and names
  (``local_address_reason``, ``local_host_reason``). Private ranges (10/8, ...) stay
  allowed: in-cluster webhooks live there.

The relay applies the SSRF rule to every address a host name resolves to, at connect time
(DNS can point anywhere, and change between a check and a connect); the API server and the
models can only refuse literal addresses and the known names.
"""

from __future__ import annotations

import ipaddress
from typing import Final

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Networks from which a client may send without AUTH without an acknowledgement: RFC 1918,
# carrier-grade NAT (RFC 6598; pod networks often live there), loopback, link-local,
# unique-local IPv6 (RFC 4193). Everything else is reachable from the internet.
PRIVATE_NETWORKS: Final[tuple[str, ...]] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "fc00::/7",
    "::1/128",
    "fe80::/10",
)

# Addresses an HTTP upstream must not connect to without an explicit allowance, each with
# what it is (the reason in the refusal).
LOCAL_NETWORKS: Final[tuple[tuple[str, str], ...]] = (
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("169.254.0.0/16", "link-local (cloud metadata lives at 169.254.169.254)"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::254/128", "the AWS metadata service"),
    ("fd20:ce::254/128", "the Google Cloud metadata service"),
    ("100.100.100.200/32", "the Alibaba Cloud metadata service"),
)
# Names that always mean this machine or a metadata service; ``*.localhost`` too (RFC 6761).
LOCAL_HOST_NAMES: Final[tuple[str, ...]] = (
    "localhost",
    "metadata.google.internal",
    "metadata.goog",
)
LOCAL_NAME_SUFFIX: Final = ".localhost"


def _unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:127.0.0.1`` is 127.0.0.1 to the kernel; judge it as such."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_private_network(network: IPNetwork) -> bool:
    """Whether every address of ``network`` lies inside one of ``PRIVATE_NETWORKS``."""
    return any(
        network.version == private.version and network.subnet_of(private)  # type: ignore[arg-type]
        for private in map(ipaddress.ip_network, PRIVATE_NETWORKS)
    )


def public_networks(networks: list[IPNetwork]) -> list[IPNetwork]:
    """The networks that reach beyond the private ranges (the open-relay rule)."""
    return [network for network in networks if not is_private_network(network)]


def local_address_reason(address: IPAddress | str) -> str | None:
    """What makes ``address`` off-limits for an HTTP upstream, or None when it is fine."""
    parsed = _unmapped(ipaddress.ip_address(address) if isinstance(address, str) else address)
    for network, reason in LOCAL_NETWORKS:
        net = ipaddress.ip_network(network)
        if parsed.version == net.version and parsed in net:
            return reason
    return None


def local_host_reason(host: str) -> str | None:
    """Why a URL's host (an address literal or a name) is off-limits, or None.

    Only what can be told without DNS: an address literal in ``LOCAL_NETWORKS`` or a name in
    ``LOCAL_HOST_NAMES``; the relay checks resolved addresses at connect time.
    """
    bare = host.strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        if bare in LOCAL_HOST_NAMES or bare.endswith(LOCAL_NAME_SUFFIX):
            return "a name of this machine or of a cloud metadata service"
        return None
    return local_address_reason(address)


PRIVATE_SUMMARY: Final = ", ".join(PRIVATE_NETWORKS)


def open_relay_message(field: str, ack: str, networks: str = "a network") -> str:
    """The refusal of a public network in ``field``, naming the acknowledgement ``ack``."""
    return (
        f"{field} may send without AUTH, and {networks} there reaches beyond private addresses "
        f"({PRIVATE_SUMMARY}): that is an open relay for the internet. List only your own "
        f"private networks and let other clients authenticate, or set {ack}: true if you "
        "really mean to let those addresses send unauthenticated"
    )


def local_endpoint_message(what: str, ack: str) -> str:
    """The refusal of an HTTP upstream ``what`` (an endpoint, a host) that is local."""
    return (
        f"{what}: HTTP upstreams may not reach loopback, link-local, unspecified or cloud "
        "metadata addresses (the relay pod, its node, the metadata service's credentials); "
        f"point it at the real service, or set {ack}: true for a local test server"
    )
