"""The rule persister for `always`: append a rule to `persist_to` atomically (lock, temp file, fsync,
rename), never clobbering a file it cannot read; the hot reload then picks the rule up."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from addons.approvals.errors import ApprovalError
from addons.approvals.model import Approval, Choice, DecideError

_ATTEMPTS = 5


class Persister:
    """Writes the rule of an `always` decision, in a worker thread, before the decision is stored."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    async def write(self, a: Approval, choice: Choice, by: str | None, reason: str | None,
                    now: float) -> None:
        """DecideError 422 without persist_to, 500 when the rule cannot be written (nothing decided)."""
        if self.path is None:
            raise DecideError(422, "no_persist_to", "scope always needs approvals.persist_to in the config; "
                              "use once or session", a)
        try:
            await asyncio.to_thread(
                append_rule, self.path, name=rule_name(choice, a.host, a.port, a.id), action=choice,
                host=a.host, port=a.port, clients=[a.client_name] if a.client_name else None, by=by,
                reason=reason, now=now)
        except (ApprovalError, OSError) as e:
            raise DecideError(500, "persist_failed", f"could not write the rule, nothing was decided: {e}",
                              a) from e


def rule_name(action: Choice, host: str, port: int, approval_id: str) -> str:
    """A unique, readable rule name: approved-<host>-<port>-<short id> (denied-... for deny)."""
    safe = re.sub(r"[^a-z0-9.-]+", "-", host.lower()).strip("-") or "host"
    verb = "approved" if Choice(action) is Choice.ALLOW else "denied"
    return f"{verb}-{safe}-{port}-{approval_id.removeprefix('apr_')[:8]}"


def append_rule(path: Path, *, name: str, action: Choice, host: str, port: int, clients: list[str] | None,
                by: str | None, reason: str | None, now: float) -> None:
    """Append one rule with a `# <action> by X at T: why` comment, atomically.

    A concurrent writer that uses this function waits on the directory lock. A manual edit
    that lands while we prepare the new text is detected (the file is re-read right before
    the rename) and we start over from the edited text, so it is not lost.
    Raises ApprovalError when the current file is not a valid rule file (never clobbers it).
    """
    action = Choice(action)  # a plain "allow"/"deny" too; anything else is a ValueError, not a deny rule
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    rule: dict[str, Any] = {"name": name, "action": action.value, "hosts": [host], "ports": [port]}
    if clients:
        rule["clients"] = clients
    when = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    verb = "approved" if action is Choice.ALLOW else "denied"
    comment = f"{verb} by {_one_line(by or 'unknown')} at {when}: {_one_line(reason or '(no reason given)')}"
    with _dir_lock(path.parent):
        for _ in range(_ATTEMPTS):
            before = _read(path)
            text = _with_rule(before, rule, comment, path)
            if _commit(path, before, text):
                return
    raise ApprovalError(f"{path}: the file kept changing while the rule was being added; try again")


def _one_line(s: str) -> str:
    return " ".join(s.split())[:200]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _load(text: str, path: Path) -> Any:
    try:
        return YAML(typ="rt").load(text)
    except YAMLError as e:
        raise ApprovalError(f"{path}: not valid YAML, refusing to rewrite it: {e}".replace("\n", " ")) from e


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _with_rule(before: str | None, rule: dict[str, Any], comment: str, path: Path) -> str:
    item = _rule_text(rule, comment, 2)
    if before is None or not before.strip():
        return (before or "") + "rules:\n" + item
    doc = _load(before, path)
    if doc is None:  # only comments
        return before.rstrip("\n") + "\nrules:\n" + item
    rules = doc.get("rules") if isinstance(doc, CommentedMap) else None
    if not isinstance(doc, CommentedMap) or not isinstance(rules, CommentedSeq | type(None)):
        raise ApprovalError(f"{path}: expected a mapping with a 'rules' list, refusing to rewrite it")
    old = _plain(rules or [])
    if isinstance(rules, CommentedSeq) and rules and not rules.fa.flow_style() \
            and list(doc.keys())[-1] == "rules":
        # Fast path that leaves every existing byte alone: append text at the same indentation.
        col = max(0, rules.lc.item(0)[1] - 2)
        text = before.rstrip("\n") + "\n" + _rule_text(rule, comment, col)
    else:
        text = _round_trip(doc, rule, comment)
    if not _appends(text, old, rule, path):  # never write something that changes other rules
        text = _round_trip(_load(before, path), rule, comment)
        if not _appends(text, old, rule, path):
            raise ApprovalError(f"{path}: could not append the rule without changing others; edit by hand")
    return text


def _appends(text: str, old: list[Any], rule: dict[str, Any], path: Path) -> bool:
    """Does `text` hold exactly the old rules followed by the new one?"""
    try:
        new = _load(text, path)
    except ApprovalError:  # an unusual indentation style defeated the text append
        return False
    return isinstance(new, CommentedMap) and _plain(new.get("rules")) == [*old, rule]


def _rule_text(rule: dict[str, Any], comment: str, col: int) -> str:
    pad = " " * col
    lines = [f"{pad}# {comment}"]
    for i, (k, v) in enumerate(rule.items()):
        lead = "- " if i == 0 else "  "
        lines.append(f"{pad}{lead}{k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def _round_trip(doc: CommentedMap, rule: dict[str, Any], comment: str) -> str:
    rules = doc.get("rules")
    if not isinstance(rules, CommentedSeq):
        rules = CommentedSeq()
        doc["rules"] = rules
    rules.fa.set_block_style()
    m = CommentedMap()
    for k, v in rule.items():
        if isinstance(v, list):
            seq = CommentedSeq(v)
            seq.fa.set_flow_style()
            m[k] = seq
        else:
            m[k] = v
    rules.append(m)
    rules.yaml_set_comment_before_after_key(len(rules) - 1, before=comment, indent=2)
    y = YAML(typ="rt")
    y.indent(mapping=2, sequence=4, offset=2)
    out = io.StringIO()
    y.dump(doc, out)
    return out.getvalue()


def _commit(path: Path, before: str | None, text: str) -> bool:
    """Temp file in the same folder, fsync, re-check, rename, fsync the folder. False if edited meanwhile."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if _read(path) != before:  # someone edited it while we worked: start again from their text
            os.unlink(tmp)
            return False
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


@contextlib.contextmanager
def _dir_lock(folder: Path) -> Iterator[None]:
    # flock on the folder itself: no lock file to litter the rules folder.
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
