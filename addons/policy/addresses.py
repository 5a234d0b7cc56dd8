"""Address classes: which destinations are private (loopback, RFC 1918, link-local, cloud metadata,
CGNAT, ULA, multicast, reserved ...), IPv6 forms that embed an IPv4 address judged by it."""

from __future__ import annotations

import functools
import ipaddress

from addons.policy.hosts import HostError, IPAddress, parse_ip

_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200",
                                      "168.63.129.16", "fd00:ec2::254", "fd00:ec2::23")
)
_V4_CLASSES: tuple[tuple[str, ipaddress.IPv4Network], ...] = tuple(
    (name, ipaddress.IPv4Network(net)) for name, net in (
        ("unspecified", "0.0.0.0/32"),
        ("reserved", "0.0.0.0/8"),            # "this network"
        ("private", "10.0.0.0/8"),
        ("cgnat", "100.64.0.0/10"),
        ("loopback", "127.0.0.0/8"),
        ("link_local", "169.254.0.0/16"),
        ("private", "172.16.0.0/12"),
        ("reserved", "192.0.0.0/24"),         # IETF protocol assignments
        ("reserved", "192.0.2.0/24"),         # TEST-NET-1
        ("reserved", "192.88.99.0/24"),       # deprecated 6to4 relay anycast
        ("private", "192.168.0.0/16"),
        ("reserved", "198.18.0.0/15"),        # benchmarking
        ("reserved", "198.51.100.0/24"),      # TEST-NET-2
        ("reserved", "203.0.113.0/24"),       # TEST-NET-3
        ("multicast", "224.0.0.0/4"),
        ("broadcast", "255.255.255.255/32"),
        ("reserved", "240.0.0.0/4"),
    )
)
_V6_CLASSES: tuple[tuple[str, ipaddress.IPv6Network], ...] = tuple(
    (name, ipaddress.IPv6Network(net)) for name, net in (
        ("unspecified", "::/128"),
        ("loopback", "::1/128"),
        ("reserved", "::/8"),                 # incl. deprecated IPv4-compatible ::a.b.c.d
        ("reserved", "64:ff9b:1::/48"),       # local-use NAT64
        ("reserved", "100::/64"),             # discard-only
        ("reserved", "2001::/23"),            # IETF protocol assignments (Teredo 2001::/32 is read first)
        ("reserved", "2001:db8::/32"),        # documentation
        ("reserved", "2001:2::/48"),          # benchmarking
        ("reserved", "2001:10::/28"),         # ORCHID
        ("reserved", "3fff::/20"),            # documentation (RFC 9637)
        ("ula", "fc00::/7"),
        ("link_local", "fe80::/10"),
        ("reserved", "fec0::/10"),            # deprecated site-local
        ("multicast", "ff00::/8"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, NAT64, 6to4, Teredo), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]  # the client's address; the server part is checked by the caller too
    return None


@functools.lru_cache(maxsize=16384)
def classify_address(ip: str) -> str | None:
    """The private class of an address (canonical or any accepted spelling), None if public.

    Classes: loopback, unspecified, private, link_local, metadata, cgnat, ula, multicast,
    broadcast, reserved. IPv6 forms embedding an IPv4 address are classified by it.
    Raises HostError when `ip` is not an IP literal.
    """
    addr = parse_ip(ip)
    if addr is None:
        raise HostError(f"{ip!r} is not an IP address")
    return classify_ip(addr)


@functools.lru_cache(maxsize=16384)
def classify_ip(addr: IPAddress) -> str | None:
    if addr in _METADATA:
        return "metadata"
    if isinstance(addr, ipaddress.IPv4Address):
        for name, net in _V4_CLASSES:
            if addr in net:
                return name
        return None
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    # Embedded IPv4 first: NAT64 64:ff9b::/96 lies inside the reserved ::/8 block.
    if addr.teredo is not None:
        server, client = addr.teredo
        return classify_ip(client) or classify_ip(server)
    embedded = _embedded_v4(addr)
    if embedded is not None:
        return classify_ip(embedded)
    for name, net6 in _V6_CLASSES:
        if addr in net6:
            return name
    return None
