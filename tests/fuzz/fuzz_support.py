"""Shared by the fuzz tests: bounded hypothesis settings, strategies for hostile strings, and an exact
comparison of two ruamel-style YAML trees (values, types, line/column data)."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from ruamel.yaml.comments import CommentedMap, CommentedSeq

# CI: bounded (a few seconds per test). PORTCULLIS_FUZZ_EXAMPLES raises the budget for a long run,
# e.g. PORTCULLIS_FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest tests/fuzz -q
_SCALE = int(os.environ.get("PORTCULLIS_FUZZ_EXAMPLES", "0"))


def bounded(examples: int) -> settings:
    return settings(
        max_examples=_SCALE or examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        print_blob=True,
    )


# Characters that matter to host, authority and header parsers, plus anything unicode.
SPECIAL = list("./:@[]%#?\\ \t\r\n\x00\x0b\x0c\x7f-_*,;=+!~'\"`$&()<>{}|^") + [
    "\u3002", "\uff0e", "\uff61", "\u00ad", "\u200b", "\u200d", "\u2028", "\u2029", "\u0085", "\ufeff",
    "\uff10", "\u0660", "\u00df", "\u0131", "\u0130", "\u212a", "xn--", "0x", "0X", "::", "%25", "..",
]
ASCII_HOSTISH = st.text(alphabet="abcxyz0123456789-_.", min_size=1, max_size=20)
hostile_text = st.one_of(
    st.lists(st.sampled_from([*SPECIAL, *"abcdefxyzABC0123456789"]), max_size=25).map("".join),
    st.text(st.characters(codec=None, exclude_categories=("Cs",)), max_size=40),
    ASCII_HOSTISH,
)


def same_tree(a: Any, b: Any, path: str = "") -> None:
    """Equal values, equal Python types, equal line/column data at every node."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, CommentedMap):
        assert list(a) == list(b), path
        assert (a.lc.line, a.lc.col) == (b.lc.line, b.lc.col), path
        for k in a:
            assert list(a.lc.data[k]) == list(b.lc.data[k]), (path, k)
            same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, CommentedSeq):
        assert len(a) == len(b), path
        assert (a.lc.line, a.lc.col) == (b.lc.line, b.lc.col), path
        for i in range(len(a)):
            assert list(a.lc.data[i]) == list(b.lc.data[i]), (path, i)
            same_tree(a[i], b[i], f"{path}[{i}]")
    else:
        assert a == b, path
