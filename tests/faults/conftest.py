"""Fault injection end to end (issue 11): every test here starts real proxies, so the whole folder is
marked `e2e` (the fast tier leaves it out) and `faults` (`pytest -m faults` runs only these)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import upstreams  # noqa: F401  (session fixture)

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.faults)
