"""Proxy loops: the proxy's own listening and admin addresses, by every spelling and by name, even
where the rules and network.allow_cidrs allow the address. A loop that got through would reach the
proxy again and show up as a second decision (the one-decision oracle) or reach the admin API.
"""

from __future__ import annotations

import pytest

from tests.adversarial.adv import Adv, Outcome, adv_config, case, proxy_fixture, run

pytestmark = pytest.mark.e2e


def _config(u, folder):
    cfg = adv_config(u, folder)
    cfg["network"]["allow_cidrs"] = ["127.0.0.0/8"]  # even then: never the proxy itself
    cfg["network"]["resolve"]["self.test"] = "127.0.0.1"
    return cfg


proxy = proxy_fixture(
    "loops",
    [{"name": "everything", "action": "allow",
      "hosts": ["**.test", "localhost", "127.0.0.0/8", "::1", "::ffff:0:0/96"]}],
    _config,
)

SPELLINGS = [
    case("v4", "127.0.0.1"),
    case("short", "127.1"),
    case("decimal", "2130706433"),
    case("hex", "0x7f000001"),
    case("octal", "0177.0.0.1"),
    case("v6", "[::1]"),
    case("v6-mapped", "[::ffff:127.0.0.1]"),
    case("v6-mapped-hex", "[::ffff:7f00:1]"),
    case("localhost", "localhost"),
    case("name-to-it", "self.test"),
    case("other-loopback", "127.0.0.2"),
    case("other-loopback-decimal", "2130706434"),
    case("other-loopback-far", "127.200.1.1"),
    case("name-to-other-loopback", "public.test"),
    case("trailing-dot", "public.test."),
]


def attempt(adv: Adv, host: str, port: int, via: str) -> Outcome:
    if via == "http":
        data = f"GET http://{host}:{port}/approvals HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    elif via == "origin":
        data = f"GET /approvals HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    else:
        data = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    return adv.send(data.encode(), timeout=3)


@pytest.mark.parametrize("via", ["http", "origin", "connect"])
@pytest.mark.parametrize("which", ["listen", "admin"])
@pytest.mark.parametrize("host", SPELLINGS)
def test_the_proxy_never_connects_to_itself(proxy, host, which, via):
    port = proxy.p.port if which == "listen" else proxy.p.admin_port
    w = run(proxy, lambda: attempt(proxy, host, port, via), "deny:private_address", forbid=None)
    (d,) = w.decisions
    assert d["destination"]["port"] == port


def test_a_nested_proxy_request_in_the_path_is_still_one_refusal(proxy):
    port = proxy.p.port
    inner = f"http://public.test:{port}/http://blocked.test/"
    run(proxy, lambda: proxy.send(
        f"GET http://public.test:{port}/{inner} HTTP/1.1\r\nHost: public.test:{port}\r\n\r\n".encode()),
        "deny:private_address", forbid=None)


def test_another_loopback_port_is_allowed(proxy):
    """The control: the same spellings on a port that is not the proxy's reach the upstream."""
    run(proxy, lambda: attempt(proxy, "public.test", proxy.rec.http, "http"), "allow", forbid=None)
