"""Proxy benchmark: Portcullis vs bare mitmdump (plain and --ignore-hosts passthrough) vs Squid, same run.

    .venv/bin/python bench/bench_proxy.py [--rounds 2] [--seconds 5] [--only portcullis,squid]

Upstream: nginx (1 worker) on 127.0.0.2, HTTP `return 200 "ok\\n"` and the same over TLS (cert for
public.test from a throwaway CA). Workloads, each a bounded cell, interleaved across proxies per round:
  http-ka   wrk -t1 -c10, absolute-form GET through the proxy on keep-alive connections
  http-close  the same with `Connection: close` (a new client and upstream connection per request)
  connect   2 client processes: new TCP + CONNECT + TLS handshake + GET + close, per request
  tunnel-ka 2 client processes, each one CONNECT + TLS session, then keep-alive GETs inside it
Prints a table (median of rounds) with ratios against mitmdump and Squid, and one JSON line.
This is a benchmark, not a test: numbers depend on the box (2 cores shared by load, proxy and nginx).
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.harness import make_pki  # noqa: E402

HOST = "public.test"
UP_IP = "127.0.0.2"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{host}:{port} did not come up")


class Stack:
    """nginx upstream + every proxy under test, each a subprocess."""

    def __init__(self, work: Path, only: set[str] | None) -> None:
        self.work = work
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.only = only
        self.pki = make_pki(work / "pki")
        self.http_port = free_port(UP_IP)
        self.tls_port = free_port(UP_IP)

    def start(self) -> None:
        self._nginx()
        wanted = ["portcullis", "mitmdump", "mitmdump-ignore", "squid"]
        for name in wanted:
            if self.only and name not in self.only:
                continue
            if name == "squid" and shutil.which("squid") is None:
                print("squid not installed: skipped", file=sys.stderr)
                continue
            getattr(self, "_" + name.replace("-", "_"))()
        for port in self.ports.values():
            wait_port("127.0.0.1", port)
        wait_port(UP_IP, self.http_port)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def _spawn(self, name: str, cmd: list[str], **kw: object) -> None:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, **kw)  # type: ignore[call-overload]

    def _nginx(self) -> None:
        d = self.work / "nginx"
        (d / "logs").mkdir(parents=True)
        (d / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; error_log {d}/error.log; pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{ listen {UP_IP}:{self.http_port}; location / {{ return 200 "ok\\n"; }} }}
  server {{ listen {UP_IP}:{self.tls_port} ssl; ssl_certificate {self.pki["public_cert"]};
           ssl_certificate_key {self.pki["public_key"]}; location / {{ return 200 "ok\\n"; }} }}
}}
""")
        self._spawn("nginx", ["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)])

    def _portcullis(self) -> None:
        d = self.work / "portcullis"
        (d / "rules").mkdir(parents=True)
        (d / "rules" / "r.yaml").write_text(
            json.dumps({"rules": [{"name": "bench", "action": "allow", "hosts": [HOST]}]})
        )
        (d / "portcullis.yaml").write_text(
            json.dumps(
                {
                    "rules": ["rules/"],
                    "default_action": "deny",
                    "network": {"allow_cidrs": [f"{UP_IP}/32"], "resolve": {HOST: UP_IP}},
                    "tls": {"ca_dir": "certs/"},
                }
            )
        )
        port = self.ports["portcullis"] = free_port()
        self._spawn(
            "portcullis",
            [
                sys.executable,
                "-m",
                "addons.cli",
                "run",
                "--config",
                str(d / "portcullis.yaml"),
                "--listen",
                f"127.0.0.1:{port}",
                "--admin",
                "127.0.0.1:0",
            ],
            cwd=REPO,
        )

    def _mitm(self, name: str, extra: list[str]) -> None:
        port = self.ports[name] = free_port()
        mitmdump = Path(sys.executable).parent / "mitmdump"
        self._spawn(
            name,
            [
                str(mitmdump),
                "-q",
                "--listen-host",
                "127.0.0.1",
                "-p",
                str(port),
                "--set",
                f"confdir={self.work / 'mitmconf'}",
                *extra,
            ],
        )

    def _mitmdump(self) -> None:
        # Plain mitmdump resolves names itself: give it the upstream by IP via a Host-less mapping is not
        # possible, so it is driven with the IP literal (same upstream, same bytes).
        self._mitm("mitmdump", ["--set", "ssl_insecure=true"])

    def _mitmdump_ignore(self) -> None:
        self._mitm("mitmdump-ignore", ["--ignore-hosts", ".*"])

    def _squid(self) -> None:
        d = self.work / "squid"
        d.mkdir()
        os.chmod(d, 0o777)
        (d / "hosts").write_text(f"{UP_IP} {HOST}\n")
        os.chmod(d / "hosts", 0o644)
        port = self.ports["squid"] = free_port()
        (d / "squid.conf").write_text(f"""
http_port 127.0.0.1:{port}
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log none
cache deny all
cache_mem 8 MB
coredump_dir {d}
hosts_file {d}/hosts
dns_nameservers 127.0.0.1
acl allowed dstdomain {HOST}
acl allowed_ip dst {UP_IP}/32
http_access allow allowed
http_access allow allowed_ip
http_access deny all
shutdown_lifetime 1 seconds
""")
        self._spawn("squid", ["squid", "-N", "-f", str(d / "squid.conf")])


def target_host(proxy: str) -> str:
    # Plain mitmdump has no static name mapping: it gets the IP literal (same upstream, same work).
    return UP_IP if proxy.startswith("mitmdump") else HOST


def wrk_http(stack: Stack, proxy: str, seconds: float, close: bool = False) -> dict[str, float]:
    host = target_host(proxy)
    script = stack.work / f"wrk-{proxy}-{int(close)}.lua"
    url = f"http://{host}:{stack.http_port}/"
    lua = f'wrk.path = "{url}"\nwrk.headers["Host"] = "{host}:{stack.http_port}"\n'
    if close:
        lua += 'wrk.headers["Connection"] = "close"\n'
    script.write_text(lua)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c10",
            f"-d{int(seconds)}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{stack.ports[proxy]}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": _wrk_ms(out, "50%"),
        "p99_ms": _wrk_ms(out, "99%"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


def _wrk_ms(out: str, pct: str) -> float:
    m = re.search(rf"{re.escape(pct)}\s+([\d.]+)(us|ms|s)", out)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def _tunnel_worker(proxy_port: int, host: str, tls_port: int, seconds: float, q: mp.Queue) -> None:  # type: ignore[type-arg]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as s:
                s.sendall(f"CONNECT {host}:{tls_port} HTTP/1.1\r\nHost: {host}:{tls_port}\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed")
                    head += chunk
                if b" 200 " not in head.split(b"\r\n", 1)[0]:
                    raise ConnectionError(head[:40])
                with ctx.wrap_socket(s, server_hostname=HOST) as t:
                    t.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                    data = b""
                    while chunk := t.recv(4096):
                        data += chunk
                    if not data.startswith(b"HTTP/1.1 200"):
                        raise ConnectionError(data[:40])
            lat.append((time.perf_counter() - t0) * 1000)
        except (OSError, ConnectionError):
            errors += 1
    q.put((lat, errors))


def _tunnel_ka_worker(proxy_port: int, host: str, tls_port: int, seconds: float, q: mp.Queue) -> None:  # type: ignore[type-arg]
    """One CONNECT + TLS session, then keep-alive GETs inside it until the cell ends."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    lat: list[float] = []
    errors = 0
    try:
        s = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)
        s.sendall(f"CONNECT {host}:{tls_port} HTTP/1.1\r\nHost: {host}:{tls_port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        t = ctx.wrap_socket(s, server_hostname=HOST)
        buf = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            t.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            while b"\r\n\r\n" not in buf:
                buf += t.recv(65536)
            head_b, buf = buf.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head_b).group(1))  # type: ignore[union-attr]
            while len(buf) < length:
                buf += t.recv(65536)
            buf = buf[length:]
            lat.append((time.perf_counter() - t0) * 1000)
        t.close()
    except (OSError, AttributeError):
        errors += 1
    q.put((lat, errors))


def connect_tunnels(
    stack: Stack, proxy: str, seconds: float, procs: int = 2, keepalive: bool = False
) -> dict[str, float]:
    host = HOST  # SNI and CONNECT authority; mitmdump (no mapping) gets the IP literal as authority
    authority_host = target_host(proxy)
    worker = _tunnel_ka_worker if keepalive else _tunnel_worker
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    workers = [
        mp.Process(target=worker, args=(stack.ports[proxy], authority_host, stack.tls_port, seconds, q))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    lats: list[float] = []
    errors = 0
    for _ in workers:
        lat, err = q.get(timeout=seconds + 60)
        lats += lat
        errors += err
    for w in workers:
        w.join(10)
    lats.sort()
    _ = host
    return {
        "rps": len(lats) / seconds,
        "p50_ms": _pct(lats, 50),
        "p99_ms": _pct(lats, 99),
        "errors": float(errors),
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--only", help="comma-separated subset of portcullis,mitmdump,mitmdump-ignore,squid")
    ap.add_argument("--workloads", default="http-ka,http-close,connect,tunnel-ka")
    args = ap.parse_args()
    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        print("needs wrk and nginx (apt-get install wrk nginx-light; squid optional)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    os.chmod(work, 0o755)  # squid drops to its own user and must reach its folder
    stack = Stack(work, set(args.only.split(",")) if args.only else None)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    workloads = args.workloads.split(",")
    try:
        stack.start()
        time.sleep(1)
        for r in range(args.rounds):
            for proxy in stack.ports:  # interleaved: every proxy once per round, per workload
                for wl in workloads:
                    if wl.startswith("http") and proxy == "mitmdump-ignore":
                        continue  # ignore_hosts does not apply to plain HTTP: same as mitmdump
                    if wl in ("connect", "tunnel-ka"):
                        res = connect_tunnels(stack, proxy, args.seconds, keepalive=wl == "tunnel-ka")
                    else:
                        res = wrk_http(stack, proxy, args.seconds, close=wl == "http-close")
                    results.setdefault(wl, {}).setdefault(proxy, []).append(res)
                    print(
                        f"round {r} {wl:8} {proxy:16} " + " ".join(f"{k}={v:.2f}" for k, v in res.items()),
                        file=sys.stderr,
                    )
    finally:
        stack.stop()
    report(results)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, dict[str, list[dict[str, float]]]]) -> None:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for wl, per in results.items():
        summary[wl] = {
            p: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for p, runs in per.items()
        }
    cols = ("workload", "proxy", "rps", "p50 ms", "p99 ms", "vs mitmdump", "vs squid")
    print("{:10} {:16} {:>10} {:>8} {:>8} {:>12} {:>9}".format(*cols))
    for wl, per in summary.items():
        base = per.get("mitmdump") or per.get("mitmdump-ignore")
        if wl in ("connect", "tunnel-ka"):
            base = per.get("mitmdump-ignore") or base
        squid = per.get("squid")
        for p, s in per.items():
            vs_m = s["rps"] / base["rps"] if base and base["rps"] else float("nan")
            vs_s = s["rps"] / squid["rps"] if squid and squid["rps"] else float("nan")
            row = (wl, p, s["rps"], s["p50_ms"], s["p99_ms"], vs_m, vs_s)
            print("{:10} {:16} {:10.1f} {:8.2f} {:8.2f} {:12.2f} {:9.3f}".format(*row))
    print(json.dumps({"bench": "proxy", "summary": summary}))


if __name__ == "__main__":
    sys.exit(main())
