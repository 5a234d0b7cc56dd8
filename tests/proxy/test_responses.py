"""addons/proxy/responses.py: the answers the proxy writes itself (403/400/407 denials, 502 upstream
failures, the JSON pages that replace mitmproxy's own error pages)."""

from __future__ import annotations

import json

import pytest

from addons.pipeline.model import Outcome, refusal
from addons.policy.model import Action, Client, Reason, Request, RuleRef
from addons.proxy.responses import (
    deny_response,
    error_body,
    h2_error_headers,
    http1_error_response,
    message_for,
    upstream_error_body,
    upstream_error_response,
)

REQ = Request("x.test", 443, Client("10.0.0.1"))


def test_deny_response_shape():
    req = Request("x.test", 443, Client("10.0.0.1"))
    rule = RuleRef("no-x", Action.DENY, "r.yaml", 3)
    r = deny_response(Outcome(req, Action.DENY, Reason.RULE, status=403, rule=rule, retry_after=30))
    assert r.status_code == 403 and r.reason == "Blocked by Portcullis: rule (no-x)"
    assert r.headers["X-Portcullis-Decision"] == "deny" and r.headers["X-Portcullis-Reason"] == "rule"
    assert r.headers["Retry-After"] == "30"
    body = json.loads(r.content or b"")
    assert set(body) == {"error", "host", "port", "reason", "rule", "approval_id", "message"}
    assert body["message"].endswith(".")
    r407 = deny_response(refusal(req, Reason.PROXY_AUTH))
    assert r407.status_code == 407 and r407.headers["Proxy-Authenticate"].startswith("Basic")
    r502 = upstream_error_response("x.test", 443, "refused")
    assert r502.status_code == 502 and r502.headers["X-Portcullis-Decision"] == "allow"


@pytest.mark.parametrize("reason", [r for r in Reason if r not in (Reason.APPROVED, Reason.INSPECT)])
def test_every_denial_reason_has_a_sentence_a_person_can_act_on(reason: Reason) -> None:
    msg = message_for(reason, "x.test", 443, "no-x", "apr-1", "metadata")
    assert msg.endswith(".") and "{" not in msg
    if reason is not Reason.PROXY_AUTH:
        assert "x.test" in msg


def test_the_message_names_the_rule_the_approval_and_the_private_class() -> None:
    assert "Rule 'no-x' denies x.test:443" in message_for(Reason.RULE, "x.test", 443, "no-x", None, None)
    assert "(id apr-7)" in message_for(Reason.APPROVAL_PENDING, "x.test", 443, None, "apr-7", None)
    assert "(metadata)" in message_for(Reason.PRIVATE_ADDRESS, "169.254.169.254", 80, None, None, "metadata")
    assert message_for(Reason.BAD_REQUEST, "", None, None, None, None).startswith(
        "The request could not be understood as a proxy request to  (bad_request)"
    )


@pytest.mark.parametrize(
    ("outcome", "status", "phrase"),
    [
        (refusal(REQ, Reason.BAD_REQUEST, "more than one Host header"), 400, "bad_request (none)"),
        (refusal(REQ, Reason.PROXY_AUTH), 407, "proxy_auth (none)"),
        (refusal(REQ, Reason.HOST_MISMATCH), 403, "host_mismatch (none)"),
        (Outcome(REQ, Action.DENY, Reason.DEFAULT, status=403), 403, "default (none)"),
        (Outcome(REQ, Action.DENY, Reason.INTERNAL_ERROR, status=None), 403, "internal_error (none)"),
    ],
)
def test_deny_response_status_and_reason_phrase(outcome: Outcome, status: int, phrase: str) -> None:
    r = deny_response(outcome)
    assert r.status_code == status and r.reason == f"Blocked by Portcullis: {phrase}"
    assert r.headers["X-Portcullis-Decision"] == "deny"
    assert r.headers["X-Portcullis-Reason"] == outcome.reason.value
    assert r.headers["Content-Type"] == "application/json" and r.headers["Cache-Control"] == "no-store"
    assert ("Proxy-Authenticate" in r.headers) is (status == 407)
    assert "Retry-After" not in r.headers
    body = json.loads(r.content or b"")
    assert (body["host"], body["port"], body["reason"]) == ("x.test", 443, outcome.reason.value)


def test_a_pending_approval_says_which_and_when_to_retry() -> None:
    o = Outcome(REQ, Action.DENY, Reason.APPROVAL_PENDING, status=403, approval_id="apr-3", retry_after=15)
    r = deny_response(o)
    body = json.loads(r.content or b"")
    assert body["approval_id"] == "apr-3" and "apr-3" in body["message"] and r.headers["Retry-After"] == "15"


def test_a_private_destination_names_its_class_not_the_detail() -> None:
    o = Outcome(
        REQ, Action.DENY, Reason.PRIVATE_ADDRESS, status=403, private_class="loopback", detail="long detail"
    )
    assert "(loopback)" in json.loads(deny_response(o).content or b"")["message"]


def test_upstream_error_body() -> None:
    body = json.loads(upstream_error_body("x.test", 443, "connection refused"))
    assert body == {
        "error": "upstream_failed",
        "host": "x.test",
        "port": 443,
        "reason": "upstream_error",
        "message": "The destination was allowed but the upstream failed: connection refused",
    }


@pytest.mark.parametrize(
    ("status", "decision", "reason", "error"),
    [
        (400, "deny", "bad_request", "egress_denied"),
        (431, "deny", "bad_request", "egress_denied"),
        (502, "allow", "upstream_error", "upstream_failed"),
        (504, "allow", "upstream_error", "upstream_failed"),
    ],
)
def test_mitmproxys_own_pages_become_our_json_answers(
    status: int, decision: str, reason: str, error: str
) -> None:
    raw = http1_error_response(status, "Bad HTTP request line")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    assert headers["x-portcullis-decision"] == decision and headers["x-portcullis-reason"] == reason
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    doc = json.loads(body)
    assert doc["error"] == error and doc["reason"] == reason
    assert "Bad HTTP request line" in doc["message"]
    if decision == "deny":
        assert lines[0] == f"HTTP/1.1 {status} Blocked by Portcullis: bad_request (none)"
    assert json.loads(error_body(status, "Bad HTTP request line")) == doc
    assert h2_error_headers(status) == [
        (b"content-type", b"application/json"),
        (b"x-portcullis-decision", decision.encode()),
        (b"x-portcullis-reason", reason.encode()),
    ]


def test_an_empty_upstream_message_still_explains() -> None:
    assert "no response" in json.loads(error_body(502, ""))["message"]
