"""The Store protocol (addons/approvals/model.py), held by both stores alike (addons/approvals/stores/),
and `open_store`'s choice between them."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from addons.approvals.errors import ApprovalError
from addons.approvals.model import Choice, Scope, State
from addons.approvals.stores import open_store
from addons.approvals.stores.sqlite import SqliteStore
from tests.approvals.approvals_support import approval

K = ("c", "h", 443)


async def test_both_stores_have_the_same_state_machine(store):
    assert await store.count_pending() == 0
    assert await store.open(approval(), now=100) == approval()
    assert await store.get("apr_1") == approval()
    assert await store.count_pending() == 1
    assert (await store.pending_for(K, now=150)).id == "apr_1"
    assert await store.pending_for(K, now=250) is None
    assert await store.decide("apr_1", Choice.ALLOW, Scope.ONCE, "x", None, now=150)
    assert not await store.decide("apr_1", Choice.DENY, Scope.ONCE, "y", None, now=151)
    assert not await store.expire("apr_1", now=300)
    got = await store.get("apr_1")
    assert (got.state, got.decision, got.scope, got.decided_by, got.reason, got.decided_at) == (
        State.ALLOWED, Choice.ALLOW, Scope.ONCE, "x", None, 150.0)
    assert all(type(v) is t for v, t in ((got.state, State), (got.decision, Choice), (got.scope, Scope)))
    assert await store.pending_for(K, now=150) is None
    await store.open(approval("apr_2", created_at=101.0), now=101)
    assert [a.id for a in await store.due(now=250)] == ["apr_2"]
    assert await store.expire("apr_2", now=250)
    assert not await store.decide("apr_2", Choice.ALLOW, Scope.ONCE, None, None, now=251)
    assert (await store.get("apr_2")).state is State.EXPIRED
    assert [a.id for a in await store.recent()] == ["apr_2", "apr_1"]
    assert await store.pending() == [] and await store.count_pending() == 0
    await store.mark_notified("apr_2")
    assert (await store.get("apr_2")).notified
    await store.mark_notified("apr_missing")
    assert await store.get("apr_missing") is None
    assert await store.get("nope") is None


async def test_both_stores_keep_the_asking_tasks_labels_and_expiry(store):
    a = replace(approval("apr_t"), client_key="task:build-7", labels=(("repo", "web"), ("by", "ci|x")),
                task_until=1234.5)
    await store.open(a, now=100)
    got = await store.get("apr_t")
    assert got == a and (got.task_id, got.labels, got.task_until) == ("build-7", a.labels, 1234.5)
    assert await store.decide("apr_t", Choice.ALLOW, Scope.TASK, "alice", None, now=101)
    assert (await store.get("apr_t")).scope is Scope.TASK


async def test_both_stores_drop_every_grant_of_one_client(store):
    for who in ("task:a", "task:b"):
        for host in ("h1", "h2"):
            await store.add_grant((who, host, 443), Choice.ALLOW, Scope.TASK, None, 100, 200,
                                  single_use=False)
    assert await store.drop_grants_of("task:a") == 2
    assert {g.client_key for g in await store.grants(150)} == {"task:b"}
    assert await store.take_grant(("task:a", "h1", 443), 150) is None
    assert (await store.take_grant(("task:b", "h1", 443), 150)) is not None
    assert await store.drop_grants_of("task:nobody") == 0


async def test_both_stores_have_the_same_grants(store):
    await store.add_grant(K, Choice.ALLOW, Scope.SESSION, "apr_1", now=0, expires_at=100, single_use=False)
    assert (await store.take_grant(K, now=50)).decision is Choice.ALLOW
    assert (await store.take_grant(K, now=50)).decision is Choice.ALLOW
    await store.add_grant(K, Choice.DENY, Scope.SESSION, "apr_2", now=1, expires_at=100, single_use=False)
    assert (await store.take_grant(K, now=50)).decision is Choice.DENY
    await store.add_grant(("c", "o", 80), Choice.ALLOW, Scope.ONCE, "apr_3", now=0, expires_at=100,
                          single_use=True)
    g = await store.take_grant(("c", "o", 80), now=50)
    assert (g.scope, g.single_use, g.approval_id) == (Scope.ONCE, True, "apr_3")
    assert await store.take_grant(("c", "o", 80), now=50) is None
    assert await store.take_grant(K, now=150) is None
    assert await store.take_grant(("other", "h", 443), now=50) is None
    assert len(await store.grants(now=50)) == 2
    assert await store.sweep(now=150) == 2
    assert await store.grants(now=0) == []


async def test_open_keeps_one_pending_approval_per_key(store):
    """What coalescing across replicas rests on: a second open for a live key returns the first."""
    first = await store.open(approval("apr_1"), now=100)
    assert await store.open(approval("apr_2", created_at=110.0), now=110) == first
    assert await store.get("apr_2") is None and [a.id for a in await store.pending()] == ["apr_1"]
    assert (await store.open(approval("apr_3", port=8443), now=110)).id == "apr_3"  # another key
    # Once it is decided (or past its time), the key opens afresh.
    assert await store.decide("apr_1", Choice.DENY, Scope.ONCE, None, None, now=120)
    assert (await store.open(approval("apr_4", created_at=120.0), now=120)).id == "apr_4"
    assert (await store.open(approval("apr_5", created_at=250.0, expires_at=400.0), now=250)).id == "apr_5"
    assert (await store.pending_for(K, now=250)).id == "apr_5"


async def test_drop_single_use_removes_only_that_approvals_once(store):
    await store.add_grant(K, Choice.ALLOW, Scope.ONCE, "apr_1", now=0, expires_at=100, single_use=True)
    await store.add_grant(K, Choice.ALLOW, Scope.ONCE, "apr_2", now=0, expires_at=100, single_use=True)
    await store.add_grant(K, Choice.ALLOW, Scope.SESSION, "apr_1", now=0, expires_at=100, single_use=False)
    assert await store.drop_single_use(approval("apr_1")) == 1
    left = sorted((g.approval_id, g.single_use) for g in await store.grants(0))
    assert left == [("apr_1", False), ("apr_2", True)]
    assert await store.drop_single_use(approval("apr_1")) == 0


async def test_sweep_keeps_decided_approvals_for_a_week(store):
    await store.open(approval("apr_1"), now=100)
    await store.decide("apr_1", Choice.ALLOW, Scope.ONCE, None, None, now=150)
    await store.sweep(now=150 + 7 * 86400 - 1)
    assert await store.get("apr_1") is not None
    await store.sweep(now=150 + 7 * 86400 + 1)
    assert await store.get("apr_1") is None and await store.recent() == []


async def test_open_store_picks_the_store_by_url(tmp_path):
    assert isinstance(await open_store("sqlite:///x.db", tmp_path), SqliteStore)
    assert (tmp_path / "x.db").is_file()
    with pytest.raises(ApprovalError, match="not supported"):
        await open_store("postgres://db/x", tmp_path)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0"])
async def test_without_the_redis_package_the_error_names_the_extra(tmp_path, monkeypatch, url):
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(ApprovalError, match=r"pip install 'portcullis\[redis\]'"):
        await open_store(url, tmp_path)
