"""addons/config/rulefiles.py: which files hold the rules, in order, and how each is named."""

from __future__ import annotations

import os
from pathlib import Path

from addons.config.models import Config
from addons.config.rulefiles import ref_file, rule_paths
from addons.config.yamlio import ErrorList


def _config(rules: list[str], persist_to: str | None = None) -> Config:
    return Config.model_validate({"rules": rules, "approvals": {"persist_to": persist_to}})


def test_files_and_folders_in_order_each_once_and_persist_to_last(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    for name in ("b.yaml", "a.yml", "notes.txt"):
        (tmp_path / "rules" / name).write_text("rules: []\n")
    (tmp_path / "extra.yaml").write_text("rules: []\n")
    (tmp_path / "approved.yaml").write_text("rules: []\n")
    errors = ErrorList()
    got = rule_paths(_config(["extra.yaml", "rules/", "rules/b.yaml"], "approved.yaml"), tmp_path, {},
                     "portcullis.yaml", errors)
    assert [shown for _, shown in got] == ["extra.yaml", "rules/a.yml", "rules/b.yaml", "approved.yaml"]
    assert errors.items == []


def test_an_entry_that_is_not_a_readable_file_is_an_error_never_skipped(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "ok.yaml").write_text("rules: []\n")
    (rules / "dir.yaml").mkdir()
    os.symlink(tmp_path / "gone.yaml", rules / "dangling.yaml")
    errors = ErrorList()
    got = rule_paths(_config(["rules/", "missing.yaml"]), tmp_path, {}, "portcullis.yaml", errors)
    assert [shown for _, shown in got] == ["rules/ok.yaml"]
    text = "\n".join(item[3] for item in errors.items)
    for what in ("dir.yaml", "dangling.yaml", "missing.yaml"):
        assert what in text, text


def test_a_rule_file_is_named_relative_to_the_config_folder_when_inside_it(tmp_path: Path) -> None:
    assert ref_file(tmp_path / "rules" / "a.yaml", tmp_path) == "rules/a.yaml"
    assert ref_file(Path("/etc/other.yaml"), tmp_path) == "/etc/other.yaml"
