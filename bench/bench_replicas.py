"""How long a decision taken on one replica takes to release a request held on another (measured, never
asserted): two `portcullis run` processes sharing one redis-server, PORTCULLIS_APPROVAL_POLL_S=120 so
that only the notification (Redis pub/sub) can release in time.

    .venv/bin/python bench/bench_replicas.py [--runs 50] [--workers 1]

Each run: a request is sent through replica A and held; once A counts it as waiting, the decision is
POSTed to replica B's admin API; the latency is from sending that POST to the held request's answer
arriving at its client on A (so it includes B's API call, the store's compare-and-set, the message
through Redis, A's look at the store, and A's answer). Before notifications, replicas polled the store:
650-760 ms in five of five trials (issue 12).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import PortcullisProc, Upstreams, base_config  # noqa: E402
from tests.redis_support import RedisServer  # noqa: E402

TOKEN = "bench-token-0123456789"


_CLIENT = httpx.Client(trust_env=False, timeout=10, headers={"Authorization": f"Bearer {TOKEN}"})


def admin(p: PortcullisProc, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """The admin API over one kept-alive connection per replica, as an approver's client would."""
    r = _CLIENT.request(method, f"http://127.0.0.1:{p.admin_port}{path}", json=body)
    r.raise_for_status()
    return r.json()


def replica(d: Path, name: str, u: Upstreams, redis: RedisServer, workers: int) -> PortcullisProc:
    folder = d / name
    folder.mkdir()
    cfg = base_config(u, folder, default_action="approval",
                      approvals={"timeout": "60s", "store": redis.url, "persist_to": None},
                      admin={"listen": "127.0.0.1:9090", "token_env": "BENCH_TOKEN"})
    env = {"BENCH_TOKEN": TOKEN, "PORTCULLIS_APPROVAL_POLL_S": "120"}
    return PortcullisProc(folder, u, rules=[], config=cfg, env=env, workers=workers)


def one_run(a: PortcullisProc, b: PortcullisProc, u: Upstreams, i: int) -> tuple[float, float]:
    host = f"approve.test:{u.http_port}"
    done: dict[str, Any] = {}

    def client() -> None:
        reply = a.raw(f"GET http://{host}/r{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), 60)
        done["t"], done["status"] = time.perf_counter(), reply.status

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 30
    while True:  # A counts it as waiting (workers: the supervisor's API counts no waiters; B lists it)
        items = [x for x in admin(a, "GET", "/approvals")["approvals"] if x["state"] == "pending"]
        if items and (items[0]["waiters"] == 1 or a.workers not in (None, 1)):
            break
        assert time.monotonic() < deadline, "the request was not held"
        time.sleep(0.01)
    if a.workers not in (None, 1):
        time.sleep(0.3)
    t0 = time.perf_counter()
    admin(b, "POST", f"/approvals/{items[0]['id']}", {"decision": "allow", "scope": "once", "by": "bench"})
    t1 = time.perf_counter()
    t.join(60)
    assert done.get("status") == 200, done
    return float(done["t"] - t0), float(done["t"] - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--workers", type=int, default=1, help="workers per replica (default 1)")
    ap.add_argument("--appendfsync", default="everysec", choices=("everysec", "always"),
                    help="Redis's AOF fsync policy (default everysec, Redis's own default)")
    args = ap.parse_args()
    os.environ.pop("PORTCULLIS_APPROVAL_POLL_S", None)
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        d = Path(tmp)
        u = Upstreams(d / "up").start()
        try:
            w = args.workers
            with RedisServer(d / "redis", appendfsync=args.appendfsync) as redis, \
                    replica(d, "a", u, redis, w) as a, replica(d, "b", u, redis, w) as b:
                one_run(a, b, u, -1)  # warm-up (connections, scripts loaded)
                runs = [one_run(a, b, u, i) for i in range(args.runs)]
        finally:
            u.stop()
    print(f"{args.runs} runs, 2 replicas x {args.workers} worker(s), one redis-server (appendfsync "
          f"{args.appendfsync}), poll 120 s, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for label, xs in (("decision POSTed on B -> held request answered on A", [r[0] for r in runs]),
                      ("B's API answered   -> held request answered on A", [r[1] for r in runs])):
        ms = sorted(x * 1e3 for x in xs)
        p99 = ms[min(len(ms) - 1, round(len(ms) * 0.99) - 1)]
        print(f"  {label}: median {statistics.median(ms):6.1f} ms, p99 {p99:6.1f} ms, "
              f"min {ms[0]:6.1f} ms, max {ms[-1]:6.1f} ms")

if __name__ == "__main__":
    main()
