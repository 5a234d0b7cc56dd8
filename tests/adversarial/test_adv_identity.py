"""Identity tricks: forwarded-for headers of every flavour must not make a client a member of a
group it is not in, and Proxy-Authorization is strict (odd encodings are 407, never someone else)
and never forwarded upstream.
"""

from __future__ import annotations

import base64

import pytest

from tests.adversarial.adv import ForbiddenArrival, _ok, adv_config, case, proxy_fixture, run

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret-pw!"  # "reviewer:s3cret-pw!" needs base64 padding
CLIENTS = [
    {"name": "reviewer", "proxy_auth": {"user": "reviewer", "password_env": "ADV_REVIEWER_PW"}},
    {"name": "ci", "cidrs": ["10.1.0.0/16"]},
]


def _config(u, folder):
    return adv_config(u, folder, clients=CLIENTS)


proxy = proxy_fixture(
    "identity",
    [
        {"name": "reviewer-only", "action": "allow", "hosts": ["www.public.test"], "clients": ["reviewer"]},
        {"name": "ci-only", "action": "allow", "hosts": ["x.public.test"], "clients": ["ci"]},
        {"name": "public", "action": "allow", "hosts": ["public.test"]},
    ],
    _config,
    env={"ADV_REVIEWER_PW": PASSWORD},
)

B64 = base64.b64encode(f"reviewer:{PASSWORD}".encode()).decode()
assert B64.endswith("=")

FORWARDED = [
    case("x-forwarded-for", "X-Forwarded-For: 10.1.2.3"),
    case("x-forwarded-for-list", "X-Forwarded-For: 10.1.2.3, 127.0.0.1"),
    case("forwarded", "Forwarded: for=10.1.2.3"),
    case("forwarded-v6", 'Forwarded: for="[::ffff:10.1.2.3]"'),
    case("forwarded-by", "Forwarded: by=10.1.2.3;for=10.1.2.3;proto=https"),
    case("x-real-ip", "X-Real-IP: 10.1.2.3"),
    case("true-client-ip", "True-Client-IP: 10.1.2.3"),
    case("client-ip", "Client-IP: 10.1.2.3"),
    case("x-client-ip", "X-Client-IP: 10.1.2.3"),
    case("x-originating-ip", "X-Originating-IP: 10.1.2.3"),
    case("cf-connecting-ip", "CF-Connecting-IP: 10.1.2.3"),
    case("x-cluster-client-ip", "X-Cluster-Client-IP: 10.1.2.3"),
    case("via", "Via: 1.1 10.1.2.3"),
    case("proxy-protocol-line-as-header", "PROXY: TCP4 10.1.2.3 127.0.0.1 1 2"),
]


@pytest.mark.parametrize("header", FORWARDED)
def test_forwarded_headers_do_not_change_the_client(proxy, header):
    port = proxy.rec.http
    data = f"GET http://x.public.test:{port}/id HTTP/1.1\r\nHost: x.public.test:{port}\r\n{header}\r\n\r\n"
    w = run(proxy, lambda: proxy.send(data.encode()), "deny:default")
    assert w.decisions[0]["client"]["address"] == "127.0.0.1" and w.decisions[0]["client"]["name"] is None


