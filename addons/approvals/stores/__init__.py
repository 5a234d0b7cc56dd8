"""The approval stores: SQLite (embedded, the default) and Redis (shared by several replicas)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from addons.approvals.model import Store
from addons.approvals.stores.sqlite import SqliteStore, store_path

if TYPE_CHECKING:
    from addons.approvals.stores.redis import Health


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


async def open_store(url: str, base_dir: Path, health: Health | None = None) -> Store:
    """`sqlite:///...` (relative to base_dir) or `redis://HOST:PORT/DB` / `rediss://...` (which must
    answer now; `health` hears whether it answers later)."""
    if is_redis(url):
        from addons.approvals.stores.redis import RedisStore  # the redis package is an optional extra

        store = RedisStore(url, health)
        await store.connect()
        return store
    return SqliteStore(store_path(url, base_dir))
