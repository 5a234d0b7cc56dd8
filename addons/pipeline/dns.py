"""Resolve a destination once and remember the checked answers per client connection (no mitmproxy)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

DNS_TIMEOUT_S = 5.0

Lookup = Callable[[str, int], Awaitable[list[str]]]


class ResolveError(Exception):
    """The name has no usable address (NXDOMAIN, timeout, no A/AAAA)."""


def canonical_ip(text: str) -> str:
    """Canonical text of an address as getaddrinfo returns it (zone id dropped, v4-mapped -> v4)."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


async def system_lookup(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (one DNS round, bounded in time)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), DNS_TIMEOUT_S
        )
    except (OSError, TimeoutError, UnicodeError) as e:
        raise ResolveError(f"cannot resolve {host}: {e}") from e
    return [str(info[4][0]) for info in infos]


async def resolve(
    host: str, port: int, is_literal: bool, static: tuple[str, ...] | None, lookup: Lookup = system_lookup
) -> tuple[str, ...]:
    """The addresses to check for `host` (already normalised): the literal, the static answers, or DNS.

    Every answer is returned (deduplicated, canonical) so the policy can refuse the whole name
    when any one of them is private.
    """
    if is_literal:
        return (host,)
    if static is not None:
        answers: list[str] = list(static)
    else:
        answers = await lookup(host, port)
    out = tuple(dict.fromkeys(canonical_ip(a) for a in answers))
    if not out:
        raise ResolveError(f"{host} has no address")
    return out


@dataclass(frozen=True, slots=True)
class Pin:
    """The checked answers for one destination on one client connection; `ip` is the one connected to."""

    host: str
    port: int
    addresses: tuple[str, ...]

    @property
    def ip(self) -> str:
        return self.addresses[0]


class PinStore:
    """Pins per client connection: (client id, normalised host, port) -> Pin.

    The proxy fills it when it decides, and `server_connect` reads it; a connect with no pin
    is refused, so no upstream connection ever goes to an address the policy did not see.
    """

    def __init__(self) -> None:
        self._pins: dict[tuple[str, str, int], Pin] = {}
        self._by_client: dict[str, set[tuple[str, str, int]]] = {}

    def get(self, client_id: str, host: str, port: int) -> Pin | None:
        return self._pins.get((client_id, host, port))

    def put(self, client_id: str, pin: Pin) -> None:
        key = (client_id, pin.host, pin.port)
        self._pins[key] = pin
        self._by_client.setdefault(client_id, set()).add(key)

    def drop_client(self, client_id: str) -> None:
        for key in self._by_client.pop(client_id, ()):
            self._pins.pop(key, None)

    def __len__(self) -> int:
        return len(self._pins)
