"""addons/config/load.py: every error as path:line:col (a fixture per kind of broken file), folders,
persist_to, reload reusing unchanged files."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import pytest

from addons.config import gcpause
from addons.config import load as load_mod
from addons.config.load import PolicyError, load_config, load_config_report, load_policy
from addons.config.models import Config
from tests.policy.pol_helpers import REPO, load_errors, make_policy, q, summary, write_config

DATA = REPO / "tests" / "data" / "rules"
RULE_FIXTURES = sorted(p for p in DATA.iterdir() if p.suffix == ".yaml" or p.name == "dup-across-files")
CONFIG_FIXTURES = sorted((DATA / "configs").glob("*.yaml"))


def expected(fixture: Path, file: str) -> list[str]:
    """The `# expect:` trailer of a fixture (at the end, so line numbers above stay true)."""
    source = fixture / "b.yaml" if fixture.is_dir() else fixture
    lines = [
        ln.removeprefix("# expect: ") for ln in source.read_text().splitlines() if ln.startswith("# expect: ")
    ]
    assert lines, f"{source} has no '# expect:' lines"
    return [ln.replace("{file}", file).replace("{dir}", str(Path(file).parent)) for ln in lines]


@pytest.mark.parametrize("fixture", RULE_FIXTURES, ids=[p.stem for p in RULE_FIXTURES])
def test_broken_rule_file(tmp_path: Path, fixture: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'rules: ["{fixture}"]\n')
    assert load_errors(cfg) == expected(fixture, str(fixture))


@pytest.mark.parametrize("fixture", CONFIG_FIXTURES, ids=[p.stem for p in CONFIG_FIXTURES])
def test_broken_config(fixture: Path) -> None:
    assert load_errors(fixture) == expected(fixture, str(fixture))


def test_every_error_across_config_and_rule_files_in_one_go(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.yaml").write_text("rules:\n  - {name: a, action: allow, hosts: ['*.com']}\n")
    (tmp_path / "rules" / "b.yaml").write_text("rules:\n  - {name: a, action: allow, hosts: [x.test]}\n")
    (tmp_path / "c.yaml").write_text("rules: [rules/]\ndefault_action: nope\n")
    errs = load_errors(tmp_path / "c.yaml")
    c, r = str(tmp_path / "c.yaml"), str(tmp_path / "rules")
    assert [e.split(": ")[0] for e in errs] == [f"{c}:2:17", f"{r}/a.yaml:2:38", f"{r}/b.yaml:2:12"]
    with pytest.raises(PolicyError) as e:
        load_config(tmp_path / "c.yaml")
    assert str(e.value) == "\n".join(errs)


def test_missing_config_file(tmp_path: Path) -> None:
    assert load_errors(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: cannot read: no such file"]


def test_unreadable_rule_file(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "bin.yaml").write_bytes(b"\xff\xfe\x00rules")
    (tmp_path / "c.yaml").write_text("rules: [rules/]\n")
    [err] = load_errors(tmp_path / "c.yaml")
    assert err.startswith(f"{tmp_path / 'rules' / 'bin.yaml'}: cannot read: ")


def test_empty_config_means_defaults(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "c.yaml").write_text("")
    lc = load_config(tmp_path / "c.yaml")
    assert lc.config == Config() and lc.policy.rule_count == 0
    assert summary(lc.policy.decide(q("x.test"))) == ("approval", "default", None)


@pytest.mark.parametrize("text", ["", "rules:\n", "rules: []\n", "# only a comment\n"])
def test_empty_rule_files_are_fine(tmp_path: Path, text: str) -> None:
    assert make_policy(tmp_path, text).rule_count == 0


def test_folder_loading(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    (rules / "sub").mkdir(parents=True)
    (rules / "b.yml").write_text("rules: [{name: b, action: allow, hosts: [b.test]}]\n")
    (rules / "a.yaml").write_text("rules: [{name: a, action: allow, hosts: [a.test]}]\n")
    (rules / "notes.txt").write_text("not yaml: [")
    (rules / "sub" / "c.yaml").write_text(
        "rules: [{name: c, action: allow, hosts: [c.test]}]\n"
    )  # not recursive
    (rules / "tests.yaml").write_text("cases: [{url: 'https://a.test/', expect: allow}]\n")
    (tmp_path / "c.yaml").write_text("rules: [rules/]\napprovals: {persist_to: null}\n")
    report = load_config_report(tmp_path / "c.yaml")
    p = report.loaded.policy
    assert [r.ref.name for r in p.rules] == ["a", "b"]
    assert [f.name for f in p.rule_files] == ["a.yaml", "b.yml"]
    assert [f.name for f in report.skipped] == ["tests.yaml"]
    assert [r.ref.file for r in p.rules] == ["rules/a.yaml", "rules/b.yml"]


def test_a_test_file_named_explicitly_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("cases: []\n")
    (tmp_path / "c.yaml").write_text("rules: [t.yaml]\n")
    assert load_errors(tmp_path / "c.yaml") == [
        f"{tmp_path / 't.yaml'}:1:1: unknown key 'cases' (a rule file has only 'rules:' and 'credentials:')"
    ]


def test_persist_to_missing_is_fine_and_loaded_when_present(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "c.yaml").write_text("rules: [rules/]\napprovals: {persist_to: state/approved.yaml}\n")
    assert load_config(tmp_path / "c.yaml").policy.rule_count == 0
    (tmp_path / "state" / "approved.yaml").write_text(
        "rules:\n  # approved by alice\n  - {name: approved-1, action: allow, hosts: [new.test]}\n"
    )
    p = load_config(tmp_path / "c.yaml").policy
    assert summary(p.decide(q("new.test"))) == ("allow", "rule", "approved-1")
    assert p.decide(q("new.test")).rule.file == "state/approved.yaml"  # type: ignore[union-attr]


def test_rule_refs_and_normalised_entries(tmp_path: Path) -> None:
    p = make_policy(
        tmp_path,
        "rules:\n  - name: u\n    action: allow\n    hosts: ['Bücher.DE.', '*.ＥＸＡＭＰＬＥ.com']\n",
    )
    [r] = p.rules
    assert (r.ref.file, r.ref.line) == ("rules/r.yaml", 2)
    assert [str(x) for x in r.patterns] == ["xn--bcher-kva.de", "*.example.com"]
    assert r.hosts_raw == ("Bücher.DE.", "*.ＥＸＡＭＰＬＥ.com")


def test_yaml_12_semantics(tmp_path: Path) -> None:
    """`no` and `on` stay strings (a host named `no` is a name), so YAML 1.1 booleans never sneak in."""
    p = make_policy(tmp_path, "rules:\n  - {name: no, action: allow, hosts: [on]}\n")
    assert summary(p.decide(q("on"))) == ("allow", "rule", "no")


def test_load_policy_for_reload(tmp_path: Path) -> None:
    path = write_config(tmp_path, [{"name": "a", "action": "allow", "hosts": ["a.test"]}])
    lc = load_config(path)
    (tmp_path / "rules" / "r.yaml").write_text("rules: [{name: b, action: deny, hosts: [a.test]}]\n")
    p2 = load_policy(lc.config, lc.base_dir)
    assert summary(p2.decide(q("a.test"))) == ("deny", "rule", "b")
    (tmp_path / "rules" / "r.yaml").write_text("rules: [{name: b, action: deny, hosts: ['*.com']}]\n")
    with pytest.raises(PolicyError) as e:
        load_policy(lc.config, lc.base_dir)
    assert e.value.errors[0].startswith(f"{tmp_path / 'rules' / 'r.yaml'}:1:41: rule 'b': wildcard '*.com'")
    assert summary(lc.policy.decide(q("a.test"))) == ("allow", "rule", "a")  # the old policy is untouched


def test_absurdly_deep_yaml_is_an_error_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "deep.yaml").write_text("rules: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "c.yaml").write_text("rules: [deep.yaml]\n")
    assert load_errors(tmp_path / "c.yaml") == [
        f"{tmp_path / 'deep.yaml'}:1:1: cannot parse: RecursionError: maximum recursion depth exceeded"
    ]


def test_reload_reuses_unchanged_files_and_recompiles_changed_ones(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    big = tmp_path / "rules" / "a.yaml"
    big.write_text("rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n    clients: [ci]\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rules: [rules/]\nclients: [{name: ci, cidrs: [10.0.0.0/8]}]\n")
    lc = load_config(cfg)
    (tmp_path / "rules" / "b.yaml").write_text("rules:\n  - name: b\n    action: deny\n    hosts: [b.test]\n")
    p2 = load_policy(lc.config, lc.base_dir)
    assert p2.rules[0] is lc.policy.rules[0]  # a.yaml was not compiled again
    assert [r.ref.name for r in p2.rules] == ["a", "b"]
    big.write_text("rules:\n  - name: a2\n    action: allow\n    hosts: [a.test]\n")
    assert [r.ref.name for r in load_policy(lc.config, lc.base_dir).rules] == ["a2", "b"]
    # what compilation depends on is part of the key: without the client group the file is wrong
    big.write_text("rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n    clients: [ci]\n")
    cfg.write_text("rules: [rules/]\n")
    assert load_errors(cfg) == [f"{big}:5:15: rule 'a': unknown client group 'ci' (config has no clients)"]


# ---- the fast path: plainly written files compile to what the full path compiles -------------------


def compiled(cfg: Path, fast: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    load_mod._CACHE.clear()
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(load_mod, "_fast_file_result", lambda *a, **k: None)
        policy = load_config(cfg).policy
    load_mod._CACHE.clear()
    return [(r.order, r.ref, r.patterns, r.ports, r.methods, r.paths, r.clients, r.raw_tcp, r.hosts_raw,
             r._path_re.pattern if r._path_re else None) for r in policy.rules]


def generated(n: int) -> str:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from bench_policy import rule_text
    finally:
        sys.path.remove(str(REPO / "bench"))
    return "rules:\n" + "".join(rule_text(i) for i in range(n))


GOOD = [
    generated(300),
    "rules:\n  - name: a\n    action: allow\n    hosts: [a.test, '*.b.test', \"**.c.test\", 10.0.0.0/8]\n"
    "    ports: [443]\n    description: plain words, here\n  - name: b\n    action: deny\n"
    "    hosts: [Bücher.DE, 1.2.3.4]\n    methods: [post]\n    paths: ['/x/*']\n",
    "# header\n\nrules:\n  - name: a  # trailing comment: the generic plain reader\n    action: approval\n"
    "    hosts: [a.test]\n    raw_tcp: true\n",
]


@pytest.mark.parametrize("text", GOOD, ids=["generated", "mixed", "comments"])
def test_the_fast_path_compiles_what_the_full_path_compiles(text: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path, text, clients=[{"name": "ci", "cidrs": ["10.0.0.0/8"]}])
    assert load_mod._fast_file_result(tmp_path / "rules" / "r.yaml", "r.yaml", text, tmp_path,
                                      load_config(cfg).policy.settings) is not None
    assert compiled(cfg, True, monkeypatch) == compiled(cfg, False, monkeypatch)


@pytest.mark.parametrize("path", sorted((REPO / "rules").glob("*.yaml")), ids=lambda p: p.name)
def test_repository_rule_files_compile_the_same_both_ways(path: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path, path.read_text())
    assert compiled(cfg, True, monkeypatch) == compiled(cfg, False, monkeypatch)


BAD = [
    "rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n    colour: blue\n",  # unknown key
    "rules:\n  - name: a\n    action: allow\n    hosts: ['*.com']\n",  # wildcard over a suffix
    "rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n    ports: [70000]\n",
    "rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n  - name: a\n    action: deny\n"
    "    hosts: [b.test]\n",  # duplicate name: reported at the second name's value
    "rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n    clients: [nobody]\n",
    "rules:\n  - name: a\n    action: allow\n    hosts: [a.test]\n    paths: [x]\n",
]


@pytest.mark.parametrize("text", BAD)
def test_a_file_with_a_problem_gets_the_full_paths_messages(text: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path, text)

    def errors(fast: bool) -> list[str]:
        load_mod._CACHE.clear()
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(load_mod, "_fast_file_result", lambda *a, **k: None)
            with pytest.raises(PolicyError) as e:
                load_config(cfg)
        return e.value.errors

    got = errors(True)
    assert got == errors(False) and all(":" in line for line in got)


def test_duplicate_names_across_files_keep_their_positions(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "rules:\n  - name: same\n    action: allow\n    hosts: [a.test]\n")
    (tmp_path / "rules" / "s.yaml").write_text(
        "rules:\n  - action: deny\n    hosts: [b.test]\n    name: same\n")
    load_mod._CACHE.clear()
    with pytest.raises(PolicyError) as e:
        load_config(cfg)
    first = f"{tmp_path}/rules/r.yaml:2"
    want = f"{tmp_path}/rules/s.yaml:4:11: duplicate rule name 'same' (first defined at {first})"
    assert e.value.errors == [want]


# ---- the collector -----------------------------------------------------------------------------------


def test_a_load_leaves_the_collector_as_it_found_it(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, generated(50))
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            load_mod._CACHE.clear()
            load_config(cfg)
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
    assert gc.get_freeze_count() == 0 or gcpause.FREEZE_RULES <= 50


def test_a_big_policy_is_frozen_out_of_the_collector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod, "FREEZE_RULES", 100)
    cfg = write_config(tmp_path, generated(150))
    try:
        load_mod._CACHE.clear()
        load_config(cfg)
        assert gc.isenabled() and gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        load_mod._CACHE.clear()
        load_config(cfg)  # the next big load unfreezes first: what died since is collectable again
        assert gc.get_freeze_count() > 0 and gc.get_freeze_count() < frozen * 3
    finally:
        gc.unfreeze()
        load_mod._CACHE.clear()


@pytest.mark.parametrize("kind", ["folder", "dangling-link", "fifo"])
def test_a_rule_folder_entry_that_is_not_a_readable_file_is_an_error(tmp_path: Path, kind: str) -> None:
    """Skipping it would quietly take its rules away (a deny rule among them); a FIFO is never opened."""
    import os

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.yaml").write_text("rules:\n  - {name: a, action: deny, hosts: [a.example]}\n")
    bad = rules / "b.yaml"
    if kind == "folder":
        bad.mkdir()
    elif kind == "dangling-link":
        bad.symlink_to(rules / "gone.yaml")
    else:
        os.mkfifo(bad)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rules: [rules/]\n")
    why = {"folder": "a folder, not a rule file", "dangling-link": "a symbolic link to nothing",
           "fifo": "not a regular file"}[kind]
    assert load_errors(cfg) == [f"{tmp_path}/rules/b.yaml: cannot read: {why}"]


def test_a_rule_file_entry_that_is_a_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "rules" / "main.yaml").mkdir(parents=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rules: [rules/main.yaml]\n")
    [err] = load_errors(cfg)
    assert err.startswith(f"{cfg}:1:9: ") and err.endswith("'rules/main.yaml' is a folder, not a rule file")
