"""SQLite store for approvals and grants (one WAL file; survives restarts and power cuts).

Every call runs on one thread of the store's own, one at a time, never on the event loop: a file that
another process holds locked, that became read-only or whose disk is full costs the requests that need
the store (denied `internal_error`, StoreUnavailable naming why, told once to `health`), never the rest
of the proxy's traffic. The next call that works tells `health` it is back."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate

from addons.approvals.errors import ApprovalError, StoreUnavailable
from addons.approvals.model import Approval, Choice, Grant, Key, Scope, State, decode_labels

if TYPE_CHECKING:
    from addons.approvals.stores.redis import Health

BUSY_TIMEOUT_MS = 2000  # another process's write lock: wait this long, then fail closed (Redis: 2 s too)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    client_key TEXT NOT NULL,
    client_address TEXT,
    client_name TEXT,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    scheme TEXT,
    method TEXT,
    path TEXT,
    rule TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    decision TEXT,
    scope TEXT,
    decided_by TEXT,
    reason TEXT,
    decided_at REAL,
    notified INTEGER NOT NULL DEFAULT 0,
    labels TEXT,
    task_until REAL
);
CREATE INDEX IF NOT EXISTS approvals_by_key ON approvals (state, client_key, host, port);
CREATE TABLE IF NOT EXISTS grants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_key TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    decision TEXT NOT NULL,
    scope TEXT NOT NULL,
    approval_id TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    single_use INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS grants_by_key ON grants (client_key, host, port);
"""

_COLUMNS = (
    "id, client_key, client_address, client_name, host, port, scheme, method, path, rule, "
    "created_at, expires_at, state, decision, scope, decided_by, reason, decided_at, notified, labels, "
    "task_until"
)
_GRANT_COLUMNS = ("id, client_key, host, port, decision, scope, approval_id, created_at, expires_at, "
                  "single_use")
_PENDING_FOR = ("state = 'pending' AND client_key = ? AND host = ? AND port = ? AND expires_at > ? "
                "ORDER BY created_at LIMIT 1")


