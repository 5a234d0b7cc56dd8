"""A strict fast reader for plainly written rule files; anything it is not sure of goes to ruamel.yaml.

ruamel.yaml's round-trip loader is pure Python (about 0.5-1.5 ms per rule): a generated file of
100,000 rules would take minutes. Rule files are almost always written in one simple shape:

    rules:
      - name: x                 # comment lines and trailing comments are fine
        action: allow
        hosts: [a.example, "*.b.example", 'c']
        ports: [443]

This reader accepts exactly that shape (block list of block mappings; scalar or one-line flow
list values; plain, single- or double-quoted scalars without escapes) and returns the same
CommentedMap/CommentedSeq tree, with the same line/column data, that ruamel.yaml builds. It
returns None for ANYTHING else (anchors, tags, escapes, multi-line values, duplicate keys, tabs,
numbers other than small decimal ints, booleans other than true/false, ...), and the caller
then parses with ruamel.yaml, which also produces the error messages. Scalar typing uses
ruamel's own YAML 1.2 resolver, so `no` stays a string exactly as it does there.
"""

from __future__ import annotations

import re

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.resolver import VersionedResolver

_RESOLVER = VersionedResolver(version=(1, 2))
_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"
_BOOL_TAG = "tag:yaml.org,2002:bool"

_ITEM = re.compile(r"( *)- ([a-z_]+):(?: (.*))?$")
_KV = re.compile(r"( *)([a-z_]+):(?: (.*))?$")
# A plain scalar we accept: starts with a letter, digit, '_' or '.', no YAML indicators inside.
_PLAIN_START = re.compile(r"[A-Za-z0-9_./]|[^\x00-\x7f](?<=\w)")
_PLAIN_FLOW = re.compile(r"(?:[A-Za-z0-9_./]|[^\x00-\x7f](?<=\w))[^:#\t\"'\[\]{},&*!|>%@` ]*")
_DQ = re.compile(r'"([^"\\\t]*)"')
_SQ = re.compile(r"'([^'\t]*)'")
_SMALL_INT = re.compile(r"[1-9][0-9]{0,8}")  # ruamel makes "0" a ScalarInt: leave it to ruamel
_DOTTED = re.compile(r"[0-9]+(?:\.[0-9]+){2,}(?:/[0-9]+)?")


_WORDS = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n"})


class _Unsure(Exception):
    """Not in the accepted shape: let ruamel.yaml read the file."""


def _plain(text: str) -> str | int | bool:
    """Type a plain scalar as ruamel (YAML 1.2) would, for the kinds we accept."""
    if text[0].isalpha() and text.lower() not in _WORDS:
        return text  # YAML 1.2 gives a letter-led scalar another type only for these words
    if _SMALL_INT.fullmatch(text):
        return int(text)  # what the resolver makes of it (ports), without asking it
    if _DOTTED.fullmatch(text):
        return text  # addresses and CIDRs: two dots or more are no YAML 1.2 number, bool or date
    tag = _RESOLVER.resolve(ScalarNode, text, (True, False))
    if tag == _STR_TAG:
        return text
    if tag == _INT_TAG and _SMALL_INT.fullmatch(text):
        return int(text)
    if tag == _BOOL_TAG and text in ("true", "false"):
        return text == "true"
    raise _Unsure


def _end(rest: str) -> None:
    """What follows a value on its line: nothing, or spaces and a comment."""
    stripped = rest.lstrip(" ")
    if stripped and not (stripped.startswith("#") and stripped != rest):
        raise _Unsure


def _flow(text: str, line: int, col: int, plain: bool = False) -> CommentedSeq | list[object]:
    """A one-line flow list of scalars starting at text[0] == '['; `col` is that bracket's column.
    `plain`: a list, without positions."""
    seq: CommentedSeq | list[object]
    if plain:
        seq = []
    else:
        seq = CommentedSeq()
        seq._yaml_set_line_col(line, col)
    i = 1
    n = len(text)
    while True:
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == "]" and not seq:
            return _flow_done(seq, text, i)
        if i >= n:
            raise _Unsure
        start = i
        m = _DQ.match(text, i) or _SQ.match(text, i)
        if m:
            value: str | int | bool = m.group(1)
            i = m.end()
        else:
            m = _PLAIN_FLOW.match(text, i)
            if not m:
                raise _Unsure
            value = _plain(m.group(0))
            i = m.end()
        seq.append(value)
        if not plain:
            seq._yaml_set_idx_line_col(len(seq) - 1, [line, col + start])  # type: ignore[union-attr]
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            return _flow_done(seq, text, i)
        raise _Unsure


