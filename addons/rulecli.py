"""`portcullis validate`, `check` and `test`: rule tooling on the pure policy core (no network, no DNS)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from addons.config.load import (
    ErrorList,
    PolicyError,
    load_config,
    load_config_report,
    read_yaml,
    validate_model,
)
from addons.config.models import Strict
from addons.policy.authority import AuthorityError, split_authority
from addons.policy.evaluate import Policy
from addons.policy.hosts import HostError, normalize_host, parse_ip
from addons.policy.model import Action, Decision, Query, RuleRef

EXIT_CODE = {Action.ALLOW: 0, Action.DENY: 1, Action.APPROVAL: 3}
_DEFAULT_PORT = {"http": 80, "https": 443}


class UsageError(Exception):
    """A bad argument (URL, client): one line, exit 2."""


def _err(message: str) -> None:
    print(f"portcullis: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# URL and client parsing


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str


def parse_url(url: str) -> Target:
    """A strict http(s) URL -> scheme, normalised host, port (default by scheme), path (no query)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORT:
        raise UsageError(f"bad URL {url!r}: use a full http:// or https:// URL, e.g. https://pypi.org/simple/")
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise UsageError(f"bad URL {url!r}: credentials in URLs are not accepted; leave out 'user@'")
    # The same authority parser the proxy uses, so `check` never disagrees with it on a spelling.
    try:
        host, port = split_authority(authority)
    except AuthorityError as e:
        raise UsageError(f"bad URL {url!r}: {e}") from None
    try:
        norm = normalize_host(host)
    except HostError as e:
        raise UsageError(f"bad URL {url!r}: {e}") from None
    path = tail.split("#", 1)[0].split("?", 1)[0] or "/"
    if not path.startswith("/"):
        path = "/" + path
    return Target(scheme, norm, port if port is not None else _DEFAULT_PORT[scheme], path)


def parse_client(policy: Policy, client: str | None) -> tuple[str | None, tuple[str, ...] | None]:
    """--client: an address (groups derived from it) or a group name -> (address, groups override)."""
    if client is None:
        return None, None
    try:
        addr = parse_ip(client)
    except HostError:
        addr = None
    if addr is not None:
        return str(addr), None
    names = [g.name for g in policy.settings.clients]
    if client in names:
        return None, (client,)
    raise UsageError(f"unknown client {client!r}: give an IP address or a client group"
                     + (f" ({', '.join(names)})" if names else " (the config defines none)"))


# ---------------------------------------------------------------------------------------------
# Evaluating a URL like the proxy would


@dataclass(frozen=True)
class Verdict:
    """What the proxy would do: the CONNECT decision (https) and the request decision if judged."""

    target: Target
    method: str
    client_address: str | None
    addresses: tuple[str, ...]
    from_resolve: bool
    tunnel: Decision | None
    request: Decision | None

    @property
    def final(self) -> Decision:
        if self.tunnel is not None and (self.request is None or not self.tunnel.inspect):
            return self.tunnel
        assert self.request is not None
        return self.request


def evaluate(policy: Policy, url: str, method: str = "GET", client: str | None = None) -> Verdict:
    """Decide a URL without network: static `network.resolve` answers only, never DNS."""
    t = parse_url(url)
    address, groups = parse_client(policy, client)
    method = method.strip().upper()
    if not method.isalpha():
        raise UsageError(f"bad method {method!r}")
    resolved = policy.static_resolve(t.host)
    addrs = resolved or ()
    base = Query(host=t.host, port=t.port, scheme=t.scheme, client_address=address, addresses=addrs)
    tunnel = request = None
    if t.scheme == "https":
        tunnel = policy.decide(base, groups=groups)
        if tunnel.inspect:
            request = policy.decide(_with(base, method, t.path), groups=groups)
    else:
        request = policy.decide(_with(base, method, t.path), groups=groups)
    return Verdict(t, method, address, addrs, resolved is not None, tunnel, request)


def _with(q: Query, method: str, path: str) -> Query:
    return Query(host=q.host, port=q.port, scheme=q.scheme, method=method, path=path,
                 client_address=q.client_address, client_user=q.client_user, addresses=q.addresses)


def _ref_json(r: RuleRef | None) -> dict[str, Any] | None:
    return None if r is None else {"name": r.name, "action": r.action.value, "file": r.file, "line": r.line}


