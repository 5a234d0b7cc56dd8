"""addons/credentials/stores.py: one behaviour table, run on SqliteCredentialStore (a real SQLite file)
and on RedisCredentialStore (a real redis-server). Two store objects on the same file or Redis stand for
two processes or replicas."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from addons.credentials.model import Credential, CredentialStore, hash_secret
from addons.credentials.stores import RedisCredentialStore, SqliteCredentialStore, open_credential_store

Opener = Callable[[], CredentialStore]
KEEP = 50.0


def cred(task: str = "t1", **kw: object) -> Credential:
    base: dict[str, object] = {
        "task_id": task,
        "profile": "frontend",
        "labels": (("repo", "web"),),
        "secret_hash": hash_secret("secret-" + task),
        "created_at": 100.0,
        "expires_at": 200.0,
        "revoked_at": None,
        "minted_by": "admin",
    }
    return Credential(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "redis"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens store objects on one database (each a process of its own); closes them all after."""
    # redis_url skips the redis half of a test when redis-server is missing
    url = request.getfixturevalue("redis_url") if request.param == "redis" else "sqlite:///state/approvals.db"
    opened: list[CredentialStore] = []

    def open_one() -> CredentialStore:
        s = open_credential_store(url, tmp_path)
        assert isinstance(s, RedisCredentialStore if request.param == "redis" else SqliteCredentialStore)
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        with contextlib.suppress(Exception):  # a test may have closed it already
            await s.close()


@pytest.fixture
def store(opener: Opener) -> CredentialStore:
    return opener()


async def test_insert_and_get(store):
    c = cred()
    assert await store.insert(c, now=100.0) is True
    assert await store.get("t1") == c
    assert await store.get("t2") is None


async def test_insert_refuses_a_live_duplicate_and_keeps_the_first(store):
    first = cred()
    assert await store.insert(first, now=100.0)
    second = cred(secret_hash=hash_secret("other"), created_at=150.0, expires_at=900.0)
    assert await store.insert(second, now=150.0) is False
    assert await store.insert(second, now=199.9) is False
    assert await store.get("t1") == first


@pytest.mark.parametrize(
    ("first", "now"),
    [
        (cred(), 200.0),  # the expiry instant: already expired
        (cred(), 500.0),
        (cred(revoked_at=150.0), 160.0),  # revoked, not yet expired
        (cred(revoked_at=150.0), 500.0),
    ],
    ids=["at-expiry", "expired", "revoked", "revoked-and-expired"],
)
async def test_insert_replaces_an_ended_credential(store, first, now):
    assert await store.insert(first, now=100.0)
    again = cred(
        secret_hash=hash_secret("new"),
        created_at=now,
        expires_at=now + 100,
        minted_by=None,
        profile=None,
        labels=(),
    )
    assert await store.insert(again, now=now) is True
    assert await store.get("t1") == again


async def test_all_lists_every_credential_in_minting_order(store):
    cs = [
        cred("c", created_at=130.0),
        cred("a", created_at=110.0),
        cred("b", created_at=120.0, revoked_at=125.0),
    ]
    for c in cs:
        assert await store.insert(c, now=100.0)
    assert [c.task_id for c in await store.all()] == ["a", "b", "c"]
    assert set(await store.all()) == set(cs)


async def test_all_of_an_empty_store(store):
    assert await store.all() == []


async def test_revoke_only_a_live_credential(store):
    await store.insert(cred("live"), now=100.0)
    await store.insert(cred("old", expires_at=150.0), now=100.0)
    got = await store.revoke("live", now=160.0)
    assert got == cred("live", revoked_at=160.0)
    assert await store.get("live") == got
    assert await store.revoke("live", now=170.0) is None  # already revoked: the first time stays
    assert (await store.get("live")).revoked_at == 160.0  # type: ignore[union-attr]
    assert await store.revoke("old", now=160.0) is None  # expired: nothing to revoke
    assert (await store.get("old")).revoked_at is None  # type: ignore[union-attr]
    assert await store.revoke("nobody", now=160.0) is None
    assert await store.get("nobody") is None  # a revoke of nothing writes nothing


@pytest.mark.parametrize(
    ("labels", "profile", "minted_by"),
    [
        ((), None, None),
        ((("repo", "web"), ("team", "ui")), "frontend", "alice"),
        ((("k8s.io/ns", "agents"), ("emoji", "🚀 ü ø"), ("eq", "a=b,c"), ("empty", "")), "docs", "ci-bot"),
        (tuple((f"k{i:02d}", "v" * 128) for i in range(16)), "release", "admin"),
        ((("quote", '"{}\\'),), "p", "x"),
    ],
    ids=["none", "two", "odd-characters", "sixteen-long", "json-characters"],
)
async def test_labels_profile_and_minter_round_trip(store, labels, profile, minted_by):
    c = cred(
        labels=labels,
        profile=profile,
        minted_by=minted_by,
        created_at=1712345678.123456,
        expires_at=1712345678.123456 + 28800.000001,
    )
    assert await store.insert(c, now=1712345678.2)
    assert await store.get("t1") == c
    assert await store.all() == [c]


