"""Suite-wide: every proxy an end-to-end test starts has its event stream audited at stop
(every stdout line a valid portcullis.event/v1 event, no decision logged twice, /metrics labels bounded);
and the in-process resolver's answer cache starts empty for every test (tests fake getaddrinfo)."""

from collections.abc import Iterator

import pytest

from addons.pipeline.dns import system_lookup

pytest_plugins = ["tests.telemetry.audit_plugin"]


@pytest.fixture(autouse=True)
def _fresh_dns_cache() -> Iterator[None]:
    system_lookup.clear()
    yield
    system_lookup.clear()
