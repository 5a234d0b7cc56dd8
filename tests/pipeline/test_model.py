"""addons/pipeline/model.py: the Outcome (when traffic passes, a second refusal of the same tunnel),
`refusal()` and the status of each denial."""

from __future__ import annotations

import dataclasses

import pytest

from addons.pipeline.dns import Pin
from addons.pipeline.model import Incoming, Outcome, deny_status, refusal
from addons.policy.model import Action, Client, Layer, Reason, Request, RuleRef

REQ = Request(
    "public.test", 443, Client("10.0.0.1", 5, "rev", "c1"), None, "CONNECT", None, Layer.CONNECT, "t1"
)
RULE = RuleRef("pub", Action.ALLOW, "rules/r.yaml", 3)


@pytest.mark.parametrize(
    ("reason", "status"),
    [(Reason.BAD_REQUEST, 400), (Reason.PROXY_AUTH, 407), (Reason.EVENT_SINK_STALLED, 503)]
    + [(r, 403) for r in Reason
       if r not in (Reason.BAD_REQUEST, Reason.PROXY_AUTH, Reason.EVENT_SINK_STALLED)],
)
def test_deny_status(reason: Reason, status: int) -> None:
    assert deny_status(reason) == status


@pytest.mark.parametrize(
    ("action", "enforced", "status", "passes"),
    [
        (Action.ALLOW, True, None, True),
        (Action.ALLOW, True, 502, False),  # allowed, but nowhere to connect
        (Action.DENY, True, 403, False),
        (Action.DENY, False, None, True),  # audit mode: recorded, let through
        (Action.DENY, True, None, False),  # an HTTP/2 connection error: refused without a status
        (Action.APPROVAL, True, 403, False),  # `portcullis check`: nobody was asked
    ],
)
def test_passes(action: Action, enforced: bool, status: int | None, passes: bool) -> None:
    assert Outcome(REQ, action, Reason.RULE, enforced=enforced, status=status).passes is passes


def test_refused_is_a_second_enforced_decision_about_the_same_request() -> None:
    allowed = Outcome(
        REQ,
        Action.ALLOW,
        Reason.RULE,
        enforced=False,
        rule=RULE,
        matched=(RULE,),
        client_name="rev",
        pin=Pin("public.test", 443, ("8.8.8.8",)),
        ip="8.8.8.8",
        approval_id="apr-1",
        retry_after=5,
        inspect=True,
        raw_tcp=True,
        latency_s=0.1,
        approval_wait_s=2.0,
    )
    r = allowed.refused(Reason.SNI_MISMATCH, "the TLS server name differs")
    assert (r.action, r.reason, r.enforced, r.status, r.detail) == (
        Action.DENY,
        Reason.SNI_MISMATCH,
        True,
        403,
        "the TLS server name differs",
    )
    assert not r.passes
    # The same request, rule, client and address; nothing that belonged to the first decision's timing,
    # approval or relay mode.
    assert (r.request, r.rule, r.matched, r.client_name, r.ip, r.pin) == (
        REQ,
        RULE,
        (RULE,),
        "rev",
        "8.8.8.8",
        allowed.pin,
    )
    assert (r.approval_id, r.retry_after, r.latency_s, r.approval_wait_s, r.inspect, r.raw_tcp) == (
        None,
        None,
        None,
        None,
        False,
        False,
    )
    assert allowed.action is Action.ALLOW  # immutable: the first outcome is unchanged


def test_refusal() -> None:
    o = refusal(REQ, Reason.PROXY_AUTH, "no credentials", "rev", 0.5)
    assert (o.action, o.reason, o.status, o.detail, o.client_name, o.latency_s, o.enforced) == (
        Action.DENY,
        Reason.PROXY_AUTH,
        407,
        "no credentials",
        "rev",
        0.5,
        True,
    )
    assert o.rule is None and o.pin is None and not o.passes


def test_outcomes_and_inputs_are_immutable() -> None:
    o = refusal(REQ, Reason.BAD_REQUEST)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.status = None  # type: ignore[misc]
    inc = Incoming(Layer.HTTP, "h", 80)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inc.host = "other"  # type: ignore[misc]


def test_credentials_are_never_shown() -> None:
    inc = Incoming(Layer.HTTP, "h", 80, credentials="Basic c2VjcmV0")
    assert "c2VjcmV0" not in repr(inc)
