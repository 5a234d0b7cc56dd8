"""Task profiles: rules tagged with `profiles:` apply only to tasks of those profiles; untagged rules
to everyone; a deny rule always applies. The loader checks every reference; check and test know them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from addons.check import UsageError, evaluate
from addons.policy.model import Client, Layer, Request
from tests.policy.pol_helpers import REPO, load_errors, make_policy, write_config

PROFILES = [{"name": "frontend", "description": "UI work"}, {"name": "release"}, {"name": "docs-only"}]
RULES = [
    {"name": "registries", "action": "allow", "hosts": ["registry.npmjs.org"]},
    {"name": "cdn", "action": "allow", "hosts": ["cdn.example.com"], "profiles": ["frontend"]},
    {"name": "publish", "action": "allow", "hosts": ["upload.pypi.org"], "profiles": ["release"]},
    {
        "name": "gh-writes",
        "action": "approval",
        "hosts": ["api.github.com"],
        "profiles": ["release", "frontend"],
    },
    {"name": "no-paste", "action": "deny", "hosts": ["**.pastebin.com"]},
    {"name": "paste-for-frontend", "action": "allow", "hosts": ["pastebin.com"], "profiles": ["frontend"]},
]


@pytest.fixture
def policy(tmp_path):
    return make_policy(tmp_path, RULES, profiles=PROFILES)


def decide(policy, host: str, profile: str | None):
    req = Request(
        host,
        443,
        Client("10.0.0.5", 1, None, "c", task_id="t1" if profile else None, profile=profile),
        None,
        "CONNECT",
        None,
        Layer.CONNECT,
    )
    d = policy.decide(req)
    return d.action.value, d.rule.name if d.rule else None


TABLE = [
    ("registry.npmjs.org", None, ("allow", "registries")),
    ("registry.npmjs.org", "frontend", ("allow", "registries")),  # untagged rules apply to everyone
    ("cdn.example.com", None, ("deny", None)),  # tagged: not for requests without a task
    ("cdn.example.com", "frontend", ("allow", "cdn")),
    ("cdn.example.com", "release", ("deny", None)),  # task A's allow never leaks to task B
    ("cdn.example.com", "docs-only", ("deny", None)),
    ("upload.pypi.org", "release", ("allow", "publish")),
    ("upload.pypi.org", "frontend", ("deny", None)),
    ("api.github.com", "release", ("approval", "gh-writes")),
    ("api.github.com", "docs-only", ("deny", None)),
    ("pastebin.com", "frontend", ("deny", "no-paste")),  # a global deny beats a profile allow
    ("pastebin.com", None, ("deny", "no-paste")),
]


@pytest.mark.parametrize(("host", "profile", "want"), TABLE)
def test_profile_rules_apply_only_to_their_profiles(policy, host, profile, want):
    assert decide(policy, host, profile) == want


@pytest.mark.parametrize(
    ("rules", "profiles", "needle"),
    [
        (
            [{"name": "x", "action": "allow", "hosts": ["a.test"], "profiles": ["nope"]}],
            PROFILES,
            "unknown profile 'nope' (known: docs-only, frontend, release)",
        ),
        (
            [{"name": "x", "action": "allow", "hosts": ["a.test"], "profiles": ["frontend"]}],
            [],
            "the config declares no profiles:",
        ),
        (
            [{"name": "x", "action": "deny", "hosts": ["a.test"], "profiles": ["frontend"]}],
            PROFILES,
            "a deny rule applies to every task",
        ),
        ([{"name": "x", "action": "allow", "hosts": ["a.test"], "profiles": []}], PROFILES, "profiles"),
        ([], [{"name": "a"}, {"name": "a"}], "duplicate profile name 'a'"),
        ([], [{"name": "bad name"}], "profiles"),
    ],
    ids=["unknown", "none-declared", "deny-with-profiles", "empty-list", "duplicate", "bad-name"],
)
def test_the_loader_refuses_bad_profile_references_with_a_position(tmp_path, rules, profiles, needle):
    errors = load_errors(write_config(tmp_path, rules, profiles=profiles))
    assert any(needle in e for e in errors), errors
    assert all(":" in e.split(" ", 1)[0] for e in errors)  # path:line:col: message


def test_check_judges_as_a_profile_and_refuses_an_unknown_one(policy):
    v = asyncio.run(evaluate(policy, "https://cdn.example.com/app.js", profile="frontend"))
    assert v.final.action.value == "allow" and v.final.rule and v.final.rule.name == "cdn"
    v = asyncio.run(evaluate(policy, "https://cdn.example.com/app.js"))
    assert v.final.action.value == "deny"
    with pytest.raises(UsageError, match="unknown profile 'ops'"):
        asyncio.run(evaluate(policy, "https://cdn.example.com/", profile="ops"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "addons.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_and_test_commands_take_a_profile(tmp_path: Path):
    cfg = write_config(tmp_path, RULES, profiles=PROFILES)
    r = _cli(
        "check", "--config", str(cfg), "https://upload.pypi.org/legacy/", "--profile", "release", "--json"
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (
        doc["decision"] == "allow"
        and doc["rule"]["name"] == "publish"
        and doc["client"]["profile"] == "release"
    )
    assert _cli("check", "--config", str(cfg), "https://upload.pypi.org/legacy/").returncode == 1
    assert _cli("check", "--config", str(cfg), "https://x.test/", "--profile", "ops").returncode == 2
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        json.dumps(
            {
                "cases": [
                    {
                        "url": "https://cdn.example.com/x",
                        "profile": "frontend",
                        "expect": "allow",
                        "rule": "cdn",
                    },
                    {"url": "https://cdn.example.com/x", "profile": "release", "expect": "deny"},
                    {"url": "https://api.github.com/", "profile": "release", "expect": "approval"},
                    {"url": "https://cdn.example.com/x", "expect": "allow"},
                ]
            }
        )
    )
    t = _cli("test", "--config", str(cfg), str(cases))
    assert t.returncode == 1 and "3 passed, 1 failed" in t.stdout, t.stdout
    assert "(profile frontend)" in t.stdout
