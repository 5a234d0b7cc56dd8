"""Prometheus: no label value is ever a host, URL, address or id, whatever the traffic."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from addons.policy.model import Reason
from tests.telemetry.tel_helpers import DECISIONS, make, record

BOUNDED = {
    "decision": {"allow", "deny"},
    "reason": {r.value for r in Reason},
    "enforced": {"true", "false"},
    "sink": {"stdout", "file", "render", "metrics", "otlp"},
    "outcome": {r.value for r in Reason} | {"approved", "denied", "timeout", "error", "expired"},
    "result": {"success", "failure", "retry", "failed", "gone", "error"},
}
HOSTILE_HOSTS = [
    "evil.example",
    "169.254.169.254",
    "[::1]",
    "https://x.example/path?q=1",
    "flow-XYZ",
    "apr-123",
]


def test_label_values_stay_in_bounded_sets() -> None:
    t, _ = make()
    for rec in DECISIONS:
        t.decision(rec)
    for i, host in enumerate(HOSTILE_HOSTS):
        t.decision(record(host=host, flow_id=f"flow-{i}", client_address="10.9.9.9", approval_id="apr-123"))
        # A caller cannot put a host where a reason or a verdict belongs: those are enums.
        with pytest.raises(ValueError):
            record(host=host, decision=host, reason=host, flow_id=host)
    t.metrics.events_dropped.labels("file").inc()
    text = t.metrics.render().decode()
    seen: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for k, v in s.labels.items():
                seen.setdefault(k, set()).add(v)
                if k == "le":
                    float(v)  # histogram bucket bounds are numbers
                    continue
                assert k in BOUNDED, f"unexpected label {k} on {s.name}"
                assert v in BOUNDED[k], f"{s.name}{{{k}={v!r}}}"
    assert seen["decision"] == {"allow", "deny"} and seen["reason"] >= {"rule", "default", "private_address"}
    for bad in [*HOSTILE_HOSTS, "10.9.9.9", "10.0.1.5", "pastebin.com", "flow-1"]:
        assert f'"{bad}"' not in text


def test_requests_counted_by_decision_and_reason() -> None:
    t, _ = make()
    t.decision(record(decision="deny", reason="default"))
    t.decision(record(decision="deny", reason="default"))
    t.decision(record(decision="allow", reason="rule", enforced=True))
    text = t.metrics.render().decode()
    assert 'portcullis_requests_total{decision="deny",enforced="true",reason="default"} 2.0' in text
    assert 'portcullis_requests_total{decision="allow",enforced="true",reason="rule"} 1.0' in text
    assert "portcullis_decision_duration_seconds_count 3.0" in text


def test_every_metric_is_exported_and_each_instance_has_its_own_registry() -> None:
    from addons.telemetry.metrics import Metrics

    a, b = Metrics(), Metrics()
    a.requests.labels("allow", "rule", "true").inc()
    a.tunnels_open.inc()
    text = a.render().decode()
    for name in (
        "portcullis_requests_total",
        "portcullis_decision_duration_seconds_bucket",
        "portcullis_approvals_pending",
        "portcullis_rules_loaded",
        "portcullis_tunnels_open 1.0",
    ):
        assert name in text, name
    for help_name in (
        "approval_requests",
        "approval_wait_seconds",
        "webhook_deliveries",
        "rule_reloads",
        "events_dropped",
        "events_buffered",
    ):
        assert f"# HELP portcullis_{help_name}" in text, help_name
    assert "portcullis_tunnels_open 0.0" in b.render().decode()  # not shared
