"""YAML reading (ruamel.yaml, YAML 1.2) and pydantic validation with every error as path:line:col."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from addons.config.fastyaml import parse_rule_file


@dataclass
class ErrorList:
    """Errors collected across files, sorted by (file order, line, column) at the end."""

    items: list[tuple[int, int, int, str]] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, line: int, col: int, message: str) -> None:
        order = self.files.setdefault(path, len(self.files))
        self.items.append((order, line, col, f"{path}:{line}:{col}: {message}"))

    def add_raw(self, path: str, line: int, col: int, text: str) -> None:
        """An already formatted line (from a cached or nested ErrorList) for `path`."""
        order = self.files.setdefault(path, len(self.files))
        self.items.append((order, line, col, text))

    def add_plain(self, path: str, message: str) -> None:
        order = self.files.setdefault(path, len(self.files))
        self.items.append((order, 0, 0, f"{path}: {message}"))

    def sorted(self) -> list[str]:
        return [t[3] for t in sorted(self.items, key=lambda t: t[:3])]


# ---------------------------------------------------------------------------------------------
# YAML and positions


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y


def read_text(path: Path, shown: str, errors: ErrorList) -> str | None:
    """The file's text, or None with a `path: cannot read: ...` error recorded."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        errors.add_plain(shown, "cannot read: no such file")
    except (OSError, UnicodeDecodeError) as e:
        errors.add_plain(shown, f"cannot read: {getattr(e, 'strerror', None) or e}")
    return None


def parse_yaml(text: str, shown: str, errors: ErrorList, *, rule_file: bool = False) -> tuple[bool, Any]:
    """(ok, data). A YAML syntax error is recorded with its position and ok is False.

    Rule files first go through the strict fast reader (same tree as ruamel.yaml, or it declines).
    """
    if rule_file:
        tree = parse_rule_file(text)
        if tree is not None:
            return True, tree
    try:
        return True, _yaml().load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(str(x) for x in (e.context, e.problem) if x) or "YAML error"
        ctx = e.context_mark
        if ctx is not None and mark is not None and ctx.line != mark.line:
            problem += f" (the construct started at line {ctx.line + 1}, column {ctx.column + 1})"
        if mark is not None:
            errors.add(shown, mark.line + 1, mark.column + 1, problem.replace("\n", " "))
        else:
            errors.add(shown, 1, 1, problem.replace("\n", " "))
    except YAMLError as e:
        errors.add(shown, 1, 1, str(e).replace("\n", " "))
    except (RecursionError, ValueError, TypeError) as e:  # e.g. absurdly deep nesting: an error, not a crash
        errors.add(shown, 1, 1, f"cannot parse: {type(e).__name__}: {e}"[:300])
    return False, None


def read_yaml(path: Path, shown: str, errors: ErrorList, *, rule_file: bool = False) -> tuple[bool, Any]:
    """(ok, data) of a file: read_text then parse_yaml."""
    text = read_text(path, shown, errors)
    if text is None:
        return False, None
    return parse_yaml(text, shown, errors, rule_file=rule_file)


def pos(node: Any, loc: Sequence[Any], value: bool = False) -> tuple[int, int]:
    """1-based (line, col) of the YAML node a pydantic `loc` points at (the key, or its value)."""
    line, col = (node.lc.line, node.lc.col) if hasattr(node, "lc") else (0, 0)
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            if value and part == loc[-1]:
                line, col = node.lc.value(part)
            else:
                line, col = node.lc.key(part)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line, col = node.lc.item(part)
            node = node[part]
        # anything else is a pydantic union/validator tag, not a YAML node: skip it
    return line + 1, col + 1


_PYDANTIC_TAGS = frozenset({"constrained-str", "str", "int", "bool", "float", "list", "dict"})


def _loc_text(loc: Sequence[Any]) -> str:
    """A pydantic loc as `a.b.0`, without the union/validator tags pydantic inserts."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _PYDANTIC_TAGS)))


def _message(err: Any) -> str:
    msg = str(err["msg"])
    value = err.get("input")
    if err["type"].endswith("_type") and isinstance(value, str | int | float | bool) and value is not None:
        msg += f" (got {value!r})"
    return msg


def validate_model(model: type[BaseModel], data: Any, shown: str, errors: ErrorList, *,
                   prefix: tuple[Any, ...] = (), label: str = "") -> Any:
    """Validate `data` (a ruamel node) against `model`; every error is recorded with its position.

    `prefix` is the loc of `data` inside its file (for messages); `label` starts each message.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            loc = tuple(err["loc"])
            where = _loc_text(loc if label else prefix + loc)
            lead = f"{label}: " if label else ""
            if err["type"] == "extra_forbidden":
                line, col = pos(data, loc)
                parent = _loc_text(loc[:-1] if label else prefix + loc[:-1])
                errors.add(shown, line, col,
                           f"{lead}unknown key {loc[-1]!r}" + (f" in {parent}" if parent else ""))
            elif err["type"] == "missing":
                line, col = pos(data, loc[:-1])
                errors.add(shown, line, col, f"{lead}{where}: required key is missing")
            else:
                line, col = pos(data, loc, value=True)
                errors.add(shown, line, col, f"{lead}{where + ': ' if where else ''}{_message(err)}")
        return None
