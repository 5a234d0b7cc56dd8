#!/usr/bin/env python3
"""Profile a proxy under one of bench_compare's workloads with py-spy and summarise where the CPU goes.

Usage: .venv/bin/python bench/profile_proxy.py --workload http-ka [--proxy portcullis] [--seconds 15]
       [--native] [--out bench/profiles]

Starts nginx and the proxy exactly as bench_compare.py does (private /etc/hosts, loopback), runs the
workload's load generator for --seconds + 3 s, and samples the proxy with `py-spy record --format raw`
(active samples only, i.e. not waiting in epoll) for --seconds. Writes the collapsed stacks
(`<proxy>-<workload>.raw`, not committed) and a short text summary (`<proxy>-<workload>.txt`): the
frames with the most samples of their own (self) and in total (inclusive), and the share per area
(Portcullis's own code, mitmproxy, asyncio, the event pipeline, ssl/sockets ...).
Needs py-spy (pip install py-spy) and what bench_compare.py needs.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_compare as bc  # noqa: E402

AREAS = (
    # (area, substrings of a frame "function (file:line)") in priority order: the first match wins
    ("events: JSON render", ("(json/", "orjson", "(addons/telemetry/render")),
    ("events: structlog", ("(structlog/",)),
    ("events: build/clean/sinks", ("(addons/telemetry/events", "(addons/telemetry/fields",
                                   "(addons/telemetry/sinks")),
    ("metrics: prometheus_client", ("(prometheus_client/",)),
    ("portcullis: pipeline+policy", ("(addons/pipeline/", "(addons/policy/")),
    ("portcullis: proxy adapter", ("(addons/proxy/",)),
    ("portcullis: other", ("(addons/",)),
    ("mitmproxy: hook dispatch", ("(mitmproxy/addonmanager", "(mitmproxy/hooks", "(mitmproxy/ctx")),
    ("mitmproxy: tls", ("(mitmproxy/proxy/layers/tls", "(mitmproxy/tls", "(mitmproxy/addons/tlsconfig",
                        "(mitmproxy/certs")),
    ("mitmproxy: http layers", ("(mitmproxy/proxy/layers/http", "(mitmproxy/http.py", "(mitmproxy/net/http",
                                "(h11/", "(mitmproxy/coretypes")),
    ("mitmproxy: server/layers", ("(mitmproxy/proxy", "(mitmproxy/connection", "(mitmproxy/flow")),
    ("mitmproxy: other", ("(mitmproxy/",)),
    ("ssl / OpenSSL", ("(ssl.py", "(OpenSSL/", "(cryptography/")),
    ("asyncio", ("(asyncio/",)),
    ("sockets / selectors", ("(socket.py", "(selectors.py")),
)


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        stacks.append((stack.split(";"), n))
    return stacks


def area_of(frame: str) -> str:
    for name, keys in AREAS:
        if any(k in frame for k in keys):
            return name
    return "other (interpreter, stdlib)"


def summarise(raw: Path, title: str, top: int = 25) -> str:
    stacks = parse_raw(raw)
    total = sum(n for _, n in stacks) or 1
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    area_self: collections.Counter[str] = collections.Counter()
    area_incl: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        frames = [f for f in frames if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        leaf = frames[-1]
        self_c[_short(leaf)] += n
        area_self[area_of(leaf)] += n
        for f in {_short(f) for f in frames}:
            incl[f] += n
        for a in {area_of(f) for f in frames}:
            area_incl[a] += n
    out = [f"# {title}", f"samples: {total} (active only; py-spy --format raw)", ""]
    out.append("## share of samples by area (self = the leaf frame is there; incl = anywhere on the stack)")
    for a, n in area_self.most_common():
        out.append(f"  {100 * n / total:5.1f}% self  {100 * area_incl[a] / total:5.1f}% incl  {a}")
    out.append("")
    out.append(f"## top {top} frames by self samples")
    for f, n in self_c.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {f}")
    out.append("")
    out.append(f"## top {top} frames by inclusive samples")
    for f, n in incl.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {f}")
    return "\n".join(out) + "\n"


def _short(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; keep function and file, drop the line
    name, _, rest = frame.partition(" (")
    file = rest.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({file})"


def load(workload: str, port: int, http_port: int, tls_port: int, ca: Path, seconds: float, d: Path) -> None:
    if workload == "http-ka":
        bc.run_wrk(port, http_port, seconds, close=False, d=d)
    elif workload == "http-close":
        bc.run_wrk(port, http_port, seconds, close=True, d=d)
    else:
        bc.run_tls(port, tls_port, ca, seconds, keepalive=(workload == "tls-ka"))


def resummarise(paths: list[str]) -> None:
    """Rewrite the .txt summary of existing .raw profiles (after a change to AREAS)."""
    for p in map(Path, paths):
        txt = p.with_suffix(".txt")
        first = txt.read_text().splitlines()[0].lstrip("# ") if txt.exists() else p.stem
        p.with_suffix(".txt").write_text(summarise(p, first))


def main() -> int:
    if sys.argv[1:2] == ["--resummarise"]:
        resummarise(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="http-ka", choices=(*bc.WORKLOADS, "held"),
                    help="held: 10,000 requests held for approval, an allowed probe beside them")
    ap.add_argument("--proxy", default="portcullis", choices=("portcullis", "mitmdump"))
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--out", default=str(bc.ROOT / "bench" / "profiles"))
    ap.add_argument("--tag", default="", help="suffix for the output names")
    args = ap.parse_args()
    if os.environ.get("PORTCULLIS_BENCH_NS") != "1":
        env = dict(os.environ, PORTCULLIS_BENCH_NS="1")
        return subprocess.call(["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv],
                               env=env)
    pyspy = shutil.which("py-spy") or str(bc.VENV_BIN / "py-spy")
    d = Path(tempfile.mkdtemp(prefix="portcullis-prof-"))
    os.chmod(d, 0o755)
    (d / "hosts").write_text(f"127.0.0.1 localhost\n{bc.UPSTREAM} {bc.NAME}\n")
    subprocess.run(["mount", "--bind", str(d / "hosts"), "/etc/hosts"], check=True)
    bc.make_certs(d)
    http_port, tls_port = bc.free_port(), bc.free_port()
    nginx = bc.start_nginx(d, http_port, tls_port)
    port, admin = bc.free_port(), bc.free_port()
    holder = None
    if args.workload == "held":
        import resource

        import bench_load as bl
        import bench_procs as bp

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        proxy = bp.start_portcullis(bp.portcullis_setup(d, "hold", 2, hold=True), port, admin)
        holder = bl.Holder(port)
        holder.open(10000)
        print("pending:", bl.wait_pending(admin, 10000, 300), flush=True)
    elif args.proxy == "portcullis":
        proxy = bc.start_portcullis(d, port, admin)
    else:
        proxy = bc.start_mitmdump(d, port, passthrough=args.workload.startswith("tls"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.proxy}-{args.workload}{args.tag}"
    raw = out / f"{name}.raw"
    try:
        time.sleep(0.5)
        if holder is None:
            t = threading.Thread(target=load, args=(args.workload, port, http_port, tls_port, d / "ca.pem",
                                                    args.seconds + 3, d))
        else:
            t = threading.Thread(target=lambda: print(bl.probe(port, http_port, args.seconds + 3)))
        t.start()
        time.sleep(1.5)
        cmd = [pyspy, "record", "-p", str(proxy.pid), "-d", str(int(args.seconds)), "-r", "250",
               "-f", "raw", "-o", str(raw), "--nonblocking"]
        if args.native:
            cmd.append("--native")
        subprocess.run(cmd, check=True, capture_output=True)
        t.join()
    finally:
        if holder is not None:
            holder.close()
        bc.stop(proxy)
        bc.stop(nginx)
        subprocess.run(["umount", "/etc/hosts"], check=False)
        shutil.rmtree(d, ignore_errors=True)
    text = summarise(raw, f"{args.proxy}, {args.workload}, {int(args.seconds)} s sampled at 250 Hz")
    (out / f"{name}.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
