"""The fast rule-file reader must build exactly ruamel.yaml's tree (values, types, positions) or decline."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from addons.config import fastyaml
from addons.config.fastyaml import parse_rule_file, read_rules
from tests.fuzz.fuzz_support import same_tree as same
from tests.policy.pol_helpers import REPO


def ruamel(text: str) -> Any:
    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y.load(text)


def plain_of(value: Any) -> Any:
    """ruamel's tree as the plain values read_rules gives (dicts, lists, the same scalar types)."""
    if isinstance(value, CommentedMap):
        return {k: plain_of(v) for k, v in value.items()}
    if isinstance(value, CommentedSeq):
        return [plain_of(v) for v in value]
    return value


def same_plain(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same_plain(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same_plain(x, y)
    else:
        assert a == b


def check_plain(text: str, tree: Any) -> None:
    """read_rules (and its simplest-spelling reader) agree with the tree: values, lines, name positions."""
    plain = read_rules(text)
    if tree is None:
        assert plain is None and fastyaml._read_simplest(text) is None, text
        return
    assert plain is not None, text
    seq = tree["rules"]
    assert len(plain) == len(seq)
    for i, (rule, line, name_pos) in enumerate(plain):
        same_plain(rule, plain_of(seq[i]))
        assert line == seq.lc.item(i)[0] + 1
        node = seq[i]
        want = (node.lc.value("name")[0] + 1, node.lc.value("name")[1] + 1) if "name" in node else (line, 1)
        assert name_pos == want
    simplest = fastyaml._read_simplest(text)
    assert simplest is None or simplest == plain


def check(text: str) -> bool:
    """True when the fast reader accepted the text (and then matched ruamel exactly)."""
    fast = parse_rule_file(text)
    check_plain(text, fast)
    if fast is None:
        return False
    same(fast, ruamel(text))
    return True


FILES = sorted([*(REPO / "rules").glob("*.yaml"), *(REPO / "tests" / "data" / "rules").rglob("*.yaml")])
# The repository's YAML files the fast reader declines (the loader then uses ruamel.yaml), and why. Every
# other file must be accepted and read exactly like ruamel.yaml: a reader that declined everything, or
# started to decline a shape it reads today, fails here.
DECLINED_FILES = {
    "rules/deny.yaml": "a flow list over several lines",
    "rules/source-hosting.yaml": "block-style lists",
    "rules/tests.yaml": "a policy-test file (cases:), not rules",
    "tests/data/rules/bad-method-path.yaml": "a plain scalar with '*' in a flow list",
    "tests/data/rules/bad-port.yaml": "the integer 0",
    "tests/data/rules/bad-wildcard.yaml": "block-style lists",
    "tests/data/rules/configs/bad-values.yaml": "a config file, not rules",
    "tests/data/rules/configs/clients.yaml": "a config file, not rules",
    "tests/data/rules/configs/duplicate-key.yaml": "a config file, not rules",
    "tests/data/rules/configs/inspect-never.yaml": "a config file, not rules",
    "tests/data/rules/configs/missing-rules.yaml": "a config file, not rules",
    "tests/data/rules/configs/not-a-mapping.yaml": "a config file, not rules",
    "tests/data/rules/configs/unknown-key.yaml": "a config file, not rules",
    "tests/data/rules/duplicate-key.yaml": "a duplicate key (ruamel.yaml reports it)",
    "tests/data/rules/not-a-mapping.yaml": "not a mapping",
    "tests/data/rules/yaml-syntax.yaml": "an unclosed flow list (ruamel.yaml reports it)",
}


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(REPO).as_posix() for p in FILES])
def test_repository_files(path: Any) -> None:
    rel = path.relative_to(REPO).as_posix()
    accepted = check(path.read_text())
    assert accepted is (rel not in DECLINED_FILES), (
        f"the fast reader {'accepted' if accepted else 'declined'} {rel}; "
        + (
            f"expected it to decline ({DECLINED_FILES[rel]})"
            if rel in DECLINED_FILES
            else "expected it to accept"
        )
    )


def test_the_declined_list_names_existing_files() -> None:
    assert {p.relative_to(REPO).as_posix() for p in FILES} >= set(DECLINED_FILES)
    assert len(FILES) > len(DECLINED_FILES)  # most of them are read fast


