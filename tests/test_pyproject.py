"""Packaging metadata that setuptools reads without deprecation warnings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_license_is_an_spdx_string_and_setuptools_reads_it() -> None:
    doc = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    # PEP 639: an SPDX expression, not the deprecated {text = ...} table (setuptools warns on that).
    assert doc["project"]["license"] == "Apache-2.0"
    # setuptools understands the string form from 77 on; an older one would reject it.
    reqs = doc["build-system"]["requires"]
    m = [re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", r) for r in reqs]
    assert any(x and int(x.group(1)) >= 77 for x in m), reqs
