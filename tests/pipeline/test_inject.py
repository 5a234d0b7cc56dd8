"""addons/pipeline/inject.py through the real Pipeline: a credential rides only on an allowed https request
in an inspected tunnel with verified upstream TLS, exactly bound, for an entitled authenticated client;
a placeholder or secret anywhere else is refused (credential_leak) before any rule or DNS query."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from addons.pipeline.decide import Settlement
from addons.pipeline.inject import body_watch
from addons.pipeline.model import Incoming, Outcome
from addons.policy.evaluate import Policy
from addons.policy.model import Action, Client, Layer, Reason
from tests.pipeline.pipe_helpers import DNS, Approvals, Lookup, connect, http, inner
from tests.pipeline.pipe_helpers import pipeline as make_pipeline
from tests.policy.pol_helpers import make_policy

SECRET = "ghs_9f8e7d6c5b4a3210ZYXW"
PH = "portcullis-credential-gh"
RULES = [
    {"name": "pub", "action": "allow", "hosts": ["public.test", "*.public.test"]},
    {"name": "no-secret-repo", "action": "deny", "hosts": ["api.public.test"], "paths": ["/repos/secret/*"]},
    {"name": "ask", "action": "approval", "hosts": ["ask.public.test"]},
]
BASIC_PH = "Basic " + base64.b64encode(f"u:{PH}".encode()).decode()
TASK = Client("10.9.0.1", 40000, "t-1", "c1", task_id="t-1", profile="release")
OTHER_TASK = Client("10.9.0.1", 40000, "t-2", "c1", task_id="t-2", profile="docs")
ANON = Client("10.9.0.1", 40000, None, "c1")


NAMES = ("api.public.test", "www.public.test", "ask.public.test", "api.other.test")


def pipeline(pol: Policy, **kw: Any) -> Any:
    kw.setdefault("lookup", Lookup({**DNS, **{n: ["8.8.8.8"] for n in NAMES}}))
    return make_pipeline(pol, **kw)


def cred(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "gh", "secret": {"file": "gh.secret"}, "hosts": ["api.public.test"],
                         "methods": ["GET", "POST"], "paths": ["/repos/*"], "profiles": ["release"],
                         "apply": {"header": "Authorization", "template": "Bearer {secret}"}}
    c.update(over)
    return c


def make(tmp: Path, *creds: dict[str, Any], **config: Any) -> Policy:
    (tmp / "gh.secret").write_text(SECRET)
    text = json.dumps({"rules": RULES, "credentials": list(creds) or [cred()]})
    config.setdefault("profiles", [{"name": "release"}, {"name": "docs"}])
    return make_policy(tmp, text, **config)


@pytest.fixture
def pol(tmp_path: Path) -> Policy:
    return make(tmp_path)


async def tunnel_to(p: Any, host: str = "api.public.test", who: Client = TASK) -> Outcome:
    t = await p.decide(connect(host), client=who)
    assert t.action is Action.ALLOW and t.inspect and t.passes, t
    return t


def req(t: Outcome, path: str = "/repos/acme/web", **kw: Any) -> Incoming:
    kw.setdefault("tls_verified", True)
    return inner(t, path=path, target=kw.pop("target", path), **kw)


async def test_a_bound_request_of_an_entitled_task_gets_the_credential(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    o = await p.decide(req(await tunnel_to(p)), client=TASK)
    assert (o.action, o.reason, o.credential, o.rule.name if o.rule else None) == (
        Action.ALLOW, Reason.RULE, "gh", "pub")
    assert o.injection is not None and o.injection.header == "Authorization"
    assert o.injection.value.reveal() == f"Bearer {SECRET}"
    assert SECRET not in repr(o)


async def test_a_credential_host_is_inspected_without_any_method_or_path_rule(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    t = await p.decide(connect("api.public.test"), client=TASK)
    assert (t.action, t.inspect, t.raw_tcp, t.credential) == (Action.ALLOW, True, False, None)
    plain = await p.decide(connect("www.public.test"), client=TASK)
    assert not plain.inspect  # no credential there: passed through as before


@pytest.mark.parametrize(
    ("who", "kw", "why"),
    [
        (TASK, {"tls_verified": False}, "upstream not verified"),
        (TASK, {"method": "DELETE"}, "method not bound"),
        (TASK, {"path": "/user", "target": "/user"}, "path not bound"),
        (OTHER_TASK, {}, "profile not entitled"),
        (ANON, {}, "not authenticated"),
    ],
)
async def test_no_credential_unless_every_condition_holds(pol: Policy, who: Client, kw: dict[str, Any],
                                                          why: str) -> None:
    p, _, _ = pipeline(pol)
    o = await p.decide(req(await tunnel_to(p, who=who), **kw), client=who)
    assert o.action is Action.ALLOW and o.credential is None and o.injection is None, why


async def test_never_on_plain_http(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    o = await p.decide(http("api.public.test", path="/repos/acme/web"), client=TASK)
    assert o.action is Action.ALLOW and o.injection is None


async def test_never_when_the_policy_denies(pol: Policy, tmp_path: Path) -> None:
    p, _, _ = pipeline(pol)
    o = await p.decide(req(await tunnel_to(p), "/repos/secret/x"), client=TASK)
    assert (o.action, o.reason, o.rule.name if o.rule else None, o.injection) == (
        Action.DENY, Reason.RULE, "no-secret-repo", None)
    (tmp_path / "n").mkdir()
    nothing_allows = make(tmp_path / "n", cred(hosts=["api.other.test"]), default_action="deny")
    p2, lookup, _ = pipeline(nothing_allows)
    t = await p2.decide(connect("api.other.test"), client=TASK)
    assert (t.action, t.reason) == (Action.DENY, Reason.DEFAULT)  # a credential allows nothing itself


async def test_audit_mode_never_injects_into_what_it_only_records(tmp_path: Path) -> None:
    pol = make(tmp_path, default_action="deny")
    p, _, _ = pipeline(pol, audit=True)
    t = await p.decide(connect("api.public.test"), client=TASK)
    o = await p.decide(req(t, "/repos/secret/x"), client=TASK)
    assert o.passes and not o.enforced and o.action is Action.DENY and o.injection is None


@pytest.mark.parametrize(
    ("where", "kw"),
    [
        ("a header", {"headers": (("Authorization", f"Bearer {PH}"),)}),
        ("another header", {"headers": (("X-Note", f"use {SECRET}"),)}),
        ("the query", {"target": f"/x?token={PH}"}),
        ("the query, %-encoded", {"target": "/x?token=portcullis%2Dcredential%2Dgh"}),
        ("Basic auth", {"headers": (("Authorization", BASIC_PH),)}),
        ("the path", {"path": f"/{SECRET}/x", "target": f"/{SECRET}/x"}),
    ],
)
async def test_a_needle_sent_to_another_allowed_host_is_refused(pol: Policy, where: str,
                                                                kw: dict[str, Any]) -> None:
    p, lookup, _ = pipeline(pol)
    t = await p.decide(connect("www.public.test"), client=TASK)
    kw.setdefault("path", "/x")
    o = await p.decide(req(t, **kw), client=TASK)
    assert (o.action, o.reason, o.credential, o.status) == (Action.DENY, Reason.CREDENTIAL_LEAK, "gh", 403)
    assert o.detail and "credential 'gh'" in o.detail
    assert "bound to https://api.public.test:443 only" in o.detail
    assert SECRET not in (o.detail or "")


async def test_a_needle_refusal_comes_before_the_rules_and_before_any_dns(pol: Policy) -> None:
    p, lookup, approvals = pipeline(pol)
    o = await p.decide(http("ask.public.test", path="/x", target=f"/x?k={PH}"), client=TASK)
    assert o.reason is Reason.CREDENTIAL_LEAK and lookup.calls == [] and approvals.asked == []
    c = await p.decide(connect(f"{SECRET.lower()}.public.test"), client=TASK)  # DNS exfiltration
    assert c.reason is Reason.CREDENTIAL_LEAK and lookup.calls == []


async def test_a_needle_on_the_bound_host_where_the_credential_does_not_apply_is_refused(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    t = await tunnel_to(p, who=OTHER_TASK)
    o = await p.decide(req(t, headers=(("Authorization", f"Bearer {PH}"),)), client=OTHER_TASK)
    assert o.reason is Reason.CREDENTIAL_LEAK and "is not in its profiles" in (o.detail or "")
    h = (("Authorization", f"token {PH}"),)
    plain = await p.decide(http("api.public.test", 443, path="/repos/a", headers=h), client=TASK)
    assert plain.reason is Reason.CREDENTIAL_LEAK and "only into https" in (plain.detail or "")
    port80 = await p.decide(http("api.public.test", path="/repos/a", headers=h), client=TASK)
    assert "bound to https://api.public.test:443 only" in (port80.detail or "")


async def test_the_applied_credentials_own_placeholder_is_replaced_not_refused(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    o = await p.decide(req(await tunnel_to(p), headers=(("Authorization", f"Bearer {PH}"),)), client=TASK)
    assert o.action is Action.ALLOW and o.credential == "gh" and o.injection is not None
    assert body_watch(pol, o) == ()  # its own needles may ride to where it is bound
    other = await p.decide(req(await p.decide(connect("www.public.test"), client=TASK), "/x"), client=TASK)
    assert [c.name for c in body_watch(pol, other)] == ["gh"]


async def test_first_use_waits_for_a_person_and_names_the_credential(tmp_path: Path) -> None:
    pol = make(tmp_path, cred(approval="first_use"))
    approvals = Approvals(Settlement(True, Reason.APPROVED, "apr-9", None, 2.0))
    p, _, _ = pipeline(pol, approvals=approvals)
    o = await p.decide(req(await tunnel_to(p)), client=TASK)
    (asked,) = approvals.asked
    assert (asked.action, asked.credential, asked.request.host, asked.rule.name if asked.rule else None) == (
        Action.APPROVAL, "gh", "api.public.test", "pub")
    assert asked.injection is None
    assert (o.action, o.reason, o.approval_id, o.credential) == (Action.ALLOW, Reason.APPROVED, "apr-9", "gh")
    assert o.injection is not None and o.approval_wait_s == 2.0


@pytest.mark.parametrize("reason", [Reason.APPROVAL_DENIED, Reason.APPROVAL_TIMEOUT, Reason.APPROVAL_PENDING])
async def test_first_use_refused_means_no_request(tmp_path: Path, reason: Reason) -> None:
    pol = make(tmp_path, cred(approval="first_use"))
    p, _, _ = pipeline(pol, approvals=Approvals(Settlement(False, reason, "apr-9", 7, 1.0)))
    o = await p.decide(req(await tunnel_to(p)), client=TASK)
    assert (o.action, o.reason, o.status, o.credential, o.injection, o.approval_id) == (
        Action.DENY, reason, 403, "gh", None, "apr-9")
    assert not o.passes


async def test_first_use_in_check_is_an_approval_and_in_audit_mode_passes_without_it(tmp_path: Path) -> None:
    pol = make(tmp_path, cred(approval="first_use"))
    p, _, _ = pipeline(pol)
    p.approvals = None  # `portcullis check`
    o = await p.decide(req(await tunnel_to(p)), client=TASK)
    assert (o.action, o.credential, o.injection) == (Action.APPROVAL, "gh", None)
    audit, _, asked = pipeline(pol, audit=True)
    a = await audit.decide(req(await tunnel_to(audit)), client=TASK)
    assert a.passes and not a.enforced and a.reason is Reason.APPROVAL_PENDING and a.injection is None
    assert asked.asked == []


async def test_a_host_approval_and_the_credentials_first_use_are_two_questions(tmp_path: Path) -> None:
    pol = make(tmp_path, cred(hosts=["ask.public.test"], approval="first_use"))
    approvals = Approvals()
    p, _, _ = pipeline(pol, approvals=approvals)
    t = await tunnel_to(p, "ask.public.test")
    o = await p.decide(req(t), client=TASK)
    assert [a.credential for a in approvals.asked] == [None, None, "gh"]  # CONNECT, request, first use
    assert o.action is Action.ALLOW and o.injection is not None


async def test_the_first_credential_the_client_is_entitled_to_wins(tmp_path: Path) -> None:
    (tmp_path / "docs.secret").write_text("docs-token-0123456789")
    pol = make(tmp_path, cred(), cred(name="gh-docs", secret={"file": "docs.secret"}, profiles=["docs"],
                                      apply={"header": "X-Token"}))
    p, _, _ = pipeline(pol)
    rel = await p.decide(req(await tunnel_to(p)), client=TASK)
    docs = await p.decide(req(await tunnel_to(p, who=OTHER_TASK)), client=OTHER_TASK)
    assert (rel.credential, docs.credential) == ("gh", "gh-docs")
    assert docs.injection is not None and docs.injection.header == "X-Token"
    assert docs.injection.value.reveal() == "docs-token-0123456789"


async def test_a_request_with_no_credentials_configured_costs_nothing(tmp_path: Path) -> None:
    pol = make_policy(tmp_path, RULES)
    p, lookup, _ = pipeline(pol)
    o = await p.decide(http("public.test", target=f"/?x={PH}"))
    assert o.action is Action.ALLOW and o.credential is None and not pol.credentials
    assert lookup.calls == ["public.test"] and Layer.HTTP is o.request.layer


async def test_the_secret_itself_is_refused_even_where_its_credential_applies(pol: Policy) -> None:
    """An agent that somehow holds the value (an upstream echoed it) cannot send it, nor get it logged."""
    p, _, _ = pipeline(pol)
    t = await tunnel_to(p)
    o = await p.decide(req(t, f"/repos/{SECRET}/x"), client=TASK)
    assert (o.reason, o.credential) == (Reason.CREDENTIAL_LEAK, "gh") and "itself" in (o.detail or "")
    assert o.request.path == "/repos/[credential:gh]/x"  # what the event and the answer show
    c = await p.decide(connect(f"{SECRET}.public.test"), client=TASK)
    assert c.request.host == "[credential:gh].public.test" and SECRET.lower() not in repr(c.request)
