"""addons/approvals/model.py: the enums keep the contract's strings; the Approval row is built from the
pipeline's outcome once; how a stored approval ended."""

from __future__ import annotations

import pytest

from addons.approvals.model import Approval, Choice, DecideError, Scope, State, rfc3339
from addons.policy.model import Reason
from tests.approvals.approvals_support import request


@pytest.mark.parametrize(("enum", "values"), [
    (State, ["pending", "allowed", "denied", "expired"]),
    (Scope, ["once", "session", "task", "always"]),
    (Choice, ["allow", "deny"]),
])
def test_enum_values_are_the_contract_strings(enum, values):
    """The store, the admin API, events and webhooks carry exactly these strings (SPEC.md)."""
    assert [m.value for m in enum] == values
    assert [enum(v).value for v in values] == values
    with pytest.raises(ValueError):
        enum("forever")


@pytest.mark.parametrize(("choice", "state", "reason"), [
    (Choice.ALLOW, State.ALLOWED, Reason.APPROVED),
    (Choice.DENY, State.DENIED, Reason.APPROVAL_DENIED),
])
def test_a_choice_names_its_state_and_reason(choice, state, reason):
    assert (choice.state, choice.reason) == (state, reason)


def test_an_approval_is_built_from_the_pending_outcome_once():
    pending = request(host="api.example.org", port=8443, client="10.1.2.3", user="bob", client_name="ci",
                      scheme="http", method="POST", path="/upload", rule="ask-first", flow_id="f9")
    a = Approval.opened("apr_x", pending, now=1000.0, timeout=120.0)
    assert (a.id, a.client_key, a.client_address, a.client_name) == ("apr_x", "user:bob", "10.1.2.3", "ci")
    assert (a.host, a.port, a.scheme, a.method, a.path, a.rule) == (
        "api.example.org", 8443, "http", "POST", "/upload", "ask-first")
    assert (a.created_at, a.expires_at, a.state, a.decision, a.scope, a.notified) == (
        1000.0, 1120.0, State.PENDING, None, None, False)
    assert a.key == ("user:bob", "api.example.org", 8443)


def test_without_a_user_the_client_key_is_the_address_and_no_rule_is_none():
    a = Approval.opened("apr_y", request(client="10.0.0.7"), now=0.0, timeout=1.0)
    assert (a.client_key, a.rule, a.client_name) == ("10.0.0.7", None, None)


def test_how_a_stored_approval_ended():
    a = Approval.opened("apr_z", request(), now=0.0, timeout=10.0)
    assert a.ending is None
    assert a.expired(5.0).ending is Reason.APPROVAL_TIMEOUT
    assert a.expired(5.0).decided_at == 5.0 and a.expired(5.0).state is State.EXPIRED
    allowed = a.decided(Choice.ALLOW, Scope.SESSION, "ann", "ok", 3.0)
    assert (allowed.state, allowed.decision, allowed.scope, allowed.decided_by, allowed.reason,
            allowed.decided_at) == (State.ALLOWED, Choice.ALLOW, Scope.SESSION, "ann", "ok", 3.0)
    assert allowed.ending is Reason.APPROVED
    assert a.decided(Choice.DENY, Scope.ONCE, None, None, 3.0).ending is Reason.APPROVAL_DENIED


def test_decide_error_carries_status_code_message_and_the_standing_approval():
    a = Approval.opened("apr_e", request(), now=0.0, timeout=10.0)
    e = DecideError(409, "already_decided", "nothing changed", a)
    assert (e.status, e.code, e.message, e.approval, str(e)) == (409, "already_decided", "nothing changed", a,
                                                                 "nothing changed")


def test_rfc3339_is_utc_with_a_z():
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1700000000.9) == "2023-11-14T22:13:20Z"
