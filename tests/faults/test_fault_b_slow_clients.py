"""Faults: slow-loris clients (a request head a byte a second) and 10,000 idle connections, while
other clients are served.

Documented behaviour (README, How the proxy decides > Decisions): an HTTP/1 request head still
incomplete `network.header_timeout` after its first byte (default 30 s) is answered 408 and closed,
one `bad_request` decision each; an idle connection costs a socket and a coroutine, is closed after
`network.idle_timeout`, and does not keep anyone else from being served.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from tests.faults.faults_b_support import (
    assert_each_decision_once,
    get,
    get_request,
    raise_nofile,
    rss_kib,
    wait_until,
)
from tests.harness import (
    PortcullisProc,
    base_config,
    upstreams,  # noqa: F401  (session fixture; the folder has no conftest.py)
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

RULES = [{"name": "public", "action": "allow", "hosts": ["public.test"]}]
HEAD_TIMEOUT = 3
LORIS = 20
MAX_TRICKLE = 12  # bytes (one a second) a slow client sends at most before giving up
IDLE = 10_000
BOUND = 60.0


async def _loris(proxy_port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        for i in range(min(MAX_TRICKLE, len(head))):
            writer.write(head[i:i + 1])
            try:
                await writer.drain()
            except ConnectionError:
                break
            try:  # answered already? stop trickling
                got = await asyncio.wait_for(reader.read(65536), 1.0)
                return got + await asyncio.wait_for(reader.read(), BOUND)
            except TimeoutError:
                continue
        return await asyncio.wait_for(reader.read(), BOUND)
    finally:
        writer.close()


async def _slow_but_whole(proxy_port: int, head: bytes) -> bytes:
    """A head in four pieces over about a second: slow, but well inside the limit."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        step = len(head) // 4 + 1
        for i in range(0, len(head), step):
            writer.write(head[i:i + step])
            await writer.drain()
            await asyncio.sleep(0.3)
        return await asyncio.wait_for(reader.read(), BOUND)
    finally:
        writer.close()


def test_slow_loris_heads_are_refused_with_408_while_others_are_served(upstreams, tmp_path):  # noqa: F811
    cfg = base_config(upstreams, tmp_path)
    cfg["network"] = {**cfg["network"], "header_timeout": f"{HEAD_TIMEOUT}s"}
    port = upstreams.http_port
    head = get_request("public.test", port, "/loris", close=True) + b"X-Pad: " + b"a" * 100 + b"\r\n\r\n"
    with PortcullisProc(tmp_path, upstreams, rules=RULES, config=cfg) as p:

        async def run() -> tuple[list[bytes], bytes, list[int]]:
            slow = [asyncio.create_task(_loris(p.port, head)) for _ in range(LORIS)]
            whole_head = get_request("public.test", port, "/whole", close=True)
            whole = asyncio.create_task(_slow_but_whole(p.port, whole_head))
            served = []
            for i in range(10):  # others are served while the slow heads trickle in
                served.append((await asyncio.to_thread(get, p, "public.test", port, f"/other-{i}")).status)
                await asyncio.sleep(0.2)
            return list(await asyncio.gather(*slow)), await whole, served

        answers, whole, served = asyncio.run(run())
        assert served == [200] * 10
        assert whole.startswith(b"HTTP/1.1 200")
        for a in answers:
            assert a.startswith(b"HTTP/1.1 408"), a[:200]
            assert b"x-portcullis-reason: bad_request" in a.lower()
        p.wait_event("egress.decision", count=LORIS + 11)
    refused = [e for e in p.decisions() if e["reason"] == "bad_request"]
    assert len(refused) == LORIS and all(e["status"] == 408 for e in refused)
    assert all("took longer than 3 s" in e["detail"] for e in refused)
    assert not upstreams.seen(lambda r: r["path"] == "/loris")  # no slow head was forwarded
    assert len(p.decisions()) == LORIS + 11
    assert_each_decision_once(p)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_ten_thousand_idle_connections_while_a_request_is_served(upstreams, tmp_path):  # noqa: F811
    limit = raise_nofile(2 * IDLE + 1000)  # the proxy inherits it
    if limit < IDLE + 500:
        pytest.skip(f"RLIMIT_NOFILE is {limit}: cannot hold {IDLE} connections")
    with PortcullisProc(tmp_path, upstreams, rules=RULES) as p:
        assert p.proc is not None
        pid = p.proc.pid
        before_fds, before_rss = _fds(pid), rss_kib(pid)
        socks: list[socket.socket] = []
        try:
            deadline = time.monotonic() + BOUND
            for _ in range(IDLE):
                assert time.monotonic() < deadline, f"only {len(socks)} connections opened"
                socks.append(socket.create_connection(("127.0.0.1", p.port), timeout=BOUND))
            assert wait_until(lambda: _fds(pid) >= before_fds + IDLE, BOUND), _fds(pid)
            rss = rss_kib(pid)
            print(f"\nproxy RSS: {before_rss} KiB before, {rss} KiB with {IDLE} idle connections "
                  f"({(rss - before_rss) / IDLE:.1f} KiB each)")
            r = get(p, "public.test", upstreams.http_port, "/among-the-idle", timeout=BOUND)
            assert r.status == 200
            assert p.proc.poll() is None
        finally:
            for s in socks:
                s.close()
        assert wait_until(lambda: _fds(pid) <= before_fds + 50, BOUND), _fds(pid)  # every one let go
        assert get(p, "public.test", upstreams.http_port, "/after").status == 200
        p.wait_event("egress.decision", count=2)
    assert len(p.decisions()) == 2  # idle connections decide nothing
