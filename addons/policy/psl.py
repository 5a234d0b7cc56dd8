"""The public suffix list (tldextract's offline snapshot, private section included), and the question
a host pattern asks of it: is this name itself a public suffix, and in which section?"""

from __future__ import annotations

import functools
from typing import Literal

import tldextract

# Offline public suffix list: never the module-level tldextract.extract (it fetches and caches).
PSL = tldextract.TLDExtract(
    suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True, include_psl_private_domains=True
)
Section = Literal["icann", "private"]


@functools.cache
def _rules() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(every rule, the ICANN section's rules, every label-suffix of a rule), as the list writes
    them: `a.b`, `*.b`, `!x.b`; the label-suffixes of `!x.b` are `b` and `!x.b`."""
    icann = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True,
                                  include_psl_private_domains=False)
    every = frozenset(PSL.tlds)
    nodes = {rule.split(".", i)[-1] for rule in every for i in range(rule.count(".") + 1)}
    return every, frozenset(icann.tlds), frozenset(nodes)


def public_suffix_section(name: str) -> Section | None:
    """Which PSL section lists a normalised name as a public suffix, or None if it is not one.

    tldextract's answer (its trie walk, label by label from the right), from the rules: a name some
    rule ends with is a suffix only if a rule names it; otherwise it is one when its parent is as far
    as the walk gets and a wildcard there (`*.ck`) covers it, unless an exception (`!www.ck`) takes
    it out. Punycode names (the list writes Unicode) ask tldextract itself. tests/policy/test_psl.py
    holds both answers equal for every rule's neighbourhood."""
    if "xn--" in name:
        r = PSL.extract_str(name)
        if r.domain == "" and r.suffix == name:
            return "private" if r.is_private else "icann"
        return None
    every, icann, nodes = _rules()
    if name in nodes:
        return ("icann" if name in icann else "private") if name in every else None
    _, dot, parent = name.partition(".")
    wildcard = "*." + parent
    if dot and parent in nodes and wildcard in every and "!" + name not in every:
        return "icann" if wildcard in icann else "private"
    return None


def is_public_suffix(name: str) -> bool:
    """True when a normalised name is itself a public suffix (ICANN or private section)."""
    return public_suffix_section(name) is not None
