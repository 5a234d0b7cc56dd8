"""addons/approvals/stores/redis.py against a real redis-server, and replicas (services) sharing one store.
The contract both stores keep: test_contract.py."""

from __future__ import annotations

import asyncio
import shutil
import socket

import pytest

from addons.approvals.errors import ApprovalError, StoreUnavailable
from addons.approvals.health import StoreHealth
from addons.approvals.model import Choice, Scope, State
from addons.approvals.stores import open_store
from addons.approvals.stores.redis import RedisStore
from addons.approvals.stores.sqlite import SqliteStore
from addons.policy.model import Reason
from tests.approvals.approvals_support import alive, approval, request, wait_until
from tests.redis_support import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server missing: apt-get install -y redis-server "
                                       "(./dev test installs it)")


@pytest.fixture
def redis_url(redis_server: str) -> str:
    import redis

    with redis.Redis.from_url(redis_server) as r:
        r.flushall()
    return redis_server


async def test_a_bad_redis_url_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(ApprovalError, match="cannot use the approvals store"):
        await open_store(f"redis://:secret@127.0.0.1:{port}/0", tmp_path)
    assert isinstance(await open_store("sqlite:///x.db", tmp_path), SqliteStore)


async def test_service_on_redis_coalesces_and_survives_restart(make_service, redis_url, receiver):
    svc = await make_service(store=redis_url, timeout=30, webhooks=[receiver.url])
    tasks = [asyncio.create_task(svc.resolve(request(), alive)) for _ in range(50)]
    async def cond() -> bool:
        return bool(len(await svc.store.pending()) == 1 and svc.waiters((await svc.store.pending())[0]) == 50)
    await wait_until(cond)
    a = (await svc.store.pending())[0]
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    await svc.decide(a.id, Choice.ALLOW, Scope.SESSION, "r", None)
    assert all(o.allowed for o in await asyncio.gather(*tasks))
    assert len(receiver.deliveries()) == 1
    await svc.stop()
    svc2 = await make_service(store=redis_url, timeout=30, hold=False)
    out = await svc2.resolve(request(), alive)  # the session grant survived the restart
    assert (out.allowed, out.reason, out.approval_id) == (True, Reason.APPROVED, a.id)
    assert [g.scope for g in await svc2.store.grants(0)] == [Scope.SESSION]


async def test_two_replicas_share_one_approval_and_each_others_decisions(make_service, redis_url, receiver,
                                                                         events):
    a = await make_service(store=redis_url, timeout=30, webhooks=[receiver.url], poll=0.05)
    b = await make_service(store=redis_url, timeout=30, webhooks=[receiver.url], poll=0.05)
    on_a = asyncio.create_task(a.resolve(request(), alive))
    async def cond() -> bool:
        return bool(await a.store.pending())
    await wait_until(cond)
    on_b = asyncio.create_task(b.resolve(request(), alive))
    async def cond() -> bool:
        return bool(any(b.waiters(x) for x in await b.store.pending()))
    await wait_until(cond)
    [approval] = await b.store.pending()
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    await b.decide(approval.id, Choice.DENY, Scope.ONCE, "replica-b", None)
    out_a, out_b = await asyncio.wait_for(asyncio.gather(on_a, on_b), 5)
    assert (out_a.reason, out_a.approval_id) == (Reason.APPROVAL_DENIED, approval.id)
    assert (await a.store.get(approval.id)).decided_by == "replica-b"
    assert (out_b.reason, out_b.approval_id) == (Reason.APPROVAL_DENIED, approval.id)
    # One approval.requested, one webhook and one approval.decided for the shared approval.
    assert len(events.of("approval.requested")) == 1 and len(events.of("approval.decided")) == 1
    assert not b.notifier.sender._tasks
    await asyncio.sleep(0.1)
    assert len(receiver.deliveries()) == 1


async def test_hold_false_replica_sees_a_remote_decision_and_asks_afresh(make_service, redis_url):
    a = await make_service(store=redis_url, hold=False, timeout=30, poll=0.05)
    b = await make_service(store=redis_url, hold=False, timeout=30, poll=0.05)
    first = await a.resolve(request(), alive)
    await b.decide(first.approval_id, Choice.DENY, Scope.ONCE, "b", None)
    assert (await a.resolve(request(), alive)).reason == Reason.APPROVAL_DENIED  # the `once` deny, used once
    await asyncio.sleep(0.06)
    again = await a.resolve(request(), alive)
    assert again.reason == Reason.APPROVAL_PENDING and again.approval_id != first.approval_id


