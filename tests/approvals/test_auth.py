"""addons/approvals/auth.py: the admin token check shared by the API and the page."""

from __future__ import annotations

import hashlib

import pytest

from addons.approvals.auth import NO_TOKEN, ApproverError, Principals, Role, token_ok
from addons.config.models import ApproverConfig


def test_token_comparison_refuses_empty_and_missing():
    assert token_ok("t", "t") and not token_ok("t", "u") and not token_ok(None, "") and not token_ok("", "")


def test_no_token_configured_lets_nobody_in_and_says_how_to_fix_it():
    assert not token_ok(None, None) and not token_ok("", "anything") and not token_ok("t", None)
    assert "PORTCULLIS_ADMIN_TOKEN" in NO_TOKEN and "admin.token_env" in NO_TOKEN


# ---- named approvers -------------------------------------------------------------------------

APPROVERS = [
    ApproverConfig(name="alice", token_env="ALICE_TOKEN"),
    ApproverConfig(name="bob", token_sha256=hashlib.sha256(b"bob-token").hexdigest(), role="admin"),
]


def test_each_token_names_its_owner_and_role():
    p = Principals("admin-token", APPROVERS, environ={"ALICE_TOKEN": "alice-token"})
    assert p.who("admin-token") == p.named("admin") and p.who("admin-token").role is Role.ADMIN
    alice = p.who("alice-token")
    assert alice is not None and (alice.name, alice.role) == ("alice", Role.APPROVER)
    bob = p.who("bob-token")
    assert bob is not None and (bob.name, bob.role) == ("bob", Role.ADMIN)
    assert p.who("mallory") is None and p.who("") is None and p.who(None) is None
    assert p.who(hashlib.sha256(b"bob-token").hexdigest()) is None  # the hash is not a token


def test_approvers_without_an_admin_token_and_a_missing_variable():
    p = Principals(None, APPROVERS[1:])
    assert p.configured and p.who("bob-token") is not None and p.who("admin-token") is None
    assert not Principals(None, []).configured
    with pytest.raises(ApproverError, match="ALICE_TOKEN is not set"):
        Principals(None, APPROVERS, environ={})


def test_the_page_key_is_the_same_for_the_same_tokens_and_changes_with_them():
    env = {"ALICE_TOKEN": "alice-token"}
    assert Principals("t", APPROVERS, env).key == Principals("t", APPROVERS, env).key
    assert Principals("t", APPROVERS, env).key != Principals("u", APPROVERS, env).key


def test_an_approver_needs_exactly_one_token_source():
    with pytest.raises(ValueError, match="exactly one of token_env and token_sha256"):
        ApproverConfig(name="x")
    with pytest.raises(ValueError, match="exactly one of token_env and token_sha256"):
        ApproverConfig(name="x", token_env="A", token_sha256="0" * 64)
