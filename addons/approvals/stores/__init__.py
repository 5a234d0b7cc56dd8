"""The approval stores: SQLite (embedded, the default) and Redis (shared by several replicas)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from addons.approvals.errors import StoreUnavailable
from addons.approvals.model import Store
from addons.approvals.stores.sqlite import SqliteStore, store_path

if TYPE_CHECKING:
    from addons.approvals.stores.redis import Health


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


async def open_store(url: str, base_dir: Path, health: Health | None = None, require: bool = True) -> Store:
    """`sqlite:///...` (relative to base_dir) or `redis://HOST:PORT/DB` / `rediss://...`, which must
    answer now unless not `require`d (then its calls fail closed until it does); `health` hears
    whether it answers."""
    if is_redis(url):
        from addons.approvals.stores.redis import RedisStore  # the redis package is an optional extra

        store = RedisStore(url, health)
        if require:
            await store.connect()
        else:
            with contextlib.suppress(StoreUnavailable):  # told to the health; it catches up later
                await store.ping()
        return store
    return SqliteStore(store_path(url, base_dir), health)
