"""Credential stores: a table in the approvals' SQLite file, or keys in the approvals' Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from addons.credentials.model import Credential, CredentialStore

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    task_id TEXT PRIMARY KEY,
    profile TEXT,
    labels TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL,
    minted_by TEXT,
    expiry_seen INTEGER NOT NULL DEFAULT 0
);
"""
_COLUMNS = "task_id, profile, labels, secret_hash, created_at, expires_at, revoked_at, minted_by"


def _row(r: tuple[Any, ...]) -> Credential:
    labels = tuple((str(k), str(v)) for k, v in json.loads(r[2]).items())
    return Credential(r[0], r[1], labels, r[3], r[4], r[5], r[6], r[7])


class SqliteCredentialStore:
    """Same file as the approvals (WAL, synchronous=FULL): a minted or revoked credential is on disk
    before the API answers. Each call runs on the store's own thread (a file another process holds
    locked costs that call at most BUSY_TIMEOUT_S, never the event loop); an error is raised to the
    caller, which fails closed (a check: 407 "cannot be checked right now"; the API: 503)."""

    BUSY_TIMEOUT_S = 2.0

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-credentials")
        self._closed = False
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=self.BUSY_TIMEOUT_S)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    async def _run[T](self, job: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    async def insert(self, c: Credential, now: float) -> bool:
        return await self._run(lambda: self._insert(c, now))

    def _insert(self, c: Credential, now: float) -> bool:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute("SELECT revoked_at, expires_at FROM credentials WHERE task_id = ?", (c.task_id,))
            row = cur.fetchone()
            if row is not None and row[0] is None and row[1] > now:
                db.execute("ROLLBACK")
                return False
            db.execute(
                f"INSERT OR REPLACE INTO credentials ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    c.task_id,
                    c.profile,
                    json.dumps(dict(c.labels)),
                    c.secret_hash,
                    c.created_at,
                    c.expires_at,
                    c.revoked_at,
                    c.minted_by,
                ),
            )
            db.execute("COMMIT")
            return True
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def get(self, task_id: str) -> Credential | None:
        return await self._run(lambda: self._get(task_id))

    def _get(self, task_id: str) -> Credential | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM credentials WHERE task_id = ?",  # noqa: S608 - constant columns
            (task_id,),
        ).fetchone()
        return _row(row) if row else None

    async def all(self) -> list[Credential]:
        def job() -> list[Credential]:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM credentials ORDER BY created_at").fetchall()  # noqa: S608
            return [_row(r) for r in rows]

        return await self._run(job)

    async def revoke(self, task_id: str, now: float) -> Credential | None:
        def job() -> Credential | None:
            cur = self._db.execute(
                "UPDATE credentials SET revoked_at = ? "
                "WHERE task_id = ? AND revoked_at IS NULL AND expires_at > ?",
                (now, task_id, now),
            )
            return self._get(task_id) if cur.rowcount == 1 else None

        return await self._run(job)

    async def sweep(self, now: float, keep_s: float) -> list[Credential]:
        def job() -> list[Credential]:
            # One statement marks and returns the credentials newly found expired (compare-and-set: of
            # the processes sweeping at once, one reports each; one minted meanwhile is not touched).
            rows = self._db.execute(
                "UPDATE credentials SET expiry_seen = 1 WHERE revoked_at IS NULL AND expires_at <= ? "  # noqa: S608
                f"AND expiry_seen = 0 RETURNING {_COLUMNS}",
                (now,),
            ).fetchall()
            # Ended: when it was revoked, else when it expired.
            self._db.execute(
                "DELETE FROM credentials WHERE COALESCE(revoked_at, expires_at) < ?", (now - keep_s,)
            )
            return sorted((_row(r) for r in rows), key=lambda c: c.created_at)

        return await self._run(job)

    async def count_live(self, now: float) -> int:
        def job() -> int:
            row = self._db.execute(
                "SELECT COUNT(*) FROM credentials WHERE revoked_at IS NULL AND expires_at > ?", (now,)
            ).fetchone()
            return int(row[0])

        return await self._run(job)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._run(self._db.close)
        finally:
            self._pool.shutdown(wait=False)


