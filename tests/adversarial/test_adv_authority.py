"""Authority parsing: userinfo, backslashes, percent-encoding, whitespace and control bytes, brackets
and port edge cases, in the three places an authority is read: the absolute-form target (with the
same Host), the Host header of an origin-form request, and the CONNECT target.

Every authority here either names public.test/127.0.0.2 on the right port (and is let through to
exactly that), or is refused; `blocked.test` never arrives.
"""

from __future__ import annotations

import pytest

from tests.adversarial.adv import Adv, Outcome, proxy_fixture, run

pytestmark = pytest.mark.e2e

proxy = proxy_fixture(
    "authority",
    [
        {"name": "public", "action": "allow", "hosts": ["public.test", "127.0.0.2"]},
        {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test", "127.0.0.3"]},
    ],
)

BAD = "deny:bad_request:4xx"
U = "unparsable"  # refused as malformed (mitmproxy's parser or ours): one logged bad_request
TUNNEL = "tunnel"  # a CONNECT to exactly public.test / 127.0.0.2 on the right port: 200, one allow

# authority ({P} = the recorder's port): expectation for (absolute-form, Host header, CONNECT)
TABLE: list[tuple[str, str, tuple[str, str, str]]] = [
    ("userinfo-allowed-first", "public.test@blocked.test:{P}", (U, U, U)),
    ("userinfo-denied-first", "blocked.test@public.test:{P}", (U, U, U)),
    ("userinfo-with-port", "public.test:{P}@blocked.test", (U, U, U)),
    ("backslash-at", "blocked.test\\@public.test:{P}", (U, U, U)),
    ("backslash-path", "public.test\\blocked.test:{P}", (U, U, U)),
    ("percent-dot", "blocked%2etest:{P}", (U, U, U)),
    ("percent-letter", "%62locked.test:{P}", (U, U, U)),
    ("percent-nul", "public.test%00.blocked.test:{P}", (U, U, U)),
    ("semicolon", "public.test;blocked.test:{P}", (U, U, U)),
    ("comma", "public.test,blocked.test:{P}", (U, U, U)),
    ("space-before-port", "public.test :{P}", (U, U, U)),
    ("tab-before-port", "public.test\t:{P}", (U, U, U)),
    ("two-authorities", "blocked.test:{P} public.test:{P}", (U, U, U)),
    ("control-byte", "public.test\x01:{P}", (U, U, U)),
    ("del-byte", "public.test\x7f:{P}", (U, U, U)),
    ("nul-after-port", "public.test:{P}\x00", (U, U, U)),
    ("fragment", "blocked.test:{P}#x", (U, U, U)),
    ("query", "blocked.test:{P}?x", (U, U, U)),
    ("path-in-host", "blocked.test:{P}/x", ("deny:host_mismatch", U, U)),
    ("name-after-port", "public.test:{P}.blocked.test", (U, U, U)),
    ("trailing-dot-denied", "blocked.test.:{P}", ("deny:rule", "deny:rule", "deny:rule")),
    ("port-zero", "public.test:0", (U, U, U)),  # no destination: malformed, not a mismatch
    ("port-65536", "public.test:65536", (U, U, U)),
    ("port-99999", "public.test:99999", (U, U, U)),
    ("port-negative", "public.test:-1", (U, U, U)),
    ("port-plus", "public.test:+{P}", (U, U, U)),
    ("port-empty", "public.test:", (U, U, U)),
    ("port-twice", "public.test:{P}:{P}", (U, U, U)),
    ("port-exponent", "public.test:1e3", (U, U, U)),
    ("port-leading-zero", "public.test:0{P}", ("deny:host_mismatch", "deny:host_mismatch", TUNNEL)),
    ("port-fullwidth-digits", "public.test:\uff18\uff10", (U, "deny:host_mismatch", U)),  # ASCII digits only
    ("brackets-around-name", "[public.test]:{P}", (U, "deny:host_mismatch", U)),  # brackets: IPv6 only
    ("brackets-around-v4", "[127.0.0.2]:{P}", (U, "deny:host_mismatch", U)),
    ("brackets-around-v6", "[::ffff:127.0.0.2]:{P}", ("allow", "allow", TUNNEL)),
    ("mapped-v6-denied", "[::ffff:127.0.0.3]:{P}", ("deny:rule", "deny:rule", "deny:rule")),
    ("unclosed-bracket", "[::1", (U, U, U)),
    ("v6-without-brackets", "::1:{P}", (U, U, U)),
]


def _params() -> list:
    out = []
    for name, authority, expects in TABLE:
        for via, exp in zip(("url", "host", "connect"), expects, strict=True):
            expect = BAD if exp == U else exp
            out.append(pytest.param(authority, via, expect, id=f"{name}-{via}"))
    return out


def attempt(adv: Adv, authority: str, via: str) -> Outcome:
    if via == "url":
        data = f"GET http://{authority}/au HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    elif via == "host":
        data = f"GET /au HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    else:
        data = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    return adv.send(data.encode("utf-8"), timeout=3)


@pytest.mark.parametrize(("authority", "via", "expect"), _params())
def test_authority_parsing(proxy, authority, via, expect):
    a = authority.replace("{P}", str(proxy.rec.http))
    if expect == TUNNEL:
        m = proxy.mark()
        s, rep = proxy.tunnel(a.replace("{P}", str(proxy.rec.http)))
        s.close()
        w = proxy.window(m)
        assert rep.status == 200, rep.status
        (d,) = w.decisions
        assert d["decision"] == "allow" and d["destination"]["port"] == proxy.rec.http
        assert d["destination"]["host"] in ("public.test", "127.0.0.2")
        return
    run(proxy, lambda: attempt(proxy, a, via), expect)
