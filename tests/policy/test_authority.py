"""addons/policy/authority.py: authority parsing (`host:port`, `[v6]:port`) and the Host/target check."""

from __future__ import annotations

import pytest

from addons.policy.authority import AuthorityError, same_destination, split_authority


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
