#!/usr/bin/env python3
"""Portcullis against bare mitmproxy and Squid, measured in the same run on loopback. Not a test.

This machine is noisy, so single absolute timings mean little: every proxy runs the same cells in
interleaved rounds (round 1: every cell for every proxy, then round 2 ...), and the report gives the
median of the rounds and ratios between proxies measured in the same run. Upstream is nginx (1
worker) on 127.0.0.2; bench.test resolves to it through a private /etc/hosts bind-mounted in a mount
namespace of our own (`unshare -m`), so every proxy resolves it the ordinary way.

Proxies (columns): portcullis (the whole product, 10 rules, an event per decision written to a file;
`--workers 1` when the installed portcullis has --workers), portcullis-wN (`--workers N`, N = --workers,
default the number of cores; skipped when `portcullis run --help` has no --workers), mitmdump (31
default addons; --ignore-hosts '.*' for the TLS cells, its fastest passthrough), squid (1 worker, no
cache, no access log), squid-wN (`workers N`), direct (no proxy: the ceiling), and portcullis-100k
(100,000 rules) for the policy cells.

Cells (rows; each runs --seconds unless said):
  http-ka     plain HTTP keep-alive, wrk -t1 -c10 (absolute-form through the proxy): req/s, and the
              proxy's CPU seconds per 1,000 requests (/proc/<pid>/stat of it and its children)
  http-close  the same with a new connection per request (Connection: close)
  tls-new     CONNECT + TLS handshake + GET, a new tunnel per request, 2 client processes
  tls-ka      GETs inside one open tunnel per client process, 2 client processes
  bulk        GET of 100 MB inside one tunnel (TLS), twice: MB/s
  latency     one client, one new tunnel (CONNECT + TLS + GET) at a time, every proxy started at once
              and taken in turn with direct (--seconds per target): p50/p99, and what each proxy adds
              to direct (its p50 and p99 minus direct's, measured over the same moments)
  held        Portcullis only: RSS idle, with 1,000 and with 10,000 requests held for approval (an
              `action: approval` rule, hold: true; 50 per source address 127.1.x.y, distinct ports),
              and the p99 of an allowed probe (keep-alive GETs, one at a time) idle and beside 10,000
  load        the time to load a 100,000-rule policy (load_config, in a fresh process)

Usage: .venv/bin/python bench/bench_compare.py [--rounds 2] [--seconds 5] [--only http-ka,tls-new]
       [--proxies portcullis,mitmdump] [--workers N]
Needs: nginx, squid, wrk (Debian packages nginx-light squid wrk), openssl, root (unshare -m, 127.1/16
source addresses, raising the open-files limit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_load as bl  # noqa: E402
import bench_procs as bp  # noqa: E402

ROOT = bp.ROOT
VENV_BIN = bp.VENV_BIN
UPSTREAM, NAME = bp.UPSTREAM, bp.NAME
THROUGHPUT = ("http-ka", "http-close", "tls-new", "tls-ka")
CELLS = (*THROUGHPUT, "bulk", "latency", "held", "load")
PROXIES = ("portcullis", "portcullis-wN", "mitmdump", "squid", "squid-wN", "direct", "portcullis-100k")
POLICY_CELLS = ("http-ka", "tls-new")  # the cells portcullis-100k runs (against portcullis: 10 rules)
NAN = float("nan")

# kept for bench/profile_proxy.py
WORKLOADS = THROUGHPUT
free_port, make_certs, start_nginx, stop = bp.free_port, bp.make_certs, bp.start_nginx, bp.stop
start_mitmdump = bp.start_mitmdump
run_wrk, run_tls = bl.run_wrk, bl.run_tls


def start_portcullis(d: Path, port: int, admin: int) -> Any:
    """The bench's standard Portcullis (10 rules), as profile_proxy.py starts it."""
    return bp.start_portcullis(bp.portcullis_setup(d, "std", 10), port, admin)


