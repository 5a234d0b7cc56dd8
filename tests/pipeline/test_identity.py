"""addons/pipeline/identity.py: Proxy-Authorization (Basic) per client group, the startup check that every
password variable is set, and the refusal of clients on public addresses."""

from __future__ import annotations

import base64

import pytest

from addons.config.models import Config
from addons.pipeline.identity import AuthConfigError, AuthResult, ProxyAuth, public_client_refusal

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


def test_no_proxy_auth_configured() -> None:
    auth = ProxyAuth(Config(), environ={})
    assert not auth.enabled
    assert auth.check(None, "10.1.0.1") == (AuthResult.NONE, None)
    assert auth.check(basic("rev", "pw1"), "10.1.0.1") == (AuthResult.BAD, None)  # nobody to be


def test_enabled_and_every_missing_variable_named() -> None:
    assert ProxyAuth(CFG, environ={"PW": "pw1", "CI_PW": "pw2"}).enabled
    with pytest.raises(AuthConfigError) as e:
        ProxyAuth(CFG, environ={"PW": ""})
    assert "PW" in str(e.value) and "CI_PW" in str(e.value) and "'rev'" in str(e.value)


@pytest.mark.parametrize("addr", [None, "not-an-ip", "fe80::1%eth0"])
def test_odd_client_addresses_do_not_require_credentials(addr: str | None) -> None:
    auth = ProxyAuth(CFG, environ={"PW": "pw1", "CI_PW": "pw2"})
    assert auth.check(None, addr) == (AuthResult.NONE, None)


@pytest.mark.parametrize(
    ("peer", "cidrs", "refused"),
    [
        (("8.8.8.8", 1), [], True),
        (("2001:4860::8888", 1), [], True),
        (("::ffff:8.8.8.8", 1), [], True),
        (("8.8.8.8", 1), ["8.8.8.0/24"], False),
        (("2001:4860::8888", 1), ["8.8.8.0/24"], True),  # another address family
        (("10.1.2.3", 1), [], False),
        (("127.0.0.1", 1), [], False),
        (("fe80::1%eth0", 1), [], False),
        (("not-an-ip", 1), [], False),
        (None, [], False),
        ((), [], False),
    ],
)
def test_public_client_refusal(peer: tuple[str, int] | None, cidrs: list[str], refused: bool) -> None:
    import ipaddress

    why = public_client_refusal(peer, [ipaddress.ip_network(c) for c in cidrs])
    assert (why is not None) is refused
    if why is not None:
        assert "clients: cidrs" in why and "8" in why
