"""IP literals in every spelling, IPv6 forms and zone ids, loopback by literal and by name, and mixed
DNS answers, on a deny-list proxy (default allow): a spelling that escaped canonicalisation would be
allowed. Non-loopback destinations are in test_adv_netns.py (inside a network namespace).

The `loop` recorder listens on the same port on 127.0.0.2, 127.0.0.1 and ::1, so a request that
slipped through to loopback would be recorded, not just refused by an empty port.
"""

from __future__ import annotations

import pytest

from tests.adversarial.adv import Adv, Outcome, adv_config, case, proxy_fixture, run

pytestmark = pytest.mark.e2e

STATIC = {
    "self.test": "127.0.0.1",
    "mixed.test": ["127.0.0.2", "127.0.0.1"],
    "mixed-reversed.test": ["127.0.0.1", "127.0.0.2"],
    "loopback-last.test": ["127.0.0.2", "127.0.0.2", "127.9.9.9"],
    "v6-loopback.test": ["::1"],
    "v4-and-v6-loopback.test": ["127.0.0.2", "::1"],
    "mapped-loopback.test": ["::ffff:127.0.0.1"],
    "public-ip.test": "127.0.0.2",
    "denied-ip.test": "127.0.0.3",
}


def _config(u, folder):
    cfg = adv_config(u, folder, default_action="allow")
    cfg["network"]["resolve"].update(STATIC)
    return cfg


proxy = proxy_fixture(
    "ip",
    [
        {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test", "127.0.0.3"]},
        {"name": "allow-everything-loopback", "action": "allow", "hosts": ["127.0.0.0/8", "::1"]},
    ],
    _config,
)


def attempt(adv: Adv, host: str, via: str, port: int) -> Outcome:
    if via == "http":
        data = f"GET http://{host}:{port}/ip HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    else:
        data = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    return adv.send(data.encode(), timeout=3)


# 127.0.0.3 is denied by an IP rule: every spelling of it must be denied by that rule.
DENIED_IP = [
    case("dotted", "127.0.0.3"),
    case("decimal", "2130706435"),
    case("hex", "0x7f000003"),
    case("hex-upper", "0X7F000003"),
    case("hex-dotted", "0x7f.0x0.0x0.0x3"),
    case("hex-first-part", "0x7f.0.0.3"),
    case("octal-dotted", "0177.0.0.03"),
    case("octal-whole", "017700000003"),
    case("leading-zeros", "127.000.000.003"),
    case("two-parts", "127.3"),
    case("three-parts", "127.0.3"),
    case("trailing-dot", "127.0.0.3."),
    case("mapped-v6", "[::ffff:127.0.0.3]"),
    case("mapped-v6-hex", "[::ffff:7f00:3]"),
    case("mapped-v6-long", "[0:0:0:0:0:ffff:7f00:3]"),
    case("mapped-v6-upper", "[::FFFF:7F00:3]"),
    case("mapped-v6-zone", "[::ffff:127.0.0.3%25eth0]"),
    case("name-resolving-to-it", "denied-ip.test"),
]


@pytest.mark.parametrize("via", ["http", "connect"])
@pytest.mark.parametrize("host", DENIED_IP)
def test_spellings_of_a_denied_ip(proxy, host, via):
    port = proxy.rec.http3 if via == "http" else proxy.rec.raw3
    run(proxy, lambda: attempt(proxy, host, via, port), "deny:rule", forbid=None)


# Loopback in every spelling and by name: private_address, even though a rule allows 127/8 and ::1
# (allow_cidrs names only 127.0.0.2 and 127.0.0.3).
LOOPBACK = [
    case("dotted", "127.0.0.1"),
    case("short", "127.1"),
    case("decimal", "2130706433"),
    case("hex", "0x7f000001"),
    case("octal", "0177.0.0.1"),
    case("octal-whole", "017700000001"),
    case("leading-zeros", "127.000.000.001"),
    case("trailing-dot", "127.0.0.1."),
    case("other-loopback", "127.254.254.254"),
    case("v6", "[::1]"),
    case("v6-long", "[0:0:0:0:0:0:0:1]"),
    case("v6-zone", "[::1%25lo]"),
    case("v6-mapped", "[::ffff:127.0.0.1]"),
    case("v6-mapped-hex", "[::ffff:7f00:1]"),
    case("v6-mapped-other", "[::ffff:127.1.2.3]"),
    case("localhost", "localhost"),
    case("localhost-upper-dot", "LOCALHOST."),
    case("below-localhost", "api.localhost"),
    case("name-to-127.0.0.1", "self.test"),
    case("mixed-answers", "mixed.test"),
    case("mixed-answers-reversed", "mixed-reversed.test"),
    case("loopback-last-answer", "loopback-last.test"),
    case("v6-loopback-answer", "v6-loopback.test"),
    case("v4-public-v6-loopback", "v4-and-v6-loopback.test"),
    case("mapped-loopback-answer", "mapped-loopback.test"),
]


@pytest.mark.parametrize("via", ["http", "connect"])
@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_by_literal_and_by_name(proxy, host, via):
    run(proxy, lambda: attempt(proxy, host, via, proxy.rec.loop), "deny:private_address", forbid=None)


ALLOWED = [
    case("dotted", "127.0.0.2"),
    case("decimal", "2130706434"),
    case("short", "127.2"),
    case("mapped-v6", "[::ffff:127.0.0.2]"),
    case("name", "public-ip.test"),
]


@pytest.mark.parametrize("host", ALLOWED)
def test_spellings_of_an_allowed_ip_reach_only_it(proxy, host):
    """The positive control: the same spellings of an allowed address are let through, to it."""
    w = run(proxy, lambda: attempt(proxy, host, "http", proxy.rec.loop), "allow", forbid=None)
    assert len(w.conns) == 1 and w.decisions[0]["destination"]["ip"] == "127.0.0.2"
