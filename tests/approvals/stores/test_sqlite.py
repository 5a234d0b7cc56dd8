"""addons/approvals/stores/sqlite.py on real files: the URL forms, the compare-and-set state machine,
grants, durability (synchronous=FULL in WAL: a decision that was answered survives a power cut, not
only a crash of the process; cost: bench/bench_store.py), and a file written by an older version."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from addons.approvals.errors import ApprovalError
from addons.approvals.model import Choice, Scope, State
from addons.approvals.stores import open_store
from addons.approvals.stores.sqlite import SqliteStore, store_path
from tests.approvals.approvals_support import approval

K = ("c", "h", 443)

FULL = 2  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA


async def test_store_opens_with_full_durability_every_time(tmp_path: Path) -> None:
    for _ in range(2):  # a new file, then the existing one
        store = await open_store("sqlite:///state/portcullis.db", tmp_path)
        db = store._db  # type: ignore[attr-defined]
        assert db.execute("PRAGMA synchronous").fetchone()[0] == FULL
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        await store.close()
    assert (tmp_path / "state" / "portcullis.db").is_file()


def test_store_url_forms(tmp_path):
    assert store_path("sqlite:///state/p.db", tmp_path) == tmp_path / "state/p.db"
    assert store_path("sqlite:////var/lib/p.db", tmp_path) == Path("/var/lib/p.db")
    for bad in ("redis://localhost:6379/0", "sqlite://", "postgres://x", "state.db"):
        with pytest.raises(ApprovalError, match="not supported"):
            store_path(bad, tmp_path)


async def test_store_state_machine_is_compare_and_set(tmp_path):
    s = SqliteStore(tmp_path / "s" / "a.db")
    await s.open(approval(), now=100)
    assert (await s.pending_for(K, now=150)).id == "apr_1"
    assert await s.pending_for(K, now=250) is None
    assert await s.decide("apr_1", Choice.ALLOW, Scope.ONCE, "x", None, now=150)
    assert not await s.decide("apr_1", Choice.DENY, Scope.ONCE, "y", None, now=151)  # first decision wins
    assert not await s.expire("apr_1", now=300)
    assert (await s.get("apr_1")).state is State.ALLOWED and (await s.get("apr_1")).decided_by == "x"
    await s.open(approval("apr_2"), now=100)
    assert [a.id for a in await s.due(now=250)] == ["apr_2"]
    assert await s.expire("apr_2", now=250)
    assert not await s.decide("apr_2", Choice.ALLOW, Scope.ONCE, None, None, now=251)
    assert [a.id for a in await s.recent()] == ["apr_2", "apr_1"]
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # What the file holds: the contract's strings.
    assert s._db.execute("SELECT state, decision, scope FROM approvals WHERE id = 'apr_1'").fetchone() == (
        "allowed", "allow", "once")
    await s.close()


async def test_grants_deny_first_single_use_consumed_expired_swept(tmp_path):
    s = SqliteStore(tmp_path / "a.db")
    await s.add_grant(K, Choice.ALLOW, Scope.SESSION, "apr_1", now=0, expires_at=100, single_use=False)
    assert (await s.take_grant(K, now=50)).decision is Choice.ALLOW
    assert (await s.take_grant(K, now=50)).decision is Choice.ALLOW  # session: not consumed
    await s.add_grant(K, Choice.DENY, Scope.SESSION, "apr_2", now=1, expires_at=100, single_use=False)
    assert (await s.take_grant(K, now=50)).decision is Choice.DENY  # deny wins
    await s.add_grant(("c", "o", 80), Choice.ALLOW, Scope.ONCE, "apr_3", now=0, expires_at=100,
                      single_use=True)
    assert (await s.take_grant(("c", "o", 80), now=50)).scope is Scope.ONCE
    assert await s.take_grant(("c", "o", 80), now=50) is None  # used up
    assert await s.take_grant(K, now=150) is None  # expired
    assert await s.take_grant(("other", "h", 443), now=50) is None
    assert await s.sweep(now=150) == 2
    assert await s.grants(now=0) == []
    assert s._db.execute("SELECT COUNT(*) FROM grants").fetchone() == (0,)
    await s.close()


async def test_two_processes_opening_one_key_at_once_get_one_approval(tmp_path):
    """Two connections to one file (two replicas' view), racing `open` from threads: one approval stands."""
    path = tmp_path / "shared.db"
    await SqliteStore(path).close()
    results: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    async def one(i: int) -> None:
        s = SqliteStore(path)
        try:
            start.wait(10)  # this thread's own loop: blocking here blocks nobody else
            results.append((await s.open(approval(f"apr_{i}"), now=100)).id)
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)
        finally:
            await s.close()

    def opener(i: int) -> None:
        asyncio.run(one(i))

    threads = [threading.Thread(target=opener, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 8
    assert len(set(results)) == 1
    s = SqliteStore(path)
    assert [a.id for a in await s.pending()] == results[:1]
    await s.close()


async def test_a_store_written_before_webhooks_were_tracked_gains_the_notified_column(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE approvals (id TEXT PRIMARY KEY, client_key TEXT NOT NULL, client_address TEXT, "
               "client_name TEXT, host TEXT NOT NULL, port INTEGER NOT NULL, scheme TEXT, method TEXT, "
               "path TEXT, rule TEXT, created_at REAL NOT NULL, expires_at REAL NOT NULL, "
               "state TEXT NOT NULL DEFAULT 'pending', decision TEXT, scope TEXT, decided_by TEXT, "
               "reason TEXT, decided_at REAL)")
    db.execute("INSERT INTO approvals (id, client_key, host, port, created_at, expires_at, state, decision, "
               "scope) VALUES ('apr_old', 'c', 'h', 443, 1.0, 2.0, 'denied', 'deny', 'session')")
    db.commit()
    db.close()
    s = SqliteStore(path)
    old = await s.get("apr_old")
    assert (old.state, old.decision, old.scope, old.notified) == (State.DENIED, Choice.DENY, Scope.SESSION,
                                                                  False)
    assert (old.labels, old.task_until) == ((), None)  # and the task columns of release 2
    await s.close()


def test_an_unusable_path_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ApprovalError, match="cannot open the approvals store"):
        SqliteStore(tmp_path / "file" / "a.db")
