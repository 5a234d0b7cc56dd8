"""Hypothesis properties: idempotent normalisation, no cross-domain matches, IP spellings, index == scan."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from addons.policy.evaluate import Policy, Rule, Settings
from addons.policy.hosts import HostError, HostPattern, normalize_host, parse_pattern, registered_domain
from addons.policy.model import Action, Client, Layer, Request, RuleRef

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HOST_CHARS = "abcxyz019-_.AZ。．｡ßüÜé例ｅ\u200b0x:[]%"
label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
suffix = st.sampled_from(["com", "org", "co.uk", "github.io", "net", "de", "test", "s3.amazonaws.com"])


def _connect(host: str) -> Request:
    return Request(host, 443, Client(None), method="CONNECT", layer=Layer.CONNECT)


@FAST
@given(st.text(alphabet=HOST_CHARS, min_size=1, max_size=24))
def test_normalisation_is_idempotent(raw: str) -> None:
    try:
        once = normalize_host(raw)
    except HostError:
        return
    assert normalize_host(once) == once
    assert once == once.lower() and not once.endswith(".") and once.isascii()


@FAST
@given(st.lists(label, min_size=1, max_size=4), suffix, st.booleans(), st.booleans())
def test_case_and_trailing_dot_do_not_matter(labels: list[str], sfx: str, upper: bool, dot: bool) -> None:
    name = ".".join([*labels, sfx])
    spelled = (name.upper() if upper else name) + ("." if dot else "")
    assert normalize_host(spelled) == name


def _pattern(raw: str) -> HostPattern:
    try:
        return parse_pattern(raw)
    except HostError:
        # Generated wildcards can land on a public suffix (`*.gr.com`, `*.cn.com` are PSL private
        # entries): not a valid rule, so not an example for these properties.
        assume(False)
        raise


def _policy(patterns: list[str], action: Action = Action.ALLOW) -> Policy:
    rules = [
        Rule(order=i, ref=RuleRef(f"r{i}", action, "f.yaml", i + 1), patterns=(_pattern(p),))
        for i, p in enumerate(patterns)
    ]
    return Policy(rules, Settings(default_action=Action.DENY, block_private=False))


@FAST
@given(
    label,
    suffix,
    st.sampled_from(["", "*.", "**."]),
    st.lists(label, max_size=3),
    label,
    suffix,
    st.sampled_from(["plain", "prefix", "glued", "inner"]),
)
def test_a_name_never_matches_a_pattern_of_another_registrable_domain(
    dom: str, sfx: str, wild: str, sub: list[str], dom2: str, sfx2: str, shape: str
) -> None:
    base = f"{dom}.{sfx}"
    other = f"{dom2}.{sfx2}"
    # Names built to look like `base` but registered under `other`.
    host = {
        "plain": ".".join([*sub, other]),
        "prefix": f"{base}.{other}",
        "glued": f"{dom}{other}",
        "inner": ".".join([*sub, dom + "-" + base.replace(".", "-"), sfx2]),
    }[shape]
    assume(registered_domain(host) != registered_domain(base))
    d = _policy([wild + base]).decide(_connect(host))
    assert d.rule is None, (wild + base, host)


@FAST
@given(st.lists(label, max_size=3), label, suffix, st.sampled_from(["", "*.", "**."]))
def test_wildcards_match_exactly_their_definition(sub: list[str], dom: str, sfx: str, wild: str) -> None:
    base = f"{dom}.{sfx}"
    host = ".".join([*sub, base])
    matched = _policy([wild + base]).decide(_connect(host)).rule is not None
    expect = {"": not sub, "*.": bool(sub), "**.": True}[wild]
    assert matched is expect


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


patterns = st.one_of(
    st.builds(
        lambda p, d: p + d,
        st.sampled_from(["", "*.", "**."]),
        st.sampled_from(["a.test", "b.a.test", "c.test", "x.b.a.test", "example.com"]),
    ),
    st.sampled_from(
        ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "192.0.2.0/24", "2001:db8::/32", "2001:db8::1"]
    ),
)
hosts = st.one_of(
    st.builds(
        lambda s, d: s + d,
        st.sampled_from(["", "x.", "y.x.", "b."]),
        st.sampled_from(["a.test", "b.a.test", "c.test", "x.b.a.test", "example.com", "test"]),
    ),
    st.sampled_from(["10.1.2.3", "10.9.9.9", "11.0.0.1", "192.0.2.200", "2001:db8::1", "2001:db9::1"]),
)


def _scan(policy: Policy, host: str) -> list[str]:
    """The obvious O(rules) matcher the index must agree with."""
    out = []
    for r in policy.rules:
        for p in r.patterns:
            if p.network is not None:
                hit = ":" in host or host[0].isdigit()
                hit = hit and ipaddress.ip_address(host) in p.network
            elif p.kind == "exact":
                hit = host == p.value
            elif p.kind == "below":
                hit = host.endswith("." + p.value)
            else:
                hit = host == p.value or host.endswith("." + p.value)
            if hit:
                out.append(r.ref.name)
                break
    return out


@FAST
@given(st.lists(st.tuples(patterns, st.sampled_from(list(Action))), min_size=1, max_size=12), hosts)
def test_index_agrees_with_a_linear_scan(entries: list[tuple[str, Action]], host: str) -> None:
    rules = [
        Rule(order=i, ref=RuleRef(f"r{i}", a, "f.yaml", i + 1), patterns=(parse_pattern(p, deny=True),))
        for i, (p, a) in enumerate(entries)
    ]
    policy = Policy(rules, Settings(default_action=Action.DENY, block_private=False))
    d = policy.decide(_connect(host))
    got = sorted([d.rule.name] if d.rule else []) + sorted(m.name for m in d.matched)
    want = _scan(policy, host)
    assert sorted(got) == sorted(want)
    if want:
        for action in (Action.DENY, Action.APPROVAL, Action.ALLOW):
            first = [r.ref.name for r in policy.rules if r.ref.name in want and r.ref.action is action]
            if first:
                assert d.rule is not None and d.rule.name == first[0]
                break
