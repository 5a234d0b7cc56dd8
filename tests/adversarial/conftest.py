"""Fixtures for the adversarial suite: the session's upstreams plus the recording servers."""

from collections.abc import Iterator

import pytest

from tests.adversarial.adv import Recorders, start_recorders
from tests.harness import Upstreams, upstreams  # noqa: F401  (session fixture)


@pytest.fixture(scope="session")
def recorders(upstreams: Upstreams) -> Iterator[Recorders]:  # noqa: F811
    r = start_recorders(upstreams)
    yield r
    r.server.stop()
