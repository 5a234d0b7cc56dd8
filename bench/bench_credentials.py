#!/usr/bin/env python3
"""What minting and checking a task credential costs (measured, never asserted).

    .venv/bin/python bench/bench_credentials.py [--rounds 2] [--seconds 5] [--n 2000] [--only inproc,e2e]

In process (`inproc`): microseconds per operation, each timed on its own, N of each (bounded):
  mint         CredentialService.mint on a SQLite store in a temporary folder under --dir (default: the
               current directory, so the disk is the one the store would use; tmpfs would hide the
               fsync of synchronous=FULL), the leader's gauge refresh included
  verify warm  the credential cached (what nearly every request with a credential costs)
  verify cold  the cache emptied before each check (a bus message): one store read
  unknown      a user the store does not know, remembered as unknown (a random-user spray)
  parse_basic  the Proxy-Authorization header taken apart

End to end (`e2e`), in interleaved rounds like bench_compare.py (nginx on 127.0.0.2, the name bench.test
from a private /etc/hosts in a mount namespace of our own, so every proxy resolves it the same way):
  http-ka, http-close (wrk -t1 -c10) through
  portcullis-anon  anonymous clients allowed by a rule
  portcullis-cred  credentials.required: true; every request carries Proxy-Authorization with a task
                   credential minted through the real admin API (POST /credentials), whose profile's
                   rule allows the host
  mitmdump         bare mitmdump (its default addons)
  squid            squid, one worker, no cache, no access log
The proxies of one workload run back to back (ABBA order over rounds); the report gives req/s and p50
(median of rounds), the CPU the proxy's processes used per request (user + system, all its processes:
far less sensitive than req/s to what else runs on the machine), the ratios cred/anon, cred/mitmdump,
cred/squid and the CPU difference cred - anon (medians of the values within a round). What a
credential adds to one request is, in process, parse_basic + verify warm: a few microseconds against a
request of milliseconds; end to end, the CPU difference is the figure to read, req/s is noise here.

Needs (e2e): nginx, squid, wrk, openssl (Debian: nginx-light squid wrk openssl), root (unshare -m).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_compare import (  # noqa: E402 - stable helpers shared with the comparison bench
    free_port,
    make_certs,
    start_mitmdump,
    start_nginx,
    start_squid,
    stop,
    wait_port,
)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
UPSTREAM = "127.0.0.2"
NAME = "bench.test"  # bench_compare's: its nginx and squid configs name it
WORKLOADS = ("http-ka", "http-close")
PROXIES = ("portcullis-anon", "portcullis-cred", "mitmdump", "squid")
TOKEN_ENV = "PORTCULLIS_BENCH_ADMIN_TOKEN"  # noqa: S105 - a variable's name
PROFILE = "bench"


# ----------------------------------------------------------------------------- in process


def _stats(ns: list[int]) -> dict[str, float]:
    us = sorted(x / 1000 for x in ns)
    return {
        "n": float(len(us)),
        "mean_us": statistics.fmean(us),
        "median_us": statistics.median(us),
        "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))],
    }


async def _time(
    n: int, op: Callable[[int], Awaitable[object]], before: Callable[[int], None] | None = None
) -> list[int]:
    out = []
    for i in range(n):
        if before is not None:
            before(i)
        t0 = time.perf_counter_ns()
        await op(i)
        out.append(time.perf_counter_ns() - t0)
    return out


async def inproc(n: int, folder: Path) -> dict[str, dict[str, float]]:
    from addons.config.models import CredentialsConfig
    from addons.credentials.model import Check
    from addons.credentials.service import CredentialService
    from addons.credentials.stores import SqliteCredentialStore
    from addons.pipeline.identity import parse_basic
    from addons.telemetry.events import Telemetry

    with open(os.devnull, "w") as sink:  # events are built and written, to nowhere
        svc = CredentialService(
            CredentialsConfig(),
            lambda: SqliteCredentialStore(folder / "state" / "approvals.db"),
            Telemetry(stream=sink),
            profiles=lambda: frozenset({PROFILE}),
            sweep_interval=3600.0,
        )
        await svc.start()
        try:

            async def mint(i: int) -> None:
                await svc.mint(f"bench-{i}", PROFILE, 3600.0, {"repo": "web", "run": str(i)}, "admin")
                await asyncio.sleep(0)  # let the leader's gauge refresh run: it is part of the cost

            out = {"mint": _stats(await _time(n, mint))}
            m = await svc.mint("hot", PROFILE, 3600.0, {}, "admin")
            header = "Basic " + base64.b64encode(f"hot:{m.secret}".encode()).decode()

            async def verify(_: int) -> None:
                check, _c = await svc.verify("hot", m.secret)
                assert check is Check.OK, check

            await verify(0)
            now = time.time()
            svc.clock = lambda: now  # frozen: every check a cache hit (the cache is re-read once a second)
            out["verify warm"] = _stats(await _time(n, verify))
            svc.clock = time.time
            forget = lambda _: svc.bus.publish({"t": "credential", "id": "hot"})  # noqa: E731
            out["verify cold"] = _stats(await _time(n, verify, before=forget))

            async def unknown(_: int) -> None:
                check, _c = await svc.verify("nobody", "x")
                assert check is Check.UNKNOWN

            await unknown(0)
            out["unknown"] = _stats(await _time(n, unknown))

            async def parse(_: int) -> None:
                assert parse_basic(header) is not None

            out["parse_basic"] = _stats(await _time(n, parse))
        finally:
            await svc.stop()
    return out


# ----------------------------------------------------------------------------- end to end


def start_portcullis(d: Path, port: int, admin: int, cred: bool, token: str) -> subprocess.Popen[bytes]:
    pd = d / ("portcullis-cred" if cred else "portcullis-anon")
    (pd / "rules").mkdir(parents=True, exist_ok=True)
    scope = f"\n    profiles: [{PROFILE}]" if cred else ""
    (pd / "rules" / "bench.yaml").write_text(
        f"rules:\n  - name: bench\n    action: allow\n    hosts: [{NAME}]{scope}\n"
    )
    extra = f"profiles: [{{name: {PROFILE}}}]\ncredentials: {{required: true}}\n" if cred else ""
    (pd / "portcullis.yaml").write_text(f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin}", token_env: {TOKEN_ENV}}}
rules: [rules/]
default_action: deny
approvals: {{store: "sqlite:///state/p.db", persist_to: rules/approved.yaml}}
network: {{allow_cidrs: ["{UPSTREAM}/32"]}}
tls: {{ca_dir: certs/}}
{extra}""")
    log = open(pd / "events.jsonl", "ab")  # noqa: SIM115 - lives as long as the process
    p = subprocess.Popen(
        [str(VENV_BIN / "portcullis"), "run", "--config", str(pd / "portcullis.yaml")],
        stdout=log,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, **{TOKEN_ENV: token}),
    )
    wait_port("127.0.0.1", port, timeout=30)
    wait_port("127.0.0.1", admin, timeout=30)
    return p


