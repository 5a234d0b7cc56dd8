"""The public-suffix question a wildcard asks, answered from the list's rules, against tldextract."""

from __future__ import annotations

import pytest

from addons.policy import psl
from addons.policy.hosts import HostError, normalize_host


def reference(name: str) -> str | None:
    r = psl.PSL.extract_str(name)
    if r.domain == "" and r.suffix == name:
        return "private" if r.is_private else "icann"
    return None


def names() -> list[str]:
    """Every rule of the list as a name, its parent, a child, and the names its wildcards cover."""
    every, _, _ = psl._rules()
    out: set[str] = set()
    for rule in every:
        base = rule.lstrip("!").removeprefix("*.")
        try:
            base = normalize_host(base)
        except HostError:
            continue
        out.update({base, f"x.{base}", f"www.{base}", f"a.b.{base}"})
        if "." in base:
            out.add(base.split(".", 1)[1])
    return sorted(out)


def test_every_name_around_every_rule_gets_tldextracts_answer() -> None:
    got = {n: psl.public_suffix_section(n) for n in names()}
    want = {n: reference(n) for n in got}
    assert got == want
    assert len(got) > 20000 and "private" in got.values() and "icann" in got.values()


@pytest.mark.parametrize(("name", "section"), [
    ("com", "icann"), ("co.uk", "icann"), ("github.io", "private"), ("x.ck", "icann"),
    ("www.ck", None), ("example.com", None), ("localhost", None), ("internal", None),
    ("xn--55qx5d.cn", "icann"), ("city.kawasaki.jp", None), ("x.kawasaki.jp", "icann"),
    ("in.futurecms.at", None),  # tldextract: a deeper rule (*.in.futurecms.at) hides *.futurecms.at
])
def test_known_suffixes(name: str, section: str | None) -> None:
    assert psl.public_suffix_section(name) == section == reference(name)
