"""addons/policy/authority.py: authority parsing (`host:port`, `[v6]:port`) and the Host/target check."""

from __future__ import annotations

import pytest

from addons.policy.authority import (
    AuthorityError,
    connect_authority_problem,
    format_authority,
    names_port_zero,
    same_destination,
    split_authority,
)


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


@pytest.mark.parametrize(
    ("raw", "host", "port", "problem"),
    [
        ("public.test:443", "public.test", 443, None),
        ("Public.TEST.:443", "public.test", 443, None),
        ("public.test:0443", "public.test", 443, None),  # leading zeros are digits
        ("[::1]:443", "::1", 443, None),
        ("[::ffff:127.0.0.2]:80", "127.0.0.2", 80, None),
        ("public.test:\uff18\uff10", "public.test", 80, "ASCII digits"),  # fullwidth: mitmproxy reads 80
        ("public.test:\u0664\u0664\u0663", "public.test", 443, "ASCII digits"),  # Arabic-Indic
        ("public.test", "public.test", 443, "ASCII digits"),
        ("public.test:", "public.test", 443, "ASCII digits"),
        ("[public.test]:443", "public.test", 443, "IPv6"),
        ("[127.0.0.2]:443", "127.0.0.2", 443, "IPv6"),
        ("public.test:444", "public.test", 443, "not the port"),
        ("evil.test:443", "public.test", 443, "not the host"),
        ("a..b:443", "a..b", 443, "bad CONNECT host"),
    ],
)
def test_connect_authority_problem(raw: str, host: str, port: int, problem: str | None) -> None:
    got = connect_authority_problem(raw, host, port)
    assert (got is None) if problem is None else (got is not None and problem in got), got


@pytest.mark.parametrize(
    ("raw", "zero"),
    [("a.test:0", True), ("a.test:000", True), ("[::1]:0", True), ("a.test:80", False), ("a.test", False),
     ("a.test:x", False), ("a b:0", False)],
)
def test_names_port_zero(raw: str, zero: bool) -> None:
    assert names_port_zero(raw) is zero


@pytest.mark.parametrize(
    ("host", "port", "scheme", "want"),
    [("a.test", 80, "http", "a.test"), ("a.test", 8080, "http", "a.test:8080"),
     ("a.test", 443, "https", "a.test"), ("a.test", 80, "https", "a.test:80"), ("::1", 80, "http", "[::1]"),
     ("2001:db8::1", 81, "http", "[2001:db8::1]:81"), ("127.0.0.2", 8080, "http", "127.0.0.2:8080")],
)
def test_format_authority(host: str, port: int, scheme: str, want: str) -> None:
    got = format_authority(host, port, scheme)
    assert got == want and same_destination(got, host, port, scheme)
