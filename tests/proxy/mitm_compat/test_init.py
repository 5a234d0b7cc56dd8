"""mitm_compat as a whole: the supported mitmproxy versions, and install() (idempotent, everything at
once). (That `portcullis run` refuses an unsupported mitmproxy: tests/proxy/e2e/test_lifecycle.py.)"""

from __future__ import annotations

import pytest
from mitmproxy import version

from addons.proxy import mitm_compat


def test_the_installed_mitmproxy_is_supported():
    assert mitm_compat.check_version() is None


@pytest.mark.parametrize("fake", ["12.3.0", "13.0.1", "11.1.3"])
def test_an_unsupported_mitmproxy_names_what_to_install(monkeypatch, fake):
    monkeypatch.setattr(version, "VERSION", fake)
    msg = mitm_compat.check_version()
    assert msg is not None and fake in msg and "mitmproxy>=12.2,<12.3" in msg