def _flow_done(seq: CommentedSeq | list[object], text: str, close: int) -> CommentedSeq | list[object]:
    _end(text[close + 1:])
    return seq


def _value(text: str | None, line: int, col: int, plain: bool = False) -> object:
    """A value that starts at column `col` of `line` (0-based) and fills the rest of the line."""
    if not text or text[0] == " ":
        raise _Unsure  # empty values and odd spacing: ruamel decides
    if text[0] == "[":
        return _flow(text, line, col, plain)
    m = _DQ.match(text) or _SQ.match(text)
    if m:
        _end(text[m.end():])
        return m.group(1)
    body = text.partition(" #")[0].rstrip(" ")  # a plain scalar ends at ' #' (a comment)
    if not _PLAIN_START.match(body) or ": " in body or body.endswith(":"):
        raise _Unsure
    return _plain(body)


def parse_rule_file(text: str) -> CommentedMap | None:
    """The ruamel-equivalent tree of a plainly written rule file, or None when unsure."""
    try:
        return _parse(text, None)
    except _Unsure:
        return None


PlainRule = tuple[dict[str, object], int, tuple[int, int]]


def read_rules(text: str) -> list[PlainRule] | None:
    """The same reading as parse_rule_file, as plain values: per rule its mapping (dicts and lists
    equal to ruamel's), the 1-based line of its `- ` item, and the 1-based (line, column) of its
    name's value (or its item line and column 1 without a name). None where parse_rule_file is."""
    fast = _read_simplest(text)
    if fast is not None:
        return fast
    rules: list[PlainRule] = []
    try:
        _parse(text, rules)
    except _Unsure:
        return None
    return rules


_PLAIN_RE = r"(?:[A-Za-z0-9_./]|[^\x00-\x7f](?<=\w))[^:#\t\"'\[\]{},&*!|>%@` \n]*"  # _PLAIN_FLOW
_ELEMENT = rf"(?:\"[^\"\\\t,\n]*\"|'[^'\t,\n]*'|{_PLAIN_RE})"  # quoted without commas, or plain
# One line of the simplest spelling: indent, "- ", key, and a value (a flow list, quoted or plain).
_LINES = re.compile(rf"^( *)(- )?([a-z_]+): (\[(?:{_ELEMENT}(?:, {_ELEMENT})*)?\]"
                    rf"|\"[^\"\\\t\n]*\"|'[^'\t\n]*'|{_PLAIN_RE})$", re.M)


def _read_simplest(text: str) -> list[PlainRule] | None:
    """read_rules for the simplest spelling only (what generators write): comment lines only before
    `rules:`, no trailing spaces, no blank-looking lines of spaces, flow lists as `[a, b]`. One regex
    pass finds every line's parts; None for anything else (then _parse reads it)."""
    if _ODD_CHARS.search(text):
        return None
    lines = text.split("\n")
    first = _first_content(lines)
    if first >= len(lines) or lines[first] != "rules:":
        return None
    body = "\n".join(lines[first + 1:])
    if "#" in body:
        return None
    numbers = [i for i, line in enumerate(lines[first + 1:], first + 2) if line]  # 1-based
    parts = _LINES.findall(body)
    if len(parts) != len(numbers) or not parts:
        return None  # some line is not `key: value` or `- key: value` in the simplest spelling
    try:
        return _simplest_rules(numbers, parts)
    except _Unsure:
        return None  # a plain scalar _plain would not type


