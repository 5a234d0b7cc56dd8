"""The SQLite store commits every approval and grant with synchronous=FULL (WAL): a decision that was
answered survives a power cut, not only a crash of the process. Cost: bench/bench_store.py."""

from __future__ import annotations

from pathlib import Path

from addons.approvals.store import open_store

FULL = 2  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA


def test_store_opens_with_full_durability_every_time(tmp_path: Path) -> None:
    for _ in range(2):  # a new file, then the existing one
        store = open_store("sqlite:///state/portcullis.db", tmp_path)
        db = store._db  # type: ignore[attr-defined]
        assert db.execute("PRAGMA synchronous").fetchone()[0] == FULL
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.close()
    assert (tmp_path / "state" / "portcullis.db").is_file()