class Bench:
    def __init__(self, args: argparse.Namespace, d: Path, http_port: int, tls_port: int) -> None:
        self.args = args
        self.d = d
        self.http_port, self.tls_port = http_port, tls_port
        self.ca = d / "ca.pem"
        self.n = args.workers
        self.has_workers = bp.portcullis_supports_workers()
        self.std = bp.portcullis_setup(d, "std", 10)
        self.big = bp.portcullis_setup(d, "100k", 100_000)
        self.hold = bp.portcullis_setup(d, "hold", 2, hold=True)
        self.variants: dict[str, str] = dict(v.split("=", 1) for v in args.variant)
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = []
        if not self.has_workers:
            self.notes.append("portcullis-wN: skipped, the installed `portcullis run` has no --workers")

    # ---- one proxy ------------------------------------------------------------------------------
    def start(self, proxy: str, cell: str, rnd: int) -> tuple[Any, int | None, int | None]:
        """(process, proxy port, admin port) for one cell; (None, None, None) for direct."""
        port, admin = bp.free_port(), bp.free_port()
        tls_cell = cell in ("tls-new", "tls-ka", "bulk", "latency")
        if proxy == "direct":
            return None, None, None
        if proxy == "mitmdump":
            return bp.start_mitmdump(self.d, port, passthrough=tls_cell), port, None
        if proxy.startswith("squid"):
            workers = self.n if proxy == "squid-wN" else 1
            folder = self.d / f"squid-{proxy}-r{rnd}-{cell}"
            return bp.start_squid(folder, port, self.http_port, self.tls_port, workers), port, None
        setup = {"portcullis-100k": self.big}.get(proxy, self.hold if cell == "held" else self.std)
        if cell == "latency":  # started side by side: each its own folder (events, state)
            setup = bp.portcullis_setup(self.d, "lat-" + proxy.replace("@", "-"), 10)
        workers = self.n if proxy == "portcullis-wN" else (1 if self.has_workers else None)
        env = None
        if proxy.startswith("portcullis@"):  # another source tree, e.g. a worktree of an older commit
            env = dict(os.environ, PYTHONPATH=self.variants[proxy.split("@", 1)[1]])
            workers = None
        t0 = time.monotonic()
        p = bp.start_portcullis(setup, port, admin, workers, env=env)
        if proxy == "portcullis-100k":
            self.record(rnd, "startup", proxy, {"value": time.monotonic() - t0})
        return p, port, admin

    def wanted(self, proxy: str, cell: str) -> bool:
        if proxy.startswith("portcullis@"):
            return cell in (*THROUGHPUT, "bulk", "latency", "held")
        if proxy == "portcullis-wN" and not self.has_workers:
            return False
        if proxy == "portcullis-100k":
            return cell in POLICY_CELLS
        if cell == "held":
            return proxy in ("portcullis", "portcullis-wN")
        if cell == "load":
            return proxy == "portcullis"
        return True

    def record(self, rnd: int, cell: str, proxy: str, values: dict[str, Any]) -> None:
        row = {"round": rnd, "cell": cell, "proxy": proxy, **values}
        self.results.append(row)
        print(json.dumps(row), flush=True)

    # ---- cells ------------------------------------------------------------------------------------
    def latency(self, rnd: int, proxies: list[str]) -> None:
        """Every proxy started at once; one client takes them (and direct) in turn, tunnel by tunnel."""
        procs: list[Any] = []
        ports: dict[str, int | None] = {}
        try:
            for proxy in proxies:
                p, port, _ = self.start(proxy, "latency", rnd)
                if p is not None:
                    procs.append(p)
                ports[proxy] = port
            time.sleep(0.5)
            bl.run_latency_interleaved(ports, self.tls_port, self.ca, 1.0)  # warm-up
            seconds = self.args.seconds * len(ports)
            results = bl.run_latency_interleaved(ports, self.tls_port, self.ca, seconds)
            for proxy, r in results.items():
                self.record(rnd, "latency", proxy, r)
        except Exception as e:  # a failed cell is reported, not fatal
            for proxy in proxies:
                self.record(rnd, "latency", proxy, {"failure": f"{type(e).__name__}: {e}"[:300]})
        finally:
            for p in procs:
                bp.stop(p)

    def run_cell(self, rnd: int, cell: str, proxy: str) -> None:
        if cell == "load":
            self.record(rnd, cell, proxy, {"value": self.load_time()})
            return
        p = None
        try:
            p, port, admin = self.start(proxy, cell, rnd)
            time.sleep(0.3)
            if cell == "held":
                self.held(rnd, proxy, p, port, admin)
                return
            if cell == "bulk":
                self.record(rnd, cell, proxy, bl.run_bulk(port, self.tls_port, self.ca))
                return
            self.load(cell, port, 1.0)  # warm-up
            cpu0 = bp.cpu_seconds(p.pid) if p is not None else NAN
            r = self.load(cell, port, self.args.seconds)
            cpu1 = bp.cpu_seconds(p.pid) if p is not None else NAN
            done = r["rps"] * self.args.seconds
            r["cpu_s_per_1k"] = (cpu1 - cpu0) / done * 1000 if done else NAN
            r["rss_mb"] = bp.rss_bytes(p.pid) / 1e6 if p is not None else NAN
            self.record(rnd, cell, proxy, r)
        except Exception as e:  # a failed cell is reported, not fatal
            self.record(rnd, cell, proxy, {"failure": f"{type(e).__name__}: {e}"[:300]})
        finally:
            bp.stop(p)

    def load(self, cell: str, port: int | None, seconds: float) -> dict[str, float]:
        if cell in ("http-ka", "http-close"):
            return bl.run_wrk(port, self.http_port, seconds, close=cell == "http-close", d=self.d)
        return bl.run_tls(port, self.tls_port, self.ca, seconds, keepalive=cell == "tls-ka")

    def held(self, rnd: int, proxy: str, p: Any, port: int, admin: int) -> None:
        secs = min(self.args.seconds, 3.0)
        time.sleep(1.0)
        out: dict[str, Any] = {"rss_idle_mb": bp.rss_bytes(p.pid) / 1e6}
        out["probe_idle_p50_ms"], out["probe_idle_p99_ms"] = _p(bl.probe(port, self.http_port, secs))
        holder = bl.Holder(port)
        try:
            for n in (1000, 10000):
                t0 = time.monotonic()
                holder.open(n)
                out[f"pending_{n}"] = bl.wait_pending(admin, n, 300)
                out[f"open_{n}_s"] = time.monotonic() - t0
                time.sleep(1.0)
                out[f"rss_{n}_mb"] = bp.rss_bytes(p.pid) / 1e6
            cpu0, t0 = bp.cpu_seconds(p.pid), time.monotonic()
            out["probe_10000_p50_ms"], out["probe_10000_p99_ms"] = _p(bl.probe(port, self.http_port, secs))
            out["cpu_cores_10000"] = (bp.cpu_seconds(p.pid) - cpu0) / (time.monotonic() - t0)
            out["failed_connects"] = holder.failed
        finally:
            holder.close()
        self.record(rnd, "held", proxy, out)

    def load_time(self) -> float:
        code = (
            "import sys, time; sys.path.insert(0, sys.argv[1]); from addons.config.load import load_config; "
            "t0 = time.perf_counter(); p = load_config(sys.argv[2]).policy; "
            "print(time.perf_counter() - t0, p.rule_count)"
        )
        cfg = str(self.big.folder / "portcullis.yaml")
        out = subprocess.run([sys.executable, "-c", code, str(ROOT), cfg],
                             capture_output=True, text=True, timeout=600, check=True).stdout.split()
        assert int(out[1]) == self.big.rules, out
        return float(out[0])


