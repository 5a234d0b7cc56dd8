"""Both stores behind one fixture: `store` runs a test on SQLite and on a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from addons.approvals.model import Store
from addons.approvals.stores import open_store


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "redis":
        import redis

        url = request.getfixturevalue("redis_server")  # skips (redis only) when redis-server is missing
        with redis.Redis.from_url(url) as r:
            r.flushall()
        s = open_store(url, tmp_path)
    else:
        s = open_store("sqlite:///a.db", tmp_path)
    yield s
    s.close()
