"""Load generators for bench_compare.py: wrk, TLS clients (new tunnels, keep-alive, bulk, latency),
and many held approval requests. Every loop is bounded in time or count."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import re
import socket
import ssl
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from bench_procs import BIG, HOLD_NAME, NAME, UPSTREAM

NAN = float("nan")

WRK_LUA = """
wrk.method = "GET"
wrk.path = "{path}"
wrk.headers["Host"] = "{host}"
{extra}
"""


def quantile(sorted_values: list[float], q: float) -> float:
    n = len(sorted_values)
    return sorted_values[min(n - 1, int(n * q))] if n else NAN


def stats(sorted_latencies: list[float], seconds: float) -> dict[str, float]:
    lat = sorted_latencies
    return {"rps": len(lat) / seconds, "p50_ms": quantile(lat, 0.5) * 1000,
            "p99_ms": quantile(lat, 0.99) * 1000}


def run_wrk(proxy_port: int | None, http_port: int, seconds: float, close: bool, d: Path,
            connections: int = 10) -> dict[str, float]:
    """wrk -t1 -c10 through the proxy (absolute-form target) or straight at nginx."""
    host = f"{NAME}:{http_port}"
    if proxy_port is None:
        target, path = f"http://{UPSTREAM}:{http_port}", "/"
    else:
        target, path = f"http://127.0.0.1:{proxy_port}", f"http://{host}/"
    lua = d / f"wrk-{int(close)}.lua"
    lua.write_text(
        WRK_LUA.format(path=path, host=host, extra='wrk.headers["Connection"] = "close"' if close else "")
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, int(seconds))}s", "--latency", "-s", str(lua), target],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk: no result ({out[-200:]!r})")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(m.group(1)), "p50_ms": _wrk_latency(out, "50%"), "p99_ms": _wrk_latency(out, "99%"),
            "bad": float(non2xx.group(1)) if non2xx else 0.0, "errors": 1.0 if errors else 0.0}


def _wrk_latency(out: str, q: str) -> float:
    m = re.search(rf"{re.escape(q)}\s+([\d.]+)(us|ms|s)", out)
    if not m:
        return NAN
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


# ---- TLS through a CONNECT tunnel -------------------------------------------------------------


def tunnel(proxy_port: int | None, tls_port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    if proxy_port is None:
        raw = socket.create_connection((UPSTREAM, tls_port), timeout=30)
    else:
        raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
        raw.sendall(f"CONNECT {NAME}:{tls_port} HTTP/1.1\r\nHost: {NAME}:{tls_port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            if not chunk:
                raise ConnectionError("proxy closed during CONNECT")
            head += chunk
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(raw, server_hostname=NAME)


def get(tls: ssl.SSLSocket, close: bool) -> None:
    tls.sendall(
        (f"GET / HTTP/1.1\r\nHost: {NAME}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n").encode()
    )
    buf = b""
    while not buf.endswith(b"ok\n"):
        chunk = tls.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the body")
        buf += chunk


def _tls_worker(proxy_port: int | None, tls_port: int, ca: str, seconds: float, keepalive: bool,
                q: mp.Queue) -> None:  # type: ignore[type-arg]
    ctx = ssl.create_default_context(cafile=ca)
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    tls = tunnel(proxy_port, tls_port, ctx) if keepalive else None
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            if keepalive:
                assert tls is not None
                get(tls, close=False)
            else:
                s = tunnel(proxy_port, tls_port, ctx)
                get(s, close=True)
                s.close()
            lat.append(time.perf_counter() - t0)
        except (OSError, ConnectionError):
            errors += 1
            if keepalive:
                break
    q.put((lat, errors))


def run_tls(proxy_port: int | None, tls_port: int, ca: Path, seconds: float, keepalive: bool,
            procs: int = 2) -> dict[str, float]:
    """`procs` client processes: a new CONNECT + TLS + GET each time, or GETs in one tunnel each."""
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    ps = [mp.Process(target=_tls_worker, args=(proxy_port, tls_port, str(ca), seconds, keepalive, q))
          for _ in range(procs)]
    for p in ps:
        p.start()
    lat: list[float] = []
    errors = 0
    for _ in ps:
        one, e = q.get(timeout=seconds + 60)
        lat += one
        errors += e
    for p in ps:
        p.join(10)
    lat.sort()
    return {**stats(lat, seconds), "bad": 0.0, "errors": float(errors)}


def run_latency(proxy_port: int | None, tls_port: int, ca: Path, seconds: float) -> dict[str, float]:
    """One client, one new tunnel at a time (nothing else loads the proxy): the time per tunnel."""
    ctx = ssl.create_default_context(cafile=str(ca))
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(lat) < 20000:
        t0 = time.perf_counter()
        try:
            s = tunnel(proxy_port, tls_port, ctx)
            get(s, close=True)
            s.close()
            lat.append(time.perf_counter() - t0)
        except (OSError, ConnectionError):
            errors += 1
    lat.sort()
    return {**stats(lat, seconds), "bad": 0.0, "errors": float(errors)}


def run_latency_interleaved(ports: dict[str, int | None], tls_port: int, ca: Path,
                            seconds: float) -> dict[str, dict[str, float]]:
    """One client, one new tunnel at a time, taking the targets in turn (direct, each proxy, again):
    every target sees the same moments of a noisy machine, so their differences mean something."""
    ctx = ssl.create_default_context(cafile=str(ca))
    lat: dict[str, list[float]] = {name: [] for name in ports}
    errors = dict.fromkeys(ports, 0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(len(v) < 20000 for v in lat.values()):
        for name, port in ports.items():
            t0 = time.perf_counter()
            try:
                s = tunnel(port, tls_port, ctx)
                get(s, close=True)
                s.close()
                lat[name].append(time.perf_counter() - t0)
            except (OSError, ConnectionError):
                errors[name] += 1
    out = {}
    for name, values in lat.items():
        values.sort()
        out[name] = {**stats(values, seconds / len(ports)), "bad": 0.0, "errors": float(errors[name])}
    return out


def run_bulk(proxy_port: int | None, tls_port: int, ca: Path, transfers: int = 2) -> dict[str, float]:
    """GET /big (100 MB) inside one tunnel, `transfers` times (each on a new tunnel): MB/s, median."""
    ctx = ssl.create_default_context(cafile=str(ca))
    rates: list[float] = []
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for _ in range(transfers):
        s = tunnel(proxy_port, tls_port, ctx)
        try:
            t0 = time.perf_counter()
            s.sendall(f"GET /big HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed before the headers")
                head += chunk
            header, _, body = head.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", header)
            if not header.startswith(b"HTTP/1.1 200") or m is None or int(m.group(1)) != BIG:
                raise ConnectionError(header[:200].decode(errors="replace"))
            got = len(body)
            while got < BIG:
                n = s.recv_into(view)
                if not n:
                    raise ConnectionError(f"closed after {got} of {BIG} bytes")
                got += n
            rates.append(BIG / (time.perf_counter() - t0) / 1e6)
        finally:
            s.close()
    return {"rps": statistics.median(rates), "p50_ms": NAN, "p99_ms": NAN, "bad": 0.0, "errors": 0.0}


# ---- many requests held for approval, and a probe beside them --------------------------------------

PER_CLIENT = 50  # held requests per source address (the proxy opens at most 100 pending per client)


def source_address(i: int) -> str:
    k = i // PER_CLIENT
    return f"127.1.{k // 250}.{k % 250 + 1}"


class Holder:
    """Keeps `n` plain-HTTP requests to distinct hold.test ports open, each waiting for a person.

    Runs its own event loop in a thread so that the bench can measure meanwhile."""

    def __init__(self, proxy_port: int) -> None:
        self.proxy_port = proxy_port
        self.loop = asyncio.new_event_loop()
        self.writers: list[asyncio.StreamWriter] = []
        self.failed = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def open(self, upto: int, timeout: float = 300) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._open(upto), self.loop)
        fut.result(timeout)

    async def _open(self, upto: int) -> None:
        start = len(self.writers)
        for batch in range(start, upto, 100):
            results = await asyncio.gather(*(self._one(i) for i in range(batch, min(upto, batch + 100))),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    self.failed += 1
                else:
                    self.writers.append(r)
            await asyncio.sleep(0.02)  # paced: the proxy's accept queue is finite

    async def _one(self, i: int) -> asyncio.StreamWriter:
        _, w = await asyncio.open_connection("127.0.0.1", self.proxy_port, local_addr=(source_address(i), 0))
        port = 20000 + i
        w.write(f"GET http://{HOLD_NAME}:{port}/ HTTP/1.1\r\nHost: {HOLD_NAME}:{port}\r\n\r\n".encode())
        await w.drain()
        return w

    def close(self) -> None:
        async def _close() -> None:
            for w in self.writers:
                w.close()
            self.writers.clear()

        asyncio.run_coroutine_threadsafe(_close(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def pending(admin_port: int) -> float:
    """portcullis_approvals_pending from /metrics (nan when it cannot be read)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:  # noqa: S310
            text = r.read().decode()
    except OSError:
        return NAN
    m = re.search(r"^portcullis_approvals_pending(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else NAN


def wait_pending(admin_port: int, n: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    got = NAN
    while time.monotonic() < deadline:
        got = pending(admin_port)
        if got >= n:
            return got
        time.sleep(0.25)
    return got


def probe(proxy_port: int, http_port: int, seconds: float) -> dict[str, float]:
    """Allowed plain-HTTP GETs, one at a time on one keep-alive connection: p50/p99 latency."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = f"GET http://{NAME}:{http_port}/ HTTP/1.1\r\nHost: {NAME}:{http_port}\r\n\r\n".encode()
    lat: list[float] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and len(lat) < 100000:
            t0 = time.perf_counter()
            s.sendall(req)
            buf = b""
            while not buf.endswith(b"ok\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("probe: closed")
                buf += chunk
            lat.append(time.perf_counter() - t0)
    finally:
        s.close()
    lat.sort()
    return stats(lat, seconds)
