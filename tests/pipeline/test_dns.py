"""addons/pipeline/dns.py: canonical addresses, resolve (literal, static answers, DNS), the system lookup
(bounded, errors as ResolveError) and the per-connection PinStore."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from addons.pipeline import dns
from addons.pipeline.dns import (
    Pin,
    PinStore,
    ResolveError,
    SharedLookup,
    canonical_ip,
    resolve,
    system_lookup,
)


@pytest.mark.parametrize(
    ("raw", "canon"),
    [
        ("::ffff:8.8.8.8", "8.8.8.8"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("8.8.8.8", "8.8.8.8"),
        ("0:0:0:0:0:0:0:1", "::1"),
    ],
)
def test_canonical_ip(raw: str, canon: str) -> None:
    assert canonical_ip(raw) == canon


def test_canonical_ip_refuses_what_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        canonical_ip("example.com")


async def test_resolve_prefers_literal_then_static() -> None:
    async def boom(host: str, port: int) -> list[str]:
        raise AssertionError("no DNS for literals or static answers")

    assert await resolve("8.8.8.8", 80, True, None, boom) == ("8.8.8.8",)
    assert await resolve("a.example.com", 80, False, ("1.1.1.1", "1.1.1.1"), boom) == ("1.1.1.1",)


async def test_resolve_returns_every_answer_deduplicated_and_canonical() -> None:
    asked: list[tuple[str, int]] = []

    async def lookup(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["8.8.8.8", "::ffff:8.8.8.8", "2001:DB8::1", "1.1.1.1", "2001:db8::1"]

    got = await resolve("a.example.com", 443, False, None, lookup)
    assert got == ("8.8.8.8", "2001:db8::1", "1.1.1.1") and asked == [("a.example.com", 443)]


@pytest.mark.parametrize("static", [None, ()])
async def test_no_answer_is_a_resolve_error(static: tuple[str, ...] | None) -> None:
    async def empty(host: str, port: int) -> list[str]:
        return []

    with pytest.raises(ResolveError, match="has no address"):
        await resolve("a.example.com", 443, False, static, empty)


async def test_system_lookup_returns_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    seen: dict[str, Any] = {}

    async def fake(host: str, port: int, **kw: Any) -> list[Any]:
        seen.update(host=host, port=port, **kw)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", port, 0, 0)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", fake)
    assert await system_lookup("a.example.com", 443) == ["8.8.8.8", "2001:db8::1"]
    assert seen["type"] == socket.SOCK_STREAM and seen["proto"] == socket.IPPROTO_TCP


@pytest.mark.parametrize("error", [socket.gaierror(-2, "Name or service not known"), UnicodeError("label")])
async def test_system_lookup_errors_are_resolve_errors(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    loop = asyncio.get_running_loop()

    async def fake(host: str, port: int, **kw: Any) -> list[Any]:
        raise error

    monkeypatch.setattr(loop, "getaddrinfo", fake)
    with pytest.raises(ResolveError, match="cannot resolve a.example.com"):
        await system_lookup("a.example.com", 443)


async def test_system_lookup_is_bounded_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(dns, "DNS_TIMEOUT_S", 0.05)

    async def hang(host: str, port: int, **kw: Any) -> list[Any]:
        await asyncio.sleep(30)
        return []

    monkeypatch.setattr(loop, "getaddrinfo", hang)
    with pytest.raises(ResolveError, match="cannot resolve"):
        await asyncio.wait_for(system_lookup("slow.example.com", 443), 10)


def test_a_pin_connects_to_its_first_checked_address() -> None:
    assert Pin("a.test", 443, ("8.8.8.8", "1.1.1.1")).ip == "8.8.8.8"


def test_pin_store_is_per_client_connection_host_and_port() -> None:
    pins = PinStore()
    a, b = Pin("a.test", 443, ("8.8.8.8",)), Pin("a.test", 80, ("1.1.1.1",))
    pins.put("c1", a)
    pins.put("c1", b)
    pins.put("c2", Pin("b.test", 443, ("9.9.9.9",)))
    assert pins.get("c1", "a.test", 443) is a and pins.get("c1", "a.test", 80) is b
    assert pins.get("c2", "a.test", 443) is None and pins.get("c1", "b.test", 443) is None
    assert len(pins) == 3
    pins.drop_client("c1")
    assert len(pins) == 1 and pins.get("c1", "a.test", 443) is None
    pins.drop_client("c1")  # twice, or a client that never had a pin: nothing happens
    pins.drop_client("nobody")
    assert pins.get("c2", "b.test", 443) is not None


def test_a_new_pin_for_the_same_destination_replaces_the_old_one() -> None:
    pins = PinStore()
    pins.put("c1", Pin("a.test", 443, ("8.8.8.8",)))
    newer = Pin("a.test", 443, ("1.1.1.1",))
    pins.put("c1", newer)
    assert pins.get("c1", "a.test", 443) is newer and len(pins) == 1
    pins.drop_client("c1")
    assert len(pins) == 0


# ---- the shared lookup: one query for concurrent lookups of a name, nothing kept after it


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
        serial = self.serial  # this query's number, whatever others start while it waits
        if self.gate is not None:
            await self.gate.wait()
        if host in self.fail:
            raise ResolveError(f"cannot resolve {host}: NXDOMAIN")
        return [f"203.0.113.{serial}"]


async def test_one_lookup_after_another_asks_every_time() -> None:
    # Nothing is kept: a name that answers differently now (rebinding) is seen on the next lookup.
    inner = Inner()
    shared = SharedLookup(inner)
    assert await shared("a.example", 443) == ["203.0.113.1"]
    assert await shared("a.example", 443) == ["203.0.113.2"]
    assert inner.calls == ["a.example", "a.example"]


async def test_concurrent_lookups_share_one_query_and_callers_get_copies() -> None:
    gate = asyncio.Event()
    inner = Inner(gate)
    shared = SharedLookup(inner)
    tasks = [asyncio.ensure_future(shared("a.example", 443)) for _ in range(20)]
    other = asyncio.ensure_future(shared("b.example", 443))
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert inner.calls == ["a.example", "b.example"] and all(r == ["203.0.113.1"] for r in results)
    assert await other == ["203.0.113.2"]
    results[0].append("10.0.0.1")  # a caller changing its list changes nobody else's
    assert results[1] == ["203.0.113.1"]


async def test_a_shared_failure_reaches_every_waiter_once_and_is_not_kept() -> None:
    gate = asyncio.Event()
    inner = Inner(gate)
    inner.fail.add("nx.example")
    shared = SharedLookup(inner)
    tasks = [asyncio.ensure_future(shared("nx.example", 443)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert inner.calls == ["nx.example"] and all(isinstance(r, ResolveError) for r in results)
    with pytest.raises(ResolveError):
        await shared("nx.example", 443)
    assert inner.calls == ["nx.example", "nx.example"]


async def test_a_cancelled_lookup_does_not_fail_the_others() -> None:
    gate = asyncio.Event()
    inner = Inner(gate)
    shared = SharedLookup(inner)
    first = asyncio.ensure_future(shared("a.example", 443))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(shared("a.example", 443))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await second == ["203.0.113.2"]  # asked again by itself
    assert inner.calls == ["a.example", "a.example"]
    with pytest.raises(asyncio.CancelledError):
        await first


def test_the_proxy_resolver_is_the_system_one_shared() -> None:
    assert isinstance(dns.system_lookup, SharedLookup)
    assert dns.system_lookup.inner is dns.getaddrinfo_lookup
