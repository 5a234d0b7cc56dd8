"""The Redis store (`redis://`) against a real redis-server, and two replicas sharing one store."""

from __future__ import annotations

import asyncio
import shutil
import socket

import pytest
from approvals_support import alive, request, wait_until

from addons.approvals.errors import ApprovalError
from addons.approvals.store import Approval, SqliteStore, open_store
from addons.policy.model import Reason

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server missing: apt-get install -y redis-server "
                                       "(./dev test installs it)")


@pytest.fixture
def redis_url(redis_server: str) -> str:
    import redis

    with redis.Redis.from_url(redis_server) as r:
        r.flushall()
    return redis_server


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path, redis_server):
    if request.param == "redis":
        import redis

        with redis.Redis.from_url(redis_server) as r:
            r.flushall()
        s = open_store(redis_server, tmp_path)
    else:
        s = open_store("sqlite:///a.db", tmp_path)
    yield s
    s.close()


def approval(i: str = "apr_1", **kw) -> Approval:
    base = {"id": i, "client_key": "c", "client_address": "10.0.0.1", "client_name": None, "host": "h",
            "port": 443, "scheme": "https", "method": None, "path": "/p", "rule": None, "created_at": 100.0,
            "expires_at": 200.0} | kw
    return Approval(**base)


def test_both_stores_have_the_same_state_machine(store):
    store.insert(approval())
    assert store.get("apr_1") == approval()
    assert store.pending_for("c", "h", 443, now=150).id == "apr_1"
    assert store.pending_for("c", "h", 443, now=250) is None
    assert store.decide("apr_1", "allow", "once", "x", None, now=150)
    assert not store.decide("apr_1", "deny", "once", "y", None, now=151)
    assert not store.expire("apr_1", now=300)
    got = store.get("apr_1")
    assert (got.state, got.decision, got.scope, got.decided_by, got.reason, got.decided_at) == (
        "allowed", "allow", "once", "x", None, 150.0)
    assert store.pending_for("c", "h", 443, now=150) is None
    store.insert(approval("apr_2", created_at=101.0))
    assert [a.id for a in store.due(now=250)] == ["apr_2"]
    assert store.expire("apr_2", now=250)
    assert not store.decide("apr_2", "allow", "once", None, None, now=251)
    assert [a.id for a in store.recent()] == ["apr_2", "apr_1"]
    assert store.pending() == []
    store.mark_notified("apr_2")
    assert store.get("apr_2").notified
    store.mark_notified("apr_missing")
    assert store.get("apr_missing") is None
    assert store.get("nope") is None


def test_both_stores_have_the_same_grants(store):
    store.add_grant("c", "h", 443, "allow", "session", "apr_1", now=0, expires_at=100, single_use=False)
    assert store.take_grant("c", "h", 443, now=50).decision == "allow"
    assert store.take_grant("c", "h", 443, now=50).decision == "allow"
    store.add_grant("c", "h", 443, "deny", "session", "apr_2", now=1, expires_at=100, single_use=False)
    assert store.take_grant("c", "h", 443, now=50).decision == "deny"
    store.add_grant("c", "o", 80, "allow", "once", "apr_3", now=0, expires_at=100, single_use=True)
    g = store.take_grant("c", "o", 80, now=50)
    assert (g.scope, g.single_use, g.approval_id) == ("once", True, "apr_3")
    assert store.take_grant("c", "o", 80, now=50) is None
    assert store.take_grant("c", "h", 443, now=150) is None
    assert store.take_grant("other", "h", 443, now=50) is None
    assert len(store.grants(now=50)) == 2
    assert store.sweep(now=150) == 2
    assert store.grants(now=0) == []


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
    await svc.decide(a.id, "allow", "session", "r", None)
    assert all(o.allowed for o in await asyncio.gather(*tasks))
    assert len(receiver.deliveries()) == 1
    await svc.stop()
    svc2 = await make_service(store=redis_url, timeout=30, hold=False)
    assert (await svc2.resolve(request(), alive)).scope == "session"


async def test_two_replicas_share_one_approval_and_each_others_decisions(make_service, redis_url, receiver):
    a = await make_service(store=redis_url, timeout=30, webhooks=[receiver.url], poll=0.05)
    b = await make_service(store=redis_url, timeout=30, webhooks=[receiver.url], poll=0.05)
    on_a = asyncio.create_task(a.resolve(request(), alive))
    await wait_until(lambda: bool(a.store.pending()))
    on_b = asyncio.create_task(b.resolve(request(), alive))
    await wait_until(lambda: any(b.waiters(x) for x in b.store.pending()))
    [approval] = b.store.pending()
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    await b.decide(approval.id, "deny", "once", "replica-b", None)
    out_a, out_b = await asyncio.wait_for(asyncio.gather(on_a, on_b), 5)
    assert (out_a.reason, out_a.approval_id) == (Reason.APPROVAL_DENIED, approval.id)
    assert out_a.decided_by == "replica-b"
    assert (out_b.reason, out_b.approval_id) == (Reason.APPROVAL_DENIED, approval.id)
    await asyncio.sleep(0.1)
    assert len(receiver.deliveries()) == 1  # one webhook for the shared approval


async def test_hold_false_replica_sees_a_remote_decision_and_asks_afresh(make_service, redis_url):
    a = await make_service(store=redis_url, hold=False, timeout=30, poll=0.05)
    b = await make_service(store=redis_url, hold=False, timeout=30, poll=0.05)
    first = await a.resolve(request(), alive)
    await b.decide(first.approval_id, "deny", "once", "b", None)
    assert (await a.resolve(request(), alive)).reason == Reason.APPROVAL_DENIED  # the `once` deny, used once
    await asyncio.sleep(0.06)
    again = await a.resolve(request(), alive)
    assert again.reason == Reason.APPROVAL_PENDING and again.approval_id != first.approval_id


async def test_once_decided_on_another_replica_is_used_by_the_waiters_only(make_service, redis_url):
    a = await make_service(store=redis_url, hold=True, timeout=30, poll=0.05)
    b = await make_service(store=redis_url, hold=True, timeout=30, poll=0.05)
    held = asyncio.create_task(a.resolve(request(), alive))
    await wait_until(lambda: bool(b.store.pending()))
    await b.decide(b.store.pending()[0].id, "allow", "once", "b", None)
    assert (await asyncio.wait_for(held, 5)).allowed
    assert b.store.grants(0) == []  # the waiters on A used the `once`; no spare pass is left
    nxt = asyncio.create_task(b.resolve(request(), alive))
    await wait_until(lambda: bool(b.store.pending()))
    assert not nxt.done()
    nxt.cancel()