class RedisCredentialStore:
    """`portcullis:cred:<task>` hashes (redis.asyncio: never blocks the event loop)."""

    PREFIX = "portcullis:cred:"

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as e:  # pragma: no cover - the image and the dev extra have it
            raise RuntimeError(
                "store redis:// needs the Redis client: pip install 'portcullis[redis]'"
            ) from e
        self._r: Any = aioredis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
        )

    @staticmethod
    def _encode(c: Credential) -> dict[str, str]:
        return {
            "task_id": c.task_id,
            "profile": c.profile or "",
            "labels": json.dumps(dict(c.labels)),
            "secret_hash": c.secret_hash,
            "created_at": repr(c.created_at),
            "expires_at": repr(c.expires_at),
            "revoked_at": "" if c.revoked_at is None else repr(c.revoked_at),
            "minted_by": c.minted_by or "",
        }

    @staticmethod
    def _decode(h: dict[str, str]) -> Credential | None:
        """None for no hash, and for one that is not a whole credential (left by an older version, or
        written by hand): it is not a credential anyone can use, and it does not break the listing."""
        if not h:
            return None
        try:
            labels = tuple((str(k), str(v)) for k, v in json.loads(h["labels"]).items())
            return Credential(
                h["task_id"],
                h["profile"] or None,
                labels,
                h["secret_hash"],
                float(h["created_at"]),
                float(h["expires_at"]),
                float(h["revoked_at"]) if h["revoked_at"] else None,
                h["minted_by"] or None,
            )
        except (KeyError, ValueError, AttributeError):
            log.warning("credential store: ignored a malformed credential (fields %s)", sorted(h))
            return None

    # A hash is a live credential when it is not revoked and its expiry is a number after now; a hash
    # that is not a whole credential never is one (and a sweep removes one without an expiry).
    _INSERT = """
    local cur = redis.call('HMGET', KEYS[1], 'revoked_at', 'expires_at')
    local exp = tonumber(cur[2])
    if exp and (not cur[1] or cur[1] == '') and exp > tonumber(ARGV[1]) then return 0 end
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], unpack(ARGV, 2))
    return 1
    """
    _REVOKE = """
    local cur = redis.call('HMGET', KEYS[1], 'revoked_at', 'expires_at')
    local exp = tonumber(cur[2])
    if not exp or (cur[1] and cur[1] ~= '') or exp <= tonumber(ARGV[1]) then return 0 end
    redis.call('HSET', KEYS[1], 'revoked_at', ARGV[1])
    return 1
    """
    # One credential, judged on what is stored now (not on a listing read earlier): mark a new expiry
    # seen and return the credential (compare-and-set: one process reports it); forget it keep_s
    # (ARGV[2]) after it ended (when it was revoked, else when it expired).
    _SWEEP = """
    local cur = redis.call('HMGET', KEYS[1], 'revoked_at', 'expires_at', 'expiry_seen')
    local exp = tonumber(cur[2])
    if not exp then
        redis.call('DEL', KEYS[1])
        return {}
    end
    local now = tonumber(ARGV[1])
    local revoked = cur[1] and cur[1] ~= ''
    local found = {}
    if not revoked and exp <= now and not cur[3] then
        redis.call('HSET', KEYS[1], 'expiry_seen', '1')
        found = redis.call('HGETALL', KEYS[1])
    end
    local ended = exp
    if revoked then ended = tonumber(cur[1]) or exp end
    if ended < now - tonumber(ARGV[2]) then redis.call('DEL', KEYS[1]) end
    return found
    """

    _COUNT = """
    local n = 0
    for _, key in ipairs(KEYS) do
        local cur = redis.call('HMGET', key, 'revoked_at', 'expires_at')
        local exp = tonumber(cur[2])
        if exp and (not cur[1] or cur[1] == '') and exp > tonumber(ARGV[1]) then n = n + 1 end
    end
    return n
    """

    async def insert(self, c: Credential, now: float) -> bool:
        flat = [x for kv in self._encode(c).items() for x in kv]
        return bool(await self._r.eval(self._INSERT, 1, self.PREFIX + c.task_id, repr(now), *flat))

    async def get(self, task_id: str) -> Credential | None:
        return self._decode(await self._r.hgetall(self.PREFIX + task_id))

    async def all(self) -> list[Credential]:
        out = []
        async for key in self._r.scan_iter(match=self.PREFIX + "*", count=500):
            c = self._decode(await self._r.hgetall(key))
            if c is not None:
                out.append(c)
        return sorted(out, key=lambda c: c.created_at)

    async def revoke(self, task_id: str, now: float) -> Credential | None:
        if await self._r.eval(self._REVOKE, 1, self.PREFIX + task_id, repr(now)):
            return await self.get(task_id)
        return None

    async def sweep(self, now: float, keep_s: float) -> list[Credential]:
        found: dict[str, Credential] = {}
        async for key in self._r.scan_iter(match=self.PREFIX + "*", count=500):
            flat = await self._r.eval(self._SWEEP, 1, key, repr(now), repr(keep_s))
            c = self._decode(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None
            if c is not None:
                found[c.task_id] = c  # SCAN may return a key twice; the script reports it once anyway
        return sorted(found.values(), key=lambda c: c.created_at)

    async def count_live(self, now: float) -> int:
        keys = sorted({k async for k in self._r.scan_iter(match=self.PREFIX + "*", count=500)})
        n = 0
        for i in range(0, len(keys), 500):  # one script per 500 keys: a round trip each, not one per key
            batch = keys[i : i + 500]
            n += int(await self._r.eval(self._COUNT, len(batch), *batch, repr(now)))
        return n

    async def close(self) -> None:
        await self._r.aclose()


def open_credential_store(url: str, base_dir: Path) -> CredentialStore:
    """Beside the approvals: the same SQLite file, or the same Redis."""
    if url.startswith(("redis://", "rediss://")):
        return RedisCredentialStore(url)
    from addons.approvals.stores.sqlite import store_path

    return SqliteCredentialStore(store_path(url, base_dir))
