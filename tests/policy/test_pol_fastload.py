"""The fast load path: plainly written rule files compile to exactly what the full path compiles,
files with any problem still get the full path's messages, and big policies leave the collector
as they found it (paused while compiling, frozen out of it once built)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pol_helpers import REPO, write_config

from addons.config import gcpause
from addons.config import load as load_mod
from addons.config.load import PolicyError, load_config
from addons.policy.hosts import HostError, normalize_host, parse_pattern


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


# ---- parse_pattern's shortcut for plain names --------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="abcxn-_.019AZ*", min_size=1, max_size=20))
def test_the_plain_name_shortcut_agrees_with_normalize_host(text: str) -> None:
    from addons.policy import hosts

    def slow(raw: str) -> Any:
        try:
            return ("ok", normalize_host(raw))
        except HostError:
            return ("error",)

    if hosts._PLAIN_NAME.fullmatch(text) and len(text) <= 253 and "xn--" not in text:
        assert slow(text) == ("ok", text)
    for raw in (text, f"*.{text}", f"**.{text}"):
        try:
            p = parse_pattern(raw)
        except HostError:
            continue
        if p.kind in ("exact", "below", "apex_below"):
            assert slow(raw.lstrip("*").lstrip(".")) == ("ok", p.value)


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


def test_pauses_nest_and_overlap() -> None:
    assert gc.isenabled()
    with gcpause.collector_paused():
        with gcpause.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


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
