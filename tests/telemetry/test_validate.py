"""addons/telemetry/validate.py: the shipped JSON Schemas checked for one event and for a stream (an empty
stream is refused unless asked for), and audit_events, the teardown check the end-to-end harness runs on a
proxy's event stream."""

from __future__ import annotations

import pytest

from addons.policy.model import Reason
from addons.telemetry.events import EVENT_TYPES
from addons.telemetry.validate import event_types, validate_event, validate_lines
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


@pytest.mark.parametrize("text", ["", "\n", "  \n\n"])
def test_an_empty_stream_is_refused(text: str) -> None:
    with pytest.raises(EventSchemaError, match="0 events in the stream, expected at least 1"):
        validate_lines(text)
    with pytest.raises(EventSchemaError, match="0 events"):
        audit_events(text)
    with pytest.raises(EventSchemaError, match="0 events"):
        audit_events([])
    assert validate_lines(text, min_events=0) == []  # where nothing is the right answer, say so
    assert audit_events(text, min_events=0) == []


def test_fewer_events_than_asked_for_are_refused() -> None:
    t, out = make()
    t.decision(record(flow_id="a"))
    t.decision(record(flow_id="b"))
    assert [e["flow_id"] for e in validate_lines(out.getvalue(), min_events=2)] == ["a", "b"]
    with pytest.raises(EventSchemaError, match="2 events in the stream, expected at least 3"):
        validate_lines(out.getvalue(), min_events=3)
    with pytest.raises(EventSchemaError, match="expected at least 3"):
        audit_events(out.getvalue(), min_events=3)


def test_blank_lines_are_skipped_and_bad_lines_named() -> None:
    t, out = make()
    t.decision(record())
    line = out.getvalue().strip()
    assert len(validate_lines(f"\n{line}\n\n")) == 1
    with pytest.raises(EventSchemaError, match="line 2: not JSON"):
        validate_lines(f"{line}\n{{oops\n")
    with pytest.raises(EventSchemaError, match="line 1: egress.decision: "):
        validate_lines(line.replace('"decision":"deny"', '"decision":"maybe"'))
    with pytest.raises(EventSchemaError, match="line 1: event is not a JSON object"):
        validate_lines("[1, 2]\n")


def test_every_event_type_has_a_schema_and_nothing_else_validates() -> None:
    assert event_types() == sorted(EVENT_TYPES)
    with pytest.raises(EventSchemaError, match="unknown event type 'nope'"):
        validate_event({"event": "nope"})
    with pytest.raises(EventSchemaError, match="not a JSON object"):
        validate_event("egress.decision")


def test_a_refused_tunnel_may_carry_a_second_decision_on_its_flow() -> None:
    t, out = make()
    allowed = record(decision="allow", reason="rule", layer="connect", method="CONNECT", path=None,
                     scheme=None, flow_id="t1", status=None)
    t.decision(allowed)
    t.decision(allowed.refused(Reason.SNI_MISMATCH, "the TLS server name differs"))
    assert len(audit_events(out.getvalue(), expected_decisions=2)) == 2
    t.decision(allowed.refused(Reason.SNI_MISMATCH, "a third"))  # but not a third
    with pytest.raises(EventSchemaError, match="more than once"):
        audit_events(out.getvalue())
