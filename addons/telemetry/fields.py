"""Field hygiene for events: nesting dotted keys, bounding and escaping strings, redacting secrets."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import date, datetime
from enum import Enum
from functools import lru_cache
from typing import Any

# Client-controlled strings (Host, path, SNI, user names) are cut to this many characters;
# the cut is marked so a reader never mistakes it for the real value.
MAX_STR = 2048
TRUNCATED = "...[truncated]"
MAX_KEY = 128
MAX_DEPTH = 8
MAX_ITEMS = 256

# Keys whose values are credentials or header contents: never written, whatever a caller passes.
# A bare `credential` is the exception: egress.decision names the injected credential (its name; the
# value never reaches an event), while `credentials`, `db_credential` and the like stay redacted.
_SECRET_KEY = re.compile(
    r"(^|[_.-])(authorization|proxy_authorization|password|passwd|secret|token|cookie|set_cookie|"
    r"headers|api_key|apikey|credentials)$|[_.-]credential$",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@")
# Characters that a terminal or a line-oriented reader would interpret: C0, DEL, C1, line/para separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
# Lone surrogates are not Unicode text: mitmproxy decodes bytes that are not UTF-8 with surrogateescape
# (0x85 -> U+DC85) and JSON bodies may spell one (\ud800). json.dumps writes them as \udc85, which
# strict parsers (serde_json, Vector, jq) refuse; UTF-8 encoders raise.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_text(m: re.Match[str]) -> str:
    o = ord(m.group(0))
    return f"\\x{o - 0xDC00:02x}" if 0xDC80 <= o <= 0xDCFF else f"\\u{o:04x}"


def text(s: str) -> str:
    """`s` with every lone surrogate written as text: the byte it stood for as `\\xNN`, else `\\uNNNN`."""
    return s if s.isascii() else _SURROGATE.sub(_surrogate_text, s)


def truncate(s: str, limit: int = MAX_STR) -> str:
    """At most `limit` characters (the cut marked), every lone surrogate as text (see `text`)."""
    return text(s if len(s) <= limit else s[:limit] + TRUNCATED)


def strip_query(path: str) -> str:
    """The path without query string or fragment (defensive: the proxy should pass none)."""
    for sep in ("?", "#"):
        i = path.find(sep)
        if i >= 0:
            path = path[:i]
    return path


def clean_url(url: str) -> str:
    """A URL without userinfo, query string or fragment."""
    return strip_query(_USERINFO.sub(r"\1", url))


@lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def nest(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`{"client.address": x, "client": {"name": y}}` -> `{"client": {"address": x, "name": y}}`.

    Callers may pass nested dicts or dotted keys (`**{"client.address": ...}`); both end up nested.
    A dotted key wins over a non-dict value at the same place (the later, more specific fact).
    """
    out: dict[str, Any] = {}
    for key, value in fields.items():
        parts = str(key).split(".") if "." in str(key) else [str(key)]
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            _merge(node[leaf], nest(value))
        elif isinstance(value, Mapping):
            node[leaf] = nest(value)
        else:
            node[leaf] = value
    return out


def _merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Deep merge: nested dicts meet at every depth (a dotted key and a nested dict both survive)."""
    for k, v in more.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def clean(value: Any, key: str = "", depth: int = 0) -> Any:
    """A JSON-safe copy: bounded strings, no secrets, URLs without userinfo or query."""
    # Exact-type fast paths first: this runs for every field of every event.
    t = type(value)
    if value is None or t is bool or t is int:
        return value
    if t is str and not key.endswith("url") and key != "path":
        return truncate(value)
    if depth > MAX_DEPTH:
        return TRUNCATED
    if value is None or isinstance(value, bool | int):
        return value.value if isinstance(value, Enum) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Enum):
        return clean(value.value, key, depth)
    if isinstance(value, str):
        if key.endswith("url"):
            value = clean_url(value)
        elif key == "path":
            value = strip_query(value)
        return truncate(value)
    if isinstance(value, bytes):
        return truncate(value.decode("utf-8", "backslashreplace"))
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in list(value.items())[:MAX_ITEMS]:
            ks = truncate(str(k), MAX_KEY)
            if is_secret_key(ks):
                continue
            out[ks] = clean(v, ks, depth + 1)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [clean(v, key, depth + 1) for v in list(value)[:MAX_ITEMS]]
    return truncate(str(value))


def escape_controls(s: str) -> str:
    """Console rendering: every control character (and the backslash) shown as an escape."""
    def esc(m: re.Match[str]) -> str:
        c = m.group(0)
        if c == "\\":
            return "\\\\"
        o = ord(c)
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"
    return _CONTROL.sub(esc, s)


def escape_all(value: Any) -> Any:
    """escape_controls applied to every string (keys too) in a cleaned document."""
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, dict):
        return {escape_controls(str(k)): escape_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_all(v) for v in value]
    return value
