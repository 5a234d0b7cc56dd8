"""The suite-wide check that nothing reaches an upstream without a logged decision letting it through."""

from __future__ import annotations

from typing import Any

import pytest

from tests.telemetry import audit_plugin as ap


def _decision(
    host: str,
    layer: str,
    decision: str = "allow",
    enforced: bool = True,
    method: str | None = "GET",
    path: str | None = "/x",
) -> dict[str, Any]:
    return {
        "event": "egress.decision",
        "decision": decision,
        "enforced": enforced,
        "layer": layer,
        "destination": {"host": host},
        "request": {"method": method, "path": path},
    }


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    decisions: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(ap, "DECISIONS", decisions)
    monkeypatch.setattr(ap, "UPSTREAM_SEEN", seen)
    return decisions, seen


@pytest.mark.parametrize(
    ("decision", "request_seen", "covered"),
    [
        (
            _decision("public.test", "http"),
            {"host": "public.test:8080", "method": "GET", "path": "/x?q=1"},
            True,
        ),
        (_decision("public.test", "http"), {"host": "PUBLIC.TEST.", "method": "GET", "path": "/x"}, True),
        (_decision("public.test", "http"), {"host": "public.test", "method": "POST", "path": "/x"}, False),
        (_decision("public.test", "http"), {"host": "public.test", "method": "GET", "path": "/other"}, False),
        (_decision("public.test", "http"), {"host": "evil.test", "method": "GET", "path": "/x"}, False),
        (
            _decision("public.test", "http", "deny"),
            {"host": "public.test", "method": "GET", "path": "/x"},
            False,
        ),
        (
            _decision("public.test", "http", "deny", enforced=False),
            {"host": "public.test", "method": "GET", "path": "/x"},
            True,
        ),
        (
            _decision("public.test", "connect", method="CONNECT", path=None),
            {"host": "public.test:443", "method": "PUT", "path": "/anything"},
            True,
        ),
        (
            _decision("public.test", "connect", "deny", method="CONNECT", path=None),
            {"host": "public.test", "method": "GET", "path": "/x"},
            False,
        ),
        (_decision("::1", "http"), {"host": "[::1]:8080", "method": "GET", "path": "/x"}, True),
    ],
    ids=[
        "allowed",
        "spelling",
        "other-method",
        "other-path",
        "other-host",
        "denied",
        "audit-mode",
        "tunnel",
        "denied-tunnel",
        "ipv6",
    ],
)
def test_upstream_requests_need_a_logged_pass(
    state: tuple[list[dict[str, Any]], list[dict[str, Any]]],
    decision: dict[str, Any],
    request_seen: dict[str, Any],
    covered: bool,
) -> None:
    decisions, seen = state
    decisions.append(decision)
    seen.append({"server": "http", **request_seen})
    assert (ap.unlogged_upstream_requests() == []) is covered
