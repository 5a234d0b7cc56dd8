"""Both stores behind one fixture: `store` runs a test on SQLite and on a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from addons.approvals.model import Store
from addons.approvals.stores import open_store


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "redis":
        import redis

        url = request.getfixturevalue("redis_server")  # skips (redis only) when redis-server is missing
        with redis.Redis.from_url(url) as r:
            r.flushall()
        s = await open_store(url, tmp_path)
    else:
        s = await open_store("sqlite:///a.db", tmp_path)
    yield s
    await s.close()