async def test_count_live(opener):
    a, b = opener(), opener()
    assert await a.count_live(100.0) == 0
    for i in range(600):  # more than one batch of keys in Redis
        await a.insert(cred(f"t{i}", created_at=100.0, expires_at=200.0 + (i % 3) * 100), now=100.0)
    await a.revoke("t0", now=150.0)
    await a.revoke("t2", now=150.0)
    assert await b.count_live(150.0) == 598
    assert await b.count_live(200.0) == 399  # t0, t3, t6 ... expired at 200 (t0 revoked before)
    assert await b.count_live(300.0) == 199
    assert await b.count_live(400.0) == 0


async def test_sweep_reports_each_expiry_once_on_every_process(opener):
    a, b = opener(), opener()
    await a.insert(cred("x", expires_at=200.0), now=100.0)
    await a.insert(cred("y", expires_at=300.0), now=100.0)
    await a.insert(cred("live", expires_at=10_000.0), now=100.0)
    await a.insert(cred("gone", expires_at=10_000.0), now=100.0)
    await a.revoke("gone", now=150.0)
    assert await a.sweep(now=199.0, keep_s=KEEP) == []
    assert await b.sweep(now=250.0, keep_s=KEEP) == [cred("x")]  # b is first here: b reports it
    assert await a.sweep(now=250.0, keep_s=KEEP) == []
    assert await b.sweep(now=251.0, keep_s=KEEP) == []
    assert [c.task_id for c in await a.sweep(now=310.0, keep_s=KEEP)] == ["y"]
    assert await b.sweep(now=320.0, keep_s=KEEP) == [] and await a.sweep(now=330.0, keep_s=KEEP) == []
    # A revoked credential is never reported as expired, not even once it is past its expiry.
    assert await a.sweep(now=10_001.0, keep_s=100_000.0) == [cred("live", expires_at=10_000.0)]
    assert await b.sweep(now=10_002.0, keep_s=100_000.0) == []


async def test_sweep_forgets_credentials_keep_s_after_they_ended(opener):
    a, b = opener(), opener()
    await a.insert(cred("exp", expires_at=200.0), now=100.0)
    await a.insert(cred("rev", expires_at=5_000.0), now=100.0)
    await a.insert(cred("live", expires_at=5_000.0), now=100.0)
    await a.revoke("rev", now=195.0)
    assert [c.task_id for c in await a.sweep(now=240.0, keep_s=KEEP)] == ["exp"]
    assert {c.task_id for c in await b.all()} == {"exp", "rev", "live"}  # kept (and listed) for keep_s
    await b.sweep(now=250.5, keep_s=KEEP)
    # exp ended at 200, rev when it was revoked (195, not at its expiry): both more than keep_s ago.
    assert [c.task_id for c in await a.all()] == ["live"]
    assert await a.get("exp") is None and await a.get("rev") is None
    assert await a.get("live") == cred("live", expires_at=5_000.0)


async def test_an_expiry_long_unseen_is_reported_once_and_forgotten(opener):
    """A proxy that was down for longer than keep_s: the expiry is still reported, once, then deleted."""
    a, b = opener(), opener()
    await a.insert(cred("old", expires_at=200.0), now=100.0)
    assert await b.sweep(now=1_000.0, keep_s=KEEP) == [cred("old", expires_at=200.0)]
    assert await a.sweep(now=1_000.0, keep_s=KEEP) == [] and await a.get("old") is None


async def test_a_task_minted_again_after_its_expiry_is_reported_again(opener):
    a, b = opener(), opener()
    await a.insert(cred("t", expires_at=200.0), now=100.0)
    assert len(await a.sweep(now=210.0, keep_s=KEEP)) == 1
    again = cred("t", created_at=220.0, expires_at=300.0, secret_hash=hash_secret("two"))
    assert await b.insert(again, now=220.0)
    assert await a.sweep(now=250.0, keep_s=KEEP) == []  # the new one is live
    assert await b.sweep(now=301.0, keep_s=KEEP) == [again]
    assert await a.sweep(now=302.0, keep_s=KEEP) == []


async def test_concurrent_sweeps_report_each_expiry_exactly_once(opener):
    """Two processes sweeping many ended credentials at the same moment: each expiry once, all gone."""
    a, b = opener(), opener()
    names = [f"t{i:03d}" for i in range(120)]
    for i, n in enumerate(names):
        await a.insert(cred(n, created_at=100.0 + i, expires_at=200.0 + i), now=100.0)
    found_a, found_b = await asyncio.gather(a.sweep(5_000.0, KEEP), b.sweep(5_000.0, KEEP))
    reported = sorted(c.task_id for c in found_a + found_b)
    assert reported == names  # each once: none twice, none lost
    assert await a.all() == [] and await b.all() == []
    assert await a.sweep(now=5_001.0, keep_s=KEEP) == []


