"""Small pure pieces of the proxy: proxy auth, authority parsing, denial responses, first bytes."""

from __future__ import annotations

import base64
import json

import pytest

from addons.policy.authority import AuthorityError, same_destination, split_authority
from addons.policy.config import Config
from addons.proxy.auth import AuthConfigError, AuthResult, ProxyAuth
from addons.proxy.responses import deny_response, upstream_error_response

CFG = Config.model_validate(
    {
        "clients": [
            {"name": "rev", "proxy_auth": {"user": "rev", "password_env": "PW"}},
            {"name": "ci", "cidrs": ["10.1.0.0/16"], "proxy_auth": {"user": "ci", "password_env": "CI_PW"}},
            {"name": "plain", "cidrs": ["10.2.0.0/16"]},
        ]
    }
)


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


@pytest.mark.parametrize(
    ("header", "addr", "want"),
    [
        (None, "10.9.0.1", (AuthResult.NONE, None)),
        (None, "10.2.0.1", (AuthResult.NONE, None)),
        (None, "10.1.0.1", (AuthResult.BAD, None)),  # a group with cidrs + proxy_auth requires credentials
        (None, "::ffff:10.1.0.1", (AuthResult.BAD, None)),
        (basic("rev", "pw1"), "10.9.0.1", (AuthResult.OK, "rev")),
        (basic("ci", "pw2"), "10.1.0.1", (AuthResult.OK, "ci")),
        (basic("rev", "pw2"), "10.9.0.1", (AuthResult.BAD, None)),  # another user's password
        (basic("nobody", "pw1"), "10.9.0.1", (AuthResult.BAD, None)),
        ("Basic !!!notbase64", "10.9.0.1", (AuthResult.BAD, None)),
        ("Basic " + base64.b64encode(b"nocolon").decode(), "10.9.0.1", (AuthResult.BAD, None)),
        ("Digest abc", "10.9.0.1", (AuthResult.BAD, None)),
        ("Basic", "10.9.0.1", (AuthResult.BAD, None)),
    ],
)
def test_proxy_auth(header, addr, want):
    auth = ProxyAuth(CFG, environ={"PW": "pw1", "CI_PW": "pw2"})
    assert auth.check(header, addr) == want


def test_proxy_auth_needs_every_password():
    with pytest.raises(AuthConfigError, match="CI_PW"):
        ProxyAuth(CFG, environ={"PW": "pw1"})


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("a.test", ("a.test", None)),
        ("a.test:80", ("a.test", 80)),
        ("[::1]:443", ("[::1]", 443)),
        ("[::1]", ("[::1]", None)),
    ],
)
def test_split_authority(raw, want):
    assert split_authority(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "a.test:",
        "a.test:0",
        "a.test:65536",
        "a.test:+80",
        "::1",
        "a b:80",
        "a.test:80/x",
        "u@a.test:80",
        "[::1",
        "[::1]x",
        "a.test:८०",
    ],
)
def test_split_authority_rejects(raw):
    with pytest.raises(AuthorityError):
        split_authority(raw)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("public.test", True),
        ("PUBLIC.TEST.", True),
        ("public.test:80", True),
        ("public.test:8080", False),
        ("evil.test", False),
        ("public.test.evil.test", False),
        ("public.test@evil.test", False),
        ("", False),
    ],
)
def test_same_destination(header, ok):
    assert same_destination(header, "public.test", 80, "http") is ok


def test_deny_response_shape():
    r = deny_response("rule", "x.test", 443, rule="no-x", retry_after=30)
    assert r.status_code == 403 and r.reason == "Blocked by Portcullis: rule (no-x)"
    assert r.headers["X-Portcullis-Decision"] == "deny" and r.headers["X-Portcullis-Reason"] == "rule"
    assert r.headers["Retry-After"] == "30"
    body = json.loads(r.content or b"")
    assert set(body) == {"error", "host", "port", "reason", "rule", "approval_id", "message"}
    assert body["message"].endswith(".")
    r407 = deny_response("proxy_auth", "x.test", 443, status=407)
    assert r407.status_code == 407 and r407.headers["Proxy-Authenticate"].startswith("Basic")
    r502 = upstream_error_response("x.test", 443, "refused")
    assert r502.status_code == 502 and r502.headers["X-Portcullis-Decision"] == "allow"
