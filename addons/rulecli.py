"""`portcullis validate`, `check` and `test`: rule tooling (no network, no DNS); `check` and `test`
decide through the proxy's own pipeline (addons/check.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from addons.check import EXIT_CODE, CheckResult, UsageError, evaluate, ref_text, result_json, result_text
from addons.config.load import (
    ErrorList,
    PolicyError,
    load_config,
    load_config_report,
    read_yaml,
    validate_model,
)
from addons.config.models import Strict
from addons.policy.evaluate import Policy
from addons.policy.model import Action, Layer, Request


def _err(message: str) -> None:
    print(f"portcullis: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Commands


def validate_command(args: argparse.Namespace) -> int:
    """Load everything; print a summary (exit 0) or every error line (exit 1)."""
    try:
        report = load_config_report(args.config, secrets=not getattr(args, "no_secrets", False))
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
    _print_credentials(policy, getattr(args, "no_secrets", False))
    st = policy.settings
    print(f"  default_action: {st.default_action.value}; tls.inspect: {st.inspect}; "
          f"block_private: {str(st.block_private).lower()}")
    return 0


def _print_credentials(policy: Policy, unread: bool) -> None:
    """Each credential rule: where it is bound, who gets it, where its secret comes from (never the value)."""
    creds = policy.credentials.creds
    if not creds:
        return
    print(f"  credentials: {len(creds)}" + (" (secrets not read: --no-secrets)" if unread else ""))
    for c in creds:
        where = ", ".join(f"https://{h}:{p}" for h in sorted(c.hosts) for p in sorted(c.ports))
        cond = (" " + ",".join(sorted(c.methods)) if c.methods else "") + \
            (" " + " ".join(c.paths) if c.paths else "")
        who = [f"profiles {', '.join(sorted(c.profiles))}"] if c.profiles is not None else []
        who += [f"client groups {', '.join(sorted(c.clients))}"] if c.clients is not None else []
        print(f"    {c.name} ({c.file}:{c.line}): {where}{cond} -> {c.apply.header} ({c.source}); for "
              f"{' and '.join(who) or 'any authenticated client'}"
              + ("; first use approved by a person" if c.approval.value == "first_use" else ""))
        for h in sorted(c.hosts):
            for port in sorted(c.ports):
                d = policy.decide(Request(h, port, method="CONNECT", layer=Layer.CONNECT))
                if d.action is Action.DENY:
                    print(f"    note: {h}:{port} is denied ({d.reason.value}); credential {c.name} is "
                          "never used there until a rule allows it")


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def check_command(args: argparse.Namespace) -> int:
    """Explain the decision for one URL. Exit 0 allow, 1 deny, 3 approval, 2 bad config/arguments."""
    try:
        loaded = load_config(args.config, secrets=False)  # check says which credential, never needs its value
    except PolicyError as e:
        for msg in e.errors:
            print(msg, file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback
        _err(f"{args.config}: cannot load: {e}")
        return 2
    try:
        v = asyncio.run(evaluate(loaded.policy, args.url, args.method or "GET", args.client, args.profile))
    except UsageError as e:
        _err(str(e))
        return 2
    except Exception as e:  # never a traceback
        _err(f"check failed: {e}")
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result_json(v), sort_keys=True))
    else:
        print(result_text(v))
    return EXIT_CODE[v.final.action]


class Case(Strict):
    url: Annotated[str, Field(min_length=1)]
    method: Annotated[str, Field(min_length=1)] = "GET"
    client: Annotated[str, Field(min_length=1)] | None = None
    profile: Annotated[str, Field(min_length=1)] | None = None  # optional: a task profile
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
        loaded = load_config(args.config, secrets=False)
        cases, lines = _load_cases(args.cases)
    except PolicyError as e:
        for msg in e.errors:
            print(msg, file=sys.stderr)
        return 2
    except Exception as e:
        _err(f"cannot run tests: {e}")
        return 2
    return asyncio.run(_run_cases(args, loaded.policy, cases, lines))


async def _run_cases(args: argparse.Namespace, policy: Policy, cases: list[Case], lines: list[int]) -> int:
    passed = failed = 0
    results: list[dict[str, Any]] = []
    for case, line in zip(cases, lines, strict=True):
        label = f"{args.cases}:{line}" + (f" {case.name}" if case.name else "")
        try:
            v: CheckResult = await evaluate(policy, case.url, case.method, case.client, case.profile)
            d = v.final
            problems = []
            if d.action.value != case.expect:
                problems.append(f"expected {case.expect}, got {d.action.value}")
            if case.rule is not None and (d.rule is None or d.rule.name != case.rule):
                problems.append(f"expected rule {case.rule!r}, got {d.rule.name if d.rule else None!r}")
            if case.reason is not None and d.reason.value != case.reason:
                problems.append(f"expected reason {case.reason}, got {d.reason.value}")
            actual: dict[str, Any] | None = result_json(v)
        except UsageError as e:
            problems, d, actual = [str(e)], None, None
        ok = not problems
        passed += ok
        failed += not ok
        results.append({"case": case.model_dump(exclude_none=True), "line": line, "passed": ok,
                        "problems": problems, "actual": actual})
        if getattr(args, "json", False):
            continue
        what = (f"{case.method} {case.url}" + (f" (client {case.client})" if case.client else "")
                + (f" (profile {case.profile})" if case.profile else ""))
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
                  + (f", decided by {ref_text(d.rule)}" if d.rule else ""))
            if d.detail:
                print(f"  {d.detail}")
    if getattr(args, "json", False):
        print(json.dumps({"passed": passed, "failed": failed, "results": results}, sort_keys=True))
    else:
        print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1
