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


_WORDS = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n"})


class _Unsure(Exception):
    """Not in the accepted shape: let ruamel.yaml read the file."""


def _plain(text: str) -> str | int | bool:
    """Type a plain scalar as ruamel (YAML 1.2) would, for the kinds we accept."""
    if text[0].isalpha() and text.lower() not in _WORDS:
        return text  # YAML 1.2 gives a letter-led scalar another type only for these words
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


def _flow(text: str, line: int, col: int) -> CommentedSeq:
    """A one-line flow list of scalars starting at text[0] == '['; `col` is that bracket's column."""
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
        seq._yaml_set_idx_line_col(len(seq) - 1, [line, col + start])
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            return _flow_done(seq, text, i)
        raise _Unsure


def _flow_done(seq: CommentedSeq, text: str, close: int) -> CommentedSeq:
    _end(text[close + 1:])
    return seq


def _value(text: str | None, line: int, col: int) -> object:
    """A value that starts at column `col` of `line` (0-based) and fills the rest of the line."""
    if not text or text[0] == " ":
        raise _Unsure  # empty values and odd spacing: ruamel decides
    if text[0] == "[":
        return _flow(text, line, col)
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
        return _parse(text)
    except _Unsure:
        return None


def _skip(line: str) -> bool:
    s = line.lstrip(" ")
    return not s or s.startswith("#")


# Anything but LF and printable characters (ruamel treats NEL, LS, PS as line breaks; BOMs, CR, tabs
# and control characters are left to it as well).
_ODD_CHARS = re.compile(
    "[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]")


def _parse(text: str) -> CommentedMap:
    if _ODD_CHARS.search(text):
        raise _Unsure
    lines = text.split("\n")
    i = 0
    while i < len(lines) and _skip(lines[i]):
        i += 1
    if i >= len(lines) or lines[i].rstrip(" ") != "rules:":
        raise _Unsure
    root = CommentedMap()
    root._yaml_set_line_col(i, 0)
    seq = CommentedSeq()
    root["rules"] = seq
    rules_line = i
    i += 1
    dash_col = -1
    item: CommentedMap | None = None
    key_col = -1
    while i < len(lines):
        raw = lines[i]
        if _skip(raw):
            i += 1
            continue
        m = _ITEM.match(raw)
        if m:
            if dash_col < 0:
                dash_col = len(m.group(1))
                seq._yaml_set_line_col(i, dash_col)
                root._yaml_set_kv_line_col("rules", [rules_line, 0, i, dash_col])
            elif len(m.group(1)) != dash_col:
                raise _Unsure
            key_col = dash_col + 2
            item = CommentedMap()
            item._yaml_set_line_col(i, key_col)
            seq.append(item)
            seq._yaml_set_idx_line_col(len(seq) - 1, [i, key_col])
            _add(item, m.group(2), m.group(3), i, key_col)
            i += 1
            continue
        m = _KV.match(raw)
        if m is None or item is None or len(m.group(1)) != key_col:
            raise _Unsure  # a new top-level key, deeper nesting, continuation lines ...
        _add(item, m.group(2), m.group(3), i, key_col)
        i += 1
    if dash_col < 0:
        raise _Unsure  # `rules:` with no items: ruamel gives None; let it say so
    return root


def _add(item: CommentedMap, key: str, text: str | None, line: int, key_col: int) -> None:
    if key in item or key in _WORDS:
        raise _Unsure  # duplicate key (ruamel reports it), or a key YAML reads as true/null
    value_col = key_col + len(key) + 2
    item[key] = _value(text, line, value_col)
    item._yaml_set_kv_line_col(key, [line, key_col, line, value_col])
