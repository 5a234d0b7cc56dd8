"""Resolve a destination once and remember the checked answers per client connection (no mitmproxy)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

DNS_TIMEOUT_S = 5.0
# How long the system resolver's answers for a name are reused (every decision still checks them).
# 0: not reused. Each new connection resolves again (tests/adversarial/test_adv_dns.py: a name that
# rebinds to a private address is refused on the next connection, not served a kept public answer).
DNS_CACHE_S = 0.0
DNS_CACHE_MAX = 10_000

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


class CachingLookup:
    """A Lookup that reuses a name's answers for `ttl` seconds and shares one query among concurrent
    lookups of the same name. Failures are not kept. The answers are data, not decisions: the policy
    checks them on every decision, and each connection still goes to an address it checked.

    getaddrinfo runs in a thread: its hand-offs cost more than the rest of a tunnel's decision, and a
    burst of new tunnels (a package install) asks for the same few names again and again.
    """

    def __init__(self, inner: Lookup, ttl: float = DNS_CACHE_S, max_names: int = DNS_CACHE_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.ttl = ttl
        self.max_names = max_names
        self.clock = clock
        self._answers: dict[str, tuple[float, list[str]]] = {}
        self._inflight: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[list[str]]]] = {}

    def clear(self) -> None:
        self._answers.clear()

    async def __call__(self, host: str, port: int) -> list[str]:
        if self.ttl <= 0:
            return await self.inner(host, port)
        hit = self._answers.get(host)
        now = self.clock()
        if hit is not None and hit[0] > now:
            return list(hit[1])
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
            self._remember(host, answers)
            return list(answers)
        finally:
            if self._inflight.get(host, (None, None))[1] is fut:
                del self._inflight[host]

    def _remember(self, host: str, answers: list[str]) -> None:
        if len(self._answers) >= self.max_names:
            now = self.clock()
            for name in [n for n, (exp, _) in self._answers.items() if exp <= now]:
                del self._answers[name]
            while len(self._answers) >= self.max_names:
                del self._answers[next(iter(self._answers))]  # the oldest entry
        self._answers.pop(host, None)
        self._answers[host] = (self.clock() + self.ttl, list(answers))


# The proxy's resolver: the system's, with answers kept DNS_CACHE_S seconds (none by default).
system_lookup = CachingLookup(getaddrinfo_lookup)


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