def store_path(url: str, base_dir: Path) -> Path:
    """`sqlite:///rel/path.db` (relative to base_dir) or `sqlite:////abs/path.db` -> a file path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ApprovalError(
            f"approvals.store {url!r} is not supported: use sqlite:///relative/path.db, "
            "sqlite:////absolute/path.db or redis://HOST:PORT/DB"
        )
    rest = url[len(prefix):]
    return Path(rest) if rest.startswith("/") else base_dir / rest


def _unusable(e: sqlite3.Error) -> bool:
    """The file cannot be used now (locked, read-only, disk full, I/O error, damaged), as opposed to a
    bug in how it is called (ProgrammingError, a constraint): the former fails closed as unavailable."""
    return isinstance(e, sqlite3.OperationalError) or (
        isinstance(e, sqlite3.DatabaseError)
        and not isinstance(e, sqlite3.ProgrammingError | sqlite3.IntegrityError))


def _hint(path: Path) -> str:
    """Why a store may not open, when the file system can tell."""
    folder = path.parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f" ({folder} is on a read-only file system)"
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            return f" ({path} or its folder is not writable by uid {os.getuid()})"
    except OSError:
        pass
    return " (is the file or its folder read-only, e.g. chattr +i, or the disk full?)"


def unusable_message(name: str, e: BaseException) -> str:
    return f"the approvals store {name} cannot be used ({type(e).__name__}: {e})"


def _in_thread[**P, T](fn: Callable[Concatenate[SqliteStore, P], T]
                       ) -> Callable[Concatenate[SqliteStore, P], Coroutine[Any, Any, T]]:
    """A store call as a coroutine that runs `fn` on the store's thread (see the module docstring)."""
    async def call(self: SqliteStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(functools.partial(fn, self, *args, **kwargs), fn.__name__ in _WRITES)
    call.__name__, call.__qualname__, call.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return call


# Calls that commit a write. Only these tell `health` the store is back: a locked or read-only file
# still answers reads, and must not look usable each time a read passes.
_WRITES = frozenset({"open", "decide", "mark_notified", "expire", "add_grant", "drop_single_use",
                     "drop_grants_of", "sweep"})


class SqliteStore:
    """Local and fast (one small row per call, well under a millisecond with its fsync). Each call is
    one transaction on the store's single thread, so calls never interleave with each other."""

    def __init__(self, path: Path, health: Health | None = None) -> None:
        self.path = path
        self.health = health
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit (approval, decision, grant) is fsynced before the call returns, so a
            # power cut cannot lose a decision already answered. Cost: bench/bench_store.py.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._db.executescript(_SCHEMA)
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(approvals)")}
            if "notified" not in cols:  # a store written before webhooks were tracked
                self._db.execute("ALTER TABLE approvals ADD COLUMN notified INTEGER NOT NULL DEFAULT 0")
            for col, kind in (("labels", "TEXT"), ("task_until", "REAL")):  # before task credentials
                if col not in cols:
                    self._db.execute(f"ALTER TABLE approvals ADD COLUMN {col} {kind}")
            # SQLite opens a file it cannot write read-only without a word; every approval would then
            # fail. Write the header once (the same value) so that such a store stops the start.
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            self._db.execute(f"PRAGMA user_version={version}")
        except (OSError, sqlite3.Error) as e:
            self._pool.shutdown(wait=False)
            with contextlib.suppress(Exception):
                self._db.close()
            why = f"{e}{_hint(path)}"
            raise ApprovalError(f"cannot open the approvals store {path} for writing: {why}") from e

    @property
    def name(self) -> str:
        return str(self.path)

    async def _run[T](self, job: Callable[[], T], writes: bool) -> T:
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._pool, job)
        except sqlite3.Error as e:
            if not _unusable(e):
                raise
            if self.health is not None:
                self.health.failed(e)
            raise StoreUnavailable(unusable_message(self.name, e)) from e
        if writes and self.health is not None:
            self.health.ok()
        return out

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._db.close)
        finally:
            self._pool.shutdown(wait=False)

    # Approvals

    @_in_thread
    def open(self, a: Approval, now: float) -> Approval:
        # BEGIN IMMEDIATE takes the write lock first: another process on this file cannot open a
        # second approval for the key between the look-up and the insert.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._select(_PENDING_FOR, (*a.key, now))
            if not rows:
                self._db.execute(
                    f"INSERT INTO approvals ({_COLUMNS}) VALUES ({', '.join('?' * 21)})",  # noqa: S608 constants
                    (a.id, a.client_key, a.client_address, a.client_name, a.host, a.port, a.scheme, a.method,
                     a.path, a.rule, a.created_at, a.expires_at, a.state.value, _v(a.decision), _v(a.scope),
                     a.decided_by, a.reason, a.decided_at, int(a.notified),
                     json.dumps(dict(a.labels)) if a.labels else None, a.task_until),
                )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise
        return rows[0] if rows else a

    @_in_thread
    def get(self, approval_id: str) -> Approval | None:
        rows = self._select("id = ?", (approval_id,))
        return rows[0] if rows else None

    @_in_thread
    def pending(self) -> list[Approval]:
        return self._select("state = 'pending' ORDER BY created_at", ())

    @_in_thread
    def count_pending(self) -> int:
        # A count, not the rows: the gauge is recounted on every change, and decoding every
        # pending row each time made a thousand held approvals cost seconds of the event loop.
        return int(self._db.execute("SELECT COUNT(*) FROM approvals WHERE state = 'pending'").fetchone()[0])

    @_in_thread
    def pending_for(self, key: Key, now: float) -> Approval | None:
        rows = self._select(_PENDING_FOR, (*key, now))
        return rows[0] if rows else None

    @_in_thread
    def recent(self, limit: int = 100) -> list[Approval]:
        return self._select("state != 'pending' ORDER BY COALESCE(decided_at, expires_at) DESC LIMIT ?",
                            (limit,))

    def _select(self, where: str, params: tuple[Any, ...]) -> list[Approval]:
        # `where` is always a literal from this module; values go through placeholders.
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM approvals WHERE {where}", params)  # noqa: S608
        return [_approval(r) for r in rows.fetchall()]

    @_in_thread
    def decide(self, approval_id: str, choice: Choice, scope: Scope, by: str | None,
                     reason: str | None, now: float) -> bool:
        cur = self._db.execute(
            "UPDATE approvals SET state = ?, decision = ?, scope = ?, decided_by = ?, reason = ?, "
            "decided_at = ? WHERE id = ? AND state = 'pending'",
            (choice.state.value, choice.value, scope.value, by, reason, now, approval_id),
        )
        return cur.rowcount == 1

    @_in_thread
    def mark_notified(self, approval_id: str) -> None:
        self._db.execute("UPDATE approvals SET notified = 1 WHERE id = ?", (approval_id,))

    @_in_thread
    def expire(self, approval_id: str, now: float) -> bool:
        cur = self._db.execute(
            "UPDATE approvals SET state = 'expired', decided_at = ? WHERE id = ? AND state = 'pending'",
            (now, approval_id),
        )
        return cur.rowcount == 1

    @_in_thread
    def due(self, now: float) -> list[Approval]:
        return self._select("state = 'pending' AND expires_at <= ?", (now,))

    # Grants

    @_in_thread
    def add_grant(self, key: Key, choice: Choice, scope: Scope, approval_id: str | None, now: float,
                        expires_at: float, single_use: bool) -> int:
        cur = self._db.execute(
            "INSERT INTO grants (client_key, host, port, decision, scope, approval_id, created_at, "
            "expires_at, single_use) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*key, choice.value, scope.value, approval_id, now, expires_at, int(single_use)),
        )
        return int(cur.lastrowid or 0)

    @_in_thread
    def take_grant(self, key: Key, now: float) -> Grant | None:
        rows = self._db.execute(
            f"SELECT {_GRANT_COLUMNS} FROM grants "  # noqa: S608 constants
            "WHERE client_key = ? AND host = ? AND port = ? AND expires_at > ? "
            "ORDER BY decision = 'deny' DESC, single_use ASC, created_at DESC",
            (*key, now),
        ).fetchall()
        for row in rows:
            g = _grant(row)
            if not g.single_use:
                return g
            # Consume atomically: two concurrent retries must not both use one `once`.
            if self._db.execute("DELETE FROM grants WHERE id = ?", (g.id,)).rowcount == 1:
                return g
        return None

    @_in_thread
    def drop_single_use(self, a: Approval) -> int:
        cur = self._db.execute("DELETE FROM grants WHERE approval_id = ? AND single_use = 1", (a.id,))
        return int(cur.rowcount)

    @_in_thread
    def grants(self, now: float) -> list[Grant]:
        rows = self._db.execute(
            f"SELECT {_GRANT_COLUMNS} FROM grants WHERE expires_at > ? ORDER BY created_at", (now,)  # noqa: S608
        ).fetchall()
        return [_grant(r) for r in rows]

    @_in_thread
    def drop_grants_of(self, client_key: str) -> int:
        return int(self._db.execute("DELETE FROM grants WHERE client_key = ?", (client_key,)).rowcount)

    @_in_thread
    def sweep(self, now: float, keep_decided_s: float = 7 * 86400) -> int:
        n = self._db.execute("DELETE FROM grants WHERE expires_at <= ?", (now,)).rowcount
        self._db.execute(
            "DELETE FROM approvals WHERE state != 'pending' AND COALESCE(decided_at, expires_at) < ?",
            (now - keep_decided_s,),
        )
        return int(n)


def _v(e: Choice | Scope | None) -> str | None:
    return None if e is None else e.value


def _approval(row: tuple[Any, ...]) -> Approval:
    (aid, client_key, address, name, host, port, scheme, method, path, rule, created_at, expires_at, state,
     decision, scope, by, reason, decided_at, notified, labels, task_until) = row
    return Approval(aid, client_key, address, name, host, port, scheme, method, path, rule, created_at,
                    expires_at, State(state), Choice(decision) if decision else None,
                    Scope(scope) if scope else None, by, reason, decided_at, bool(notified),
                    decode_labels(labels), task_until)


def _grant(row: tuple[Any, ...]) -> Grant:
    gid, client_key, host, port, decision, scope, approval_id, created_at, expires_at, single_use = row
    return Grant(gid, client_key, host, port, Choice(decision), Scope(scope), approval_id, created_at,
                 expires_at, bool(single_use))
