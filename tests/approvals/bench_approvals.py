"""Measurements for the approvals part (not a test; run by hand, numbers go in the report).

    .venv/bin/python tests/approvals/bench_approvals.py inproc       # service costs, in-process
    .venv/bin/python tests/approvals/bench_approvals.py release 200  # N held via the real proxy, 1 decision
    .venv/bin/python tests/approvals/bench_approvals.py memory 1000  # RSS with N held; hang-up frees them
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402

from addons.approvals.model import Choice, Scope  # noqa: E402
from addons.approvals.service import ApprovalService  # noqa: E402
from addons.config.models import ApprovalsConfig  # noqa: E402
from addons.pipeline.model import Outcome  # noqa: E402
from addons.telemetry.events import Telemetry  # noqa: E402
from tests.approvals.approvals_support import request  # noqa: E402

TOKEN = "bench-token"


def req(host: str, client: str = "10.0.0.5") -> Outcome:
    return request(host=host, client=client, flow_id="f")


async def inproc() -> None:
    svc = ApprovalService(ApprovalsConfig(hold=False, timeout=600), Path(tempfile.mkdtemp()),
                          Telemetry(stream=io.StringIO()))
    await svc.start()
    svc.ledger.max_pending_per_client = 10**6
    n = 2000

    async def per_call(host: Any, client: str = "10.0.0.5") -> float:
        t = time.perf_counter()
        for i in range(n):
            await svc.resolve(req(host(i), client), lambda: True)
        return (time.perf_counter() - t) / n * 1e6

    t_open = await per_call(lambda i: f"h{i}.example")
    t_join = await per_call(lambda i: f"h{i}.example")
    first = await svc.resolve(req("s.example", "c2"), lambda: True)
    await svc.decide(first.approval_id or "", Choice.ALLOW, Scope.SESSION, "b", None)
    t_grant = await per_call(lambda i: "s.example", "c2")
    svc.config = ApprovalsConfig(hold=True, timeout=600)
    tasks = [asyncio.create_task(svc.resolve(req("held.example", "c3"), lambda: True)) for _ in range(2000)]
    while not (held := [a for a in await svc.store.pending() if a.host == "held.example"]) or \
            svc.waiters(held[0]) < 2000:
        await asyncio.sleep(0.01)
    t = time.perf_counter()
    await svc.decide(held[0].id, Choice.ALLOW, Scope.ONCE, "b", None)
    assert all(o.allowed for o in await asyncio.gather(*tasks))
    print(f"open a new approval {t_open:.0f} us; join a pending one {t_join:.0f} us; session grant hit "
          f"{t_grant:.0f} us; one decision releases 2000 waiters in {(time.perf_counter() - t) * 1e3:.1f} ms")
    await svc.stop()


def through_proxy(kind: str, n: int) -> None:
    from tests.harness import PortcullisProc, Upstreams, base_config

    os.environ["BENCH_TOKEN"] = TOKEN
    d = Path(tempfile.mkdtemp())
    u = Upstreams(d / "up").start()
    (d / "p").mkdir()
    cfg = base_config(u, d / "p", default_action="approval", approvals={"timeout": "300s"},
                      admin={"listen": "127.0.0.1:9090", "token_env": "BENCH_TOKEN"})
    try:
        with PortcullisProc(d / "p", u, rules=[{"name": "pub", "action": "allow", "hosts": ["public.test"]}],
                            config=cfg) as p:
            asyncio.run(release(p, u, n) if kind == "release" else memory(p, u, n))
    finally:
        u.stop()


async def _open(p: Any, u: Any, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", p.port)
    w.write(f"GET http://approve.test:{u.http_port}/c{i} HTTP/1.1\r\nHost: approve.test:{u.http_port}\r\n"
            "Connection: close\r\n\r\n".encode())
    await w.drain()
    return r, w


async def _pending(a: httpx.AsyncClient) -> list[dict[str, Any]]:
    return [x for x in (await a.get("/approvals")).json()["approvals"] if x["state"] == "pending"]


async def release(p: Any, u: Any, n: int) -> None:
    async def probe() -> tuple[float, float]:
        lat = []
        async with httpx.AsyncClient(proxy=p.proxy_url, trust_env=False) as c:
            for _ in range(200):
                t = time.perf_counter()
                assert (await c.get(f"http://public.test:{u.http_port}/")).status_code == 200
                lat.append(time.perf_counter() - t)
        lat.sort()
        return lat[100] * 1e3, lat[197] * 1e3

    base = await probe()
    conns = [await _open(p, u, i) for i in range(n)]
    async with httpx.AsyncClient(base_url=p.admin_url, headers={"Authorization": f"Bearer {TOKEN}"},
                                 trust_env=False) as a:
        while not (items := await _pending(a)) or items[0]["waiters"] < n:
            await asyncio.sleep(0.05)
        held = await probe()
        t0 = time.perf_counter()
        assert (await a.post(f"/approvals/{items[0]['id']}", json={"decision": "allow"})).status_code == 200
    replies = await asyncio.gather(*(asyncio.wait_for(r.read(), 60) for r, _ in conns))
    took = time.perf_counter() - t0
    ok = sum(x.startswith(b"HTTP/1.1 200") for x in replies)
    print(f"N={n}: allowed probe p50/p99 {base[0]:.2f}/{base[1]:.2f} ms before, "
          f"{held[0]:.2f}/{held[1]:.2f} ms while {n} held; one decision -> all answered in "
          f"{took * 1e3:.0f} ms; {ok}/{n} got 200; "
          f"approval.requested events: {len(p.find('approval.requested'))}")


async def memory(p: Any, u: Any, n: int) -> None:
    def rss() -> int:
        with open(f"/proc/{p.proc.pid}/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))

    async with httpx.AsyncClient(base_url=p.admin_url, headers={"Authorization": f"Bearer {TOKEN}"},
                                 trust_env=False) as a:
        start = rss()
        for rnd in range(3):
            conns = [await _open(p, u, i) for i in range(n)]
            while not (items := await _pending(a)) or items[0]["waiters"] < n:
                await asyncio.sleep(0.1)
            held = rss()
            t0 = time.perf_counter()
            for _, w in conns:
                w.transport.abort()
            while (await _pending(a))[0]["waiters"] > 0:
                await asyncio.sleep(0.05)
            print(f"round {rnd}: RSS {start} MiB at start, {held} MiB with {n} held; "
                  f"all hung up -> waiters 0 after {time.perf_counter() - t0:.2f} s; RSS {rss()} MiB after")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "inproc"
    if what == "inproc":
        asyncio.run(inproc())
    else:
        through_proxy(what, int(sys.argv[2]) if len(sys.argv) > 2 else 200)
