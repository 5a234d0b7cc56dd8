"""addons/check.py: `portcullis check` decides a URL through the proxy's own pipeline (a CONNECT, then the
inspected request when the tunnel is inspected), with no DNS, approvals or credentials; URL and client
parsing; the JSON and text renderings; exit codes. (The command line itself: tests/test_rulecli.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from addons.check import (
    EXIT_CODE,
    CheckResult,
    Target,
    UsageError,
    evaluate,
    parse_client,
    parse_url,
    ref_text,
    result_json,
    result_text,
)
from addons.policy.evaluate import Policy
from addons.policy.model import Action, Layer, Reason, RuleRef
from tests.policy.pol_helpers import make_policy

RULES: list[dict[str, Any]] = [
    {"name": "pub", "action": "allow", "hosts": ["public.test"]},
    {"name": "gh-read", "action": "allow", "hosts": ["api.gh.test"]},
    {
        "name": "gh-write",
        "action": "approval",
        "hosts": ["api.gh.test"],
        "methods": ["POST"],
        "paths": ["/repos/*"],
    },
    {"name": "blocked", "action": "deny", "hosts": ["blocked.test"]},
    {"name": "ci-only", "action": "allow", "hosts": ["ci.test"], "clients": ["ci"]},
    {"name": "resolved", "action": "allow", "hosts": ["static.test", "inner.test"]},
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return make_policy(
        tmp_path_factory.mktemp("check"),
        RULES,
        default_action="approval",
        clients=[{"name": "ci", "cidrs": ["10.1.0.0/16"]}, {"name": "ops", "cidrs": ["10.2.0.0/16"]}],
        network={"resolve": {"static.test": "8.8.8.8", "inner.test": "10.0.0.5"}},
    )


def check(policy: Policy, url: str, method: str = "GET", client: str | None = None) -> CheckResult:
    return asyncio.run(evaluate(policy, url, method, client))


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("https://pypi.org/simple/", Target("https", "pypi.org", 443, "/simple/")),
        ("HTTP://PyPI.ORG.:8080", Target("http", "pypi.org", 8080, "/")),
        ("https://pypi.org?x=1#f", Target("https", "pypi.org", 443, "/")),
        ("https://pypi.org/a?b#c", Target("https", "pypi.org", 443, "/a")),
        ("https://[::1]:8443/x", Target("https", "::1", 8443, "/x")),
        ("https://Bücher.de/", Target("https", "xn--bcher-kva.de", 443, "/")),
        ("http://2130706433/", Target("http", "127.0.0.1", 80, "/")),
    ],
)
def test_parse_url(url: str, want: Target) -> None:
    assert parse_url(url) == want


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("pypi.org", "use a full http:// or https:// URL"),
        ("ftp://pypi.org/", "use a full http:// or https:// URL"),
        ("https://u:p@pypi.org/", "credentials in URLs"),
        ("https://pypi.org:0/", "bad port"),
        ("https://exa mple.com/", "not a host name"),
        ("https://a..b/", "empty label"),
        ("https:///x", "empty host"),
    ],
)
def test_parse_url_errors(url: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_url(url)


def test_parse_client(policy: Policy) -> None:
    assert parse_client(policy, None) == (None, None)
    assert parse_client(policy, "10.1.2.3") == ("10.1.2.3", None)
    assert parse_client(policy, "::ffff:10.1.2.3") == ("10.1.2.3", None)
    assert parse_client(policy, "ops") == (None, ("ops",))
    with pytest.raises(UsageError, match=r"unknown client 'nobody'.*\(ci, ops\)"):
        parse_client(policy, "nobody")


def test_parse_client_without_groups(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="the config defines none"):
        parse_client(make_policy(tmp_path, []), "ci")


def test_plain_http_is_one_request_decision(policy: Policy) -> None:
    r = check(policy, "http://public.test/x?secret=1")
    assert r.tunnel is None and r.request is not None and r.final is r.request
    o = r.final
    assert (o.action, o.reason, o.rule.name if o.rule else None) == (Action.ALLOW, Reason.RULE, "pub")
    assert (o.request.layer, o.request.method, o.request.path, o.request.port) == (
        Layer.HTTP,
        "GET",
        "/x",
        80,
    )
    assert (r.addresses, r.from_resolve, r.client_address) == ((), False, None)


def test_https_to_a_plain_host_is_the_connect_decision(policy: Policy) -> None:
    r = check(policy, "https://public.test/anything", "DELETE")
    assert r.request is None and r.tunnel is not None and r.final is r.tunnel
    assert (r.tunnel.request.layer, r.tunnel.request.method, r.tunnel.request.path) == (
        Layer.CONNECT,
        "CONNECT",
        None,
    )


@pytest.mark.parametrize(
    ("method", "path", "action", "rule"),
    [("POST", "/repos/o/r", Action.APPROVAL, "gh-write"), ("GET", "/repos/o/r", Action.ALLOW, "gh-read")],
)
def test_an_inspected_host_is_connect_then_the_request(
    policy: Policy, method: str, path: str, action: Action, rule: str
) -> None:
    r = check(policy, f"https://api.gh.test{path}", method)
    assert r.tunnel is not None and r.tunnel.inspect and r.tunnel.reason is Reason.INSPECT
    assert r.request is not None and r.final is r.request
    assert r.request.request.layer is Layer.INSPECTED and r.request.request.scheme == "https"
    assert (r.final.action, r.final.rule.name if r.final.rule else None) == (action, rule)
    assert EXIT_CODE[r.final.action] == {Action.ALLOW: 0, Action.APPROVAL: 3}[action]


def test_nobody_is_asked_and_nothing_is_resolved(policy: Policy) -> None:
    r = check(policy, "http://unknown.test/")
    assert (r.final.action, r.final.reason) == (Action.APPROVAL, Reason.DEFAULT)  # default_action approval
    assert r.final.pin is None and r.final.ip is None and r.final.approval_id is None


def test_static_answers_are_checked(policy: Policy) -> None:
    ok = check(policy, "http://static.test/")
    assert ok.final.action is Action.ALLOW and (ok.addresses, ok.from_resolve) == (("8.8.8.8",), True)
    bad = check(policy, "http://inner.test/")
    assert (bad.final.action, bad.final.reason, bad.final.private_class) == (
        Action.DENY,
        Reason.PRIVATE_ADDRESS,
        "private",
    )


@pytest.mark.parametrize(
    ("client", "action"),
    [("10.1.0.9", Action.ALLOW), ("ci", Action.ALLOW), ("ops", Action.APPROVAL), (None, Action.APPROVAL)],
)
def test_the_client_decides_like_the_proxy(policy: Policy, client: str | None, action: Action) -> None:
    r = check(policy, "http://ci.test/", client=client)
    assert r.final.action is action
    if client == "ci":
        assert r.final.client_name == "ci" and r.client_address is None
    if client == "10.1.0.9":
        assert r.final.client_name == "ci" and r.final.request.client.address == "10.1.0.9"


@pytest.mark.parametrize("method", ["GE T", "G3T", ""])
def test_a_bad_method_is_a_usage_error(policy: Policy, method: str) -> None:
    with pytest.raises(UsageError, match="bad method"):
        check(policy, "http://public.test/", method)


def test_result_json(policy: Policy) -> None:
    doc = result_json(check(policy, "https://api.gh.test/repos/o/r", "post", "10.2.0.1"))
    assert doc["url"] == {"scheme": "https", "host": "api.gh.test", "port": 443, "path": "/repos/o/r"}
    assert (doc["method"], doc["decision"], doc["reason"], doc["dns_queried"]) == (
        "POST",
        "approval",
        "rule",
        False,
    )
    assert doc["client"] == {"address": "10.2.0.1", "name": "ops", "profile": None}
    assert doc["rule"] == {
        "name": "gh-write",
        "action": "approval",
        "file": "rules/r.yaml",
        "line": doc["rule"]["line"],
    }
    assert [m["name"] for m in doc["matched"]] == ["gh-read"]
    assert doc["tunnel"]["decision"] == "allow" and doc["tunnel"]["inspect"] is True
    assert doc["request"]["decision"] == "approval" and doc["addresses"] == []


def test_result_text(policy: Policy) -> None:
    text = result_text(check(policy, "https://api.gh.test/repos/o/r", "POST"))
    lines = text.splitlines()
    assert lines[0] == "POST https://api.gh.test:443/repos/o/r"
    assert "CONNECT (tunnel): ALLOW  (reason: inspect)" in lines
    assert "POST /repos/o/r (inspected request): APPROVAL  (reason: rule)" in lines
    assert "=> APPROVAL" in lines
    assert lines[-1].startswith("  note: check does not query DNS; api.gh.test was judged by name only")
    plain = result_text(check(policy, "https://public.test/x", "PUT", "10.1.0.1")).splitlines()
    assert plain[0] == "PUT https://public.test:443/x  client 10.1.0.1 [ci]"
    assert plain[1] == "=> ALLOW  (reason: rule)"
    assert any(
        "public.test is not inspected, so the tunnel decision covers every request" in ln for ln in plain
    )
    v6 = result_text(check(policy, "http://[2001:db8::1]/")).splitlines()
    assert v6[0] == "GET http://[2001:db8::1]:80/" and not any("does not query DNS" in ln for ln in v6)
    static = result_text(check(policy, "http://static.test/"))
    assert "addresses from network.resolve: 8.8.8.8" in static


def test_ref_text_and_exit_codes() -> None:
    assert ref_text(RuleRef("a", Action.DENY, "r.yaml", 3)) == "a (deny, r.yaml:3)"
    assert EXIT_CODE == {Action.ALLOW: 0, Action.DENY: 1, Action.APPROVAL: 3}