async def test_once_decided_on_another_replica_is_used_by_the_waiters_only(make_service, redis_url):
    a = await make_service(store=redis_url, hold=True, timeout=30, poll=0.05)
    b = await make_service(store=redis_url, hold=True, timeout=30, poll=0.05)
    held = asyncio.create_task(a.resolve(request(), alive))
    async def cond() -> bool:
        return bool(await b.store.pending())
    await wait_until(cond)
    await b.decide((await b.store.pending())[0].id, Choice.ALLOW, Scope.ONCE, "b", None)
    assert (await asyncio.wait_for(held, 5)).allowed
    assert await b.store.grants(0) == []  # the waiters on A used the `once`; no spare pass is left
    nxt = asyncio.create_task(b.resolve(request(), alive))
    async def cond() -> bool:
        return bool(await b.store.pending())
    await wait_until(cond)
    assert not nxt.done()
    nxt.cancel()


async def test_approvals_are_stored_as_the_contract_strings(redis_url, tmp_path):
    import redis

    s = await open_store(redis_url, tmp_path)
    assert isinstance(s, RedisStore)
    await s.open(approval(), now=100)
    await s.decide("apr_1", Choice.DENY, Scope.SESSION, "x", "why", now=150)
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        h = r.hgetall("portcullis:apr:apr_1")
    assert (h["state"], h["decision"], h["scope"], h["notified"], h["port"]) == (
        "denied", "deny", "session", "0", "443")
    assert await s.get("apr_1") == approval().decided(Choice.DENY, Scope.SESSION, "x", "why", 150.0)
    await s.close()


async def test_replicas_racing_to_open_one_key_get_one_approval(redis_url, tmp_path):
    """Eight clients (eight replicas) open the same key at once: the Lua script lets exactly one in."""
    import threading

    results: list[str] = []
    start = threading.Barrier(8)

    async def one(i: int) -> None:
        s = await open_store(redis_url, tmp_path)
        try:
            start.wait(10)  # this thread's own loop: blocking here blocks nobody else
            results.append((await s.open(approval(f"apr_{i}"), now=100)).id)
        finally:
            await s.close()

    def opener(i: int) -> None:
        asyncio.run(one(i))

    threads = [threading.Thread(target=opener, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and len(set(results)) == 1
    s = await open_store(redis_url, tmp_path)
    assert [a.id for a in await s.pending()] == results[:1]
    assert (await s.get(results[0])).state is State.PENDING
    await s.close()


async def test_a_call_while_redis_is_down_fails_closed_and_the_health_hears_it_once(tmp_path, events):
    with RedisServer(tmp_path / "redis") as server:
        health = StoreHealth(events.telemetry, server.url)
        s = await open_store(server.url, tmp_path, health)
        await s.open(approval(), now=100)
        await asyncio.to_thread(server.stop)
        said = rf"^the approvals store {server.url} is unreachable \(ConnectionError: "
        for call in (s.get("apr_1"), s.take_grant(("c", "h", 443), now=150), s.pending()):
            with pytest.raises(StoreUnavailable, match=said):
                await call
        assert not health.up and len(events.of("store.unreachable")) == 1
        await asyncio.to_thread(server.start)
        assert (await s.get("apr_1")).state is State.PENDING  # a new connection, made on demand
        assert health.up and len(events.of("store.reconnected")) == 1
        await s.close()


async def test_a_redis_that_does_not_answer_costs_one_bounded_call(tmp_path, events):
    with RedisServer(tmp_path / "redis") as server:
        health = StoreHealth(events.telemetry, server.url)
        s = await open_store(server.url, tmp_path, health)
        with server.client() as r:
            r.execute_command("CLIENT", "PAUSE", "5000", "ALL")
        with pytest.raises(StoreUnavailable, match=r"is unreachable \(TimeoutError"):
            await asyncio.wait_for(s.get("apr_1"), 10)  # its own deadline (2 s) ends it first
        assert not health.up
        await s.close()


async def test_a_store_not_required_at_start_opens_and_fails_closed_until_redis_answers(tmp_path, events):
    server = RedisServer(tmp_path / "redis")  # not started yet
    health = StoreHealth(events.telemetry, server.url)
    s = await open_store(server.url, tmp_path, health, require=False)
    assert not health.up and len(events.of("store.unreachable")) == 1
    with pytest.raises(StoreUnavailable):
        await s.pending()
    with server:
        assert await s.pending() == [] and health.up
    await s.close()
