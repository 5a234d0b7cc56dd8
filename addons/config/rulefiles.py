"""Which files hold the rules: the config's `rules:` entries (files, and folders of *.yaml/*.yml),
the `approvals.persist_to` file, and how each file is named in decisions and events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from addons.config.models import Config
from addons.config.yamlio import ErrorList, pos


def rule_paths(config: Config, base_dir: Path, data: Any, shown_cfg: str,
                errors: ErrorList) -> list[tuple[Path, str]]:
    """(path, shown path) of every rule file, in order. Folders: *.yaml/*.yml, sorted, not recursive."""
    out: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for i, entry in enumerate(config.rules):
        path = base_dir / entry
        shown = str(Path(shown_cfg).parent / entry)
        if path.is_dir() and Path(entry).suffix in RULE_SUFFIXES:
            errors.add(shown_cfg, *pos(data, ("rules", i), value=True),
                       f"rules: {entry!r} is a folder, not a rule file")
        elif path.is_dir():
            named = sorted(p for p in path.iterdir() if p.suffix in RULE_SUFFIXES)
            for p in named:  # a rule file that cannot be read must not quietly take its rules away
                if not p.is_file():
                    errors.add_plain(str(Path(shown) / p.name), f"cannot read: {_not_a_file(p)}")
            files = [p for p in named if p.is_file()]
            out.extend((p, str(Path(shown) / p.name)) for p in files if p.resolve() not in seen)
            seen.update(p.resolve() for p in files)
        elif path.is_file():
            if path.resolve() not in seen:  # the same file named twice is loaded once
                out.append((path, shown))
            seen.add(path.resolve())
        else:
            errors.add(shown_cfg, *pos(data, ("rules", i), value=True),
                       f"rules: {entry!r}: no such file or folder")
    # scope=always grants are written to persist_to; load it even when no rules entry covers it.
    if config.approvals.persist_to:
        persist = base_dir / config.approvals.persist_to
        if persist.is_file() and persist.resolve() not in seen:
            out.append((persist, str(Path(shown_cfg).parent / config.approvals.persist_to)))
    return out


RULE_SUFFIXES = (".yaml", ".yml")


def _not_a_file(p: Path) -> str:
    """Why a *.yaml entry of a rule folder is not a rule file (it is never opened: it may be a FIFO)."""
    if p.is_symlink() and not p.exists():
        return "a symbolic link to nothing"
    if p.is_dir():
        return "a folder, not a rule file"
    return "not a regular file"


def ref_file(path: Path, base_dir: Path) -> str:
    """The rule file as named in decisions and events: relative to the config folder if inside it."""
    try:
        return path.resolve().relative_to(base_dir.resolve()).as_posix()
    except ValueError:
        return str(path)
