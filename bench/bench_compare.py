#!/usr/bin/env python3
"""Portcullis against bare mitmproxy and Squid, measured in the same run on loopback.

This machine is noisy, so single absolute timings mean little: every proxy runs the same
workloads in interleaved rounds and the report gives ratios. Upstream is nginx (1 worker) on
127.0.0.2; the name bench.test resolves to it through a private /etc/hosts bind-mounted in a
mount namespace of our own (`unshare -m`), so every proxy resolves it the ordinary way.

Workloads (each cell runs --seconds, default 5):
  http-ka      plain HTTP through the proxy, keep-alive, wrk -t1 -c10
  http-close   plain HTTP, a new connection per request (Connection: close), wrk -t1 -c10
  tls-new      CONNECT + TLS handshake + GET, a new tunnel per request, 2 client processes
  tls-ka       GET after GET inside one open tunnel per client process, 2 client processes

Proxies: portcullis (the real product, events written to a file), mitmdump (31 default
addons; --ignore-hosts '.*' for the TLS cells, i.e. its fastest passthrough), squid 5 (one
worker, no cache, no access log), and direct (no proxy) as the ceiling.

Usage: .venv/bin/python bench/bench_compare.py [--rounds 2] [--seconds 5] [--only http-ka,tls-new]
Needs: nginx, squid, wrk (Debian packages nginx-light squid wrk), root (for unshare -m).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
UPSTREAM = "127.0.0.2"
NAME = "bench.test"
WORKLOADS = ("http-ka", "http-close", "tls-new", "tls-ka")
PROXIES = ("portcullis", "mitmdump", "squid", "direct")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")


# ----------------------------------------------------------------------------- setup


def make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for bench.test (never leaves the temp dir)."""
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Bench CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={NAME}",
        "-keyout",
        str(d / "srv.key"),
        "-out",
        str(d / "srv.csr"),
    )
    (d / "ext.cnf").write_text(
        f"subjectAltName=DNS:{NAME}\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
    )
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        str(d / "srv.csr"),
        "-CA",
        str(d / "ca.pem"),
        "-CAkey",
        str(d / "ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(d / "ext.cnf"),
        "-out",
        str(d / "srv.pem"),
    )


def start_nginx(d: Path, http_port: int, tls_port: int) -> subprocess.Popen[bytes]:
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{ listen {UPSTREAM}:{http_port}; location / {{ return 200 "ok\\n"; }} }}
  server {{ listen {UPSTREAM}:{tls_port} ssl; ssl_certificate {d}/srv.pem; ssl_certificate_key {d}/srv.key;
           location / {{ return 200 "ok\\n"; }} }}
}}
""")
    p = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_port(UPSTREAM, http_port)
    wait_port(UPSTREAM, tls_port)
    return p


def start_squid(d: Path, port: int, http_port: int, tls_port: int) -> subprocess.Popen[bytes]:
    sd = d / "squid"
    sd.mkdir()
    os.chmod(sd, 0o777)
    conf = sd / "squid.conf"
    conf.write_text(f"""
http_port 127.0.0.1:{port}
acl bench dstdomain {NAME}
acl benchports port {http_port} {tls_port}
http_access allow bench benchports
http_access deny all
cache deny all
access_log none
cache_log {sd}/cache.log
pid_filename {sd}/squid.pid
coredump_dir {sd}
workers 1
shutdown_lifetime 0 seconds
""")
    p = subprocess.Popen(
        ["squid", "-N", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_port("127.0.0.1", port)
    return p


def start_mitmdump(d: Path, port: int, passthrough: bool) -> subprocess.Popen[bytes]:
    args = [
        str(VENV_BIN / "mitmdump"),
        "-q",
        "--listen-host",
        "127.0.0.1",
        "-p",
        str(port),
        "--set",
        f"confdir={d / 'mitm'}",
    ]
    if passthrough:
        args += ["--ignore-hosts", ".*"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port)
    return p


def start_portcullis(d: Path, port: int, admin: int) -> subprocess.Popen[bytes]:
    pd = d / "portcullis"
    (pd / "rules").mkdir(parents=True, exist_ok=True)
    (pd / "rules" / "bench.yaml").write_text(
        f"rules:\n  - name: bench\n    action: allow\n    hosts: [{NAME}]\n"
    )
    (pd / "portcullis.yaml").write_text(f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin}"}}
rules: [rules/]
default_action: deny
approvals: {{store: "sqlite:///state/p.db", persist_to: rules/approved.yaml}}
network: {{allow_cidrs: ["{UPSTREAM}/32"]}}
tls: {{ca_dir: certs/}}
""")
    log = open(pd / "events.jsonl", "wb")  # noqa: SIM115 - lives as long as the process
    p = subprocess.Popen(
        [str(VENV_BIN / "portcullis"), "run", "--config", str(pd / "portcullis.yaml")],
        stdout=log,
        stderr=subprocess.DEVNULL,
    )
    wait_port("127.0.0.1", port, timeout=30)
    return p


