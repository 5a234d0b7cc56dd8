"""addons/pipeline/identity.py: Proxy-Authorization (Basic) per client group, the startup check that every
password variable is set, and the refusal of clients on public addresses."""

from __future__ import annotations

import base64

import pytest

from addons.config.models import Config
from addons.pipeline.identity import AuthConfigError, AuthResult, ProxyAuth

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
