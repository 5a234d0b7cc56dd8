"""What `synchronous=FULL` costs the SQLite approvals store, against NORMAL (measured, never asserted).

    .venv/bin/python bench/bench_store.py [--dir state/] [--cycles 300] [--rounds 3]

One cycle is one approval's life as the proxy writes it: open, decide, add a single-use grant,
take (delete) it: four commits. The file lives in --dir (default: a temporary folder under the
current directory, so the disk is the one the store would use; tmpfs would hide the fsyncs).
Modes alternate round by round so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from addons.approvals.model import Approval, Choice, Scope  # noqa: E402
from addons.approvals.stores.sqlite import SqliteStore  # noqa: E402


async def run(folder: Path, mode: str, cycles: int, tag: str) -> list[float]:
    store = SqliteStore(folder / f"bench-{mode}-{tag}.db")
    store._db.execute(f"PRAGMA synchronous={mode}")  # the store opens with FULL; NORMAL for comparison
    per_cycle = []
    try:
        for i in range(cycles):
            now = time.time()
            t0 = time.perf_counter()
            a = Approval(id=f"apr_{tag}_{i}", client_key="10.0.0.5", client_address="10.0.0.5",
                         client_name=None, host=f"h{i}.example.com", port=443, scheme="https", method="GET",
                         path="/", rule=None, created_at=now, expires_at=now + 120)
            await store.open(a, now)
            await store.decide(a.id, Choice.ALLOW, Scope.ONCE, "bench", None, now)
            await store.add_grant(a.key, Choice.ALLOW, Scope.ONCE, a.id, now, now + 60, True)
            await store.take_grant(a.key, now)
            per_cycle.append(time.perf_counter() - t0)
    finally:
        await store.close()
    return per_cycle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.dir or Path.cwd()) as tmp:
        folder = Path(tmp)
        results: dict[str, list[float]] = {"NORMAL": [], "FULL": []}
        for r in range(args.rounds):
            for mode in (("NORMAL", "FULL") if r % 2 == 0 else ("FULL", "NORMAL")):
                results[mode] += asyncio.run(run(folder, mode, args.cycles, str(r)))
    where = args.dir or Path.cwd()
    print(f"{args.rounds} rounds x {args.cycles} cycles (4 commits each) per mode, in {where}")
    med = {}
    for mode, xs in results.items():
        xs.sort()
        med[mode] = statistics.median(xs)
        p99 = xs[int(len(xs) * 0.99) - 1]
        print(f"  synchronous={mode:<6}  per cycle: median {med[mode] * 1e3:6.2f} ms, "
              f"p99 {p99 * 1e3:6.2f} ms; per commit: median {med[mode] / 4 * 1e3:5.2f} ms; "
              f"{1 / med[mode]:7.0f} cycles/s")
    print(f"  FULL / NORMAL (median per cycle): {med['FULL'] / med['NORMAL']:.2f}")


if __name__ == "__main__":
    main()
