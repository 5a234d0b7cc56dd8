"""Fuzzing host normalisation (addons/policy/hosts.py): any input is either one comparable form or a
HostError, never another exception; IP spellings agree with ipaddress; address classes never call
an address public that the ipaddress module knows is not globally reachable."""

from __future__ import annotations

import ipaddress

from fuzz_support import SPECIAL, bounded, hostile_text
from hypothesis import assume, given
from hypothesis import strategies as st

from addons.policy.addresses import classify_address
from addons.policy.hosts import HostError, is_ip, normalize_host, parse_ip, parse_pattern

FORBIDDEN_IN_RESULT = set("/@\\?# \t\r\n%[]")


@bounded(3000)
@given(hostile_text)
def test_normalize_host_is_total_and_idempotent(raw: str) -> None:
    try:
        out = normalize_host(raw)
    except HostError:
        return
    assert out.isascii() and out == out.lower() and not out.endswith("."), out
    assert not FORBIDDEN_IN_RESULT & set(out), out
    assert normalize_host(out) == out
    if is_ip(out):
        assert str(parse_ip(out)) == out
    else:
        assert 0 < len(out) <= 253 and all(0 < len(label) <= 63 for label in out.split("."))


@bounded(2000)
@given(st.lists(st.sampled_from(SPECIAL + list("abc019")), max_size=20).map("".join))
def test_parse_pattern_raises_only_host_errors(raw: str) -> None:
    try:
        parse_pattern(raw)
        parse_pattern(raw, deny=True)
    except HostError:
        pass


def _spell(n: int, parts: int, bases: list[int]) -> str:
    """n as an inet_aton spelling with `parts` parts, each in base 8, 10 or 16."""
    if parts == 1:
        values = [n]
    elif parts == 2:
        values = [n >> 24, n & 0xFFFFFF]
    elif parts == 3:
        values = [n >> 24, (n >> 16) & 0xFF, n & 0xFFFF]
    else:
        values = [(n >> s) & 0xFF for s in (24, 16, 8, 0)]
    out = []
    for v, b in zip(values, bases, strict=False):
        out.append(hex(v) if b == 16 else (("0" + oct(v)[2:]) if b == 8 else str(v)))
    return ".".join(out)


@bounded(2000)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.lists(st.sampled_from([8, 10, 16]), min_size=4,
                                                               max_size=4), st.booleans())
def test_every_ipv4_spelling_is_the_same_address(n: int, parts: int, bases: list[int], dot: bool) -> None:
    spelled = _spell(n, parts, bases) + ("." if dot else "")
    assert normalize_host(spelled) == str(ipaddress.IPv4Address(n)), spelled


@bounded(1500)
@given(st.ip_addresses(v=6), st.booleans(), st.sampled_from(["", "%25eth0", "%lo"]))
def test_ipv6_spellings(addr: ipaddress.IPv6Address, exploded: bool, zone: str) -> None:
    text = (addr.exploded if exploded else addr.compressed) + zone
    want = str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    assert normalize_host(f"[{text}]") == want
    assert normalize_host(f"[{text.upper()}]") == want


def test_ietf_protocol_assignments_are_not_public() -> None:
    """Found by the property below: 2001::/23 outside Teredo was classified public."""
    for a in ("2001:40::", "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", "2001:2::1"):
        assert classify_address(a) == "reserved", a


EMBEDDINGS = [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "2002::/16", "2001::/32")]


@bounded(3000)
@given(st.ip_addresses())
def test_no_address_python_knows_is_not_global_is_called_public(addr: ipaddress.IPv4Address
                                                                 | ipaddress.IPv6Address) -> None:
    cls = classify_address(str(addr))
    if isinstance(addr, ipaddress.IPv6Address):
        assume(not any(addr in n for n in EMBEDDINGS))  # classified by the IPv4 address they carry
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
    if not addr.is_global or addr.is_multicast:
        assert cls is not None, f"{addr} is not globally reachable but classified public"


@bounded(1500)
@given(st.ip_addresses(v=4))
def test_classes_agree_across_spellings(addr: ipaddress.IPv4Address) -> None:
    n = int(addr)
    want = classify_address(str(addr))
    for spelled in (str(n), hex(n), f"[::ffff:{addr}]", f"[::ffff:{n >> 16:x}:{n & 0xFFFF:x}]"):
        assert classify_address(spelled) == want, (spelled, want)
    # NAT64 carries the address too: classified by it (never public when the address is not)
    nat64 = classify_address(f"[64:ff9b::{addr}]")
    assert nat64 == want