AUTH = [
    case("correct", f"Basic {B64}", "allow"),
    case("scheme-lowercase", f"basic {B64}", "allow"),
    case("scheme-uppercase", f"BASIC {B64}", "allow"),
    case("two-spaces", f"Basic  {B64}", "allow"),
    case("unpadded", f"Basic {B64.rstrip('=')}", "deny:proxy_auth"),
    case("space-inside-base64", f"Basic {B64[:8]} {B64[8:]}", "deny:proxy_auth"),
    case("base64url-alphabet", "Basic " + base64.urlsafe_b64encode(b"reviewer:\xfb\xff").decode(),
         "deny:proxy_auth"),
    case("wrong-password", "Basic " + base64.b64encode(b"reviewer:nope").decode(), "deny:proxy_auth"),
    case("user-case", "Basic " + base64.b64encode(f"Reviewer:{PASSWORD}".encode()).decode(),
         "deny:proxy_auth"),
    case("empty-password", "Basic " + base64.b64encode(b"reviewer:").decode(), "deny:proxy_auth"),
    case("no-colon", "Basic " + base64.b64encode(b"reviewer").decode(), "deny:proxy_auth"),
    case("password-with-suffix", "Basic " + base64.b64encode(f"reviewer:{PASSWORD}x".encode()).decode(),
         "deny:proxy_auth"),
    case("nul-in-user", "Basic " + base64.b64encode(f"reviewer\x00:{PASSWORD}".encode()).decode(),
         "deny:proxy_auth"),
    case("latin1-user", "Basic " + base64.b64encode(f"rev\xe9wer:{PASSWORD}".encode("latin-1")).decode(),
         "deny:proxy_auth"),
    case("bearer", f"Bearer {B64}", "deny:proxy_auth"),
    case("digest", 'Digest username="reviewer"', "deny:proxy_auth"),
    case("scheme-only", "Basic", "deny:proxy_auth"),
    case("huge", "Basic " + "A" * 10000, "deny:proxy_auth"),
    case("right-then-wrong", f"Basic {B64}\r\nProxy-Authorization: Basic eDp5", "deny:proxy_auth"),
    case("wrong-then-right", f"Basic eDp5\r\nProxy-Authorization: Basic {B64}", "deny:proxy_auth"),
]


@pytest.mark.parametrize("via", ["http", "connect"])
@pytest.mark.parametrize(("value", "expect"), AUTH)
def test_proxy_authorization_encodings(proxy, value, expect, via):
    port = proxy.rec.http if via == "http" else proxy.rec.raw
    if via == "http":
        data = (f"GET http://www.public.test:{port}/auth HTTP/1.1\r\nHost: www.public.test:{port}\r\n"
                f"Proxy-Authorization: {value}\r\n\r\n")
    else:
        data = f"CONNECT www.public.test:{port} HTTP/1.1\r\nHost: www.public.test:{port}\r\n" \
               f"Proxy-Authorization: {value}\r\n\r\n"
    if via == "connect" and expect == "allow":
        m = proxy.mark()
        s, rep = proxy.tunnel(f"www.public.test:{port}", headers=f"Proxy-Authorization: {value}\r\n")
        s.close()
        w = proxy.window(m)
        assert rep.status == 200
        assert [(d["decision"], d["client"]["user"]) for d in w.decisions] == [("allow", "reviewer")]
        return
    w = run(proxy, lambda: proxy.send(data.encode("latin-1")), expect, forbid=b"s3cret")
    _ok(b"proxy-authorization" not in w.arrived.lower(), "Proxy-Authorization forwarded", ForbiddenArrival)
    if expect == "allow":
        assert w.decisions[0]["client"]["user"] == "reviewer"
    else:
        assert w.decisions[0]["client"]["user"] is None
        assert PASSWORD not in str(w.events)


def test_valid_credentials_do_not_open_another_groups_hosts(proxy):
    port = proxy.rec.http
    data = (f"GET http://x.public.test:{port}/id HTTP/1.1\r\nHost: x.public.test:{port}\r\n"
            f"Proxy-Authorization: Basic {B64}\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n")
    w = run(proxy, lambda: proxy.send(data.encode()), "deny:default")
    assert w.decisions[0]["client"]["user"] == "reviewer"


def test_origin_authorization_is_not_proxy_identity(proxy):
    port = proxy.rec.http
    data = (f"GET http://www.public.test:{port}/id HTTP/1.1\r\nHost: www.public.test:{port}\r\n"
            f"Authorization: Basic {B64}\r\n\r\n")
    run(proxy, lambda: proxy.send(data.encode()), "deny:default", forbid=b"s3cret")


def test_credentials_on_an_allowed_request_for_everyone_are_not_forwarded(proxy):
    port = proxy.rec.http
    data = (f"GET http://public.test:{port}/id HTTP/1.1\r\nHost: public.test:{port}\r\n"
            f"Proxy-Authorization: Basic {B64}\r\n\r\n")
    w = run(proxy, lambda: proxy.send(data.encode()), "allow")
    assert b"proxy-authorization" not in w.arrived.lower() and B64.encode() not in w.arrived
