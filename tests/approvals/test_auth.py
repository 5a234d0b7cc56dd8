"""addons/approvals/auth.py: the admin token check shared by the API and the page."""

from __future__ import annotations

from addons.approvals.auth import NO_TOKEN, token_ok


def test_token_comparison_refuses_empty_and_missing():
    assert token_ok("t", "t") and not token_ok("t", "u") and not token_ok(None, "") and not token_ok("", "")


def test_no_token_configured_lets_nobody_in_and_says_how_to_fix_it():
    assert not token_ok(None, None) and not token_ok("", "anything") and not token_ok("t", None)
    assert "PORTCULLIS_ADMIN_TOKEN" in NO_TOKEN and "admin.token_env" in NO_TOKEN
