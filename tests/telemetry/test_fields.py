"""Log injection: client-controlled Host, path and SNI can never forge a field or a line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from addons.telemetry.fields import MAX_STR, TRUNCATED
from addons.telemetry.validate import validate_lines
from tests.telemetry.tel_helpers import TtyIO, lines, make, record

HOSTILE = [
    'evil.com\r\n{"schema":"portcullis.event/v1","event":"egress.decision","decision":"allow"}',
    'a.com"}, "decision": "allow", "x": {"',
    "ansi\x1b[2J\x1b[31m.example",
    "nul\x00byte.example",
    "sep\u2028line\u2029para\x85next.example",
    "tab\tand\vform\ffeed",
    "back\\slash\\n.example",
    "ünïcödé.example",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_json_keeps_one_event_per_line_and_the_exact_value(value: str, tmp_path: Path) -> None:
    t, out = make(tmp_path, log={"file": "ev.jsonl"})
    t.decision(record(host=value, path="/" + value, detail=f"SNI {value} != authority"))
    t.emit("approval.requested", approval_id=value, destination={"host": value, "port": 443})
    for text in (out.getvalue(), (tmp_path / "ev.jsonl").read_text()):
        assert text.count("\n") == 2 and len(text.splitlines()) == 2  # str.splitlines knows \u2028, \x85 ...
        assert text.isascii() and all(c == "\n" or 0x20 <= ord(c) < 0x7F for c in text)
        dec, req = validate_lines(text)
        assert dec["destination"]["host"] == value and dec["decision"] == "deny"
        assert dec["request"]["path"] == "/" + value.split("?")[0].split("#")[0]
        assert dec["detail"] == f"SNI {value} != authority"
        assert req["approval_id"] == value and "decision" not in req


def test_very_long_values_are_truncated_and_marked() -> None:
    t, out = make()
    t.decision(record(host="a" * 10_000 + ".example", path="/" + "p" * 100_000))
    (ev,) = lines(out)
    assert len(ev["destination"]["host"]) == MAX_STR + len(TRUNCATED)
    assert ev["destination"]["host"].endswith(TRUNCATED)
    assert ev["request"]["path"].endswith(TRUNCATED)
    validate_lines(out.getvalue())


def test_console_escapes_every_control_character() -> None:
    t, out = make(stream=TtyIO(), log={"format": "console"})
    for value in HOSTILE:
        t.decision(record(host=value, path="/" + value))
    text = out.getvalue()
    assert text.count("\n") == len(HOSTILE) == len(text.splitlines())
    assert "\r" not in text and "\x00" not in text and "\u2028" not in text and "\x85" not in text
    # colour codes come from the renderer itself; the hostile ESC sequences must not
    assert "\x1b[2J" not in text and "\\x1b[2J" in text


def test_hostile_field_names_are_bounded_and_escaped() -> None:
    t, out = make()
    t.emit("webhook.failed", **{'x"\n{': "v", "k" * 500: 1, "headers": {"Cookie": "c"}})
    (ev,) = lines(out)
    assert 'x"\n{' in ev and all(len(k) <= 128 + len(TRUNCATED) for k in ev)
    assert "headers" not in ev
    assert json.dumps(ev)  # round-trips