def _simplest_rules(numbers: list[int], parts: list[tuple[str, str, str, str]]) -> list[PlainRule] | None:
    rules: list[PlainRule] = []
    scalars: dict[str, object] = {}
    lists: dict[str, tuple[object, ...]] = {}
    dash_col = key_col = -1
    item: dict[str, object] = {}
    for number, (indent, dash, key, value) in zip(numbers, parts, strict=True):
        col = len(indent)
        if dash:
            if dash_col < 0:
                dash_col = col
            elif col != dash_col:
                return None
            key_col = col + 2
            item = {}
            rules.append((item, number, (number, 1)))
        elif col != key_col:
            return None
        if key in item or key in _WORDS:
            return None
        if key == "name":
            rules[-1] = (item, rules[-1][1], (number, key_col + 7))
        first_char = value[0]
        if first_char == "[":
            seq = lists.get(value)
            if seq is None:
                seq = lists[value] = tuple(_simplest_scalar(e) for e in value[1:-1].split(", ") if e)
            item[key] = list(seq)
        elif first_char == '"' or first_char == "'":
            item[key] = value[1:-1]
        else:
            v = scalars.get(value, scalars)
            if v is scalars:
                v = scalars[value] = _plain(value)
            item[key] = v
    return rules


def _simplest_scalar(text: str) -> object:
    """A list element _LINES has already checked: quoted (no escapes) or plain."""
    return text[1:-1] if text[0] == '"' or text[0] == "'" else _plain(text)


def _skip(line: str) -> bool:
    s = line.lstrip(" ")
    return not s or s.startswith("#")


def _first_content(lines: list[str]) -> int:
    """The index of the first line that is neither blank nor a comment (len(lines) when none is)."""
    i = 0
    while i < len(lines) and _skip(lines[i]):
        i += 1
    return i


# Anything but LF and printable characters (ruamel treats NEL, LS, PS as line breaks; BOMs, CR, tabs
# and control characters are left to it as well).
_ODD_CHARS = re.compile(
    "[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]")


def _parse(text: str, plain: list[PlainRule] | None) -> CommentedMap:
    """The tree; with `plain` (a list), the rules are appended to it as plain values instead."""
    if _ODD_CHARS.search(text):
        raise _Unsure
    lines = text.split("\n")
    i = _first_content(lines)
    if i >= len(lines) or lines[i].rstrip(" ") != "rules:":
        raise _Unsure
    root = CommentedMap()
    seq = CommentedSeq()
    if plain is None:
        root._yaml_set_line_col(i, 0)
        root["rules"] = seq
    rules_line = i
    i += 1
    dash_col = -1
    item: CommentedMap | dict[str, object] | None = None
    key_col = -1
    n = len(lines)
    while i < n:
        raw = lines[i]
        if _skip(raw):
            i += 1
            continue
        m = _ITEM.match(raw)
        if m:
            if dash_col < 0:
                dash_col = len(m.group(1))
                if plain is None:
                    seq._yaml_set_line_col(i, dash_col)
                    root._yaml_set_kv_line_col("rules", [rules_line, 0, i, dash_col])
            elif len(m.group(1)) != dash_col:
                raise _Unsure
            key_col = dash_col + 2
            if plain is not None:
                item = {}
                plain.append((item, i + 1, (i + 1, 1)))
            else:
                item = CommentedMap()
                item._yaml_set_line_col(i, key_col)
                seq.append(item)
                seq._yaml_set_idx_line_col(len(seq) - 1, [i, key_col])
            _add(item, m.group(2), m.group(3), i, key_col, plain)
            i += 1
            continue
        m = _KV.match(raw)
        if m is None or item is None or len(m.group(1)) != key_col:
            raise _Unsure  # a new top-level key, deeper nesting, continuation lines ...
        _add(item, m.group(2), m.group(3), i, key_col, plain)
        i += 1
    if dash_col < 0:
        raise _Unsure  # `rules:` with no items: ruamel gives None; let it say so
    return root


def _add(item: CommentedMap | dict[str, object], key: str, text: str | None, line: int, key_col: int,
         plain: list[PlainRule] | None = None) -> None:
    if key in item or key in _WORDS:
        raise _Unsure  # duplicate key (ruamel reports it), or a key YAML reads as true/null
    value_col = key_col + len(key) + 2
    item[key] = _value(text, line, value_col, plain is not None)
    if plain is None:
        item._yaml_set_kv_line_col(key, [line, key_col, line, value_col])  # type: ignore[union-attr]
    elif key == "name":
        rule, item_line, _ = plain[-1]
        plain[-1] = (rule, item_line, (line + 1, value_col + 1))