def mint_credential(admin: int, token: str, task: str) -> str:
    """POST /credentials on the real admin API; the Proxy-Authorization value for its answer."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}/credentials",
        method="POST",
        data=json.dumps(
            {"task_id": task, "profile": PROFILE, "ttl": "1h", "labels": {"bench": "e2e"}}
        ).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
        doc = json.loads(r.read())
    return "Basic " + base64.b64encode(f"{doc['user']}:{doc['password']}".encode()).decode()


def wait_answers(port: int, http_port: int, auth: str | None, timeout: float = 60.0) -> None:
    """Until a GET through the proxy is answered 200: a proxy may accept connections before it is ready
    to serve them (Portcullis takes seconds here after its port opens), and that is not its speed."""
    head = f"GET http://{NAME}:{http_port}/ HTTP/1.1\r\nHost: {NAME}:{http_port}\r\nConnection: close\r\n"
    if auth:
        head += f"Proxy-Authorization: {auth}\r\n"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall((head + "\r\n").encode())
                last = s.recv(64).decode(errors="replace").split("\r\n")[0]
            if " 200 " in last + " ":
                return
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"the proxy on port {port} did not answer 200 in {timeout:g}s (last: {last!r})")


WRK_LUA = """
wrk.method = "GET"
wrk.path = "{path}"
wrk.headers["Host"] = "{host}"
{extra}
"""


def run_wrk(
    port: int, http_port: int, seconds: float, close: bool, auth: str | None, d: Path
) -> dict[str, float]:
    """wrk -t1 -c10 through the proxy at `port` (our own runner: bench_compare's has no headers)."""
    host = f"{NAME}:{http_port}"
    extra = []
    if close:
        extra.append('wrk.headers["Connection"] = "close"')
    if auth:
        extra.append(f'wrk.headers["Proxy-Authorization"] = "{auth}"')
    lua = d / f"wrk-{int(close)}-{int(bool(auth))}.lua"
    lua.write_text(WRK_LUA.format(path=f"http://{host}/", host=host, extra="\n".join(extra)))
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c10",
            f"-d{max(1, int(seconds))}s",
            "--latency",
            "-s",
            str(lua),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk printed no rate: {out[-300:]!r}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    n = re.search(r"(\d+) requests in", out)
    return {
        "requests": float(n.group(1)) if n else float("nan"),
        "rps": float(m.group(1)),
        "p50_ms": _latency(out, "50%"),
        "p99_ms": _latency(out, "99%"),
        "bad": float(non2xx.group(1)) if non2xx else 0.0,
        "errors": 1.0 if errors else 0.0,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (Portcullis may run workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, total = {pid}, 0.0
    grown = True
    while grown:
        grown = False
        for p, (ppid, _) in stats.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                grown = True
    for p in tree:
        total += stats.get(p, (0, 0.0))[1]
    return total


def _latency(out: str, q: str) -> float:
    m = re.search(rf"{re.escape(q)}\s+([\d.]+)(us|ms|s)\b", out)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def e2e(rounds: int, seconds: float, proxies: list[str], workloads: list[str]) -> list[dict[str, object]]:
    d = Path(tempfile.mkdtemp(prefix="portcullis-bench-cred-"))
    os.chmod(d, 0o755)
    hosts = d / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{UPSTREAM} {NAME}\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    token = base64.urlsafe_b64encode(os.urandom(24)).decode()
    results: list[dict[str, object]] = []
    nginx = None
    try:
        make_certs(d)
        http_port, tls_port = free_port(), free_port()
        nginx = start_nginx(d, http_port, tls_port)
        for rnd in range(rounds):
            for wl in workloads:
                # The proxies of one workload run back to back, in the reverse order every other round
                # (ABBA): the ratios are taken within a round, where the machine's noise is most alike.
                for proxy in proxies if rnd % 2 == 0 else proxies[::-1]:
                    procs: list[subprocess.Popen[bytes]] = []
                    r: dict[str, object]
                    try:
                        port, auth = free_port(), None
                        if proxy.startswith("portcullis"):
                            admin = free_port()
                            cred = proxy == "portcullis-cred"
                            procs.append(start_portcullis(d, port, admin, cred, token))
                            if cred:
                                auth = mint_credential(admin, token, f"bench-r{rnd}-{wl}")
                        elif proxy == "mitmdump":
                            procs.append(start_mitmdump(d, port, passthrough=False))
                        else:
                            cell = d / f"squid-r{rnd}-{wl}"
                            cell.mkdir()
                            procs.append(start_squid(cell, port, http_port, tls_port))
                        wait_answers(port, http_port, auth)
                        run_wrk(port, http_port, 1.0, wl == "http-close", auth, d)  # warm-up
                        cpu0 = cpu_seconds(procs[0].pid)
                        r = dict(run_wrk(port, http_port, seconds, wl == "http-close", auth, d))
                        # CPU per request: far less sensitive than req/s to what else runs on the machine
                        r["cpu_us"] = (cpu_seconds(procs[0].pid) - cpu0) / float(r["requests"]) * 1e6
                    except Exception as e:  # noqa: BLE001 - a failed cell is reported, not fatal
                        r = {
                            "rps": float("nan"),
                            "cpu_us": float("nan"),
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
        shutil.rmtree(d, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------- report


def report_inproc(out: dict[str, dict[str, float]]) -> None:
    n = int(next(iter(out.values()))["n"])
    print(f"\n## In process ({n} of each, each timed alone)\n")
    print("| operation | mean µs | median µs | p99 µs |")
    print("|---|---|---|---|")
    for name, s in out.items():
        print(f"| {name} | {s['mean_us']:,.1f} | {s['median_us']:,.1f} | {s['p99_us']:,.1f} |")
    if "verify warm" in out and "parse_basic" in out:
        per = out["verify warm"]["median_us"] + out["parse_basic"]["median_us"]
        print(
            f"\nA request with a (cached) task credential: parse_basic + verify warm = {per:.1f} µs (medians)"
        )


def report_e2e(
    results: list[dict[str, object]], workloads: list[str], proxies: list[str], args: argparse.Namespace
) -> None:
    def cell(proxy: str, wl: str, rnd: int, key: str = "rps") -> float:
        for r in results:
            if (r["proxy"], r["workload"], r["round"]) == (proxy, wl, rnd):
                return float(r.get(key, float("nan")))  # type: ignore[arg-type]
        return float("nan")

    def med(proxy: str, wl: str, key: str) -> float:
        vals = [
            float(r[key])  # type: ignore[arg-type]
            for r in results
            if r["proxy"] == proxy and r["workload"] == wl and r[key] == r[key]
        ]
        return statistics.median(vals) if vals else float("nan")

    def paired(a: str, b: str, wl: str) -> float:
        """The median over rounds of a/b measured in the same round."""
        ratios = [
            x / y for rnd in range(args.rounds) if (x := cell(a, wl, rnd)) == x and (y := cell(b, wl, rnd))
        ]
        return statistics.median(ratios) if ratios else float("nan")

    def extra_cpu(wl: str) -> float:
        """The median over rounds of cred - anon CPU µs per request, measured in the same round."""
        d = [
            x - y
            for rnd in range(args.rounds)
            if (x := cell("portcullis-cred", wl, rnd, "cpu_us")) == x
            and (y := cell("portcullis-anon", wl, rnd, "cpu_us")) == y
        ]
        return statistics.median(d) if d else float("nan")

    print(
        f"\n## End to end ({args.rounds} interleaved rounds x {args.seconds:g}s per cell; req/s and p50: "
        "median of rounds; ratios: median of the ratios within each round)\n"
    )
    print(
        "| workload | "
        + " | ".join(f"{p} req/s (p50 ms) CPU µs/req" for p in proxies)
        + " | cred/anon | cred/mitmdump | cred/squid | cred - anon CPU µs/req |"
    )
    print("|---|" + "---|" * (len(proxies) + 4))
    for wl in workloads:
        cells = [
            f"{med(p, wl, 'rps'):,.0f} ({med(p, wl, 'p50_ms'):.2f}) {med(p, wl, 'cpu_us'):,.0f}"
            for p in proxies
        ]
        ratios = [paired("portcullis-cred", other, wl) for other in ("portcullis-anon", "mitmdump", "squid")]
        print(
            f"| {wl} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(_fmt(x) for x in ratios)
            + f" | {extra_cpu(wl):,.0f} |"
        )
    bad = [r for r in results if r.get("failure") or float(r.get("bad", 0)) > 0]  # type: ignore[arg-type]
    if bad:
        print(f"\n{len(bad)} cell(s) had failures or non-2xx answers:")
        for r in bad:
            print("  ", json.dumps(r))


def _fmt(x: float) -> str:
    return f"{x:.2f}" if x == x else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--n", type=int, default=2000, help="operations of each kind, in process")
    ap.add_argument("--only", default="inproc,e2e", help="inproc, e2e or both (comma-separated)")
    ap.add_argument("--proxies", help="comma-separated (default: all four)")
    ap.add_argument("--dir", type=Path, default=None, help="where the in-process SQLite file lives")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    parts = set(args.only.split(","))
    args.n = max(1, min(args.n, 100_000))

    if "e2e" in parts and os.environ.get("PORTCULLIS_BENCH_NS") != "1":
        # Again inside a private mount namespace, so that bench.test resolves via our own /etc/hosts.
        if shutil.which("unshare") is None:
            print("bench: needs unshare (util-linux)", file=sys.stderr)
            return 2
        env = dict(os.environ, PORTCULLIS_BENCH_NS="1")
        return subprocess.call(
            ["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv], env=env
        )

    results: list[dict[str, object]] = []
    workloads, proxies = list(WORKLOADS), args.proxies.split(",") if args.proxies else list(PROXIES)
    if "e2e" in parts:
        for tool in ("nginx", "squid", "wrk", "openssl"):
            if shutil.which(tool) is None:
                print(
                    f"bench: {tool} not found (apt-get install nginx-light squid wrk openssl)",
                    file=sys.stderr,
                )
                return 2
        results = e2e(args.rounds, args.seconds, proxies, workloads)
    measured: dict[str, dict[str, float]] = {}
    if "inproc" in parts:
        with tempfile.TemporaryDirectory(prefix="bench-cred-", dir=args.dir or Path.cwd()) as tmp:
            measured = asyncio.run(inproc(args.n, Path(tmp)))
        report_inproc(measured)
    if results:
        report_e2e(results, workloads, proxies, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out / f"credentials-{stamp}.json").write_text(json.dumps({"inproc": measured, "e2e": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