def _decision_json(d: Decision | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"decision": d.action.value, "reason": d.reason.value, "rule": _ref_json(d.rule),
            "matched": [_ref_json(m) for m in d.matched], "client_name": d.client_name,
            "private_class": d.private_class, "inspect": d.inspect, "raw_tcp": d.raw_tcp, "detail": d.detail}


def verdict_json(v: Verdict) -> dict[str, Any]:
    """The stable `check --json` object."""
    final = v.final
    out = {"url": {"scheme": v.target.scheme, "host": v.target.host, "port": v.target.port,
                   "path": v.target.path}, "method": v.method,
           "client": {"address": v.client_address, "name": final.client_name},
           "addresses": list(v.addresses), "dns_queried": False}
    out.update(_decision_json(final) or {})
    out["tunnel"] = _decision_json(v.tunnel)
    out["request"] = _decision_json(v.request)
    return out


def _ref_text(r: RuleRef) -> str:
    return f"{r.name} ({r.action.value}, {r.file}:{r.line})"


def _decision_lines(d: Decision, label: str) -> list[str]:
    lines = [f"{label}{d.action.value.upper()}  (reason: {d.reason.value})"]
    if d.rule is not None:
        lines.append(f"  decided by: {_ref_text(d.rule)}")
    if d.matched:
        lines.append("  also matched: " + ", ".join(_ref_text(m) for m in d.matched))
    if d.private_class:
        lines.append(f"  private class: {d.private_class}")
    if d.detail:
        lines.append(f"  {d.detail}")
    return lines