def stop(p: subprocess.Popen[bytes] | None) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# ----------------------------------------------------------------------------- load

WRK_LUA = """
wrk.method = "GET"
wrk.path = "{path}"
wrk.headers["Host"] = "{host}"
{extra}
"""


def run_wrk(proxy_port: int | None, http_port: int, seconds: float, close: bool, d: Path) -> dict[str, float]:
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
        ["wrk", "-t1", "-c10", f"-d{max(1, int(seconds))}s", "--latency", "-s", str(lua), target],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    p50 = _wrk_latency(out, "50%")
    p99 = _wrk_latency(out, "99%")
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "bad": float(non2xx.group(1)) if non2xx else 0.0,
        "errors": 1.0 if errors else 0.0,
    }


def _wrk_latency(out: str, q: str) -> float:
    m = re.search(rf"{re.escape(q)}\s+([\d.]+)(us|ms|s)", out)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def _tunnel(proxy_port: int | None, tls_port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    if proxy_port is None:
        raw = socket.create_connection((UPSTREAM, tls_port), timeout=10)
    else:
        raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
        raw.sendall(f"CONNECT {NAME}:{tls_port} HTTP/1.1\r\nHost: {NAME}:{tls_port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            if not chunk:
                raise ConnectionError("proxy closed during CONNECT")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
    return ctx.wrap_socket(raw, server_hostname=NAME)


def _get(tls: ssl.SSLSocket, close: bool) -> None:
    tls.sendall(
        (f"GET / HTTP/1.1\r\nHost: {NAME}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n").encode()
    )
    buf = b""
    while not buf.endswith(b"ok\n"):
        chunk = tls.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the body")
        buf += chunk


def _tls_worker(
    proxy_port: int | None, tls_port: int, ca: str, seconds: float, keepalive: bool, q: mp.Queue
) -> None:  # type: ignore[type-arg]
    ctx = ssl.create_default_context(cafile=ca)
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    tls = _tunnel(proxy_port, tls_port, ctx) if keepalive else None
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            if keepalive:
                assert tls is not None
                _get(tls, close=False)
            else:
                s = _tunnel(proxy_port, tls_port, ctx)
                _get(s, close=True)
                s.close()
            lat.append(time.perf_counter() - t0)
        except (OSError, ConnectionError):
            errors += 1
            if keepalive:
                break
    q.put((lat, errors))


def run_tls(
    proxy_port: int | None, tls_port: int, ca: Path, seconds: float, keepalive: bool, procs: int = 2
) -> dict[str, float]:
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    ps = [
        mp.Process(target=_tls_worker, args=(proxy_port, tls_port, str(ca), seconds, keepalive, q))
        for _ in range(procs)
    ]
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
    n = len(lat)
    return {
        "rps": n / seconds,
        "p50_ms": (lat[n // 2] * 1000) if n else float("nan"),
        "p99_ms": (lat[min(n - 1, int(n * 0.99))] * 1000) if n else float("nan"),
        "bad": 0.0,
        "errors": float(errors),
    }


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--only", help="comma-separated workloads")
    ap.add_argument("--proxies", help="comma-separated proxies (default: all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    if os.environ.get("PORTCULLIS_BENCH_NS") != "1":
        # Re-run inside a private mount namespace so bench.test can resolve via our own /etc/hosts.
        if shutil.which("unshare") is None:
            print("bench: needs unshare (util-linux)", file=sys.stderr)
            return 2
        env = dict(os.environ, PORTCULLIS_BENCH_NS="1")
        return subprocess.call(
            ["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv], env=env
        )

    for tool in ("nginx", "squid", "wrk", "openssl"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found (apt-get install nginx-light squid wrk openssl)", file=sys.stderr)
            return 2

    workloads = args.only.split(",") if args.only else list(WORKLOADS)
    proxies = args.proxies.split(",") if args.proxies else list(PROXIES)
    d = Path(tempfile.mkdtemp(prefix="portcullis-bench-"))
    os.chmod(d, 0o755)
    hosts = d / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{UPSTREAM} {NAME}\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    make_certs(d)
    http_port, tls_port = free_port(), free_port()
    nginx = start_nginx(d, http_port, tls_port)
    results: list[dict[str, object]] = []
    try:
        for rnd in range(args.rounds):
            for proxy in proxies:
                for wl in workloads:
                    procs: list[subprocess.Popen[bytes]] = []
                    try:
                        port: int | None = None
                        if proxy == "portcullis":
                            port = free_port()
                            procs.append(start_portcullis(d, port, free_port()))
                        elif proxy == "mitmdump":
                            port = free_port()
                            procs.append(start_mitmdump(d, port, passthrough=wl.startswith("tls")))
                        elif proxy == "squid":
                            port = free_port()
                            cell = d / f"r{rnd}-{wl}"
                            cell.mkdir()
                            procs.append(start_squid(cell, port, http_port, tls_port))
                        time.sleep(0.3)
                        if wl == "http-ka":
                            r = run_wrk(port, http_port, args.seconds, close=False, d=d)
                        elif wl == "http-close":
                            r = run_wrk(port, http_port, args.seconds, close=True, d=d)
                        else:
                            run_tls(port, tls_port, d / "ca.pem", 1.0, keepalive=(wl == "tls-ka"))  # warm-up
                            r = run_tls(
                                port, tls_port, d / "ca.pem", args.seconds, keepalive=(wl == "tls-ka")
                            )
                    except Exception as e:  # a failed cell is reported, not fatal
                        r = {
                            "rps": float("nan"),
                            "p50_ms": float("nan"),
                            "p99_ms": float("nan"),
                            "bad": 0.0,
                            "errors": 1.0,
                            "failure": str(e)[:200],
                        }
                    finally:
                        for p in procs:
                            stop(p)
                    row = {"round": rnd, "proxy": proxy, "workload": wl, **r}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        stop(nginx)
        subprocess.run(["umount", "/etc/hosts"], check=False)

    report(results, workloads, proxies, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out / f"compare-{stamp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    shutil.rmtree(d, ignore_errors=True)
    return 0


def report(
    results: list[dict[str, object]], workloads: list[str], proxies: list[str], args: argparse.Namespace
) -> None:
    def med(proxy: str, wl: str, key: str) -> float:
        vals = [
            float(r[key])
            for r in results  # type: ignore[arg-type]
            if r["proxy"] == proxy and r["workload"] == wl and r[key] == r[key]
        ]
        return statistics.median(vals) if vals else float("nan")

    print(
        f"\n## Portcullis vs mitmdump vs Squid "
        f"({args.rounds} interleaved rounds x {args.seconds:g}s per cell; "
        "median of rounds)\n"
    )
    print(
        "| workload | "
        + " | ".join(f"{p} req/s (p50 ms)" for p in proxies)
        + " | portcullis/mitmdump | portcullis/squid |"
    )
    print("|---|" + "---|" * (len(proxies) + 2))
    for wl in workloads:
        cells = [f"{med(p, wl, 'rps'):,.0f} ({med(p, wl, 'p50_ms'):.2f})" for p in proxies]
        pc, mm, sq = med("portcullis", wl, "rps"), med("mitmdump", wl, "rps"), med("squid", wl, "rps")
        print(f"| {wl} | " + " | ".join(cells) + f" | {_ratio(pc, mm)} | {_ratio(pc, sq)} |")
    bad = [r for r in results if r.get("failure") or float(r.get("bad", 0)) > 0]  # type: ignore[arg-type]
    if bad:
        print(f"\n{len(bad)} cell(s) had failures or non-2xx answers:")
        for r in bad:
            print("  ", json.dumps(r))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and a == a and b == b else "n/a"


if __name__ == "__main__":
    sys.exit(main())
