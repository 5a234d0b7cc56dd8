"""SQLite store for approvals and grants (one WAL file; survives restarts)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from addons.approvals.errors import ApprovalError

PENDING, ALLOWED, DENIED, EXPIRED = "pending", "allowed", "denied", "expired"
STATES = (PENDING, ALLOWED, DENIED, EXPIRED)

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
    notified INTEGER NOT NULL DEFAULT 0
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
    "created_at, expires_at, state, decision, scope, decided_by, reason, decided_at, notified"
)


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval as stored. `state` is pending | allowed | denied | expired."""

    id: str
    client_key: str
    client_address: str | None
    client_name: str | None
    host: str
    port: int
    scheme: str | None
    method: str | None
    path: str | None
    rule: str | None
    created_at: float
    expires_at: float
    state: str = PENDING
    decision: str | None = None
    scope: str | None = None
    decided_by: str | None = None
    reason: str | None = None
    decided_at: float | None = None
    notified: bool = False  # every webhook endpoint reached a final answer (else re-sent after a restart)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.client_key, self.host, self.port)


@dataclass(frozen=True, slots=True)
class Grant:
    """A standing decision for (client, host, port): session/always grants, or a single-use `once`."""

    id: int
    client_key: str
    host: str
    port: int
    decision: str
    scope: str
    approval_id: str | None
    created_at: float
    expires_at: float
    single_use: bool


class Store(Protocol):
    """What the service needs from a store. Every state change is a compare-and-set."""

    def close(self) -> None: ...
    def insert(self, a: Approval) -> None: ...
    def get(self, approval_id: str) -> Approval | None: ...
    def pending(self) -> list[Approval]: ...
    def pending_for(self, client_key: str, host: str, port: int, now: float) -> Approval | None: ...
    def recent(self, limit: int = 100) -> list[Approval]: ...
    def decide(self, approval_id: str, decision: str, scope: str, by: str | None, reason: str | None,
               now: float) -> bool: ...
    def mark_notified(self, approval_id: str) -> None: ...
    def expire(self, approval_id: str, now: float) -> bool: ...
    def due(self, now: float) -> list[Approval]: ...
    def add_grant(self, client_key: str, host: str, port: int, decision: str, scope: str,
                  approval_id: str | None, now: float, expires_at: float, single_use: bool) -> int: ...
    def take_grant(self, client_key: str, host: str, port: int, now: float) -> Grant | None: ...
    def drop_single_use(self, a: Approval) -> int: ...
    def grants(self, now: float) -> list[Grant]: ...
    def sweep(self, now: float, keep_decided_s: float = 7 * 86400) -> int: ...


def open_store(url: str, base_dir: Path) -> Store:
    """`sqlite:///...` (the embedded default) or `redis://HOST:PORT/DB` (several replicas)."""
    if url.startswith(("redis://", "rediss://")):
        try:
            from addons.approvals.redis_store import RedisStore
        except ModuleNotFoundError as e:
            if e.name != "redis":
                raise
            raise ApprovalError(
                "store redis://... needs the Redis client: pip install 'portcullis[redis]'") from e
        return RedisStore(url)
    return SqliteStore(store_path(url, base_dir))


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


