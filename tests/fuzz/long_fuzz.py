"""The long fuzzing harness (outside CI): `./dev fuzz [seconds] [target ...]`.

Targets
  clienthello  the tunnel's first-bytes reader (addons.pipeline.clienthello:read_first_bytes)
               against a server-like ClientHello reader (tests/recording.py server_names). Point it
               at another reader with `--sni-reader module:function` (or PORTCULLIS_FUZZ_SNI_READER):
               bytes -> an object with .kind (Kind) or with .need_more, .tls, .sni, .problem.
  fastyaml     addons.config.fastyaml.parse_rule_file against ruamel.yaml: same tree or None.
  requestline  mitmproxy's HTTP/1 request-head reader, then Portcullis' host normalisation, authority
               parser and Host check, as the proxy chains them: only ValueError, and the two parsers
               agree on the destination wherever both accept it.

Crashes (an unexpected exception or a broken invariant) stop the run like any fuzzer finding (atheris
writes the input to crash-*). Known, already-reported classes (issue 8) are counted, not raised, so a
run keeps going; `--strict` raises them too. A summary (counts and a few examples per class) is kept
up to date in fuzz-findings/<target>.json. Uses atheris (coverage-guided, libFuzzer) when it is
installed; otherwise a hypothesis run with a time budget.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fuzz"))

OUT = REPO / "fuzz-findings"
STRICT = False
FOUND: Counter[str] = Counter()
STATS: Counter[str] = Counter()  # not findings: how much of the input reached the interesting paths
EXAMPLES: dict[str, list[str]] = {}
_last_write = 0.0
_target_name = "none"
_started = 0.0
_runs = 0


class Finding(AssertionError):
    """A broken invariant: a real finding."""


def known(kind: str, data: bytes) -> None:
    """A finding of an already-reported class: count it (raise it with --strict)."""
    FOUND[kind] += 1
    ex = EXAMPLES.setdefault(kind, [])
    if len(ex) < 3:
        ex.append(data[:400].hex())
    _write(force=len(ex) == 1)
    if STRICT:
        raise Finding(f"{kind}: {data[:200]!r}")


def _write(force: bool = False) -> None:
    global _last_write
    now = time.monotonic()
    if not force and now - _last_write < 2:
        return
    _last_write = now
    OUT.mkdir(exist_ok=True)
    doc = {"target": _target_name, "seconds": round(now - _started, 1), "runs": _runs,
           "stats": dict(STATS), "known_classes": dict(FOUND), "examples_hex": EXAMPLES}
    (OUT / f"{_target_name}.json").write_text(json.dumps(doc, indent=1))


# ------------------------------------------------------------------------------------- clienthello

DEFAULT_READERS = ("addons.pipeline.clienthello:read_first_bytes",)


def _reader() -> Callable[[bytes], Any]:
    """The first-bytes reader under test, adapted to need_more / tls / sni / problem."""
    specs = [os.environ["PORTCULLIS_FUZZ_SNI_READER"]] if os.environ.get("PORTCULLIS_FUZZ_SNI_READER") \
        else list(DEFAULT_READERS)
    for spec in specs:
        mod, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
        print(f"fuzz: first-bytes reader {spec}", file=sys.stderr)
        return lambda data: _adapt(fn(data))
    raise SystemExit(f"no first-bytes reader among {specs}")


def _adapt(r: Any) -> Any:
    kind = getattr(r, "kind", None)
    if kind is None:
        return r  # already need_more / tls / sni / problem
    k = str(getattr(kind, "value", kind))  # clienthello.read_first_bytes: Kind.NEED_MORE/TLS/NOT_TLS/BAD
    if k == "bad":
        raise ValueError(r.problem)  # refused: the tunnel is closed
    return SimpleNamespace(need_more=k == "need_more", tls=k == "tls", sni=r.sni, problem=r.problem)


def clienthello_seeds() -> list[bytes]:
    from tests.recording import client_hello, sni_extension

    out = [
        client_hello("public.test"), client_hello(None), client_hello(["a.test", "b.test"]),
        client_hello("a" * 64 + ".test"), client_hello("x..test"), client_hello(b"\xff\x00"),
        client_hello("public.test", duplicate_sni="blocked.test"),
        client_hello("p.test", record_sizes=[20, 20]),
        client_hello("p.test", record_version=0x0304), client_hello("p.test", padding=600),
        client_hello(None, sni_body=sni_extension(["p.test"], name_type=1)), client_hello("127.0.0.2"),
        client_hello("p.test", alpn=["h2", "http/1.1"]), b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00",
    ]
    return out


def clienthello_one(data: bytes, reader: Callable[[bytes], Any]) -> None:
    from addons.policy.hosts import HostError, normalize_host
    from tests.recording import hello_layout, server_names

    try:
        fb = reader(data)
    except ValueError:
        return  # refused as unparsable: the tunnel is closed
    except Exception as e:  # noqa: BLE001 - tunnel_next_layer refuses the tunnel (fail closed): count it
        known(f"reader-raises-{type(e).__name__}", data)
        return
    names = server_names(data)  # what a tolerant server would read (None: not a whole ClientHello)
    STATS["tls" if fb.tls else "need more" if fb.need_more else "not tls"] += 1
    if fb.need_more:
        if names is not None and len(data) < 65536:
            # The reader waits for more although a server already has a whole ClientHello.
            known("waits-although-a-whole-clienthello-arrived", data)
        return
    if not fb.tls:
        if names is not None:  # a server reads TLS where the reader saw "not TLS" (issue 8 #2)
            known("issue8-2:not-tls-but-a-server-reads-a-clienthello", data)
        return
    if fb.sni is None:
        if names:  # a server_name extension is there, the reader says "no SNI" (issue 8 #1)
            known("issue8-1:invalid-sni-read-as-absent", data)
        return
    with contextlib.suppress(HostError):  # unusable: the tunnel is refused (sni != authority)
        normalize_host(fb.sni)
    if names is None:
        # A server would not read a ClientHello here (another handshake type, a truncated or oversized
        # record): it refuses the connection, so whatever the reader made of it reaches nobody.
        known("harmless:reader-reads-a-hello-a-server-refuses", data)
        return
    if fb.sni.encode() not in names:
        layout = hello_layout(data)
        if layout is not None and layout[1]:
            # mitmproxy's parser reads extensions past the declared extensions block (it ignores the
            # block's length): it can see a name there that a server never reads.
            known("issue8-1-sibling:reader-reads-extensions-after-the-declared-block", data)
            return
        if not names:
            # The reader found a server name a server does not see (e.g. after an extensions block
            # whose declared length is 0): the "SNI required" rule is met while the server sees none.
            known("issue8-1-sibling:reader-sees-an-sni-the-server-does-not", data)
            return
        raise Finding(f"the reader's SNI {fb.sni!r} is not a name a server reads: {names!r}")
    if len(names) > 1:
        known("bypass:several-server-names-the-reader-takes-one", data)


# ---------------------------------------------------------------------------------------- fastyaml

def fastyaml_seeds() -> list[bytes]:
    texts = [p.read_bytes() for p in sorted((REPO / "rules").glob("*.yaml"))]
    texts += [p.read_bytes() for p in sorted((REPO / "tests" / "data" / "rules").rglob("*.yaml"))][:40]
    texts += [b"rules:\n  - name: a\n    action: allow\n    hosts: [a.test, '*.b.test']\n    ports: [443]\n",
              b"rules:\n- name: no\n  action: on\n  hosts: []\n  raw_tcp: false # c\n"]
    return texts


def fastyaml_one(data: bytes) -> None:
    from fuzz_support import same_tree
    from ruamel.yaml import YAML

    from addons.config.fastyaml import parse_rule_file

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    fast = parse_rule_file(text)
    if fast is None:
        return
    STATS["accepted by the fast reader (compared with ruamel)"] += 1
    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    try:
        slow = y.load(text)
    except Exception as e:  # noqa: BLE001 - ruamel refusing what the fast reader accepted IS the finding
        raise Finding(f"fast reader accepted what ruamel refuses ({type(e).__name__}: {e}): {text!r}") from e
    try:
        same_tree(fast, slow)
    except AssertionError as e:
        raise Finding(f"fast reader and ruamel disagree at {e}: {text!r}") from e


# ------------------------------------------------------------------------------------- requestline

def requestline_seeds() -> list[bytes]:
    return [
        b"GET http://public.test:8080/a?b HTTP/1.1\r\nHost: public.test:8080\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: [::ffff:127.0.0.1]:80\r\n\r\n",
        b"CONNECT xn--bcher-kva.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST https://a.test/x HTTP/1.1\r\nHost: A.TEST.\r\nContent-Length: 0\r\n\r\n",
        b"GET http://2130706433/ HTTP/1.0\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET http://a.test:0080/ HTTP/1.1\r\nHost: a.test:80\r\nX: y\r\n z\r\n\r\n",
    ]


def requestline_one(data: bytes) -> None:
    from h11._receivebuffer import ReceiveBuffer
    from mitmproxy.net.http import http1, url
    from mitmproxy.net.http.validate import validate_headers

    from addons.policy.authority import same_destination, split_authority
    from addons.policy.hosts import normalize_host
    from addons.proxy.addon import path_only

    buf = ReceiveBuffer()  # the head is cut into lines exactly as mitmproxy's HTTP/1 server does
    buf += data
    got = buf.maybe_extract_lines()
    while got == []:  # leading empty lines, skipped as the proxy does (mitm_compat read_headers)
        got = buf.maybe_extract_lines()
    if not got:
        return
    lines = [bytes(x) for x in got]
    try:
        req = http1.read_request_head(lines)
        validate_headers(req)
    except ValueError:
        return
    except Exception as e:  # noqa: BLE001 - mitmproxy's layer catches only ValueError: the connection dies
        known(f"bypass:mitmproxy-request-head-raises-{type(e).__name__}", data)
        return
    STATS["parsed by mitmproxy"] += 1
    if req.method != "CONNECT" and req.path:
        p = path_only(req.path)
        if "?" in p or "#" in p:
            raise Finding(f"path_only kept a query or fragment: {req.path!r} -> {p!r}")
    host = req.host
    if not host:
        try:
            host, port = url.parse_authority(req.host_header or "", check=True)
        except ValueError:
            return
        req.port = port or 80
    try:
        target = normalize_host(host)
    except ValueError:
        return  # bad_request
    if req.authority:
        try:
            h, p = split_authority(req.authority.rstrip("."))
            ours = normalize_host(h)
        except ValueError:
            ours = None
        if ours is not None and (ours != target or (p is not None and p != req.port)):
            raise Finding(f"authority {req.authority!r}: mitmproxy {host!r}:{req.port}, ours {ours}:{p}")
    hh = req.headers.get("host")
    if hh is not None and same_destination(hh, target, req.port, req.scheme or "http"):
        h, _ = split_authority(hh)
        if normalize_host(h) != target:
            raise Finding(f"Host {hh!r} accepted for {target}")


# ------------------------------------------------------------------------------------------- main

TARGETS: dict[str, tuple[Callable[[], list[bytes]], Callable[[bytes], None]]] = {}


def _setup_targets() -> None:
    from addons.proxy import mitm_compat

    mitm_compat.harden_request_parsing()  # mitmproxy's request reader as the proxy runs it
    reader = _reader()
    TARGETS["clienthello"] = (clienthello_seeds, lambda d: clienthello_one(d, reader))
    TARGETS["fastyaml"] = (fastyaml_seeds, fastyaml_one)
    TARGETS["requestline"] = (requestline_seeds, requestline_one)


def _preload() -> None:
    """Import everything the targets import lazily (inside atheris.instrument_imports)."""
    import mitmproxy.net.http.http1  # noqa: F401
    import mitmproxy.net.http.url  # noqa: F401
    import mitmproxy.net.http.validate  # noqa: F401
    import ruamel.yaml  # noqa: F401

    import addons.config.fastyaml  # noqa: F401
    import addons.pipeline.clienthello  # noqa: F401
    import addons.policy.authority  # noqa: F401
    import addons.policy.hosts  # noqa: F401
    import addons.proxy.addon  # noqa: F401


def run_atheris(name: str, seconds: int, extra: list[str]) -> None:
    import atheris

    seeds_fn, one = TARGETS[name]
    corpus = OUT / f"corpus-{name}"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds_fn()):
        (corpus / f"seed-{i}").write_bytes(s)

    def test_one(data: bytes) -> None:
        global _runs
        _runs += 1
        one(data)
        _write()

    args = [sys.argv[0], f"-max_total_time={seconds}", "-max_len=20000", "-timeout=10",
            f"-artifact_prefix={OUT}/{name}-", *extra, str(corpus)]
    atheris.Setup(args, test_one)
    atheris.Fuzz()


def run_hypothesis(name: str, seconds: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    seeds_fn, one = TARGETS[name]
    seeds = seeds_fn()
    deadline = time.monotonic() + seconds

    class Done(Exception):
        pass

    mutated = st.builds(_mutate, st.sampled_from(seeds), st.binary(max_size=64), st.integers(0, 10**6),
                        st.integers(0, 64))

    @settings(max_examples=10**9, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=2000), mutated))
    def run(data: bytes) -> None:
        global _runs
        if time.monotonic() > deadline:
            raise Done
        _runs += 1
        one(data)
        _write()

    with contextlib.suppress(Done):
        run()


def _mutate(seed: bytes, chunk: bytes, at: int, cut: int) -> bytes:
    i = at % (len(seed) + 1)
    return seed[:i] + chunk + seed[i + cut:]


def main() -> None:
    global STRICT, _target_name
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["clienthello", "fastyaml", "requestline"])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--strict", action="store_true", help="raise known classes too")
    ap.add_argument("--sni-reader", help="module:function for the clienthello target")
    ap.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    args, extra = ap.parse_known_args()
    STRICT = args.strict
    _target_name = args.target
    if args.sni_reader:
        os.environ["PORTCULLIS_FUZZ_SNI_READER"] = args.sni_reader
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    if engine == "atheris":
        import atheris

        # Coverage guidance for the code under test (and mitmproxy's parsers), not for the tooling.
        with atheris.instrument_imports(include=["addons", "mitmproxy", "ruamel", "idna"]):
            _preload()
            _setup_targets()
    else:
        _setup_targets()
    global _started
    _started = time.monotonic()
    print(f"fuzz: {args.target} for {args.seconds}s with {engine}", file=sys.stderr)
    _write(force=True)
    if engine == "atheris":
        run_atheris(args.target, args.seconds, extra)
    else:
        run_hypothesis(args.target, args.seconds)
    _write(force=True)


if __name__ == "__main__":
    main()
