"""Host spellings and normalisation, homographs, and wildcard look-alikes, as plain HTTP and CONNECT.

Spellings are attacked on a deny-list proxy (default allow, `blocked.test` denied): a spelling that
escapes normalisation would be allowed and reach the upstream. Look-alikes are attacked on an
allow-list proxy (default deny): a look-alike that matched an allow rule would reach the upstream.
"""

from __future__ import annotations

import pytest

from tests.adversarial.adv import Adv, Outcome, adv_config, case, proxy_fixture, run

pytestmark = pytest.mark.e2e



def _deny_list(u, folder):
    return adv_config(u, folder, default_action="allow")


denylist = proxy_fixture(
    "denylist",
    [{"name": "no-blocked", "action": "deny", "hosts": ["blocked.test", "127.0.0.3"]}],
    _deny_list,
)
allowlist = proxy_fixture(
    "allowlist",
    [
        {"name": "public", "action": "allow", "hosts": ["public.test"]},
        {"name": "wild", "action": "allow", "hosts": ["*.wild.test"]},
        {"name": "apex", "action": "allow", "hosts": ["**.apex.test"]},
        {"name": "idn", "action": "allow", "hosts": ["bücher.test"]},
        {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
    ],
)


def attempt(adv: Adv, host: str, via: str) -> Outcome:
    """The host as the target of a plain request (absolute-form, same Host) or of a CONNECT."""
    port = adv.rec.http if via == "http" else adv.rec.raw
    if via == "http":
        data = f"GET http://{host}:{port}/h HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    else:
        data = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    out = adv.send(data.encode("utf-8"), timeout=3)
    return out


LONG_LABEL = "a" * 64 + ".blocked.test"
LONG_NAME = ".".join(["b" * 63] * 4) + ".blocked.test"  # 256 + characters

# (host, expected). Every one of these names blocked.test in some spelling: must never arrive.
SPELLINGS = [
    case("plain", "blocked.test", "deny:rule"),
    case("upper", "BLOCKED.TEST", "deny:rule"),
    case("mixed-case", "BlOcKeD.TeSt", "deny:rule"),
    case("trailing-dot", "blocked.test.", "deny:rule"),
    case("upper-trailing-dot", "BLOCKED.TEST.", "deny:rule"),
    case("two-trailing-dots", "blocked.test..", "deny:bad_request:4xx"),
    case("leading-dot", ".blocked.test", "deny:bad_request:4xx"),
    case("inner-empty-label", "blocked..test", "deny:bad_request:4xx"),
    case("ideographic-dot", "blocked\u3002test", "deny:bad_request:4xx"),
    case("fullwidth-dot", "blocked\uff0etest", "deny:bad_request:4xx"),
    case("halfwidth-dot", "blocked\uff61test", "deny:bad_request:4xx"),
    case("fullwidth-letters", "\uff42\uff4c\uff4f\uff43\uff4b\uff45\uff44.test", "deny:bad_request:4xx"),
    case("soft-hyphen", "blocked\u00ad.test", "deny:bad_request:4xx"),
    case("zero-width-space", "block\u200bed.test", "deny:bad_request:4xx"),
    case("bad-punycode", "xn--blocked-.test", "deny:bad_request:4xx"),
    case("label-64", LONG_LABEL, "deny:bad_request:4xx"),
    case("name-over-253", LONG_NAME, "deny:bad_request:4xx"),
    case("trailing-hyphen-label", "blocked-.test", "deny:bad_request"),
    case("leading-hyphen-label", "-blocked.test", "deny:bad_request"),
    case("wildcard-literal", "*.blocked.test", "deny:bad_request:4xx"),
    case("percent-dot", "blocked%2etest", "deny:bad_request:4xx"),
    case("percent-letter", "%62locked.test", "deny:bad_request:4xx"),
]


@pytest.mark.parametrize("via", ["http", "connect"])
@pytest.mark.parametrize(("host", "expect"), SPELLINGS)
def test_spellings_of_a_denied_name(denylist, host, expect, via):
    run(denylist, lambda: attempt(denylist, host, via), expect)


# Look-alikes of allowed names (allow-list proxy): each must be judged as the name it really is.
LOOKALIKES = [
    case("exact", "public.test", "allow"),
    case("exact-upper-dot", "PUBLIC.TEST.", "allow"),
    case("suffix-glued", "evilpublic.test", "deny:default"),
    case("allowed-as-prefix", "public.test.evil.test", "deny:default"),
    case("subdomain-of-exact", "x.public.test", "deny:default"),
    case("below-apex", "wild.test", "deny:default"),
    case("below-one", "a.wild.test", "allow"),
    case("below-two", "b.a.wild.test", "allow"),
    case("below-glued", "evilwild.test", "deny:default"),
    case("below-as-prefix", "wild.test.evil.test", "deny:default"),
    case("below-deep-prefix", "a.wild.test.evil.test", "deny:default"),
    case("apex-rule-apex", "apex.test", "allow"),
    case("apex-rule-sub", "x.apex.test", "allow"),
    case("apex-rule-glued", "xapex.test", "deny:default"),
    case("idn-a-label", "xn--bcher-kva.test", "allow"),
    case("idn-a-label-upper", "XN--BCHER-KVA.TEST", "allow"),
    case("idn-u-label", "bücher.test", "deny:bad_request:4xx"),
    case("homograph-cyrillic-es", "publi\u0441.test", "deny:bad_request:4xx"),
    case("homograph-cyrillic-er", "\u0440ublic.test", "deny:bad_request:4xx"),
    case("homograph-punycode", "xn--publi-4ve.test", "deny:default"),
    case("homograph-greek-omicron-idn", "xn--bcher-kva.test.xn--pblic-mva.test", "deny:default"),
    case("underscore-lookalike", "public_test", "deny:default"),
    case("denied-under-wildcard-rule", "blocked.test", "deny:rule"),
]


@pytest.mark.parametrize("via", ["http", "connect"])
@pytest.mark.parametrize(("host", "expect"), LOOKALIKES)
def test_wildcard_and_homograph_lookalikes(allowlist, host, expect, via):
    def go() -> Outcome:
        out = attempt(allowlist, host, via)
        return out

    if via == "connect" and expect == "allow":
        # An allowed CONNECT answers 200 and opens a tunnel (nothing is sent through it here).
        w = run_tunnel_allowed(allowlist, host)
        assert [d["decision"] for d in w.decisions] == ["allow"]
        return
    run(allowlist, go, expect, forbid=b"evil")


def run_tunnel_allowed(adv: Adv, host: str):
    m = adv.mark()
    s, rep = adv.tunnel(f"{host}:{adv.rec.raw}")
    s.close()
    assert rep.status == 200, (rep.status, rep.body[:200])
    return adv.window(m)
