"""Property tests: whatever strings a client controls, the stream stays one valid event per line."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.telemetry.fields import MAX_STR, TRUNCATED, escape_controls
from addons.telemetry.validate import validate_lines
from tests.telemetry.tel_helpers import TtyIO, make, record

hostile = st.text(st.characters(codec=None, exclude_categories=("Cs",)), max_size=300) | st.sampled_from(
    ["\r\n", '"}', "\x1b[2J", "\x00", "\u2028", "\x85", "\\", '{"event":"egress.decision"}']
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host=hostile, path=hostile, detail=hostile, user=hostile)
def test_json_stream_round_trips_any_client_string(host: str, path: str, detail: str, user: str) -> None:
    t, out = make()
    t.decision(record(host=host, path="/" + path, detail=detail, client_user=user))
    text = out.getvalue()
    assert text.count("\n") == 1 and len(text.splitlines()) == 1 and text.isascii()
    (ev,) = validate_lines(text)
    want = host[:MAX_STR] + (TRUNCATED if len(host) > MAX_STR else "") if host else None  # "": unknown
    assert ev["destination"]["host"] == want
    assert ev["detail"] == detail and ev["client"]["user"] == user
    assert "?" not in ev["request"]["path"] and "#" not in ev["request"]["path"]


@settings(max_examples=100, deadline=None)
@given(value=hostile)
def test_console_escaping_leaves_no_control_character(value: str) -> None:
    esc = escape_controls(value)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in esc)
    t, out = make(stream=TtyIO(), log={"format": "console"})
    t.decision(record(host=value))
    assert len(out.getvalue().splitlines()) == 1