def verdict_text(v: Verdict) -> str:
    t = v.target
    host = f"[{t.host}]" if ":" in t.host else t.host
    lines = [f"{v.method} {t.scheme}://{host}:{t.port}{t.path}"
             + (f"  client {v.client_address or ''}{' ' if v.client_address else ''}"
                f"[{v.final.client_name or 'no group'}]" if v.client_address or v.final.client_name else "")]
    if v.tunnel is not None and v.request is not None:
        lines += _decision_lines(v.tunnel, "CONNECT (tunnel): ")
        lines += _decision_lines(v.request, f"{v.method} {t.path} (inspected request): ")
        lines.append(f"=> {v.final.action.value.upper()}")
    else:
        lines += _decision_lines(v.final, "=> ")
    if v.tunnel is not None and v.request is None and (v.method != "GET" or t.path != "/"):
        lines.append(f"  note: {host} is not inspected, so the tunnel decision covers every request in it "
                     "(method and path are not seen)")
    if v.from_resolve:
        lines.append(f"  addresses from network.resolve: {', '.join(v.addresses)}")
    elif parse_ip(t.host) is None:
        lines.append(f"  note: check does not query DNS; {t.host} was judged by name only "
                     "(add network.resolve to check its addresses)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Commands


def validate_command(args: argparse.Namespace) -> int:
    """Load everything; print a summary (exit 0) or every error line (exit 1)."""
    try:
        report = load_config_report(args.config)
    except PolicyError as e:
        for msg in e.errors:
            print(msg, file=sys.stderr)
        print(f"{args.config}: invalid ({len(e.errors)} error{'s' if len(e.errors) != 1 else ''})",
              file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback
        _err(f"{args.config}: cannot validate: {e}")
        return 1
    policy = report.loaded.policy
    counts = Counter(r.ref.action.value for r in policy.rules)
    per_file = Counter(r.ref.file for r in policy.rules)
    print(f"{args.config}: valid")
    print(f"  rules: {policy.rule_count} (" + ", ".join(f"{a} {counts.get(a, 0)}" for a in
                                                       ("allow", "deny", "approval")) + ")")
    print(f"  rule files: {len(policy.rule_files)}")
    for f in policy.rule_files:
        ref = report.loaded.base_dir
        name = _rel(f, ref)
        print(f"    {name}: {per_file.get(name, 0)} rules")
    for f in report.skipped:
        print(f"  skipped (policy-test file): {_rel(f, report.loaded.base_dir)}")
    for r in policy.rules:
        for raw, pat in zip(r.hosts_raw, r.patterns, strict=True):
            if raw != str(pat):
                print(f"  normalised: {raw!r} -> {pat} ({r.ref.file}:{r.ref.line}, rule {r.ref.name})")
    st = policy.settings
    print(f"  default_action: {st.default_action.value}; tls.inspect: {st.inspect}; "
          f"block_private: {str(st.block_private).lower()}")
    return 0


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def check_command(args: argparse.Namespace) -> int:
    """Explain the decision for one URL. Exit 0 allow, 1 deny, 3 approval, 2 bad config/arguments."""
    try:
        loaded = load_config(args.config)
    except PolicyError as e:
        for msg in e.errors:
            print(msg, file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback
        _err(f"{args.config}: cannot load: {e}")
        return 2
    try:
        v = evaluate(loaded.policy, args.url, args.method or "GET", args.client)
    except UsageError as e:
        _err(str(e))
        return 2
    except Exception as e:  # never a traceback
        _err(f"check failed: {e}")
        return 2
    if getattr(args, "json", False):
        print(json.dumps(verdict_json(v), sort_keys=True))
    else:
        print(verdict_text(v))
    return EXIT_CODE[v.final.action]


class Case(Strict):
    url: Annotated[str, Field(min_length=1)]
    method: Annotated[str, Field(min_length=1)] = "GET"
    client: Annotated[str, Field(min_length=1)] | None = None
    expect: Literal["allow", "deny", "approval"]
    rule: str | None = None      # optional: the deciding rule's name
    reason: str | None = None    # optional: the decision's reason
    name: str | None = None      # optional label shown in the output


class CaseFile(Strict):
    cases: Annotated[list[Case], Field(min_length=1)]


def _load_cases(path: str) -> tuple[list[Case], list[int]]:
    errors = ErrorList()
    ok, data = read_yaml(Path(path), path, errors)
    if ok and isinstance(data, dict):
        model = validate_model(CaseFile, data, path, errors)
        if model is not None and not errors.items:
            seq = data["cases"]
            return list(model.cases), [seq.lc.item(i)[0] + 1 for i in range(len(model.cases))]
    if not errors.items:
        errors.add(path, 1, 1, "a policy-test file is a mapping with a 'cases:' list")
    raise PolicyError(errors.sorted())


def test_command(args: argparse.Namespace) -> int:
    """Run policy unit tests. Exit 0 all pass, 1 any fail, 2 bad config or cases file."""
    try:
        loaded = load_config(args.config)
        cases, lines = _load_cases(args.cases)
    except PolicyError as e:
        for msg in e.errors:
            print(msg, file=sys.stderr)
        return 2
    except Exception as e:
        _err(f"cannot run tests: {e}")
        return 2
    passed = failed = 0
    results: list[dict[str, Any]] = []
    for case, line in zip(cases, lines, strict=True):
        label = f"{args.cases}:{line}" + (f" {case.name}" if case.name else "")
        try:
            v = evaluate(loaded.policy, case.url, case.method, case.client)
            d = v.final
            problems = []
            if d.action.value != case.expect:
                problems.append(f"expected {case.expect}, got {d.action.value}")
            if case.rule is not None and (d.rule is None or d.rule.name != case.rule):
                problems.append(f"expected rule {case.rule!r}, got {d.rule.name if d.rule else None!r}")
            if case.reason is not None and d.reason.value != case.reason:
                problems.append(f"expected reason {case.reason}, got {d.reason.value}")
            actual: dict[str, Any] | None = verdict_json(v)
        except UsageError as e:
            problems, d, actual = [str(e)], None, None
        ok = not problems
        passed += ok
        failed += not ok
        results.append({"case": case.model_dump(exclude_none=True), "line": line, "passed": ok,
                        "problems": problems, "actual": actual})
        if getattr(args, "json", False):
            continue
        what = f"{case.method} {case.url}" + (f" (client {case.client})" if case.client else "")
        if ok:
            print(f"PASS {label}: {what} -> {case.expect}")
            continue
        print(f"FAIL {label}: {what}")
        print(f"  expected: {case.expect}" + (f", rule {case.rule}" if case.rule else "")
              + (f", reason {case.reason}" if case.reason else ""))
        if d is None:
            print(f"  error: {problems[0]}")
        else:
            print(f"  actual:   {d.action.value} (reason {d.reason.value})"
                  + (f", decided by {_ref_text(d.rule)}" if d.rule else ""))
            if d.detail:
                print(f"  {d.detail}")
    if getattr(args, "json", False):
        print(json.dumps({"passed": passed, "failed": failed, "results": results}, sort_keys=True))
    else:
        print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1
