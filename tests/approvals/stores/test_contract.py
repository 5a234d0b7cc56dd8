"""The Store protocol (addons/approvals/model.py), held by both stores alike (addons/approvals/stores/),
and `open_store`'s choice between them."""

from __future__ import annotations

import sys

import pytest

from addons.approvals.errors import ApprovalError
from addons.approvals.model import Choice, Scope, State
from addons.approvals.stores import open_store
from addons.approvals.stores.sqlite import SqliteStore
from tests.approvals.approvals_support import approval

K = ("c", "h", 443)


def test_both_stores_have_the_same_state_machine(store):
    assert store.open(approval(), now=100) == approval()
    assert store.get("apr_1") == approval()
    assert store.pending_for(K, now=150).id == "apr_1"
    assert store.pending_for(K, now=250) is None
    assert store.decide("apr_1", Choice.ALLOW, Scope.ONCE, "x", None, now=150)
    assert not store.decide("apr_1", Choice.DENY, Scope.ONCE, "y", None, now=151)
    assert not store.expire("apr_1", now=300)
    got = store.get("apr_1")
    assert (got.state, got.decision, got.scope, got.decided_by, got.reason, got.decided_at) == (
        State.ALLOWED, Choice.ALLOW, Scope.ONCE, "x", None, 150.0)
    assert all(type(v) is t for v, t in ((got.state, State), (got.decision, Choice), (got.scope, Scope)))
    assert store.pending_for(K, now=150) is None
    store.open(approval("apr_2", created_at=101.0), now=101)
    assert [a.id for a in store.due(now=250)] == ["apr_2"]
    assert store.expire("apr_2", now=250)
    assert not store.decide("apr_2", Choice.ALLOW, Scope.ONCE, None, None, now=251)
    assert store.get("apr_2").state is State.EXPIRED
    assert [a.id for a in store.recent()] == ["apr_2", "apr_1"]
    assert store.pending() == []
    store.mark_notified("apr_2")
    assert store.get("apr_2").notified
    store.mark_notified("apr_missing")
    assert store.get("apr_missing") is None
    assert store.get("nope") is None


def test_both_stores_have_the_same_grants(store):
    store.add_grant(K, Choice.ALLOW, Scope.SESSION, "apr_1", now=0, expires_at=100, single_use=False)
    assert store.take_grant(K, now=50).decision is Choice.ALLOW
    assert store.take_grant(K, now=50).decision is Choice.ALLOW
    store.add_grant(K, Choice.DENY, Scope.SESSION, "apr_2", now=1, expires_at=100, single_use=False)
    assert store.take_grant(K, now=50).decision is Choice.DENY
    store.add_grant(("c", "o", 80), Choice.ALLOW, Scope.ONCE, "apr_3", now=0, expires_at=100, single_use=True)
    g = store.take_grant(("c", "o", 80), now=50)
    assert (g.scope, g.single_use, g.approval_id) == (Scope.ONCE, True, "apr_3")
    assert store.take_grant(("c", "o", 80), now=50) is None
    assert store.take_grant(K, now=150) is None
    assert store.take_grant(("other", "h", 443), now=50) is None
    assert len(store.grants(now=50)) == 2
    assert store.sweep(now=150) == 2
    assert store.grants(now=0) == []


def test_open_keeps_one_pending_approval_per_key(store):
    """What coalescing across replicas rests on: a second open for a live key returns the first."""
    first = store.open(approval("apr_1"), now=100)
    assert store.open(approval("apr_2", created_at=110.0), now=110) == first
    assert store.get("apr_2") is None and [a.id for a in store.pending()] == ["apr_1"]
    assert store.open(approval("apr_3", port=8443), now=110).id == "apr_3"  # another key
    # Once it is decided (or past its time), the key opens afresh.
    assert store.decide("apr_1", Choice.DENY, Scope.ONCE, None, None, now=120)
    assert store.open(approval("apr_4", created_at=120.0), now=120).id == "apr_4"
    assert store.open(approval("apr_5", created_at=250.0, expires_at=400.0), now=250).id == "apr_5"
    assert store.pending_for(K, now=250).id == "apr_5"


def test_drop_single_use_removes_only_that_approvals_once(store):
    store.add_grant(K, Choice.ALLOW, Scope.ONCE, "apr_1", now=0, expires_at=100, single_use=True)
    store.add_grant(K, Choice.ALLOW, Scope.ONCE, "apr_2", now=0, expires_at=100, single_use=True)
    store.add_grant(K, Choice.ALLOW, Scope.SESSION, "apr_1", now=0, expires_at=100, single_use=False)
    assert store.drop_single_use(approval("apr_1")) == 1
    left = sorted((g.approval_id, g.single_use) for g in store.grants(0))
    assert left == [("apr_1", False), ("apr_2", True)]
    assert store.drop_single_use(approval("apr_1")) == 0


def test_sweep_keeps_decided_approvals_for_a_week(store):
    store.open(approval("apr_1"), now=100)
    store.decide("apr_1", Choice.ALLOW, Scope.ONCE, None, None, now=150)
    store.sweep(now=150 + 7 * 86400 - 1)
    assert store.get("apr_1") is not None
    store.sweep(now=150 + 7 * 86400 + 1)
    assert store.get("apr_1") is None and store.recent() == []


def test_open_store_picks_the_store_by_url(tmp_path):
    assert isinstance(open_store("sqlite:///x.db", tmp_path), SqliteStore)
    assert (tmp_path / "x.db").is_file()
    with pytest.raises(ApprovalError, match="not supported"):
        open_store("postgres://db/x", tmp_path)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0"])
def test_without_the_redis_package_the_error_names_the_extra(tmp_path, monkeypatch, url):
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(ApprovalError, match=r"pip install 'portcullis\[redis\]'"):
        open_store(url, tmp_path)
