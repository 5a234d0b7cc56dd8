"""addons/approvals/stores/redis.py against a real redis-server, and replicas (services) sharing one store.
The contract both stores keep: test_contract.py."""

from __future__ import annotations

import asyncio
import shutil
import socket

import pytest

from addons.approvals.errors import ApprovalError
from addons.approvals.model import Choice, Scope, State
from addons.approvals.stores import open_store
from addons.approvals.stores.redis import RedisStore
from addons.approvals.stores.sqlite import SqliteStore
from addons.policy.model import Reason
from tests.approvals.approvals_support import alive, approval, request, wait_until

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server missing: apt-get install -y redis-server "
                                       "(./dev test installs it)")


@pytest.fixture
def redis_url(redis_server: str) -> str:
    import redis

    with redis.Redis.from_url(redis_server) as r:
        r.flushall()
    return redis_server


def test_a_bad_redis_url_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(ApprovalError, match="cannot use the approvals store"):
        open_store(f"redis://:secret@127.0.0.1:{port}/0", tmp_path)
    assert isinstance(open_store("sqlite:///x.db", tmp_path), SqliteStore)


async def test_service_on_redis_coalesces_and_survives_restart(make_service, redis_url, receiver):
    svc = await make_service(store=redis_url, timeout=30, webhooks=[receiver.url])
    tasks = [asyncio.create_task(svc.resolve(request(), alive)) for _ in range(50)]
    await wait_until(lambda: len(svc.store.pending()) == 1 and svc.waiters(svc.store.pending()[0]) == 50)
    a = svc.store.pending()[0]
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    await svc.decide(a.id, Choice.ALLOW, Scope.SESSION, "r", None)
    assert all(o.allowed for o in await asyncio.gather(*tasks))
    assert len(receiver.deliveries()) == 1
    await svc.stop()
    svc2 = await make_service(store=redis_url, timeout=30, hold=False)
    out = await svc2.resolve(request(), alive)  # the session grant survived the restart
    assert (out.allowed, out.reason, out.approval_id) == (True, Reason.APPROVED, a.id)
    assert [g.scope for g in svc2.store.grants(0)] == [Scope.SESSION]


async def test_two_replicas_share_one_approval_and_each_others_decisions(make_service, redis_url, receiver,
                                                                         events):
    a = await make_service(store=redis_url, timeout=30, webhooks=[receiver.url], poll=0.05)
    b = await make_service(store=redis_url, timeout=30, webhooks=[receiver.url], poll=0.05)
    on_a = asyncio.create_task(a.resolve(request(), alive))
    await wait_until(lambda: bool(a.store.pending()))
    on_b = asyncio.create_task(b.resolve(request(), alive))
    await wait_until(lambda: any(b.waiters(x) for x in b.store.pending()))
    [approval] = b.store.pending()
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    await b.decide(approval.id, Choice.DENY, Scope.ONCE, "replica-b", None)
    out_a, out_b = await asyncio.wait_for(asyncio.gather(on_a, on_b), 5)
    assert (out_a.reason, out_a.approval_id) == (Reason.APPROVAL_DENIED, approval.id)
    assert a.store.get(approval.id).decided_by == "replica-b"
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
    await wait_until(lambda: bool(b.store.pending()))
    await b.decide(b.store.pending()[0].id, Choice.ALLOW, Scope.ONCE, "b", None)
    assert (await asyncio.wait_for(held, 5)).allowed
    assert b.store.grants(0) == []  # the waiters on A used the `once`; no spare pass is left
    nxt = asyncio.create_task(b.resolve(request(), alive))
    await wait_until(lambda: bool(b.store.pending()))
    assert not nxt.done()
    nxt.cancel()


def test_approvals_are_stored_as_the_contract_strings(redis_url, tmp_path):
    import redis

    s = open_store(redis_url, tmp_path)
    assert isinstance(s, RedisStore)
    s.open(approval(), now=100)
    s.decide("apr_1", Choice.DENY, Scope.SESSION, "x", "why", now=150)
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        h = r.hgetall("portcullis:apr:apr_1")
    assert (h["state"], h["decision"], h["scope"], h["notified"], h["port"]) == (
        "denied", "deny", "session", "0", "443")
    assert s.get("apr_1") == approval().decided(Choice.DENY, Scope.SESSION, "x", "why", 150.0)
    s.close()


def test_replicas_racing_to_open_one_key_get_one_approval(redis_url, tmp_path):
    """Eight clients (eight replicas) open the same key at once: the Lua script lets exactly one in."""
    import threading

    results: list[str] = []
    start = threading.Barrier(8)

    def opener(i: int) -> None:
        s = open_store(redis_url, tmp_path)
        try:
            start.wait(10)
            results.append(s.open(approval(f"apr_{i}"), now=100).id)
        finally:
            s.close()

    threads = [threading.Thread(target=opener, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and len(set(results)) == 1
    s = open_store(redis_url, tmp_path)
    assert [a.id for a in s.pending()] == results[:1] and s.get(results[0]).state is State.PENDING
    s.close()
