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


async def getaddrinfo_lookup(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (one DNS round, bounded in time)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), DNS_TIMEOUT_S
        )
    except (OSError, TimeoutError, UnicodeError) as e:
        raise ResolveError(f"cannot resolve {host}: {e}") from e
    return [str(info[4][0]) for info in infos]


class _Abandoned(Exception):
    """The shared lookup was cancelled (its request went away), not failed."""


class SharedLookup:
    """A Lookup that shares one query among concurrent lookups of the same name; no answer is kept
    once its query is over, so each new connection resolves again (a name that rebinds to a private
    address is refused on its next connection: tests/adversarial/test_adv_dns.py).

    getaddrinfo runs in a thread, and its hand-offs cost more than the rest of a tunnel's decision: a
    burst of new tunnels to the same few names (a package install) then costs one query per name at
    a time, not one per tunnel. Failures reach every waiter of that query and are not kept either.
    """

    def __init__(self, inner: Lookup) -> None:
        self.inner = inner
        self._inflight: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[list[str]]]] = {}

    async def __call__(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        shared = self._inflight.get(host)
        if shared is not None and shared[0] is loop:
            try:
                return list(await asyncio.shield(shared[1]))
            except _Abandoned:
                pass  # the lookup we waited for was cancelled with its request: ask ourselves
        fut: asyncio.Future[list[str]] = loop.create_future()
        self._inflight[host] = (loop, fut)
        try:
            answers = await self.inner(host, port)
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e if isinstance(e, Exception) else _Abandoned())
                fut.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            fut.set_result(answers)
            return list(answers)
        finally:
            if self._inflight.get(host, (None, None))[1] is fut:
                del self._inflight[host]


# The proxy's resolver: the system's, one query at a time per name, nothing kept.
system_lookup = SharedLookup(getaddrinfo_lookup)


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
