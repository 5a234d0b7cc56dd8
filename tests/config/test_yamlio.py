"""addons/config/yamlio.py: reading YAML (1.2) with every error as path:line:col, the position of a
pydantic error in the YAML tree, and the error list's order across files."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.config.models import Config, RuleFile
from addons.config.yamlio import ErrorList, parse_yaml, pos, read_text, read_yaml, validate_model


def test_errors_are_sorted_by_file_order_then_position() -> None:
    e = ErrorList()
    e.add("b.yaml", 3, 1, "late")
    e.add("a.yaml", 9, 9, "second file")
    e.add("b.yaml", 1, 5, "early")
    e.add_plain("a.yaml", "cannot read")
    e.add_raw("c.yaml", 2, 2, "c.yaml:2:2: raw")
    assert e.sorted() == [
        "b.yaml:1:5: early",
        "b.yaml:3:1: late",
        "a.yaml: cannot read",
        "a.yaml:9:9: second file",
        "c.yaml:2:2: raw",
    ]


def test_read_text(tmp_path: Path) -> None:
    e = ErrorList()
    (tmp_path / "ok.yaml").write_text("a: 1\n")
    assert read_text(tmp_path / "ok.yaml", "ok.yaml", e) == "a: 1\n"
    assert read_text(tmp_path / "none.yaml", "none.yaml", e) is None
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    assert read_text(tmp_path / "bin.yaml", "bin.yaml", e) is None
    assert read_text(tmp_path, "dir", e) is None
    lines = e.sorted()
    assert lines[0] == "none.yaml: cannot read: no such file"
    assert lines[1].startswith("bin.yaml: cannot read: ") and lines[2].startswith("dir: cannot read: ")


@pytest.mark.parametrize(
    ("text", "where", "fragment"),
    [
        ("a: [1, 2\n", "x.yaml:2:1:", "while parsing a flow sequence"),
        ("a: 1\na: 2\n", "x.yaml:2:1:", 'found duplicate key "a"'),
        ("a: b: c\n", "x.yaml:1:5:", "mapping values are not allowed"),
        ("a: 1\n\tb: 2\n", "x.yaml:2:1:", "found character"),
        ("[" * 3000 + "]" * 3000, "x.yaml:1:1:", "cannot parse: RecursionError"),
    ],
)
def test_syntax_errors_have_a_position(text: str, where: str, fragment: str) -> None:
    e = ErrorList()
    ok, data = parse_yaml(text, "x.yaml", e)
    assert (ok, data) == (False, None)
    (line,) = e.sorted()
    assert line.startswith(where) and fragment in line and "\n" not in line


def test_a_construct_started_elsewhere_says_where() -> None:
    e = ErrorList()
    parse_yaml("a: [1,\n  2,\n  3\n", "x.yaml", e)
    assert "(the construct started at line 1, column 4)" in e.sorted()[0]


def test_yaml_12_scalars() -> None:
    ok, data = parse_yaml("a: no\nb: on\nc: yes\nd: true\ne: 0o17\nf: 017\n", "x.yaml", ErrorList())
    assert ok and data == {"a": "no", "b": "on", "c": "yes", "d": True, "e": 15, "f": 17}


def test_rule_files_go_through_the_fast_reader_first(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n"
    ok_fast, fast = parse_yaml(text, "r.yaml", ErrorList(), rule_file=True)
    ok_slow, slow = parse_yaml(text, "r.yaml", ErrorList())
    assert ok_fast and ok_slow and fast == slow and type(fast).__module__ == "ruamel.yaml.comments"
    assert fast["rules"][0].lc.line == slow["rules"][0].lc.line == 1
    (tmp_path / "r.yaml").write_text(text)
    assert read_yaml(tmp_path / "r.yaml", "r.yaml", ErrorList(), rule_file=True) == (True, fast)
    e = ErrorList()
    assert read_yaml(tmp_path / "missing.yaml", "missing.yaml", e) == (False, None)
    assert e.sorted() == ["missing.yaml: cannot read: no such file"]


def test_pos_points_at_keys_values_and_items() -> None:
    _, data = parse_yaml("a:\n  b: [x, y]\n  c: 1\nlist:\n  - k: v\n", "x.yaml", ErrorList())
    assert pos(data, ("a",)) == (1, 1)
    assert pos(data, ("a", "c")) == (3, 3)
    assert pos(data, ("a", "c"), value=True) == (3, 6)
    assert pos(data, ("a", "b", 1)) == (2, 10)
    assert pos(data, ("list", 0, "k"), value=True) == (5, 8)
    assert pos(data, ("a", "missing")) == (1, 1)  # the deepest node that exists
    assert pos(data, ("a", "b", 7)) == (2, 3)
    assert pos(data, ("a", "function-after[check(), str]", "c")) == (3, 3)  # pydantic tags skipped
    assert pos({"plain": 1}, ("plain",)) == (1, 1)  # not a YAML node: the start


def test_validate_model_reports_every_error_with_its_position() -> None:
    text = "listen: 8080\nbogus: 1\napprovals:\n  timeout: never\nclients:\n  - cidrs: [10.0.0.0/8]\n"
    _, data = parse_yaml(text, "c.yaml", ErrorList())
    e = ErrorList()
    assert validate_model(Config, data, "c.yaml", e) is None
    assert e.sorted() == [
        "c.yaml:1:9: listen: Input should be a valid string (got 8080)",
        "c.yaml:2:1: unknown key 'bogus'",
        "c.yaml:4:12: approvals.timeout: Value error, bad duration 'never': use a number with s, m or h "
        "(e.g. 120s, 5m, 1h)",
        "c.yaml:6:5: clients.0.name: required key is missing",
    ]


def test_validate_model_with_a_label_and_a_prefix() -> None:
    _, data = parse_yaml("rules:\n  - name: a\n    action: maybe\n    hosts: [x]\n", "r.yaml", ErrorList())
    e = ErrorList()
    assert validate_model(RuleFile, data, "r.yaml", e) is None
    assert e.sorted()[0].startswith("r.yaml:3:13: rules.0.action: Input should be")
    e2 = ErrorList()
    rule = data["rules"][0]
    from addons.config.models import RuleModel

    assert validate_model(RuleModel, rule, "r.yaml", e2, prefix=("rules", 0), label="rule 'a'") is None
    assert e2.sorted()[0].startswith("r.yaml:3:13: rule 'a': action: Input should be")
    ok = validate_model(RuleFile, parse_yaml("rules: []\n", "r.yaml", ErrorList())[1], "r.yaml", ErrorList())
    assert ok == RuleFile()