class SqliteStore:
    """Synchronous and fast (one small row per call); used from the event loop. Not thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit (approval, decision, grant) is fsynced before the call returns, so a
            # power cut cannot lose a decision already answered. Cost: bench/bench_store.py.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(approvals)")}
            if "notified" not in cols:  # a store written before webhooks were tracked
                self._db.execute("ALTER TABLE approvals ADD COLUMN notified INTEGER NOT NULL DEFAULT 0")
        except (OSError, sqlite3.Error) as e:
            raise ApprovalError(f"cannot open the approvals store {path}: {e}") from e

    def close(self) -> None:
        self._db.close()

    # Approvals

    def insert(self, a: Approval) -> None:
        self._db.execute(
            f"INSERT INTO approvals ({_COLUMNS}) VALUES ({', '.join('?' * 19)})",  # noqa: S608 constants
            (a.id, a.client_key, a.client_address, a.client_name, a.host, a.port, a.scheme, a.method,
             a.path, a.rule, a.created_at, a.expires_at, a.state, a.decision, a.scope, a.decided_by,
             a.reason, a.decided_at, int(a.notified)),
        )

    def get(self, approval_id: str) -> Approval | None:
        rows = self._select("id = ?", (approval_id,))
        return rows[0] if rows else None

    def pending(self) -> list[Approval]:
        return self._select("state = 'pending' ORDER BY created_at", ())

    def pending_for(self, client_key: str, host: str, port: int, now: float) -> Approval | None:
        rows = self._select(
            "state = 'pending' AND client_key = ? AND host = ? AND port = ? AND expires_at > ? "
            "ORDER BY created_at LIMIT 1", (client_key, host, port, now))
        return rows[0] if rows else None

    def recent(self, limit: int = 100) -> list[Approval]:
        return self._select("state != 'pending' ORDER BY COALESCE(decided_at, expires_at) DESC LIMIT ?",
                            (limit,))

    def _select(self, where: str, params: tuple[Any, ...]) -> list[Approval]:
        # `where` is always a literal from this module; values go through placeholders.
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM approvals WHERE {where}", params)  # noqa: S608
        return [_approval(r) for r in rows.fetchall()]

    def decide(self, approval_id: str, decision: str, scope: str, by: str | None, reason: str | None,
               now: float) -> bool:
        """Compare-and-set pending -> allowed/denied. False when it was no longer pending."""
        state = ALLOWED if decision == "allow" else DENIED
        cur = self._db.execute(
            "UPDATE approvals SET state = ?, decision = ?, scope = ?, decided_by = ?, reason = ?, "
            "decided_at = ? WHERE id = ? AND state = 'pending'",
            (state, decision, scope, by, reason, now, approval_id),
        )
        return cur.rowcount == 1

    def mark_notified(self, approval_id: str) -> None:
        self._db.execute("UPDATE approvals SET notified = 1 WHERE id = ?", (approval_id,))

    def expire(self, approval_id: str, now: float) -> bool:
        """Compare-and-set pending -> expired. False when it was no longer pending."""
        cur = self._db.execute(
            "UPDATE approvals SET state = 'expired', decided_at = ? WHERE id = ? AND state = 'pending'",
            (now, approval_id),
        )
        return cur.rowcount == 1

    def due(self, now: float) -> list[Approval]:
        """Pending approvals whose expiry has passed."""
        return self._select("state = 'pending' AND expires_at <= ?", (now,))

    # Grants

    def add_grant(self, client_key: str, host: str, port: int, decision: str, scope: str,
                  approval_id: str | None, now: float, expires_at: float, single_use: bool) -> int:
        cur = self._db.execute(
            "INSERT INTO grants (client_key, host, port, decision, scope, approval_id, created_at, "
            "expires_at, single_use) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (client_key, host, port, decision, scope, approval_id, now, expires_at, int(single_use)),
        )
        return int(cur.lastrowid or 0)

    def take_grant(self, client_key: str, host: str, port: int, now: float) -> Grant | None:
        """The live grant for this key (deny before allow); a single-use grant is consumed."""
        rows = self._db.execute(
            "SELECT id, client_key, host, port, decision, scope, approval_id, created_at, expires_at, "
            "single_use FROM grants WHERE client_key = ? AND host = ? AND port = ? AND expires_at > ? "
            "ORDER BY decision = 'deny' DESC, single_use ASC, created_at DESC",
            (client_key, host, port, now),
        ).fetchall()
        for row in rows:
            g = _grant(row)
            if not g.single_use:
                return g
            # Consume atomically: two concurrent retries must not both use one `once`.
            if self._db.execute("DELETE FROM grants WHERE id = ?", (g.id,)).rowcount == 1:
                return g
        return None

    def drop_single_use(self, a: Approval) -> int:
        """Remove the unused `once` grant a decision left for this approval; returns how many."""
        cur = self._db.execute("DELETE FROM grants WHERE approval_id = ? AND single_use = 1", (a.id,))
        return int(cur.rowcount)

    def grants(self, now: float) -> list[Grant]:
        rows = self._db.execute(
            "SELECT id, client_key, host, port, decision, scope, approval_id, created_at, expires_at, "
            "single_use FROM grants WHERE expires_at > ? ORDER BY created_at", (now,)
        ).fetchall()
        return [_grant(r) for r in rows]

    def sweep(self, now: float, keep_decided_s: float = 7 * 86400) -> int:
        """Delete expired grants and old decided approvals. Returns the number of grants removed."""
        n = self._db.execute("DELETE FROM grants WHERE expires_at <= ?", (now,)).rowcount
        self._db.execute(
            "DELETE FROM approvals WHERE state != 'pending' AND COALESCE(decided_at, expires_at) < ?",
            (now - keep_decided_s,),
        )
        return int(n)


def _approval(row: tuple[Any, ...]) -> Approval:
    # notified is stored as 0/1; everything else maps one to one
    return replace(Approval(*row[:18]), notified=bool(row[18]))


def _grant(row: tuple[Any, ...]) -> Grant:
    gid, client_key, host, port, decision, scope, approval_id, created_at, expires_at, single_use = row
    return Grant(gid, client_key, host, port, decision, scope, approval_id, created_at, expires_at,
                 bool(single_use))