ACCEPTED = [
    "rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n",
    "# c\n\nrules:\n  - name: a  # c\n    action: allow # c\n    hosts: [a.test, 'b', \"c\"]  # c\n",
    "rules:\n- name: a\n  action: deny\n  hosts: [\"*.x.test\", '**.y.test', 10.0.0.0/8, 1.2.3.4]\n",
    "rules:\n    - name: a\n      ports: [443, 8443]\n      raw_tcp: true\n      description: w, x:y [z]\n",
    "rules:\n  - name: no\n    action: on\n    hosts: []\n    raw_tcp: false\n",
    "rules:   \n  - name: Bücher\n    hosts: [bücher.de, 例え.テスト]\n\n\n# trailing\n",
    "rules:\n  - name: a\n    paths: [\"/repos/*\", '/x y']\n    methods: [POST,PUT]\n",
    "rules:\n  - name: a#b\n    description: it's 100% ok, [really] {yes} & *fine*\n",
]
DECLINED = [
    "rules:\n  - name: a\n    name: b\n",  # duplicate key: ruamel reports it
    "rules:\n  - name: &x a\n",  # anchors
    "rules:\n  - name: *x\n",  # aliases
    "rules:\n  - name: !!str a\n",  # tags
    'rules:\n  - name: "a\\tb"\n',  # escapes
    "rules:\n  - name: a\n    hosts:\n      - x\n",  # block lists
    "rules:\n  - name: a\n    hosts: [x,\n      y]\n",  # multi-line flow
    "rules:\n  - name: 0o17\n",
    "rules:\n  - name: 1.5\n",
    "rules:\n  - name: null\n",
    "rules:\n  - name: ~\n",
    "rules:\n  - name: True\n",
    "rules:\n  - ports: [0x1bb]\n",
    "rules:\n  - ports: [0443]\n",
    "rules:\n  - name: a\n\tfoo: b\n",
    "rules:\n  - name: a\r\n",
    "\ufeffrules:\n  - name: a\n",
    "rules:\n  - name: a\u2028b\n",
    "rules:\n  - name: a\x85b\n",
    "rules:\n  - name: a\x01\n",
    "rules: []\n",
    "rules:\n",
    "",
    "other: 1\nrules:\n  - name: a\n",
    "rules:\n  - name: a\nother: 1\n",
    "rules:\n  - name: a\n   action: b\n",
    "rules:\n  - name: a\n     action: b\n",
    "rules:\n  -  name: a\n",
    "rules:\n  - name: a\n  - name: b\n - name: c\n",
    "rules:\n  - name: a:b: c\n",
    "rules:\n  - name: 'it''s'\n",
    "rules:\n  - name: a\n    hosts: [a b]\n",
    "rules:\n  - name: a\n    hosts: [a]x\n",
    "rules:\n  - name: a\n    hosts: [a,]\n",
    "rules:\n  - name: a\n    hosts: [a]#c\n",
    "rules:\n  - name: -a\n",
    "rules:\n  - name: [\n",
    "rules:\n  - name: a\n...\n",
    "---\nrules:\n  - name: a\n",
    "rules:\n  - name:\n",
    "rules:\n  - name:  a\n",
    "rules:\n  - name: |\n      x\n",
    "rules:\n  - name: >\n      x\n",
    "rules:\n  - {name: a}\n",
    "rules:\n  - name: a\n    x: {a: b}\n",
    "rules:\n  - name: a\n    hosts: [[a]]\n",
    "rules:\n  - name: a\n  b\n",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_accepted_shapes_match_ruamel(text: str) -> None:
    assert check(text)


@pytest.mark.parametrize("text", DECLINED)
def test_everything_else_is_declined(text: str) -> None:
    assert parse_rule_file(text) is None
    assert read_rules(text) is None and fastyaml._read_simplest(text) is None


SCALARS = st.one_of(
    st.sampled_from(
        [
            "a.test",
            "*.b.test",
            "**.c.test",
            "10.0.0.0/8",
            "1.2.3.4",
            "fd00::/8",
            "no",
            "yes",
            "on",
            "true",
            "false",
            "null",
            "~",
            "443",
            "0",
            "017",
            "1.5",
            "1e3",
            "0x1f",
            ".inf",
            "-1",
            "+1",
            "Bücher.de",
            "a b",
            "a: b",
            "a #b",
            "a#b",
            "x,y",
            "[x]",
            "&a",
            "*a",
            "!a",
            "|",
            ">",
            "'",
            '"',
            "''",
            "a'b",
            "/repos/*",
            "POST",
            "",
            " ",
            "a:",
            ":a",
            "%a",
            "@a",
            "`a",
            "a\\b",
            "é",
        ]
    ),
    st.text(alphabet="ab.*:#, '\"[]-_0123456789/\\é", max_size=6),
)


def _render(value: str, style: str) -> str:
    return {"plain": value, "single": f"'{value}'", "double": f'"{value}"'}[style]


styles = st.sampled_from(["plain", "single", "double"])
entry = st.tuples(
    st.sampled_from(["name", "action", "hosts", "ports", "methods", "raw_tcp", "description", "name"]),
    st.one_of(st.tuples(SCALARS, styles), st.lists(st.tuples(SCALARS, styles), max_size=3)),
    st.sampled_from(["", " # c", "  #c", "#c", "  "]),
)


def _rule_text(rules: list[list[tuple[str, Any, str]]], indent: int) -> str:
    out = ["rules:"]
    pad = " " * indent
    for rule in rules:
        for j, (key, value, tail) in enumerate(rule):
            if isinstance(value, tuple):
                text = _render(*value)
            else:
                text = "[" + ", ".join(_render(*v) for v in value) + "]"
            out.append(f"{pad}{'- ' if j == 0 else '  '}{key}: {text}{tail}")
    return "\n".join(out) + "\n"


def test_fast_reader_agrees_with_ruamel() -> None:
    seen = {"accepted": 0, "declined": 0}

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(st.lists(entry, min_size=1, max_size=4), min_size=1, max_size=3), st.sampled_from([0, 2, 4])
    )
    def agrees(rules: list[list[tuple[str, Any, str]]], indent: int) -> None:
        text = _rule_text(rules, indent)
        fast = parse_rule_file(text)
        check_plain(text, fast)
        if fast is None:
            seen["declined"] += 1
            return
        seen["accepted"] += 1
        try:
            slow = ruamel(text)
        except Exception as e:  # the fast reader accepted something ruamel rejects
            raise AssertionError(f"accepted invalid YAML: {text!r}: {e}") from None
        same(fast, slow)

    agrees()
    # Both sides were exercised: a reader that declined everything would compare nothing.
    assert seen["accepted"] >= 10 and seen["declined"] >= 10, seen


