"""Fuzzing the authority parser (addons/policy/authority.py) alone and against mitmproxy's.

The proxy reads a destination twice: mitmproxy parses the request target / CONNECT authority (and
connects there, through our pin of normalize_host(host)), and Portcullis parses the Host header and
:authority with split_authority to check they name the same place. Where both accept an authority,
they must agree on the normalised host and the port; where either refuses, the request is refused.
"""

from __future__ import annotations

import pytest
from fuzz_support import SPECIAL, bounded, hostile_text
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.net.http import url

from addons.policy.authority import AuthorityError, same_destination, split_authority
from addons.policy.hosts import HostError, normalize_host

authority_text = st.one_of(
    hostile_text,
    st.builds(lambda h, p: f"{h}:{p}", hostile_text, st.one_of(st.integers(-5, 70000).map(str),
                                                               hostile_text)),
    st.builds(lambda h, p: f"[{h}]:{p}", st.ip_addresses(v=6).map(str), st.integers(0, 66000)),
    st.lists(st.sampled_from([*SPECIAL, *"public.test", "8", "0", "[", "]", ":"]), max_size=25).map("".join),
)


def test_a_port_without_a_host_is_refused() -> None:
    """Found by the property below: ':8080' parsed as host '' (so `run --listen :8080` bound every
    interface, although the config validator refuses the same text)."""
    for raw in (":80", ":0", ":8080"):
        with pytest.raises(AuthorityError):
            split_authority(raw, allow_zero=True)


@bounded(1000)
@given(authority_text, st.booleans())
def test_split_authority_raises_only_authority_errors(raw: str, allow_zero: bool) -> None:
    try:
        host, port = split_authority(raw, allow_zero=allow_zero)
    except AuthorityError:
        return
    assert host and not set(host) & set(" \t\r\n/\\@?#")
    assert port is None or (0 if allow_zero else 1) <= port <= 65535
    if host.startswith("["):
        assert host.endswith("]")


@bounded(1000)
@given(authority_text, st.sampled_from(["http", "https", "ws", "wss", "ftp"]), st.integers(1, 65535))
def test_same_destination_never_raises_and_implies_equal_parts(raw: str, scheme: str, port: int) -> None:
    try:
        host = normalize_host(split_authority(raw)[0])
    except (AuthorityError, HostError):
        host = "public.test"
    if same_destination(raw, host, port, scheme):
        h, p = split_authority(raw)
        assert normalize_host(h) == host
        default = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(scheme, port)
        assert p == port or (p is None and port == default)


def _ours(raw: str) -> tuple[str, int | None] | None:
    try:
        h, p = split_authority(raw)
        return normalize_host(h), p
    except ValueError:
        return None


def _mitmproxy(raw: bytes) -> tuple[str, int | None] | None:
    try:
        h, p = url.parse_authority(raw, check=True)  # what mitmproxy connects to
        return normalize_host(h), p
    except ValueError:
        return None


@bounded(1500)
@given(authority_text)
def test_mitmproxy_and_portcullis_agree_where_both_accept(raw: str) -> None:
    try:
        as_bytes = raw.encode("utf-8")
    except UnicodeEncodeError:
        return
    ours, theirs = _ours(raw), _mitmproxy(as_bytes)
    if ours is not None and theirs is not None:
        assert ours == theirs, (raw, ours, theirs)


@bounded(800)
@given(st.lists(st.sampled_from(["a", "b", "xn--bcher-kva", "XN--BCHER-KVA", "bücher", "faß", "ǅ", "ı", "İ",
                                 "\u212a", "k", "0", "1", "x"]), min_size=1, max_size=4),
       st.integers(1, 65535), st.booleans())
def test_international_names_agree(labels: list[str], port: int, dot: bool) -> None:
    raw = ".".join([*labels, "test"]) + ("." if dot else "") + f":{port}"
    ours, theirs = _ours(raw), _mitmproxy(raw.encode())
    if ours is not None and theirs is not None:
        assert ours == theirs, (raw, ours, theirs)
