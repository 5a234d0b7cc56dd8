"""Fixtures for the proxy's end-to-end tests (the harness lives in tests/harness.py)."""

from tests.harness import upstreams  # noqa: F401  (session fixture)
