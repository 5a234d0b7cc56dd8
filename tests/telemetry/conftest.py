"""Fixtures for the telemetry tests that run a real proxy (the harness lives in tests/harness.py)."""

from tests.harness import upstreams  # noqa: F401  (session fixture)
