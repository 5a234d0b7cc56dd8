"""SECURITY.md names the tests that prove each guarantee: every one of them must exist, so the
document cannot rot. `tests/x.py` must be a file (or `tests/x/` a folder); `tests/x.py::name` must
also define `name` (a test function or class) in that file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECURITY = REPO / "SECURITY.md"
# A tests/ path in the text: stops at whitespace, backticks, quotes, brackets and commas.
REF = re.compile(r"(?<![\w/.])(tests/[\w./-]*[\w/])(?:::(\w+))?")
# Folders SECURITY.md names as coming from branches not merged yet (it says so next to them). Once
# one exists it is checked like any other path; drop it from here when it has landed.
PENDING = {"tests/faults/"}


def references(text: str) -> list[tuple[str, str | None]]:
    """Every (path, name-or-None) that the text names, in order, without repeats."""
    seen: dict[tuple[str, str | None], None] = {}
    for m in REF.finditer(text):
        seen.setdefault((m.group(1), m.group(2)), None)
    return list(seen)


def missing(refs: list[tuple[str, str | None]], root: Path) -> list[str]:
    problems = []
    for path, name in refs:
        target = root / path
        if path in PENDING and name is None and not target.exists():
            continue
        if not target.exists():
            problems.append(f"{path}: no such file or folder")
        elif name is not None:
            if not target.is_file():
                problems.append(f"{path}::{name}: {path} is not a file")
            elif not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", target.read_text(), re.M):
                problems.append(f"{path}::{name}: {path} defines no {name}")
    return problems


def test_every_test_path_named_in_security_md_exists() -> None:
    refs = references(SECURITY.read_text())
    assert len(refs) >= 50, f"only {len(refs)} test references found: has the format changed?"
    assert missing(refs, REPO) == []


def test_every_named_test_function_exists() -> None:
    named = [r for r in references(SECURITY.read_text()) if r[1] is not None]
    assert len(named) >= 40
    assert missing(named, REPO) == []


def test_pending_folders_are_said_to_come_from_elsewhere() -> None:
    text = SECURITY.read_text()
    for path in PENDING:
        at = text.find(f"`{path}`")
        assert at >= 0, f"{path} is no longer named: remove it from PENDING"
        assert "other branches" in text[at : at + 400]


def test_the_readme_links_it() -> None:
    assert "SECURITY.md" in (REPO / "README.md").read_text()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("see `tests/nowhere/test_gone.py`", "tests/nowhere/test_gone.py: no such file or folder"),
        ("`tests/test_security_md.py::test_not_here`",
         "tests/test_security_md.py::test_not_here: tests/test_security_md.py defines no test_not_here"),
        ("`tests/adversarial/::test_x`", "tests/adversarial/::test_x: tests/adversarial/ is not a file"),
    ],
)
def test_the_checker_catches_what_rots(text: str, problem: str) -> None:
    assert missing(references(text), REPO) == [problem]


def test_the_checker_reads_paths_as_written() -> None:
    text = ("`tests/recording.py`), (`tests/telemetry/audit_plugin.py` and "
            "`tests/proxy/test_ca.py::test_ca_command`, tests/adversarial/. and tests/faults/")
    assert references(text) == [
        ("tests/recording.py", None),
        ("tests/telemetry/audit_plugin.py", None),
        ("tests/proxy/test_ca.py", "test_ca_command"),
        ("tests/adversarial/", None),
        ("tests/faults/", None),
    ]
    assert missing(references("`tests/proxy/test_ca.py::test_ca_command`"), REPO) == []