async def test_a_sweep_never_deletes_or_marks_a_credential_minted_while_it_runs(opener):
    """Tasks minted again while another process sweeps their old, long-ended credentials: the new,
    live credentials survive the sweep, and their own expiry is reported later."""
    a, b = opener(), opener()
    names = [f"t{i:03d}" for i in range(120)]
    for i, n in enumerate(names):
        await a.insert(cred(n, created_at=100.0 + i, expires_at=200.0 + i), now=100.0)
    fresh = {
        n: cred(n, created_at=5_000.0, expires_at=6_000.0, secret_hash=hash_secret("new" + n)) for n in names
    }

    async def mint_all() -> None:
        for n in reversed(names):  # from the other end of the sweep's order, so that they cross
            assert await b.insert(fresh[n], now=5_000.0)

    await asyncio.gather(a.sweep(now=5_000.0, keep_s=KEEP), mint_all())
    assert {c.task_id: c for c in await b.all()} == fresh  # every new credential is there, unchanged
    later = await a.sweep(now=6_001.0, keep_s=KEEP)
    assert sorted(c.task_id for c in later) == names  # and each new expiry is reported


async def test_credentials_survive_a_restart(opener):
    a = opener()
    await a.insert(cred("live", expires_at=5_000.0), now=100.0)
    await a.insert(cred("rev", expires_at=5_000.0), now=100.0)
    await a.revoke("rev", now=120.0)
    await a.insert(cred("seen", expires_at=150.0), now=100.0)
    assert len(await a.sweep(now=160.0, keep_s=10_000.0)) == 1
    before = await a.all()
    await a.close()
    b = opener()
    assert await b.all() == before
    assert await b.get("rev") == cred("rev", expires_at=5_000.0, revoked_at=120.0)
    assert await b.sweep(now=170.0, keep_s=10_000.0) == []  # the reported expiry stays reported
    assert await b.insert(cred("live", expires_at=9_000.0), now=170.0) is False  # still live


def test_open_credential_store_picks_the_approvals_backend(tmp_path):
    s = open_credential_store("sqlite:///state/x.db", tmp_path)
    assert isinstance(s, SqliteCredentialStore) and (tmp_path / "state" / "x.db").is_file()
    asyncio.run(s.close())
    assert isinstance(open_credential_store("redis://127.0.0.1:1/0", tmp_path), RedisCredentialStore)
    assert isinstance(open_credential_store("rediss://127.0.0.1:1/0", tmp_path), RedisCredentialStore)


async def test_redis_unreachable_raises_for_the_service_to_fail_closed():
    from tests.credentials.conftest import free_port

    s = RedisCredentialStore(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        with pytest.raises(Exception, match="(?i)connect"):
            await s.get("t1")
        with pytest.raises(Exception, match="(?i)connect"):
            await s.insert(cred(), now=100.0)
    finally:
        await s.close()


async def test_redis_ignores_a_hash_that_is_not_a_whole_credential(redis_url):
    """A key under the prefix that is not a credential (an older version's sweep could leave one with
    only `expiry_seen`): nobody can use it, and it does not break listing, sweeping or minting."""
    import redis.asyncio as aioredis

    s = RedisCredentialStore(redis_url)
    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await s.insert(cred("ok", expires_at=5_000.0), now=100.0)
        await r.hset(RedisCredentialStore.PREFIX + "half", mapping={"expiry_seen": "1"})
        await r.hset(
            RedisCredentialStore.PREFIX + "junk",
            mapping={"task_id": "junk", "labels": "{not json", "expires_at": "x"},
        )
        assert await s.get("half") is None and await s.get("junk") is None
        assert [c.task_id for c in await s.all()] == ["ok"]
        assert await s.sweep(now=200.0, keep_s=KEEP) == []
        assert await r.exists(RedisCredentialStore.PREFIX + "half", RedisCredentialStore.PREFIX + "junk") == 0
        assert await s.get("ok") == cred("ok", expires_at=5_000.0)
        assert await s.insert(cred("half", expires_at=5_000.0), now=200.0)  # minting that task works
        assert await s.get("half") == cred("half", expires_at=5_000.0)
    finally:
        await r.aclose()
        await s.close()


async def test_a_sqlite_file_locked_by_another_process_fails_the_call_and_never_the_event_loop(tmp_path):
    """Another connection holds the write lock: a mint fails (the API answers 503) after the busy
    timeout, and the event loop keeps running meanwhile (the call waits on the store's own thread)."""
    import sqlite3

    store = SqliteCredentialStore(tmp_path / "creds.db")
    other = sqlite3.connect(tmp_path / "creds.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())  # noqa: RUF006 - cancelled below
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await store.insert(cred("locked"), now=100.0)
        assert ticks > 10  # the loop ran while the mint waited for the lock
        other.execute("ROLLBACK")
        assert await store.insert(cred("locked"), now=100.0) is True  # usable again at once
        assert (await store.get("locked")) == cred("locked")
    finally:
        ticker.cancel()
        other.close()
        await store.close()