def _p(r: dict[str, float]) -> tuple[float, float]:
    return r["p50_ms"], r["p99_ms"]


# ----------------------------------------------------------------------------- report


class Report:
    def __init__(self, b: Bench) -> None:
        self.b = b
        self.rows = b.results

    def med(self, cell: str, proxy: str, key: str) -> float:
        vals = [float(r[key]) for r in self.rows
                if r["cell"] == cell and r["proxy"] == proxy and key in r and r[key] == r[key]]
        return statistics.median(vals) if vals else NAN

    def render(self, proxies: list[str], cells: list[str]) -> str:
        b = self.b
        n = b.n
        cols = [p for p in ("portcullis", "portcullis-wN", "mitmdump", "squid", "squid-wN", "direct")
                if p in proxies]
        names = {"portcullis-wN": f"portcullis ×{n}", "squid-wN": f"squid ×{n}"}
        head = ["cell", *(names.get(c, c) for c in cols), "pc/mitmdump", "pc/squid",
                f"pc×{n}/pc", f"pc×{n}/squid", "notes"]
        lines = [
            f"## Portcullis vs mitmdump vs Squid ({b.args.rounds} interleaved rounds x {b.args.seconds:g} s "
            f"per cell; median of rounds; {os.cpu_count()} cores)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]

        def row(label: str, cell: str, key: str, fmt: str, ratios: bool = True, note: str = "") -> None:
            vals = {c: self.med(cell, c, key) for c in cols}
            cells_txt = [_fmt(vals[c], fmt) for c in cols]
            pc, pcn = vals.get("portcullis", NAN), vals.get("portcullis-wN", NAN)
            mm, sq = vals.get("mitmdump", NAN), vals.get("squid", NAN)
            rs = [_ratio(pc, mm), _ratio(pc, sq), _ratio(pcn, pc), _ratio(pcn, sq)] if ratios else ["—"] * 4
            lines.append("| " + " | ".join([label, *cells_txt, *rs, note]) + " |")

        titles = {"http-ka": "plain HTTP keep-alive (req/s)",
                  "http-close": "plain HTTP, new connection each (req/s)",
                  "tls-new": "CONNECT + TLS + GET, new tunnel each (/s)",
                  "tls-ka": "GETs inside one tunnel (req/s)"}
        for cell in THROUGHPUT:
            if cell in cells:
                row(titles[cell], cell, "rps", ",.0f",
                    note=f"p50 ms: pc {self.med(cell, 'portcullis', 'p50_ms'):.2f}, "
                         f"mitmdump {self.med(cell, 'mitmdump', 'p50_ms'):.2f}, "
                         f"squid {self.med(cell, 'squid', 'p50_ms'):.2f}")
        if "bulk" in cells:
            row("100 MB inside one tunnel (MB/s)", "bulk", "rps", ",.0f")
        if "latency" in cells:
            row("new tunnel, one client: p50 ms", "latency", "p50_ms", ".2f", ratios=False,
                note="added over direct: " + self._added("p50_ms", cols))
            row("new tunnel, one client: p99 ms", "latency", "p99_ms", ".2f", ratios=False,
                note="added over direct: " + self._added("p99_ms", cols))
        for cell in THROUGHPUT:
            if cell in cells:
                row(f"CPU s per 1,000 requests, {cell}", cell, "cpu_s_per_1k", ".3f", ratios=False)
        if "held" in cells:
            row("RSS MB idle (approval config)", "held", "rss_idle_mb", ",.0f", ratios=False)
            row("RSS MB, 1,000 held approvals", "held", "rss_1000_mb", ",.0f", ratios=False,
                note=self._held_note(1000))
            row("RSS MB, 10,000 held approvals", "held", "rss_10000_mb", ",.0f", ratios=False,
                note=self._held_note(10000))
            row("allowed probe p99 ms, idle", "held", "probe_idle_p99_ms", ".2f", ratios=False)
            row("allowed probe p99 ms, beside 10,000 held", "held", "probe_10000_p99_ms", ".2f", ratios=False,
                note="vs idle: " + ", ".join(
                    f"{names.get(c, c)} {self._probe_ratio(c)}x"
                    for c in ("portcullis", "portcullis-wN") if c in cols)
                + "; CPU while holding (cores): " + ", ".join(
                    f"{names.get(c, c)} {self.med('held', c, 'cpu_cores_10000'):.2f}"
                    for c in ("portcullis", "portcullis-wN") if c in cols))
        if "portcullis-100k" in proxies:
            for cell in POLICY_CELLS:
                if cell in cells:
                    ten, big = self.med(cell, "portcullis", "rps"), self.med(cell, "portcullis-100k", "rps")
                    lines.append(f"| {cell} with 100,000 rules (portcullis column: 10 rules) | "
                                 + " | ".join(_fmt(big, ",.0f") if c == "portcullis" else "—" for c in cols)
                                 + f" | — | — | — | — | 100k/10 rules: {_ratio(big, ten)} |")
        if "load" in cells:
            load_s = _fmt(self.med("load", "portcullis", "value"), ".2f")
            lines.append("| 100,000-rule policy: load_config s (proxy start to listening s) | "
                         + " | ".join(load_s if c == "portcullis" else "—" for c in cols)
                         + f" | — | — | — | — | start to listening: "
                         f"{self.med('startup', 'portcullis-100k', 'value'):.2f} s |")
        if b.variants:
            lines += ["", "| variant (same run) | cell | value | portcullis | variant / portcullis |",
                      "|---|---|---|---|---|"]
            keys = [(c, "rps") for c in (*THROUGHPUT, "bulk") if c in cells]
            keys += [("latency", "p50_ms"), ("latency", "p99_ms")] if "latency" in cells else []
            keys += [("held", k) for k in ("rss_10000_mb", "probe_10000_p99_ms")] if "held" in cells else []
            for v, src in b.variants.items():
                for cell, key in keys:
                    a, pc = self.med(cell, f"portcullis@{v}", key), self.med(cell, "portcullis", key)
                    lines.append(f"| {v} ({src}) | {cell} {key} | {_fmt(a, ',.2f')} | {_fmt(pc, ',.2f')} | "
                                 f"{_ratio(a, pc)} |")
        failed = [r for r in self.rows if r.get("failure") or float(r.get("bad", 0) or 0) > 0
                  or float(r.get("errors", 0) or 0) > 0]
        out = "\n".join(lines) + "\n"
        for note in b.notes:
            out += f"\n- {note}"
        if failed:
            out += f"\n\n{len(failed)} cell(s) had failures, errors or non-2xx answers:\n"
            out += "".join(f"  {json.dumps(r)}\n" for r in failed)
        return out + "\n"

    def _added(self, key: str, cols: list[str]) -> str:
        d = self.med("latency", "direct", key)
        return ", ".join(f"{c} +{self.med('latency', c, key) - d:.2f}" for c in cols if c != "direct")

    def _held_note(self, n: int) -> str:
        held = [c for c in ("portcullis", "portcullis-wN")
                if any(r["proxy"] == c and r["cell"] == "held" for r in self.rows)]
        return ", ".join(f"{c}: {self.med('held', c, f'pending_{n}'):,.0f} pending after "
                         f"{self.med('held', c, f'open_{n}_s'):.0f} s" for c in held)

    def _probe_ratio(self, proxy: str) -> str:
        busy = self.med("held", proxy, "probe_10000_p99_ms")
        return _ratio(busy, self.med("held", proxy, "probe_idle_p99_ms"))


def _fmt(v: float, fmt: str) -> str:
    return "n/a" if v != v else format(v, fmt)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and a == a and b == b else "n/a"


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--only", help="comma-separated cells (default: all): " + ",".join(CELLS))
    ap.add_argument("--proxies", help="comma-separated proxies (default: all): " + ",".join(PROXIES))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                    help="N for portcullis-wN and squid-wN")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                    help="also run Portcullis from the source tree DIR (PYTHONPATH) as portcullis@NAME")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    if os.environ.get("PORTCULLIS_BENCH_NS") != "1":
        # Re-run inside a private mount namespace so bench.test can resolve via our own /etc/hosts.
        if shutil.which("unshare") is None:
            print("bench: needs unshare (util-linux)", file=sys.stderr)
            return 2
        env = dict(os.environ, PORTCULLIS_BENCH_NS="1")
        return subprocess.call(["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv],
                               env=env)

    for tool in ("nginx", "squid", "wrk", "openssl"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found (apt-get install nginx-light squid wrk openssl)", file=sys.stderr)
            return 2
    # 10,000 held connections: this process holds one end, the proxy (which inherits the limit) the other.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 11000:
        print(f"bench: the open-files limit is {hard}; the held cell needs about 11,000", file=sys.stderr)

    cells = args.only.split(",") if args.only else list(CELLS)
    proxies = args.proxies.split(",") if args.proxies else list(PROXIES)
    proxies += [f"portcullis@{v.split('=', 1)[0]}" for v in args.variant]
    d = Path(tempfile.mkdtemp(prefix="portcullis-bench-"))
    os.chmod(d, 0o755)
    (d / "hosts").write_text(f"127.0.0.1 localhost\n{UPSTREAM} {NAME}\n")
    subprocess.run(["mount", "--bind", str(d / "hosts"), "/etc/hosts"], check=True)
    bp.make_certs(d)
    http_port, tls_port = bp.free_port(), bp.free_port()
    nginx = bp.start_nginx(d, http_port, tls_port)
    b = Bench(args, d, http_port, tls_port)
    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()[0]
    try:
        for rnd in range(args.rounds):
            for cell in cells:
                if cell == "latency":
                    b.latency(rnd, [p for p in proxies if b.wanted(p, cell)])
                    continue
                for proxy in proxies:
                    if b.wanted(proxy, cell):
                        b.run_cell(rnd, cell, proxy)
    finally:
        bp.stop(nginx)
        subprocess.run(["umount", "/etc/hosts"], check=False)

    text = Report(b).render(proxies, cells)
    text += f"(started {started}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after)\n"
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out / f"compare-{stamp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b.results))
    (out / f"compare-{stamp}.md").write_text(text)
    shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
