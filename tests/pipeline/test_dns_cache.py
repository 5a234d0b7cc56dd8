"""The resolver's answer cache: names reused for a few seconds, one query for concurrent lookups,
failures never kept, bounded in size."""

from __future__ import annotations

import asyncio

import pytest

from addons.pipeline import dns
from addons.pipeline.dns import CachingLookup, ResolveError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Inner:
    """A lookup that records each query; answers per name, or raises for names in `fail`."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.gate = gate
        self.serial = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        self.serial += 1
        if self.gate is not None:
            await self.gate.wait()
        if host in self.fail:
            raise ResolveError(f"cannot resolve {host}: NXDOMAIN")
        return [f"203.0.113.{self.serial}"]


async def test_answers_are_reused_until_the_ttl_ends() -> None:
    inner, clock = Inner(), Clock()
    cache = CachingLookup(inner, ttl=5.0, clock=clock)
    a = await cache("a.example", 443)
    assert await cache("a.example", 80) == a  # the port does not change A/AAAA answers
    assert inner.calls == ["a.example"]
    clock.now += 4.9
    assert await cache("a.example", 443) == a
    clock.now += 0.2
    b = await cache("a.example", 443)
    assert b != a and inner.calls == ["a.example", "a.example"]


async def test_names_are_cached_separately_and_callers_get_copies() -> None:
    inner = Inner()
    cache = CachingLookup(inner, ttl=5.0, clock=Clock())
    a, b = await cache("a.example", 443), await cache("b.example", 443)
    assert a != b
    a.append("10.0.0.1")  # a caller changing its list must not change what the next one gets
    assert await cache("a.example", 443) == ["203.0.113.1"]


async def test_failures_are_not_kept() -> None:
    inner = Inner()
    inner.fail.add("nx.example")
    cache = CachingLookup(inner, ttl=5.0, clock=Clock())
    for _ in range(2):
        with pytest.raises(ResolveError):
            await cache("nx.example", 443)
    assert inner.calls == ["nx.example", "nx.example"]


async def test_concurrent_lookups_share_one_query() -> None:
    gate = asyncio.Event()
    inner = Inner(gate)
    cache = CachingLookup(inner, ttl=5.0, clock=Clock())
    tasks = [asyncio.ensure_future(cache("a.example", 443)) for _ in range(20)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert inner.calls == ["a.example"] and all(r == results[0] for r in results)


async def test_a_shared_failure_reaches_every_waiter_once() -> None:
    gate = asyncio.Event()
    inner = Inner(gate)
    inner.fail.add("nx.example")
    cache = CachingLookup(inner, ttl=5.0, clock=Clock())
    tasks = [asyncio.ensure_future(cache("nx.example", 443)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert inner.calls == ["nx.example"] and all(isinstance(r, ResolveError) for r in results)


async def test_a_cancelled_lookup_does_not_fail_the_others() -> None:
    gate = asyncio.Event()
    inner = Inner(gate)
    cache = CachingLookup(inner, ttl=5.0, clock=Clock())
    first = asyncio.ensure_future(cache("a.example", 443))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(cache("a.example", 443))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await second == ["203.0.113.2"]  # asked again by itself
    assert inner.calls == ["a.example", "a.example"]
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_the_cache_is_bounded() -> None:
    inner, clock = Inner(), Clock()
    cache = CachingLookup(inner, ttl=5.0, max_names=3, clock=clock)
    for name in ("a", "b", "c", "d"):
        await cache(f"{name}.example", 443)
    await cache("a.example", 443)  # the oldest went first
    assert inner.calls == ["a.example", "b.example", "c.example", "d.example", "a.example"]
    await cache("d.example", 443)
    assert inner.calls[-1] == "a.example"  # d was still there


async def test_a_zero_ttl_asks_every_time() -> None:
    inner = Inner()
    cache = CachingLookup(inner, ttl=0, clock=Clock())
    await cache("a.example", 443)
    await cache("a.example", 443)
    assert inner.calls == ["a.example", "a.example"]


def test_the_proxy_resolver_is_the_system_one_with_a_short_cache() -> None:
    assert isinstance(dns.system_lookup, CachingLookup)
    assert dns.system_lookup.inner is dns.getaddrinfo_lookup
    assert 0 < dns.system_lookup.ttl <= 30
