"""addons/policy/hosts.py: host normalisation, IP literal spellings, registrable domains,
the pattern grammar; and hypothesis properties (idempotent normalisation, IP spellings)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from addons.policy.hosts import (
    HostError,
    is_ip,
    normalize_host,
    parse_pattern,
    registered_domain,
)

NORMALISE = [
    # names: case, trailing dot, unicode dots, IDNA
    ("example.com", "example.com"),
    ("EXAMPLE.COM", "example.com"),
    ("Example.Com.", "example.com"),
    ("pypi.org.", "pypi.org"),
    ("a.b.c.d.e.example.com", "a.b.c.d.e.example.com"),
    ("example。com", "example.com"),
    ("example．com", "example.com"),
    ("example｡com", "example.com"),
    ("ｅｘａｍｐｌｅ.com", "example.com"),
    ("Bücher.de", "xn--bcher-kva.de"),
    ("BÜCHER.DE", "xn--bcher-kva.de"),
    ("bücher.de.", "xn--bcher-kva.de"),
    ("xn--bcher-kva.de", "xn--bcher-kva.de"),
    ("XN--BCHER-KVA.DE", "xn--bcher-kva.de"),
    ("münchen.example", "xn--mnchen-3ya.example"),
    ("пример.рф", "xn--e1afmkfd.xn--p1ai"),
    ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
    ("ⓔxample.com", "example.com"),
    ("exa\u200bmple.com", "example.com"),  # zero-width space is mapped away by UTS 46
    ("faß.de", "xn--fa-hia.de"),  # non-transitional: ß stays
    ("a-b.example", "a-b.example"),
    ("a--b.example", "a--b.example"),
    ("r3---sn-abc.googlevideo.com", "r3---sn-abc.googlevideo.com"),
    ("under_score.example.com", "under_score.example.com"),
    ("localhost", "localhost"),
    ("LOCALHOST.", "localhost"),
    ("x", "x"),
    ("123abc.example", "123abc.example"),
    ("example.com1", "example.com1"),
    ("1.example", "1.example"),
    # IPv4 in every spelling
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0X7F000001", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("0177.0.0.01", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("0x7f.0x0.0x0.0x1", "127.0.0.1"),
    ("0x7f.0.0x0.01", "127.0.0.1"),
    ("127.000.000.001", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("0x0", "0.0.0.0"),
    ("0.0.0.0", "0.0.0.0"),
    ("10.1", "10.0.0.1"),
    ("167772161", "10.0.0.1"),
    ("0xa9fea9fe", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),
    ("169.254.43518", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("4294967295", "255.255.255.255"),
    ("8.8.8.8", "8.8.8.8"),
    ("１２７.０.０.１", "127.0.0.1"),
    ("127。0。0。1", "127.0.0.1"),
    # IPv6: brackets, zones, case, mapped v4 becomes v4
    ("::1", "::1"),
    ("[::1]", "::1"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    ("0000:0000:0000:0000:0000:0000:0000:0001", "::1"),
    ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ("::ffff:127.0.0.1", "127.0.0.1"),
    ("[::ffff:7f00:1]", "127.0.0.1"),
    ("[::FFFF:7F00:0001]", "127.0.0.1"),
    ("[::ffff:a9fe:a9fe]", "169.254.169.254"),
    ("[fe80::1%eth0]", "fe80::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("[fe80::1%25eth0]", "fe80::1"),
    ("[2001:DB8::1]", "2001:db8::1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("[fd00:ec2::254]", "fd00:ec2::254"),
    ("[64:ff9b::a9fe:a9fe]", "64:ff9b::a9fe:a9fe"),
    ("[::]", "::"),
]


@pytest.mark.parametrize(("raw", "want"), NORMALISE, ids=[f"{r!r}" for r, _ in NORMALISE])
def test_normalize_host(raw: str, want: str) -> None:
    assert normalize_host(raw) == want
    assert normalize_host(want) == want  # idempotent


BAD_HOSTS = [
    "",
    " ",
    " example.com",
    "example.com ",
    "exa mple.com",
    "example..com",
    ".example.com",
    "a.b..",
    "-example.com",
    "example-.com",
    "ex@mple.com",
    "user@example.com",
    "example.com/path",
    "example.com?x",
    "example.com#f",
    "example.com\\x",
    "example.com:443",
    "exa%6dple.com",
    "exam!ple.com",
    "exa*mple.com",
    "*.example.com",
    "a" * 64 + ".com",
    ".".join(["abcdefghi"] * 26) + ".com",
    "xn--zz.com",
    "1.2.3.4.5",
    "1.2.3.256",
    "256.1.1.1",
    "4294967296",
    "0x100000000",
    "08.1.1.1",
    "0x7g.0.0.1",
    "1.2.3.0x",
    "127.0.0.1..",
    "foo.123",
    "example.0x7f",
    "[::1",
    "::1]",
    "[example.com]",
    "[1::2::3]",
    "[::ffff:1.2.3.4.5]",
    "fe80::1%",
    "12345::1",
    "[]",
    "exam\tple.com",
    "exam\nple.com",
    "é..com",
    "9" * 5000,
    "9" * 20,
    "0x" + "f" * 40,
    "a." * 600 + "com",
    # punycode CPython's decoder overflows on (OverflowError, found by ./dev fuzz requestline)
    "xn--hk0sxn--mmheR-k" + "0" * 15 + "1siie",
    "a.xn--hk0sxn--mmher-k" + "0" * 15 + "1siie.test",
    "xn--hk0sxn--mmheR-k" + "0" * 100 + "1siie",
]


@pytest.mark.parametrize("raw", BAD_HOSTS, ids=[repr(b)[:60] for b in BAD_HOSTS])
def test_normalize_host_rejects(raw: str) -> None:
    with pytest.raises(HostError) as e:
        normalize_host(raw)
    assert str(e.value)  # a message a person can read
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("fe80::1", True),
        ("8.8.8.8", True),
        ("example.com", False),
        ("1.example", False),
        ("example.com1", False),
        ("localhost", False),
        ("", False),
    ],
)
def test_is_ip(host: str, want: bool) -> None:
    assert is_ip(host) is want


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("example.com", "example.com"),
        ("a.b.example.com", "example.com"),
        ("www.bbc.co.uk", "bbc.co.uk"),
        ("alice.github.io", "alice.github.io"),
        ("a.alice.github.io", "alice.github.io"),
        ("bucket.s3.amazonaws.com", "bucket.s3.amazonaws.com"),
        ("com", None),
        ("co.uk", None),
        ("github.io", None),
        ("localhost", None),
        ("127.0.0.1", None),
        ("::1", None),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        # Under no listed suffix the PSL's default rule `*` applies: the last label is the suffix.
        ("x.example.notatld", "example.notatld"),
        ("api.build.corp", "build.corp"),
        ("x.corp.internal", "corp.internal"),
        ("a.b.c.corp.internal", "corp.internal"),
        ("foo.test", "foo.test"),
        ("corp", None),
        ("10.0.0.1", None),
        ("2001:db8::1", None),
    ],
)
def test_registered_domain(host: str, want: str | None) -> None:
    assert registered_domain(host) == want


PATTERNS = [
    ("example.com", "exact", "example.com"),
    ("Example.COM.", "exact", "example.com"),
    ("*.example.com", "below", "*.example.com"),
    ("**.example.com", "apex_below", "**.example.com"),
    ("**.npmjs.org", "apex_below", "**.npmjs.org"),
    ("*.Bücher.de", "below", "*.xn--bcher-kva.de"),
    ("**.bbc.co.uk", "apex_below", "**.bbc.co.uk"),
    ("*.alice.github.io", "below", "*.alice.github.io"),
    ("*.internal", "below", "*.internal"),  # not on the PSL: a private zone
    ("com", "exact", "com"),  # an exact suffix is just a name
    ("10.20.0.0/16", "cidr", "10.20.0.0/16"),
    ("10.20.0.0/32", "cidr", "10.20.0.0/32"),
    ("0.0.0.0/0", "cidr", "0.0.0.0/0"),
    ("fd00::/8", "cidr", "fd00::/8"),
    ("::ffff:10.0.0.0/104", "cidr", "10.0.0.0/8"),
    ("169.254.169.254", "ip", "169.254.169.254"),
    ("2130706433", "ip", "127.0.0.1"),
    ("[::1]", "ip", "::1"),
    ("::ffff:127.0.0.1", "ip", "127.0.0.1"),
]


@pytest.mark.parametrize(("raw", "kind", "shown"), PATTERNS, ids=[p[0] for p in PATTERNS])
def test_pattern_valid(raw: str, kind: str, shown: str) -> None:
    p = parse_pattern(raw)
    assert (p.kind, str(p)) == (kind, shown)


BAD_PATTERNS = [
    ("*", "only a leading"),
    ("**", "only a leading"),
    ("*.", "empty host"),
    ("**.", "empty host"),
    ("api.*.x", "only a leading"),
    ("*x.com", "only a leading"),
    ("a.**.b", "only a leading"),
    ("*.*.example.com", "only a leading"),
    ("***.example.com", "only a leading"),
    ("example.*", "only a leading"),
    ("*example.com", "only a leading"),
    (".example.com", "empty label"),
    ("*.com", "public suffix"),
    ("**.com", "public suffix"),
    ("*.co.uk", "public suffix"),
    ("**.co.uk", "public suffix"),
    ("*.uk", "public suffix"),
    ("*.github.io", "public suffix"),
    ("**.github.io", "public suffix"),
    ("*.s3.amazonaws.com", "public suffix"),
    ("*.githubusercontent.com", "public suffix"),
    ("*.foo.ck", "public suffix"),
    ("*.1.2.3.4", "IP address"),
    ("**.10.0.0.1", "IP address"),
    ("10.0.0.1/8", "host bits"),
    ("10.0.0.0/33", "bad CIDR"),
    ("10.0.0.0/", "bad CIDR"),
    ("example.com/8", "bad CIDR"),
    ("10.0.0.0/x", "bad CIDR"),
    ("::ffff:10.0.0.0/8", "mapped"),
    ("exa mple.com", "not a host"),
    ("http://example.com", "is a URL"),
    ("example.com:443", "not a host"),
    ("", "empty"),
    ("  ", "empty"),
    ("1.2.3.4.5", "four parts"),
    ("user@example.com", "not a host"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_PATTERNS, ids=[repr(p[0]) for p in BAD_PATTERNS])
def test_pattern_invalid(raw: str, message: str) -> None:
    with pytest.raises(HostError, match=message):
        parse_pattern(raw)


@pytest.mark.parametrize("raw", ["**.ngrok.io", "*.github.io", "**.trycloudflare.com"])
def test_deny_may_wildcard_a_private_section_suffix(raw: str) -> None:
    """Denying every tenant of a hosting service only narrows access, so deny rules may."""
    assert parse_pattern(raw, deny=True).kind in ("below", "apex_below")
    with pytest.raises(HostError, match="public suffix"):
        parse_pattern(raw)


@pytest.mark.parametrize("raw", ["*.com", "**.co.uk"])
def test_deny_may_not_wildcard_an_icann_suffix(raw: str) -> None:
    with pytest.raises(HostError, match="public suffix"):
        parse_pattern(raw, deny=True)


# -- properties (hypothesis) ------------------------------------------------------------------------

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HOST_CHARS = "abcxyz019-_.AZ。．｡ßüÜé例ｅ\u200b0x:[]%"
label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
suffix = st.sampled_from(["com", "org", "co.uk", "github.io", "net", "de", "test", "s3.amazonaws.com"])


@FAST
@given(st.text(alphabet=HOST_CHARS, min_size=1, max_size=24))
def test_normalisation_is_idempotent(raw: str) -> None:
    try:
        once = normalize_host(raw)
    except HostError:
        once = None
    assume(once is not None)  # not `return`: a normaliser that rejected everything would fail here
    assert once is not None and normalize_host(once) == once
    assert once == once.lower() and not once.endswith(".") and once.isascii()


@FAST
@given(st.lists(label, min_size=1, max_size=4), suffix, st.booleans(), st.booleans())
def test_case_and_trailing_dot_do_not_matter(labels: list[str], sfx: str, upper: bool, dot: bool) -> None:
    name = ".".join([*labels, sfx])
    spelled = (name.upper() if upper else name) + ("." if dot else "")
    assert normalize_host(spelled) == name


def _spell_part(n: int, style: str) -> str:
    return {"dec": str(n), "hex": hex(n), "HEX": "0X" + format(n, "X"), "oct": "0" + format(n, "o")}[style]


@FAST
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 2, 3, 4]),
    st.lists(st.sampled_from(["dec", "hex", "HEX", "oct"]), min_size=4, max_size=4),
    st.sampled_from(["v4", "mapped", "mapped-hex", "bracket"]),
    st.booleans(),
)
def test_ip_spellings_canonicalise_to_one_address(
    value: int, parts: int, styles: list[str], form: str, dot: bool
) -> None:
    want = str(ipaddress.IPv4Address(value))
    octets = list(ipaddress.IPv4Address(value).packed)
    head = octets[: parts - 1]
    rest = int.from_bytes(bytes(octets[parts - 1 :]), "big")
    text = ".".join(
        [_spell_part(n, s) for n, s in zip(head, styles, strict=False)] + [_spell_part(rest, styles[-1])]
    )
    if form == "mapped":
        text = f"[::ffff:{want}]"
    elif form == "mapped-hex":
        text = f"[::ffff:{value >> 16:x}:{value & 0xFFFF:x}]"
    elif form == "bracket":
        text = f"[::FFFF:{want}]"
    elif dot:
        text += "."
    assert normalize_host(text) == want


# ---- parse_pattern's shortcut for plain names --------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="abcxn-_.019AZ*", min_size=1, max_size=20))
def test_the_plain_name_shortcut_agrees_with_normalize_host(text: str) -> None:
    from addons.policy import hosts

    def slow(raw: str) -> Any:
        try:
            return ("ok", normalize_host(raw))
        except HostError:
            return ("error",)

    if hosts._PLAIN_NAME.fullmatch(text) and len(text) <= 253 and "xn--" not in text:
        assert slow(text) == ("ok", text)
    for raw in (text, f"*.{text}", f"**.{text}"):
        try:
            p = parse_pattern(raw)
        except HostError:
            continue
        if p.kind in ("exact", "below", "apex_below"):
            assert slow(raw.lstrip("*").lstrip(".")) == ("ok", p.value)
