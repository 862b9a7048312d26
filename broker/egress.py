"""The proxy's egress guard: which addresses an upstream connection may reach.

An upstream's host comes only from the config, but a name can resolve anywhere: to loopback
(the broker's own API, Redis, a debug port), to the cloud's metadata service at 169.254.169.254
(the node's credentials), or into the private network. So every address the proxy connects to
is classified right before `connect()`, on the socket address itself (see `guarded_socket`):
the name was already resolved, and nothing resolves it again between the check and the
connection (no DNS rebinding). A special address is refused unless the app's
`proxy.allowed_networks` lists a network that holds it.

Pure logic on `ipaddress`; broker/api/proxy.py plugs `guarded_socket` into its pools, and
broker/config.py refuses an upstream given as a literal special address at load time.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Why an address is refused: the `reason` label of token_broker_proxy_egress_refused_total
# (bounded: these names only).
LOOPBACK = "loopback"
LINK_LOCAL = "link_local"
PRIVATE = "private"
UNSPECIFIED = "unspecified"
RESERVED = "reserved"
REASONS = (LOOPBACK, LINK_LOCAL, PRIVATE, UNSPECIFIED, RESERVED)

# What each reason means, for messages (the operator learns what was hit).
DESCRIBED = {
    LOOPBACK: "a loopback address",
    LINK_LOCAL: "a link-local address (169.254.0.0/16 holds the cloud metadata service)",
    PRIVATE: "a private-network address",
    UNSPECIFIED: "an unspecified address (0.0.0.0 or ::, which reach this host)",
    RESERVED: "a reserved, multicast or documentation address, not a public one",
}

# Checked in this order; the first network that holds the address names the reason. Explicit
# networks rather than `ipaddress`'s flags, which changed between Python patch releases.
_CLASSES: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = tuple(
    (reason, tuple(ipaddress.ip_network(n) for n in networks))
    for reason, networks in (
        # 0.0.0.0/8 is "this network": Linux connects 0.0.0.0 to the local host.
        (UNSPECIFIED, ("0.0.0.0/8", "::/128")),
        (LOOPBACK, ("127.0.0.0/8", "::1/128")),
        (LINK_LOCAL, ("169.254.0.0/16", "fe80::/10")),
        (
            PRIVATE,
            (
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                # Shared address space (RFC 6598): carrier NAT, and some clouds' internal
                # services (Alibaba's metadata service is 100.100.100.200).
                "100.64.0.0/10",
                "fc00::/7",
                "fec0::/10",  # site-local, deprecated but still routed by some networks
            ),
        ),
    )
)
# IPv6 forms that carry an IPv4 address which the host or a gateway may connect to instead:
# IPv4-mapped (::ffff:a.b.c.d, a dual-stack socket connects to a.b.c.d), IPv4-compatible
# (::a.b.c.d, deprecated), NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48) and 6to4.
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


class EgressRefused(OSError):
    """A connection the guard refused: the address and why (one of REASONS).

    Its text is the same for every refusal: when several addresses of a name are all refused,
    the connection attempt reports one of them rather than a merged message.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__("egress refused by proxy.allowed_networks")
        self.address = address
        self.reason = reason


def parse_networks(networks: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The allowed networks of a config (already validated) as `ipaddress` networks."""
    return tuple(ipaddress.ip_network(n) for n in networks)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, NAT64, 6to4), or None."""
    if address in _MAPPED or (address in _COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return address.sixtofour
    return None


def classify(address: IPAddress) -> str | None:
    """Why `address` is special (one of REASONS), or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            return classify(inner)
    for reason, networks in _CLASSES:
        if any(address in network for network in networks):
            return reason
    # Multicast is "global" to `ipaddress`, but no API lives at a group address.
    return None if address.is_global and not address.is_multicast else RESERVED


def refusal(address: IPAddress | str, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why the proxy must not connect to `address` (one of REASONS), or None when it may.

    An address inside one of the `allowed` networks may always be reached; so may an IPv6 form
    whose embedded IPv4 address is inside one.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    reason = classify(ip)
    if reason is None:
        return None
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            candidates.append(inner)
    for network in allowed:
        if any(c.version == network.version and c in network for c in candidates):
            return None
    return reason


def guarded_socket(allowed: Iterable[IPNetwork]) -> Callable[[Any], socket.socket]:
    """A socket factory for aiohttp's connector that refuses special addresses.

    aiohttp resolves the upstream's name once, then calls this factory with each address it
    is about to connect to; the socket it returns is connected to exactly that address. So the
    check is on the address actually connected to, after resolution: a name that resolves to
    a public address for a check and to 127.0.0.1 for the connection cannot slip through. A
    refused address raises EgressRefused; aiohttp tries the name's other addresses, and
    reports the refusal when none is left.
    """
    networks = tuple(allowed)

    def create(addr_info: Any) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        reason = refusal(sockaddr[0], networks)
        if reason is not None:
            raise EgressRefused(sockaddr[0], reason)
        return socket.socket(family=family, type=kind, proto=proto)

    return create
