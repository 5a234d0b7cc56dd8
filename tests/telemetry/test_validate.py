"""audit_events: the teardown check the end-to-end harness runs on a proxy's event stream."""

from __future__ import annotations

import pytest

from tests.telemetry.events_audit import EventSchemaError, audit_events
from tests.telemetry.tel_helpers import DECISIONS, make, record


def test_accepts_a_clean_stream_and_counts_decisions() -> None:
    t, out = make()
    for rec in DECISIONS:
        t.decision(rec)
    t.emit(
        "tunnel.closed",
        flow_id=DECISIONS[1].request.flow_id,
        bytes_up=1,
        bytes_down=2,
        duration_s=0.1,
        destination={"host": "h", "port": 443},
    )
    assert len(audit_events(out.getvalue(), expected_decisions=len(DECISIONS))) == len(DECISIONS) + 1


@pytest.mark.parametrize("problem", ["missing", "twice", "stray", "orphan"])
def test_rejects(problem: str) -> None:
    t, out = make()
    t.decision(record(flow_id="a"))
    t.decision(record(flow_id="b"))
    expected = 2
    if problem == "missing":
        expected = 3
    elif problem == "twice":
        t.decision(record(flow_id="a"))
        expected = 3
    elif problem == "orphan":
        t.emit(
            "tunnel.closed",
            flow_id="zzz",
            bytes_up=0,
            bytes_down=0,
            duration_s=0.0,
            destination={"host": "h", "port": 1},
        )
    text = out.getvalue()
    if problem == "stray":
        text += "[12:00:01.123] client connect\n"  # a mitmproxy log line leaking into stdout
    with pytest.raises(EventSchemaError):
        audit_events(text, expected_decisions=expected)
