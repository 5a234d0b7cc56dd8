"""Policy benchmark: decision time at 10 / 1k / 100k rules (ratio 100k/10) and load time of a big rule file.

Run:  .venv/bin/python bench/bench_policy.py [--quick] [--sizes 10,1000,100000] [--json-only]
Prints a table and one JSON line (`{"bench": "policy", ...}`). Rule files are generated in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addons.config.fastyaml import parse_rule_file  # noqa: E402
from addons.config.load import load_config, load_policy  # noqa: E402
from addons.policy.model import Layer, Request  # noqa: E402

ACTIONS = ("allow", "allow", "allow", "deny", "approval")


def rule_text(i: int) -> str:
    """One generated rule: a mix of exact names, wildcards, CIDRs, ports and methods/paths."""
    kind = i % 10
    action = ACTIONS[i % len(ACTIONS)]
    dom = f"svc{i}.example{i % 50}.com"
    if kind < 5:
        hosts = f"[{dom}, api.{dom}]"
    elif kind < 7:
        hosts = f'["*.{dom}"]'
    elif kind < 9:
        hosts = f'["**.{dom}"]'
    else:
        hosts = f"[{10 + (i >> 16) % 200}.{(i >> 8) % 256}.{i % 256}.0/24]"
    extra = ""
    if i % 7 == 0:
        extra += "\n    ports: [443, 8443]"
    if i % 13 == 0 and kind < 9:
        extra += '\n    methods: [POST]\n    paths: ["/v1/*"]'
    return f"  - name: r{i}\n    action: {action}\n    hosts: {hosts}{extra}\n"


def write_policy(folder: Path, n: int) -> Path:
    (folder / "rules").mkdir(parents=True, exist_ok=True)
    (folder / "rules" / "gen.yaml").write_text("rules:\n" + "".join(rule_text(i) for i in range(n)))
    cfg = folder / "portcullis.yaml"
    cfg.write_text("rules: [rules/]\ndefault_action: deny\napprovals: {persist_to: null}\n")
    return cfg


Query = tuple[Request, tuple[str, ...]]  # a request and its checked addresses


def queries(n: int, rng: random.Random) -> list[Query]:
    """Hits (exact, wildcard, CIDR) and misses, requests and tunnels; the same shapes at every size."""
    out: list[Query] = []
    addresses = ("93.184.216.34",)
    for _ in range(400):
        i = rng.randrange(n)
        dom = f"svc{i}.example{i % 50}.com"
        shape = rng.randrange(6)
        host = {
            0: dom,
            1: f"api.{dom}",
            2: f"a.b.{dom}",
            3: f"miss{i}.nothing{i % 7}.org",
            4: f"{10 + (i >> 16) % 200}.{(i >> 8) % 256}.{i % 256}.7",
            5: f"x.{dom}.evil.net",
        }[shape]
        if rng.random() < 0.5:
            out.append((Request(host, 443, scheme="https", method="GET", path="/v1/items"), addresses))
        else:
            out.append((Request(host, 443, method="CONNECT", layer=Layer.CONNECT), addresses))
    return out


def time_decisions(policy_decide: object, qs: list[Query], rounds: int) -> float:
    """Median over rounds of the mean seconds per decision."""
    decide = policy_decide
    per: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for req, addrs in qs:
            decide(req, addrs)  # type: ignore[operator]
        per.append((time.perf_counter() - t0) / len(qs))
    return statistics.median(per)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10, 1k, 10k rules and fewer rounds")
    ap.add_argument("--sizes", help="comma-separated rule counts (default 10,1000,100000)")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([10, 1000, 10000] if args.quick else [10, 1000, 100000])
    )
    rounds = 5 if args.quick else 15
    rng = random.Random(1234)
    results = []
    with tempfile.TemporaryDirectory(prefix="portcullis-bench-") as tmp:
        for n in sizes:
            cfg = write_policy(Path(tmp) / str(n), n)
            text = (cfg.parent / "rules" / "gen.yaml").read_text()
            t0 = time.perf_counter()
            assert parse_rule_file(text) is not None  # the generated shape takes the fast path
            parse_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = load_config(cfg)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_policy(loaded.config, loaded.base_dir)  # a hot reload with the file unchanged
            reload_s = time.perf_counter() - t0
            policy = loaded.policy
            assert policy.rule_count == n
            qs = queries(n, rng)
            for req, addrs in qs[:50]:
                policy.decide(req, addrs)  # warm the normalisation caches like a running proxy
            per = time_decisions(policy.decide, qs, rounds)
            results.append(
                {
                    "rules": n,
                    "decision_us": round(per * 1e6, 2),
                    "load_s": round(load_s, 3),
                    "parse_s": round(parse_s, 3),
                    "reload_unchanged_s": round(reload_s, 3),
                    "file_bytes": (cfg.parent / "rules" / "gen.yaml").stat().st_size,
                }
            )
    ratio = results[-1]["decision_us"] / results[0]["decision_us"]
    if not args.json_only:
        print(f"{'rules':>8} {'decision µs':>12} {'load s':>8} {'(parse s)':>10} {'file MB':>8}")
        for r in results:
            print(
                f"{r['rules']:>8} {r['decision_us']:>12.2f} {r['load_s']:>8.2f} {r['parse_s']:>10.2f} "
                f"{r['file_bytes'] / 1e6:>8.2f}"
            )
        print(f"decision time ratio {results[-1]['rules']}/{results[0]['rules']}: {ratio:.2f} (target <= 2)")
    print(
        json.dumps(
            {
                "bench": "policy",
                "results": results,
                "ratio": round(ratio, 3),
                "sizes": sizes,
                "queries": 400,
                "rounds": rounds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
