"""Replicas in one loop: ApprovalServices on one real redis-server, each with its own RedisBus and store
health, as every process of every replica has. The poll is 120 s, so what releases a held request is
the notification (or the resync after a lost link), never the poll. Also: what fails closed while
Redis is away (and what the admin API answers), a slow Redis that must not stall the loop, and the
way back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from addons.approvals.health import StoreHealth
from addons.approvals.model import Choice, Scope, State
from addons.approvals.service import ApprovalService
from addons.approvals.stores.redis import safe_url
from addons.bus import Bus, NullBus
from addons.config.models import ApprovalsConfig, WebhookConfig
from addons.policy.model import Reason
from addons.redisbus import RedisBus
from tests.approvals.approvals_support import SECRET_ENV, TOKEN, alive, request, wait_until
from tests.redis_support import RedisServer, needs_redis

pytestmark = needs_redis
SLOW_POLL = 120.0
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def own_redis(tmp_path):
    with RedisServer(tmp_path / "redis") as r:
        yield r


@pytest.fixture
async def replica(tmp_path: Path, events, secret_env, own_redis) -> AsyncIterator[Callable[..., Any]]:
    """`await replica(bus=True, webhooks=[url], **approvals)` -> a started service on own_redis."""
    made: list[tuple[ApprovalService, Bus]] = []

    async def make(*, bus: bool = True, webhooks: list[str] | None = None, **cfg: Any) -> ApprovalService:
        cfg.setdefault("timeout", 60)
        hooks = [WebhookConfig(url=u, secret_env=SECRET_ENV) for u in webhooks or []]
        config = ApprovalsConfig(store=own_redis.url, persist_to=None, **cfg, webhooks=hooks)
        health = StoreHealth(events.telemetry, safe_url(own_redis.url))
        b: Bus = RedisBus(own_redis.url, health) if bus else NullBus()
        svc = ApprovalService(config, tmp_path, events.telemetry, bus=b, health=health, webhook_backoff=0.05)
        svc.poll_interval = SLOW_POLL
        await svc.start()
        if isinstance(b, RedisBus):
            await b.start()
        made.append((svc, b))
        return svc

    yield make
    for svc, b in made:
        await svc.stop()
        await b.close()


async def held_on(svc: ApprovalService, n: int = 1) -> str:
    """Wait until `n` requests wait on `svc` for its one pending approval; its id."""
    async def cond() -> bool:
        pending = await svc.store.pending()
        return len(pending) == 1 and svc.waiters(pending[0]) == n
    await wait_until(cond)
    return (await svc.store.pending())[0].id


async def test_a_decision_on_one_replica_releases_the_requests_held_on_the_others(replica, receiver, events):
    a, b, c = [await replica(webhooks=[receiver.url]) for _ in range(3)]
    on_a = [asyncio.create_task(a.resolve(request(flow_id=f"a{i}"), alive)) for i in range(3)]
    approval_id = await held_on(a, 3)
    on_c = [asyncio.create_task(c.resolve(request(flow_id=f"c{i}"), alive)) for i in range(2)]
    assert await held_on(c, 2) == approval_id  # joined: one approval across replicas
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    await b.decide(approval_id, Choice.ALLOW, Scope.ONCE, "on-b", None)
    # Bounded wait, far below the 120 s poll: the message released them.
    outs = await asyncio.wait_for(asyncio.gather(*on_a, *on_c), 10)
    assert {(o.allowed, o.reason, o.approval_id) for o in outs} == {(True, Reason.APPROVED, approval_id)}
    assert len(receiver.deliveries()) == 1 and len(events.of("approval.requested")) == 1
    assert [e["by"] for e in events.of("approval.decided")] == ["on-b"]
    assert await b.store.grants(0) == []  # the `once` was used by the requests held on A and C


async def test_a_session_grant_taken_on_one_replica_holds_on_every_replica(replica):
    a, b, c = [await replica() for _ in range(3)]
    held = asyncio.create_task(a.resolve(request(), alive))
    approval_id = await held_on(a)
    await b.decide(approval_id, Choice.ALLOW, Scope.SESSION, "on-b", None)
    assert (await asyncio.wait_for(held, 10)).allowed
    for svc in (a, b, c):
        out = await svc.resolve(request(), alive)
        assert (out.allowed, out.reason, out.approval_id) == (True, Reason.APPROVED, approval_id)


async def test_a_lost_subscription_is_made_good_by_looking_again_at_what_is_held(replica, own_redis):
    a = await replica()
    silent = await replica(bus=False)  # decides in the store without telling anyone
    held = asyncio.create_task(a.resolve(request(), alive))
    approval_id = await held_on(a)
    await silent.decide(approval_id, Choice.DENY, Scope.ONCE, "silent", None)
    await asyncio.sleep(0.3)
    assert not held.done()  # nobody said anything, and the poll is 120 s away
    with own_redis.client() as r:
        r.client_kill_filter(_type="pubsub")  # A's subscription drops: it subscribes again and resyncs
    out = await asyncio.wait_for(held, 10)
    assert (out.allowed, out.reason, out.approval_id) == (False, Reason.APPROVAL_DENIED, approval_id)


async def test_while_redis_is_away_what_needs_it_fails_closed_and_after_it_is_back_decisions_release(
        replica, own_redis, events, admin_server):
    a = await replica()
    held = asyncio.create_task(a.resolve(request(host="held.example"), alive))
    approval_id = await held_on(a)
    admin = await admin_server(a)
    await asyncio.to_thread(own_redis.stop)

    out = await asyncio.wait_for(a.resolve(request(host="new.example"), alive), 10)
    assert (out.allowed, out.reason, out.approval_id) == (False, Reason.INTERNAL_ERROR, None)
    assert out.detail.startswith(f"the approvals store {own_redis.url} is unreachable (")
    async with httpx.AsyncClient(base_url=admin.url, headers=AUTH, trust_env=False) as client:
        for r in (await client.get("/approvals"), await client.get(f"/approvals/{approval_id}"),
                  await client.post(f"/approvals/{approval_id}", json={"decision": "allow"})):
            assert r.status_code == 503 and r.headers["Retry-After"] == "5"
            assert r.json()["error"] == "store_unavailable" and "is unreachable" in r.json()["message"]
    assert len(events.of("store.unreachable")) == 1  # told once, however many calls failed
    assert not held.done()  # a held request waits on (its approval is safe in Redis's file)

    await asyncio.to_thread(own_redis.start)
    await wait_until(lambda: a.health.up, timeout=15)
    assert len(events.of("store.reconnected")) == 1
    b = await replica()
    assert (await b.store.get(approval_id)).state is State.PENDING  # survived the restart
    await b.decide(approval_id, Choice.ALLOW, Scope.ONCE, "after", None)
    got = await asyncio.wait_for(held, 10)
    assert (got.allowed, got.reason, got.approval_id) == (True, Reason.APPROVED, approval_id)
    again = asyncio.create_task(a.resolve(request(host="new.example"), alive))
    assert (await held_on(a)) != approval_id  # and a new approval opens again
    again.cancel()


async def test_a_slow_redis_costs_the_requests_that_need_it_a_bounded_wait_and_stalls_nothing(
        replica, own_redis):
    a = await replica(hold=False)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    with own_redis.client() as r:
        r.execute_command("CLIENT", "PAUSE", "5000", "ALL")  # connected, but nothing answers
    try:
        out = await asyncio.wait_for(a.resolve(request(), alive), 10)
    finally:
        t.cancel()
    assert (out.reason, out.approval_id) == (Reason.INTERNAL_ERROR, None) and "unreachable" in out.detail
    assert ticks > 10  # the loop kept turning while the store call waited for its deadline
