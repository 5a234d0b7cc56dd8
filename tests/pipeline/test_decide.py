"""addons/pipeline/decide.py: `Pipeline.decide` stage by stage, table-driven, with fake lookups (no sockets):
identity (407), the authority (bad hosts, Host/target/tunnel mismatches, framing), an unhealthy event
sink, the policy with checked DNS answers (resolve once, pin, never resolve a denied name, any private
answer refuses), the self-address refusal, approvals, audit mode, "allowed but nowhere to connect",
fail-closed on any internal error, and `malformed()`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from addons.pipeline.decide import AUDITED, Pipeline, Settlement
from addons.pipeline.dns import PinStore, system_lookup
from addons.pipeline.model import Incoming, Outcome
from addons.policy.evaluate import Policy
from addons.policy.model import Action, Layer, Reason
from tests.pipeline import pipe_helpers as ph
from tests.pipeline.pipe_helpers import PEER, Approvals, Lookup, Source, connect, http, inner, pipeline
from tests.policy.pol_helpers import make_policy


@pytest.fixture(scope="module")
def pol(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return ph.policy(tmp_path_factory.mktemp("decide"))


def decide(p: Pipeline, inc: Incoming, **kw: Any) -> Outcome:
    return asyncio.run(p.decide(inc, **kw))


def summary(o: Outcome) -> tuple[str, str, int | None, bool]:
    return o.action.value, o.reason.value, o.status, o.passes


# -- the whole path for ordinary requests -----------------------------------------------------------

CASES: list[tuple[str, Incoming, tuple[str, str, int | None, bool], str | None]] = [
    # id, input, (action, reason, status, passes), deciding rule
    ("http-allow", http(), ("allow", "rule", None, True), "pub"),
    ("http-deny-rule", http("blocked.test"), ("deny", "rule", 403, False), "blocked"),
    ("http-default", http("nothing.test"), ("deny", "default", 403, False), None),
    ("http-approved", http("ask.test"), ("allow", "approved", None, True), "ask"),
    ("connect-allow", connect(), ("allow", "rule", None, True), "pub"),
    ("connect-deny", connect("blocked.test"), ("deny", "rule", 403, False), "blocked"),
    ("connect-inspect", connect("insp.test"), ("allow", "inspect", None, True), None),
    ("connect-raw-tcp", connect("ssh.test"), ("allow", "rule", None, True), "ssh"),
    ("ip-literal", http("8.8.8.8"), ("allow", "rule", None, True), "lit"),
    ("ip-literal-other-spelling", http("134744072"), ("allow", "rule", None, True), "lit"),
    ("name-spelling", http("PUBLIC.Test.", host_header="public.test"), ("allow", "rule", None, True), "pub"),
    ("private-literal", http("127.0.0.1"), ("deny", "private_address", 403, False), None),
    ("private-answer", http("private.public.test"), ("deny", "private_address", 403, False), None),
    ("metadata-name", http("metadata.google.internal"), ("deny", "private_address", 403, False), None),
    ("bad-port", http("public.test", 0, host_header=None), ("deny", "bad_request", 400, False), None),
]


@pytest.mark.parametrize(("inc", "want", "rule"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_outcomes(
    pol: Policy, inc: Incoming, want: tuple[str, str, int | None, bool], rule: str | None
) -> None:
    p, _, _ = pipeline(pol)
    o = decide(p, inc)
    assert summary(o) == want
    assert (o.rule.name if o.rule else None) == rule
    assert o.request.flow_id == inc.flow_id and o.request.layer is inc.layer
    assert o.latency_s is not None and o.latency_s >= 0


def test_the_outcome_carries_the_normalised_request_and_its_facts(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    o = decide(
        p, http("WWW.Public.Test.", 80, host_header="www.public.test", path="/a", peer=("10.1.2.3", 5))
    )
    r = o.request
    assert (r.host, r.port, r.scheme, r.method, r.path) == ("www.public.test", 80, "http", "GET", "/a")
    assert (r.client.address, r.client.port, r.client.user, r.client.conn_id) == ("10.1.2.3", 5, None, "c1")
    assert (
        o.client_name == "ci" and o.ip == "8.8.4.4" and o.pin is not None and o.pin.addresses == ("8.8.4.4",)
    )
    assert o.enforced is True and o.detail and "pub" in o.detail


def test_connect_outcomes_say_how_the_tunnel_is_relayed(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    assert decide(p, connect("insp.test")).inspect is True
    ssh = decide(p, connect("ssh.test"))
    assert ssh.raw_tcp is True and ssh.inspect is False
    plain = decide(p, connect())
    assert plain.raw_tcp is False and plain.inspect is False
    assert plain.request.method == "CONNECT" and plain.request.path is None


def test_groups_override_the_client_group(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    assert decide(p, http(), groups=("rev",)).client_name == "rev"
    assert decide(p, http()).client_name is None  # 10.9.0.1 is in no group


# -- 1. identity ------------------------------------------------------------------------------------


def _basic(user: str, pw: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


@pytest.mark.parametrize(
    ("peer", "credentials", "want_user"),
    [
        (("10.9.0.1", 1), None, None),  # no credentials, none required: anonymous
        (("10.9.0.1", 1), _basic("rev", "pw"), "rev"),
        (("10.2.0.7", 1), _basic("rev", "pw"), "rev"),
        (("10.2.0.7", 1), None, "407"),  # a group with cidrs + proxy_auth requires credentials
        (("10.9.0.1", 1), _basic("rev", "wrong"), "407"),
        (("10.9.0.1", 1), _basic("nobody", "pw"), "407"),
        (("10.9.0.1", 1), "Bearer abc", "407"),
        (("10.9.0.1", 1), "Basic !!!", "407"),
    ],
)
def test_identity(pol: Policy, peer: tuple[str, int], credentials: str | None, want_user: str | None) -> None:
    p, lookup, _ = pipeline(pol, auth=ph.auth())
    for inc in (http(peer=peer, credentials=credentials), connect(peer=peer, credentials=credentials)):
        o = decide(p, inc)
        if want_user == "407":
            assert summary(o) == ("deny", "proxy_auth", 407, False)
            assert o.request.client.user is None and o.rule is None
        else:
            assert summary(o) == ("allow", "rule", None, True)
            assert o.request.client.user == want_user
            if want_user:
                assert o.client_name == "rev"  # the user's group
    if want_user == "407":
        assert lookup.calls == []  # nothing resolved for a client that is not identified


def test_inside_a_tunnel_the_connects_identity_applies(pol: Policy) -> None:
    p, _, _ = pipeline(pol, auth=ph.auth())
    tunnel = decide(p, connect("insp.test", peer=("10.2.0.7", 1), credentials=_basic("rev", "pw")))
    assert tunnel.passes and tunnel.request.client.user == "rev"
    # The inner request carries no credentials (they went on the CONNECT): still user rev.
    o = decide(p, inner(tunnel, peer=("10.2.0.7", 1), credentials=None))
    assert summary(o) == ("allow", "rule", None, True) and o.request.client.user == "rev"
    assert o.client_name == "rev"


def test_a_refusal_before_the_policy_reports_the_request_as_received(pol: Policy) -> None:
    p, _, _ = pipeline(pol, auth=ph.auth())
    o = decide(p, http("PUBLIC.TEST.", peer=("10.2.0.7", 9), credentials=None))
    assert o.request.host == "PUBLIC.TEST." and o.request.client.address == "10.2.0.7"


# -- 2. the authority -------------------------------------------------------------------------------

BAD_HOSTS = ["", "exa mple.com", "a..b", "-x.com", "1.2.3.4.5"]


@pytest.mark.parametrize("host", BAD_HOSTS, ids=repr)
@pytest.mark.parametrize("layer", ["http", "connect"])
def test_a_host_that_does_not_normalise_is_bad_request(pol: Policy, host: str, layer: str) -> None:
    p, lookup, approvals = pipeline(pol)
    inc = http(host, host_header=None) if layer == "http" else connect(host)
    o = decide(p, inc)
    assert (o.action, o.reason, o.status, o.enforced) == (Action.DENY, Reason.BAD_REQUEST, 400, True)
    assert not o.passes and o.rule is None and o.detail
    assert o.request.host == host  # reported as received
    assert lookup.calls == [] and approvals.asked == [] and len(p.pins) == 0


AUTHORITY = [
    # id, input, (action, reason, status), detail fragment
    ("host-header-differs", http(host_header="evil.test"), ("deny", "host_mismatch", 403), "Host header"),
    ("host-header-port", http(host_header="public.test:8080"), ("deny", "host_mismatch", 403), "Host header"),
    ("host-header-garbage", http(host_header="a b"), ("deny", "host_mismatch", 403), "Host header"),
    ("host-header-spelling", http(host_header="PUBLIC.TEST."), ("allow", "rule", None), None),
    ("host-header-default-port", http(host_header="public.test:80"), ("allow", "rule", None), None),
    ("no-host-header", http(host_header=None, host_headers=0), ("allow", "rule", None), None),
    # RFC 9112 3.2: an HTTP/1.1 request without Host is malformed; HTTP/1.0 and HTTP/2 (:authority) are not.
    ("no-host-http11", http(host_header=None, host_headers=0, http_version="HTTP/1.1"),
     ("deny", "bad_request", 400), "without a Host header"),
    ("no-host-http10", http(host_header=None, host_headers=0, http_version="HTTP/1.0"),
     ("allow", "rule", None), None),
    ("no-host-http2", http(host_header=None, host_headers=0, http_version="HTTP/2.0",
                           target_authority="public.test"), ("allow", "rule", None), None),
    # Port 0 named explicitly is no destination (mitmproxy reads `:0` in a target as the default port).
    ("target-port-zero", http(target_authority="public.test:0"), ("deny", "bad_request", 400), "port 0"),
    ("host-port-zero", http(host_header="public.test:000"), ("deny", "bad_request", 400), "port 0"),
    ("head-too-large", http(problem="the header fields are larger than 65536 bytes", problem_status=431),
     ("deny", "bad_request", 431), "65536"),
    ("target-too-long", http(problem="the request target is longer than 8192 bytes", problem_status=414),
     ("deny", "bad_request", 414), "8192"),
    # A CONNECT target as received: ASCII digits, brackets around IPv6 only, naming what was read.
    ("connect-plain", connect(target_authority="public.test:443"), ("allow", "rule", None), None),
    ("connect-spelling", connect(target_authority="PUBLIC.test.:0443"), ("allow", "rule", None), None),
    ("connect-fullwidth-port", connect(port=80, target_authority="public.test:\uff18\uff10"),
     ("deny", "bad_request", 400), "ASCII digits"),
    ("connect-arabic-indic-port", connect(target_authority="public.test:\u0664\u0664\u0663"),
     ("deny", "bad_request", 400), "ASCII digits"),
    ("connect-bracketed-name", connect(target_authority="[public.test]:443"), ("deny", "bad_request", 400),
     "IPv6"),
    ("connect-bracketed-v4", connect("8.8.8.8", target_authority="[8.8.8.8]:443"),
     ("deny", "bad_request", 400), "IPv6"),
    ("connect-other-host", connect(target_authority="evil.test:443"), ("deny", "bad_request", 400),
     "not the host read"),
    ("two-host-headers", http(host_headers=2), ("deny", "bad_request", 400), "more than one Host header"),
    ("target-differs", http(target_authority="evil.test"), ("deny", "host_mismatch", 403), "target"),
    ("target-agrees", http(target_authority="public.test:80"), ("allow", "rule", None), None),
    ("framing", http(problem="a header value holds CR"), ("deny", "bad_request", 400), "holds CR"),
    (
        "connect-in-tunnel",
        connect(problem="CONNECT inside a tunnel"),
        ("deny", "bad_request", 400),
        "CONNECT",
    ),
]


@pytest.mark.parametrize(("inc", "want", "detail"), [a[1:] for a in AUTHORITY], ids=[a[0] for a in AUTHORITY])
def test_the_authority(
    pol: Policy, inc: Incoming, want: tuple[str, str, int | None], detail: str | None
) -> None:
    p, lookup, _ = pipeline(pol)
    o = decide(p, inc)
    assert (o.action.value, o.reason.value, o.status) == want
    if detail is not None:
        assert o.detail is not None and detail in o.detail
        assert lookup.calls == [] and o.enforced  # refused before the policy and DNS


@pytest.mark.parametrize(
    ("host", "port", "host_header", "want"),
    [
        ("insp.test", 443, None, ("allow", "rule", None)),
        ("INSP.test.", 443, "insp.test", ("allow", "rule", None)),
        ("public.test", 443, "public.test", ("deny", "host_mismatch", 403)),  # another host in the tunnel
        ("insp.test", 8443, "insp.test:8443", ("deny", "host_mismatch", 403)),  # another port
        ("insp.test", 443, "public.test", ("deny", "host_mismatch", 403)),  # the Host header names another
    ],
)
def test_a_request_inside_a_tunnel_must_name_the_tunnels_destination(
    pol: Policy, host: str, port: int, host_header: str | None, want: tuple[str, str, int | None]
) -> None:
    p, _, _ = pipeline(pol)
    tunnel = decide(p, connect("insp.test"))
    o = decide(p, inner(tunnel, host, port, host_header=host_header))
    assert (o.action.value, o.reason.value, o.status) == want
    assert o.request.layer is Layer.INSPECTED
    if want[1] == "host_mismatch":
        assert o.detail is not None and ("tunnel" in o.detail or "Host header" in o.detail)


def test_inner_requests_are_decided_by_method_and_path(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    tunnel = decide(p, connect("insp.test"))
    assert summary(decide(p, inner(tunnel, path="/ok/x"))) == ("allow", "rule", None, True)
    assert summary(decide(p, inner(tunnel, path="/admin"))) == ("deny", "default", 403, False)


# -- the event sink must be writable --------------------------------------------------------------


def test_an_unhealthy_event_sink_denies_everything_with_internal_error(pol: Policy) -> None:
    healthy = [False]
    p, lookup, approvals = pipeline(pol, healthy=lambda: healthy[0])
    for inc in (http(), connect(), http("ask.test")):
        o = decide(p, inc)
        assert summary(o) == ("deny", "internal_error", 403, False)
        assert o.detail == "the event log cannot be written" and o.enforced
    assert lookup.calls == [] and approvals.asked == [] and len(p.pins) == 0
    healthy[0] = True
    assert decide(p, http()).passes


def test_audit_mode_does_not_pass_an_unrecorded_request(pol: Policy) -> None:
    p, _, _ = pipeline(pol, audit=True, healthy=lambda: False)
    o = decide(p, http("blocked.test"))
    assert summary(o) == ("deny", "internal_error", 403, False) and o.enforced


# -- 3 and 4. the policy with checked DNS answers; pins ---------------------------------------------


def test_resolve_once_per_connection_and_pin_the_checked_answers(pol: Policy) -> None:
    lookup = Lookup()
    p, _, _ = pipeline(pol, lookup=lookup)
    first = decide(p, http())
    assert first.passes and first.ip == "8.8.8.8" and lookup.calls == ["public.test"]
    pin = p.pins.get("c1", "public.test", 80)
    assert pin is not None and pin.addresses == ("8.8.8.8",)
    # The name now resolves elsewhere (rebinding): this connection keeps its checked answer ...
    lookup.table["public.test"] = ["127.0.0.1"]
    again = decide(p, http(flow_id="f2"))
    assert again.passes and again.ip == "8.8.8.8" and lookup.calls == ["public.test"]
    # ... and a new connection resolves again and is refused.
    other = decide(p, http(conn_id="c2"))
    assert summary(other) == ("deny", "private_address", 403, False)
    assert p.pins.get("c2", "public.test", 80) is None and lookup.calls == ["public.test"] * 2


@pytest.mark.parametrize(
    "answers",
    [
        ["8.8.8.8", "10.0.0.5"],
        ["127.0.0.1", "8.8.8.8"],
        ["1.1.1.1", "::ffff:169.254.169.254"],
        ["8.8.8.8", "fd00::1"],
        ["8.8.8.8", "100.64.1.1"],
    ],
)
def test_any_private_answer_refuses_the_name(pol: Policy, answers: list[str]) -> None:
    p, _, _ = pipeline(pol, lookup=Lookup({"api.public.test": answers}))
    o = decide(p, http("api.public.test"))
    assert not o.passes and o.status == 403 and o.reason is Reason.PRIVATE_ADDRESS
    assert len(p.pins) == 0


def test_the_system_resolver_path_with_mixed_answers(pol: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> Outcome:
        loop = asyncio.get_running_loop()

        async def fake_getaddrinfo(host: str, port: int, **kw: Any) -> list[Any]:
            assert host == "api.public.test"
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            ]

        monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
        p = Pipeline(Source(pol), lookup=system_lookup)
        return await p.decide(http("api.public.test"))

    o = asyncio.run(run())
    assert not o.passes and o.reason is Reason.PRIVATE_ADDRESS


@pytest.mark.parametrize("inc", [http("blocked.test"), http("nothing.test"), connect("blocked.test")])
def test_a_denied_name_is_never_resolved(pol: Policy, inc: Incoming) -> None:
    p, lookup, _ = pipeline(pol)
    o = decide(p, inc)
    assert not o.passes and o.reason in (Reason.RULE, Reason.DEFAULT) and lookup.calls == []
    assert o.ip is None and o.pin is None


def test_static_answers_and_literals_need_no_dns(pol: Policy) -> None:
    p, lookup, _ = pipeline(pol)
    s = decide(p, http("static.test"))
    assert s.passes and s.ip == "8.8.4.4"
    lit = decide(p, http("8.8.8.8"))
    assert lit.passes and lit.ip == "8.8.8.8"
    assert lookup.calls == []


def test_without_a_lookup_nothing_is_resolved_and_nothing_pinned(pol: Policy) -> None:
    p = Pipeline(Source(pol))  # `portcullis check`: no DNS
    o = asyncio.run(p.decide(http()))
    assert o.passes and o.pin is None and o.ip is None and len(p.pins) == 0


def test_an_unresolvable_allowed_name_is_502_with_action_allow(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    for inc in (http("nx.test"), connect("nx.test")):
        o = decide(p, inc)
        assert (o.action, o.reason, o.status) == (Action.ALLOW, Reason.RULE, 502)
        assert not o.passes and o.detail == "cannot resolve nx.test: NXDOMAIN"
        assert o.rule is not None and o.rule.name == "nx"
    assert len(p.pins) == 0


def test_an_unresolvable_denied_name_stays_a_denial(pol: Policy) -> None:
    p, lookup, _ = pipeline(pol, lookup=Lookup({}))
    o = decide(p, http("nothing.test"))
    assert summary(o) == ("deny", "default", 403, False) and lookup.calls == []


def test_the_proxy_itself_is_refused_as_a_destination(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    o = decide(p, http("self.test", 8080, host_header="self.test:8080"))
    assert summary(o) == ("deny", "private_address", 403, False)
    assert o.private_class == "self" and o.detail == "the destination is this proxy itself"
    assert len(p.pins) == 0
    # The same address on another port is not the proxy.
    assert decide(p, http("self.test", 8081, host_header="self.test:8081", conn_id="c2")).passes


def test_the_self_check_also_applies_to_a_pinned_connection(pol: Policy) -> None:
    own = [False]
    p, _, _ = pipeline(pol, is_own=lambda ip, port: own[0])
    assert decide(p, http("self.test", 8080, host_header="self.test:8080")).passes
    own[0] = True  # now that address:port is a listener of ours
    o = decide(p, http("self.test", 8080, host_header="self.test:8080", flow_id="f2"))
    assert o.reason is Reason.PRIVATE_ADDRESS and o.private_class == "self"


# -- 5. approvals -----------------------------------------------------------------------------------


def test_approvals_none_answers_approval_like_check(pol: Policy) -> None:
    p = Pipeline(Source(pol), lookup=Lookup())
    o = asyncio.run(p.decide(http("ask.test")))
    assert (o.action, o.reason, o.status, o.passes) == (Action.APPROVAL, Reason.RULE, 403, False)
    assert o.rule is not None and o.rule.name == "ask" and o.approval_id is None


@pytest.mark.parametrize(
    ("answer", "want"),
    [
        (Settlement(True, Reason.APPROVED, "apr-1", None, 2.5), ("allow", "approved", None, True)),
        (
            Settlement(False, Reason.APPROVAL_DENIED, "apr-2", None, 1.0),
            ("deny", "approval_denied", 403, False),
        ),
        (
            Settlement(False, Reason.APPROVAL_TIMEOUT, "apr-3", None, 9.0),
            ("deny", "approval_timeout", 403, False),
        ),
        (
            Settlement(False, Reason.APPROVAL_PENDING, "apr-4", 30, 0.0),
            ("deny", "approval_pending", 403, False),
        ),
        (Settlement(False, Reason.CLIENT_CLOSED, "apr-5", None, 3.0), ("deny", "client_closed", 403, False)),
    ],
)
def test_approvals_settle_what_the_policy_left_to_a_person(
    pol: Policy, answer: Settlement, want: tuple[str, str, int | None, bool]
) -> None:
    approvals = Approvals(answer)
    p, _, _ = pipeline(pol, approvals=approvals)
    o = decide(p, http("ask.test"), client_alive=lambda: False)
    assert summary(o) == want
    assert o.approval_id == answer.approval_id and o.approval_wait_s == answer.waited_s
    assert o.retry_after == (None if answer.allowed else answer.retry_after)
    assert o.rule is not None and o.rule.name == "ask"
    (asked,) = approvals.asked
    assert asked.action is Action.APPROVAL and asked.request.host == "ask.test"
    assert approvals.alive_seen == [False]  # the client's liveness reaches the approvals service
    assert (p.pins.get("c1", "ask.test", 80) is not None) is answer.allowed


def test_approvals_are_not_asked_about_allowed_or_denied_requests(pol: Policy) -> None:
    p, _, approvals = pipeline(pol)
    decide(p, http())
    decide(p, http("blocked.test"))
    assert approvals.asked == []


# -- audit mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inc", "reason"),
    [(http("blocked.test"), "rule"), (http("nothing.test"), "default"), (connect("blocked.test"), "rule")],
)
def test_audit_mode_lets_rule_and_default_denials_through_unenforced(
    pol: Policy, inc: Incoming, reason: str
) -> None:
    p, lookup, _ = pipeline(pol, audit=True)
    o = decide(p, inc)
    assert (o.action.value, o.reason.value, o.enforced, o.status, o.passes) == (
        "deny",
        reason,
        False,
        None,
        True,
    )
    # It goes through, so it needs a checked address like an allowed request (resolved, pinned).
    if inc.host == "blocked.test":
        assert lookup.calls == ["blocked.test"] and o.ip == "1.0.0.1"
        assert p.pins.get("c1", "blocked.test", inc.port) is not None


def test_audit_mode_never_holds_an_approval(pol: Policy) -> None:
    p, _, approvals = pipeline(pol, audit=True)
    o = decide(p, http("ask.test"))
    assert (o.action, o.reason, o.enforced, o.status, o.passes) == (
        Action.DENY,
        Reason.APPROVAL_PENDING,
        False,
        None,
        True,
    )
    assert approvals.asked == []


SAFETY = [
    ("private", http("private.public.test"), Reason.PRIVATE_ADDRESS),
    ("private-literal", http("127.0.0.1"), Reason.PRIVATE_ADDRESS),
    ("self", http("self.test", 8080, host_header="self.test:8080"), Reason.PRIVATE_ADDRESS),
    ("host-mismatch", http(host_header="evil.test"), Reason.HOST_MISMATCH),
    ("bad-host", http("a..b", host_header=None), Reason.BAD_REQUEST),
    ("framing", http(problem="bad framing"), Reason.BAD_REQUEST),
    ("auth", http(peer=("10.2.0.1", 1)), Reason.PROXY_AUTH),
]


@pytest.mark.parametrize(("inc", "reason"), [s[1:] for s in SAFETY], ids=[s[0] for s in SAFETY])
def test_audit_mode_enforces_safety_reasons(pol: Policy, inc: Incoming, reason: Reason) -> None:
    assert reason not in AUDITED
    p, _, _ = pipeline(pol, audit=True, auth=ph.auth())
    o = decide(p, inc)
    assert o.reason is reason and o.enforced is True and not o.passes and o.status in (400, 403, 407)


def test_audit_mode_enforces_internal_errors(pol: Policy) -> None:
    p, _, _ = pipeline(pol, audit=True, healthy=lambda: False)
    o = decide(p, http("blocked.test"))
    assert o.reason is Reason.INTERNAL_ERROR and o.enforced and not o.passes


def test_audit_mode_keeps_a_502_for_an_unresolvable_name(pol: Policy) -> None:
    p, _, _ = pipeline(pol, audit=True)
    o = decide(p, http("nx.test"))
    assert (o.action, o.status, o.passes) == (Action.ALLOW, 502, False)


# -- fail closed ------------------------------------------------------------------------------------


class _Raising:
    @property
    def policy(self) -> Policy:
        raise RuntimeError("the policy source broke")


def test_a_pipeline_that_raises_denies_with_internal_error(pol: Policy) -> None:
    p = Pipeline(_Raising())
    o = asyncio.run(p.decide(http()))
    assert summary(o) == ("deny", "internal_error", 403, False)
    assert (
        o.request.host == "public.test" and o.request.client.address == ph.PEER[0] and o.latency_s is not None
    )


def test_a_lookup_that_raises_something_unexpected_denies(pol: Policy) -> None:
    async def broken(host: str, port: int) -> list[str]:
        raise RuntimeError("resolver bug")

    p, _, _ = pipeline(pol, lookup=broken)
    o = decide(p, http())
    assert summary(o) == ("deny", "internal_error", 403, False) and len(p.pins) == 0


def test_an_approvals_service_that_raises_denies(pol: Policy) -> None:
    class Broken:
        async def resolve(self, pending: Outcome, client_alive: Any) -> Settlement:
            raise RuntimeError("store down")

    p, _, _ = pipeline(pol, approvals=Broken())
    o = decide(p, http("ask.test"))
    assert summary(o) == ("deny", "internal_error", 403, False) and len(p.pins) == 0


def test_a_policy_swapped_in_applies_to_the_next_decision(pol: Policy, tmp_path: Path) -> None:
    src = Source(pol)
    p = Pipeline(src, lookup=Lookup())
    assert asyncio.run(p.decide(http())).passes
    src.policy = make_policy(tmp_path, [{"name": "other", "action": "allow", "hosts": ["other.test"]}])
    assert asyncio.run(p.decide(http(conn_id="c9"))).reason is Reason.DEFAULT


# -- malformed(): a request mitmproxy refused by itself ---------------------------------------------


def test_malformed_without_a_tunnel(pol: Policy) -> None:
    p, lookup, _ = pipeline(pol)
    inc = Incoming(
        Layer.HTTP, "PUBLIC.test", 80, conn_id="c1", flow_id="m1", peer=("10.1.0.9", 3), method="GET"
    )
    o = p.malformed(inc, "bad header line", 400)
    assert (o.action, o.reason, o.status, o.enforced) == (Action.DENY, Reason.BAD_REQUEST, 400, True)
    assert (o.request.host, o.request.port, o.request.method, o.request.flow_id) == (
        "public.test",
        80,
        "GET",
        "m1",
    )
    assert o.request.client.address == "10.1.0.9" and o.client_name == "ci" and o.detail == "bad header line"
    assert lookup.calls == []


@pytest.mark.parametrize(("host", "want"), [("a..b", ""), ("", "")])
def test_malformed_with_an_unreadable_host_reports_none(pol: Policy, host: str, want: str) -> None:
    p, _, _ = pipeline(pol)
    o = p.malformed(Incoming(Layer.HTTP, host, 0, flow_id="m2"), "unparsable request line", 400)
    assert o.request.host == want and o.reason is Reason.BAD_REQUEST and o.request.client.address is None


def test_malformed_inside_a_tunnel_names_the_tunnel_and_its_client(pol: Policy) -> None:
    p, _, _ = pipeline(pol, auth=ph.auth())
    tunnel = decide(p, connect("insp.test", peer=("10.2.0.7", 1), credentials=_basic("rev", "pw")))
    inc = Incoming(Layer.INSPECTED, "", 0, conn_id="c1", flow_id="m3", tunnel=tunnel)
    o = p.malformed(inc, "GOAWAY: protocol error", None)  # an HTTP/2 connection error has no status
    assert (o.request.host, o.request.port, o.request.layer) == ("insp.test", 443, Layer.INSPECTED)
    assert o.request.client.user == "rev" and o.client_name == "rev"
    assert o.status is None and o.reason is Reason.BAD_REQUEST and not o.passes


def test_pins_are_per_connection_and_dropped_with_it(pol: Policy) -> None:
    pins = PinStore()
    p, _, _ = pipeline(pol, pins=pins)
    decide(p, http())
    decide(p, http("www.public.test", host_header="www.public.test"))
    decide(p, http(conn_id="c2"))
    assert len(pins) == 3
    pins.drop_client("c1")
    assert len(pins) == 1 and pins.get("c2", "public.test", 80) is not None


def test_denied_outcomes_leave_no_pin(pol: Policy) -> None:
    p, _, _ = pipeline(pol)
    for inc in (
        http("blocked.test"),
        http("private.public.test"),
        http(host_header="evil.test"),
        http("nx.test"),
    ):
        assert not decide(p, inc).passes
    assert len(p.pins) == 0


@pytest.mark.parametrize(("version", "want"), [("HTTP/1.1", ("deny", "bad_request", 400)),
                                                ("HTTP/1.0", ("allow", "rule", None))])
def test_inside_a_tunnel_a_request_without_host(
    pol: Policy, version: str, want: tuple[str, str, int | None]
) -> None:
    p, _, _ = pipeline(pol)
    tunnel = decide(p, connect("insp.test"))
    o = decide(p, inner(tunnel, host_header=None, host_headers=0, http_version=version))
    assert (o.action.value, o.reason.value, o.status) == want


# -- task credentials ------------------------------------------------------------------------------


class _Tasks:
    """The TaskCredentials protocol over one credential; `live` flips when it is revoked."""

    def __init__(self) -> None:
        from addons.credentials.model import Credential, hash_secret

        self.cred = Credential("build-7", None, (("repo", "web"),), hash_secret("s3cret"), 0.0, 4e9)
        self.live = True

    def knows(self, user: str) -> bool:
        return user == "build-7"

    async def verify(self, task_id: str, secret: str) -> tuple[Any, Any]:
        from addons.credentials.model import Check

        if secret != "s3cret":
            return Check.WRONG_SECRET, None
        return (Check.OK, self.cred) if self.live else (Check.REVOKED, self.cred)

    def still_valid(self, task_id: str) -> bool:
        return self.live


def test_a_task_credential_names_the_task_and_its_expiry(pol: Policy) -> None:
    p, _, _ = pipeline(pol, credentials=_Tasks())
    o = decide(p, http(credentials=_basic("build-7", "s3cret")))
    c = o.request.client
    assert (c.task_id, c.labels, c.task_until, c.key) == ("build-7", (("repo", "web"),), 4e9, "task:build-7")


@pytest.mark.parametrize(("secret", "live", "named"), [
    ("s3cret", False, True),   # revoked, its secret proven: the refusal's event says which task tried
    ("guess", True, False),    # a wrong secret proves nothing: the claimed name is not recorded
    ("guess", False, False),
])
def test_a_refused_task_credential_is_named_only_when_its_secret_matched(
    pol: Policy, secret: str, live: bool, named: bool
) -> None:
    tasks = _Tasks()
    tasks.live = live
    p, _, _ = pipeline(pol, credentials=tasks)
    o = decide(p, http(credentials=_basic("build-7", secret)))
    assert summary(o)[:3] == ("deny", "proxy_auth", 407)
    c = o.request.client
    assert (c.user, c.task_id) == (("build-7", "build-7") if named else (None, None))
    assert c.address == PEER[0] and not p.pins.get("c1", "public.test", 80)


def test_a_task_revoked_while_its_request_was_held_is_refused_after_the_approval(pol: Policy) -> None:
    tasks = _Tasks()

    class RevokedMeanwhile(Approvals):
        async def resolve(self, pending: Outcome, client_alive: Any) -> Settlement:
            tasks.live = False  # DELETE /credentials/build-7 while a person was deciding
            return await super().resolve(pending, client_alive)

    p, _, approvals = pipeline(pol, credentials=tasks, approvals=RevokedMeanwhile())
    o = decide(p, http("ask.test", credentials=_basic("build-7", "s3cret")))
    assert len(approvals.asked) == 1
    assert summary(o) == ("deny", "proxy_auth", 407, False) and "revoked" in (o.detail or "")
    assert p.pins.get("c1", "ask.test", 80) is None  # nothing pinned for it


# -- no DNS query for a name nobody has approved ----------------------------------------------------


def test_a_name_waiting_for_a_person_is_looked_up_only_once_approved(pol: Policy) -> None:
    """The proxy's resolver is no channel out: an agent asking for `<secret>.attacker.example` under
    an approval rule sends nothing to DNS until a person allows it."""
    lookup = Lookup({"ask.test": ["8.8.4.4"]})
    for answer in (Reason.APPROVAL_DENIED, Reason.APPROVAL_PENDING, Reason.APPROVAL_TIMEOUT):
        p, _, _ = pipeline(pol, lookup=lookup, approvals=Approvals(Settlement(False, answer, "a1")))
        assert not decide(p, http("ask.test")).passes and lookup.calls == []
    p, _, approvals = pipeline(pol, lookup=lookup)
    o = decide(p, http("ask.test"))
    assert (summary(o), o.ip, lookup.calls) == (("allow", "approved", None, True), "8.8.4.4", ["ask.test"])
    assert approvals.asked[0].ip is None  # the approval was opened knowing no address
    assert p.pins.get("c1", "ask.test", 80) is not None


@pytest.mark.parametrize("answers", [["10.0.0.7"], ["8.8.8.8", "169.254.169.254"]])
def test_an_approved_name_with_a_private_answer_is_still_refused(pol: Policy, answers: list[str]) -> None:
    p, _, _ = pipeline(pol, lookup=Lookup({"ask.test": answers}))
    o = decide(p, http("ask.test"))
    assert summary(o) == ("deny", "private_address", 403, False) and o.approval_id == "apr-1"
    assert p.pins.get("c1", "ask.test", 80) is None


def test_an_approved_name_that_does_not_resolve_is_502(pol: Policy) -> None:
    p, lookup, _ = pipeline(pol, lookup=Lookup({}))
    o = decide(p, http("ask.test"))
    assert (o.action, o.reason, o.status, lookup.calls) == (Action.ALLOW, Reason.APPROVED, 502, ["ask.test"])


def test_an_approved_name_resolving_to_this_proxy_is_refused(pol: Policy) -> None:
    p, _, _ = pipeline(pol, lookup=Lookup({"ask.test": [ph.OWN[0]]}), is_own=lambda ip, port: ip == ph.OWN[0])
    o = decide(p, http("ask.test"))
    assert (o.reason, o.passes) == (Reason.PRIVATE_ADDRESS, False)
