"""The approval stores: SQLite (embedded, the default) and Redis (shared by several replicas)."""

from __future__ import annotations

from pathlib import Path

from addons.approvals.model import Store
from addons.approvals.stores.sqlite import SqliteStore, store_path


def open_store(url: str, base_dir: Path) -> Store:
    """`sqlite:///...` (relative to base_dir) or `redis://HOST:PORT/DB` / `rediss://...`."""
    if url.startswith(("redis://", "rediss://")):
        from addons.approvals.stores.redis import RedisStore  # the redis package is an optional extra

        return RedisStore(url)
    return SqliteStore(store_path(url, base_dir))
