"""addons/redisbus.py against a real redis-server of the test's own: messages between processes (here:
buses in one loop), no echo, junk dropped, and what happens when the link is lost: Redis restarted,
the subscription killed, Redis that stops answering. After every (re)subscription a bus tells its own
subscribers `resync` (what was said meanwhile is lost to it), and the health hears down and up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from addons import redisbus
from addons.approvals.errors import ApprovalError
from addons.approvals.health import StoreHealth
from addons.redisbus import RedisBus
from tests.approvals.approvals_support import Events, wait_until
from tests.redis_support import RedisServer, free_port, needs_redis

pytestmark = needs_redis
RESYNC = {"t": "resync"}


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def own_redis(tmp_path):
    with RedisServer(tmp_path / "redis") as r:
        yield r


@pytest.fixture
async def bus(own_redis) -> AsyncIterator[Callable[..., Any]]:
    """`await bus(health=None)` -> (a started RedisBus, the list of messages its subscriber got)."""
    made: list[RedisBus] = []

    async def make(health: StoreHealth | None = None) -> tuple[RedisBus, list[dict[str, Any]]]:
        b = RedisBus(own_redis.url, health)
        got: list[dict[str, Any]] = []
        b.subscribe(got.append)
        await b.start()
        made.append(b)
        return b, got

    yield make
    for b in made:
        await b.close()


def metric(events, name: str) -> float:
    return events.telemetry.metrics.registry.get_sample_value(name) or 0.0


async def test_a_message_reaches_every_other_process_once_and_its_own_subscribers_at_once(bus):
    (a, on_a), (b, on_b), (_, on_c) = await bus(), await bus(), await bus()
    assert on_a == on_b == on_c == [RESYNC]  # the first subscription is a resync too (nothing held yet)
    a.publish({"t": "approval", "id": "apr_1"})
    assert on_a == [RESYNC, {"t": "approval", "id": "apr_1"}]  # locally at once, not through Redis
    await wait_until(lambda: on_b[-1:] == on_c[-1:] == [{"t": "approval", "id": "apr_1"}])
    b.publish({"t": "approval", "id": "apr_2"})  # reaches Redis after apr_1, so any echo of apr_1 is in
    await wait_until(lambda: on_a[-1:] == [{"t": "approval", "id": "apr_2"}])
    assert on_a == [RESYNC, {"t": "approval", "id": "apr_1"}, {"t": "approval", "id": "apr_2"}]  # no echo
    assert on_c == [RESYNC, {"t": "approval", "id": "apr_1"}, {"t": "approval", "id": "apr_2"}]


async def test_junk_on_the_channel_is_dropped_and_the_bus_goes_on(bus, own_redis):
    (a, on_a) = await bus()
    with own_redis.client() as r:
        for junk in ("not json", "[1, 2]", '"a string"', "{" * 10, "x" * (70 * 1024)):
            r.publish(redisbus.CHANNEL, junk)
        r.publish(redisbus.CHANNEL, '{"t": "approval", "id": "apr_ok"}')
    await wait_until(lambda: on_a[-1:] == [{"t": "approval", "id": "apr_ok"}])
    assert on_a == [RESYNC, {"t": "approval", "id": "apr_ok"}]


async def test_after_redis_restarts_the_bus_subscribes_again_resyncs_and_the_health_says_so(
        bus, own_redis, events):
    health = StoreHealth(events.telemetry, own_redis.url)
    (a, on_a), (b, on_b) = await bus(health), await bus()
    await asyncio.to_thread(own_redis.stop)
    await wait_until(lambda: not health.up, timeout=15)
    [down] = events.of("store.unreachable")
    assert down["store"] == own_redis.url and "Error" in down["error"]
    assert metric(events, "portcullis_store_up") == 0.0 and not a.connected
    a.publish({"t": "approval", "id": "apr_lost"})  # queued while Redis is away
    await asyncio.to_thread(own_redis.start)
    await wait_until(lambda: a.subscriptions == 2 and b.subscriptions == 2 and health.up, timeout=15)
    assert on_a.count(RESYNC) == 2 and on_b.count(RESYNC) == 2  # what was said meanwhile: look again
    [up] = events.of("store.reconnected")
    assert up["store"] == own_redis.url and up["down_s"] >= 0
    assert metric(events, "portcullis_store_up") == 1.0 and len(events.of("store.unreachable")) == 1
    b.publish({"t": "approval", "id": "apr_after"})
    await wait_until(lambda: {"t": "approval", "id": "apr_after"} in on_a)


async def test_a_killed_subscription_is_made_again_at_once_without_an_outage(bus, own_redis, events):
    health = StoreHealth(events.telemetry, own_redis.url)
    (a, on_a) = await bus(health)
    with own_redis.client() as r:
        assert r.client_kill_filter(_type="pubsub") >= 1
    await wait_until(lambda: a.subscriptions == 2)
    assert on_a == [RESYNC, RESYNC]
    assert health.up and events.of("store.unreachable") == []  # Redis itself never went away


async def test_a_redis_that_stops_answering_is_noticed_by_the_ping(bus, own_redis, events, monkeypatch):
    monkeypatch.setattr(redisbus, "TICK_S", 0.05)
    monkeypatch.setattr(redisbus, "PING_EVERY_S", 0.1)
    monkeypatch.setattr(redisbus, "DEAD_AFTER_S", 0.5)
    health = StoreHealth(events.telemetry, own_redis.url)
    (a, on_a) = await bus(health)
    with own_redis.client() as r:
        r.execute_command("CLIENT", "PAUSE", "4000", "ALL")  # the TCP link stays up; nothing answers
    await wait_until(lambda: not health.up, timeout=10)
    await wait_until(lambda: health.up and a.subscriptions == 2, timeout=15)
    assert on_a == [RESYNC, RESYNC]
    assert len(events.of("store.unreachable")) == 1 and len(events.of("store.reconnected")) == 1


async def test_a_bus_that_cannot_subscribe_at_start_says_so():
    b = RedisBus(f"redis://:pw@127.0.0.1:{free_port()}/0")
    with pytest.raises(ApprovalError, match=r"cannot subscribe to portcullis:bus on redis://\*\*\*@127"):
        await b.start()
    await b.close()