UNICODE = ["\u00a0", "\u3000", "\u2000", "\u200b", "é", "例", "\U0001f600", "\u0301", "\u00ad", "\u0660"]
SHAPES = [
    "rules:\n  - name: {c}a\n",
    "rules:\n  - name: a{c}b\n",
    "rules:\n  - hosts: [{c}a, b{c}]\n",
    "rules:\n  - name: a{c}\n",
    "rules:\n  - name: a {c}#b\n",
]


# A plain scalar may not start with a space-like or format character (ruamel would strip or reject it):
# those are declined where the character starts a scalar, accepted anywhere else.
STARTS_A_SCALAR = {SHAPES[0], SHAPES[2]}
MAY_START_A_SCALAR = {"é", "例", "\u0660"}


@pytest.mark.parametrize("char", UNICODE, ids=[f"U+{ord(c):04X}" for c in UNICODE])
@pytest.mark.parametrize("shape", SHAPES)
def test_unicode_edges_agree_with_ruamel(char: str, shape: str) -> None:
    accepted = check(shape.format(c=char))
    assert accepted is (shape not in STARTS_A_SCALAR or char in MAY_START_A_SCALAR)


@pytest.mark.parametrize("key", ["null", "true", "false", "on", "no", "y"])
def test_keys_yaml_reads_as_other_types_are_declined(key: str) -> None:
    assert parse_rule_file(f"rules:\n  - name: a\n    {key}: b\n") is None


SIMPLE_VALUES = st.one_of(
    st.sampled_from(["a.test", "r1", "allow", "deny", "443", "8443", "10.1.2.0/24", "1.2.3.4", "1.5", "0",
                     "no", "true", "/v1/*", "POST", "Bücher.de", "x_y-z", "1.2.3", "2026-01-02", "0x1f"]),
    st.text(alphabet="ab.0123456789/-_*", min_size=1, max_size=8),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.tuples(st.sampled_from(["name", "action", "hosts", "ports", "paths", "raw_tcp"]),
                                   st.one_of(st.tuples(SIMPLE_VALUES, styles),
                                             st.lists(st.tuples(SIMPLE_VALUES, styles), max_size=3)),
                                   st.just("")), min_size=1, max_size=4), min_size=1, max_size=4),
       st.sampled_from([0, 2]), st.sampled_from(["", "# generated\n\n"]))
def test_the_simplest_spelling_reads_like_the_tree(rules: list[list[tuple[str, Any, str]]], indent: int,
                                                  header: str) -> None:
    """What generators write (no comments after values, `[a, b]` lists): the one-regex reader's domain."""
    text = header + _rule_text(rules, indent)
    check(text)


def test_a_generated_policy_takes_the_simplest_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from bench_policy import rule_text

    text = "# generated\nrules:\n" + "".join(rule_text(i) for i in range(2000))
    simplest = fastyaml._read_simplest(text)
    assert simplest is not None and len(simplest) == 2000
    check(text)


@pytest.mark.parametrize(
    "text",
    [
        "rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\ncredentials:\n  - name: gh\n",
        "credentials:\n  - name: gh\n    hosts: [api.github.com]\n",
        "rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n    secret: {env: X}\n",
    ],
)
def test_credential_rules_are_left_to_ruamel(text: str) -> None:
    """A `credentials:` section (and the nested mappings it needs) is not the fast reader's shape."""
    assert parse_rule_file(text) is None
    assert fastyaml.read_rules(text) is None  # nor the plain-values reader's (load.py then reads it whole)
