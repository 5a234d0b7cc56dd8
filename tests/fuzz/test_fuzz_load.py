"""Fuzzing rule loading (addons/config/load.py) and the fast YAML reader (addons/config/fastyaml.py).

Loading: whatever a rule file or config holds, the result is a policy or a PolicyError whose every
line is `path:line:col: message` (or `path: message`), never another exception. The fast reader
must build exactly ruamel.yaml's tree (values, types, positions) or decline (None).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from fuzz_support import bounded, same_tree
from hypothesis import given
from hypothesis import strategies as st
from ruamel.yaml import YAML

from addons.config.fastyaml import parse_rule_file
from addons.config.load import PolicyError, load_config

KEYS = ["name", "action", "hosts", "ports", "methods", "paths", "clients", "raw_tcp", "description", "x"]
scalars = st.one_of(
    st.sampled_from(["allow", "deny", "approval", "ALLOW", "", "*", "*.com", "**.example.com", "a.test",
                     "10.0.0.0/8", "::/0", "/x/*", "GET", "yes", "no", "on", "null", "~", "0", "07", "1e3"]),
    st.text(max_size=15),
    st.integers(-2, 70000),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
    max_leaves=8,
)
rule = st.dictionaries(st.sampled_from(KEYS), values, max_size=7)
document = st.one_of(
    st.fixed_dictionaries({"rules": st.lists(rule, max_size=4)}),
    st.dictionaries(st.sampled_from(["rules", "cases", "x"]), values, max_size=2),
    values,
)
ERROR_LINE = re.compile(r"^[^\n]+?(:\d+:\d+)?: .+", re.S)


def _load(rule_text: str, config_extra: dict[str, Any] | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "rules").mkdir()
        (root / "rules" / "r.yaml").write_text(rule_text, encoding="utf-8")
        (root / "c.yaml").write_text(json.dumps({"rules": ["rules/"], **(config_extra or {})}))
        try:
            load_config(root / "c.yaml")
        except PolicyError as e:
            assert e.errors and all(ERROR_LINE.match(x) for x in e.errors), e.errors


@bounded(200)
@given(document)
def test_any_rule_document_loads_or_is_a_positioned_error(doc: Any) -> None:
    _load(json.dumps(doc))


@bounded(200)
@given(st.dictionaries(st.sampled_from(["default_action", "mode", "network", "clients", "approvals", "tls",
                                        "listen", "telemetry", "x"]), values, max_size=3))
def test_any_config_loads_or_is_a_positioned_error(extra: dict[str, Any]) -> None:
    _load('rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n', extra)


# ---- the fast reader against ruamel ------------------------------------------------------------------

def ruamel(text: str) -> Any:
    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y.load(text)


PIECES = ["a", "b.test", "*.x.test", "'q'", '"d"', "10.0.0.0/8", "1", "0", "07", "443", "1e3", "0x1f",
          "true", "false", "yes", "no", "null", "~", "on", "#c", " #c", ":", ": ", "-", "- ", "&a", "*a",
          "!!str", "|", ">", "%", "@", "`", "{", "}", "[", "]", ",", "\\", "\\t", "é", "例", "\u2028",
          "\t", " ", "  ", "'it''s'", '"a\\"b"', "? ", "!", "2024-01-01", ".inf", "-1", "+1", "1_000"]
line_value = st.one_of(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("".join),
    st.lists(st.sampled_from(PIECES), max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
)
key = st.sampled_from([*KEYS, "yes", "True", "a b", "name "])
indent = st.sampled_from(["", " ", "  ", "   ", "    ", "\t"])


# Values the fast reader is meant to accept (so the comparison is not vacuous), and hostile ones.
PLAIN = ["a", "b.test", "a-b_c.d", "10.0.0.0/8", "/x/*", "GET", "1", "443", "65535", "no", "on", "off", "y",
         "true", "false", "Bücher.de", "例え.テスト", "it's", "100%", "a#b", "w, x:y [z]", "{x}", "&fine*",
         "x~"]
QUOTED = ["'q'", '"d"', "'*.x.test'", '"**.y.test"', "'a b'", "''", '""', "'#'", '"# not a comment"']


def _flow(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


good_value = st.one_of(
    st.sampled_from(PLAIN + QUOTED),
    st.lists(st.sampled_from([p for p in PLAIN if not set(p) & set(",[]{}#") or p.startswith("'")] + QUOTED),
             max_size=4).map(_flow),
)


@st.composite
def rule_files(draw: Any) -> str:
    """Mostly files in the fast reader's shape (consistent indents, known keys, plain values), with
    now and then one hostile piece or odd indent: the comparison must hold either way."""
    hostile = draw(st.integers(0, 3)) == 0
    value = line_value if hostile else good_value
    lines = [draw(st.sampled_from(["rules:", "rules: ", "rules:  # c", "# c\nrules:"]
                                  + (["rules: []", "rules:\t"] if hostile else [])))]
    dash = draw(st.sampled_from(["  - ", "- ", "    - "]))
    for _ in range(draw(st.integers(1, 4))):
        lines.append(f"{dash}{draw(key if hostile else st.sampled_from(KEYS))}: {draw(value)}")
        for _ in range(draw(st.integers(0, 4))):
            if draw(st.integers(0, 7)) == 0:
                lines.append(draw(st.sampled_from(["", "   ", "# note", "  # note"])))
                continue
            pad = draw(indent) if hostile else ""
            sep = draw(st.sampled_from([" ", "", "  "])) if hostile else " "
            comment = draw(st.sampled_from(["", "  # c", " # c"]))
            lines.append(f"{' ' * len(dash)}{pad}{draw(st.sampled_from(KEYS))}:{sep}{draw(value)}{comment}")
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"] + (["\r\n"] if hostile else [])))


def fast_agrees(text: str) -> None:
    fast = parse_rule_file(text)
    if fast is None:
        return
    try:
        slow = ruamel(text)
    except Exception as e:  # noqa: BLE001 - the finding is that the fast reader accepted it
        raise AssertionError(f"the fast reader accepted what ruamel refuses ({type(e).__name__}): {text!r}") \
            from e
    same_tree(fast, slow)


@bounded(800)
@given(rule_files())
def test_fast_reader_agrees_with_ruamel_or_declines(text: str) -> None:
    fast_agrees(text)


@bounded(500)
@given(rule_files(), st.integers(0, 500), st.sampled_from(PIECES + ["\n", "\n  ", "\n- ", "\x00", "\ufeff"]))
def test_fast_reader_on_mutated_files(text: str, at: int, insert: str) -> None:
    at = at % (len(text) + 1)
    fast_agrees(text[:at] + insert + text[at:])
