"""addons/telemetry/fields.py: field hygiene. Unit tests of nesting, bounding, redaction and escaping, then
through the event stream: client-controlled Host, path and SNI can never forge a field or a line (examples
and hypothesis properties)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from enum import Enum
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.telemetry.fields import (
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_KEY,
    MAX_STR,
    TRUNCATED,
    clean,
    clean_url,
    escape_all,
    escape_controls,
    is_secret_key,
    nest,
    strip_query,
    text,
    truncate,
)
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
    for written in (out.getvalue(), (tmp_path / "ev.jsonl").read_text()):
        assert written.count("\n") == 2 and len(written.splitlines()) == 2  # splitlines knows \u2028, \x85
        assert written.isascii() and all(c == "\n" or 0x20 <= ord(c) < 0x7F for c in written)
        dec, req = validate_lines(written)
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
    assert len(validate_lines(out.getvalue())) == 1


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


# -- properties (hypothesis) ------------------------------------------------------------------------

hostile = st.text(st.characters(codec=None), max_size=300) | st.sampled_from(  # lone surrogates too
    ["\r\n", '"}', "\x1b[2J", "\x00", "\u2028", "\x85", "\\", '{"event":"egress.decision"}', "G\udc85T"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host=hostile, path=hostile, detail=hostile, user=hostile)
def test_json_stream_round_trips_any_client_string(host: str, path: str, detail: str, user: str) -> None:
    t, out = make()
    t.decision(record(host=host, path="/" + path, detail=detail, client_user=user))
    got = out.getvalue()
    assert got.count("\n") == 1 and len(got.splitlines()) == 1 and got.isascii()
    (ev,) = validate_lines(got)
    want = text(host[:MAX_STR] + (TRUNCATED if len(host) > MAX_STR else "")) if host else None  # "": unknown
    assert ev["destination"]["host"] == want
    assert ev["detail"] == text(detail) and ev["client"]["user"] == text(user)
    _strict(ev)
    assert "?" not in ev["request"]["path"] and "#" not in ev["request"]["path"]


@settings(max_examples=100, deadline=None)
@given(value=hostile)
def test_console_escaping_leaves_no_control_character(value: str) -> None:
    esc = escape_controls(value)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in esc)
    t, out = make(stream=TtyIO(), log={"format": "console"})
    t.decision(record(host=value))
    assert len(out.getvalue().splitlines()) == 1


# -- the functions one by one -----------------------------------------------------------------------


def test_truncate() -> None:
    assert truncate("abc", 3) == "abc"
    assert truncate("abcd", 3) == "abc" + TRUNCATED
    assert truncate("x" * MAX_STR) == "x" * MAX_STR and truncate("x" * (MAX_STR + 1)).endswith(TRUNCATED)


@pytest.mark.parametrize(
    ("path", "want"),
    [("/a?b", "/a"), ("/a#f", "/a"), ("/a#f?b", "/a"), ("/a?b#f", "/a"), ("/a", "/a"), ("", "")],
)
def test_strip_query(path: str, want: str) -> None:
    assert strip_query(path) == want


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("https://user:pw@hooks.example.com/p?sig=1#x", "https://hooks.example.com/p"),
        ("https://hooks.example.com:8443/p", "https://hooks.example.com:8443/p"),
        ("http://a@b/c", "http://b/c"),
        ("not a url?x", "not a url"),
    ],
)
def test_clean_url(url: str, want: str) -> None:
    assert clean_url(url) == want


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("authorization", True),
        ("Proxy_Authorization", True),
        ("password", True),
        ("db.password", True),
        ("webhook-secret", True),
        ("api_key", True),
        ("headers", True),
        ("set_cookie", True),
        ("credential", False),  # egress.decision names the credential applied (a name, never the value)
        ("credentials", True),
        ("db_credential", True),
        ("proxy.credential", True),
        ("token", True),
        ("token_env", False),  # the name of a variable, not its value
        ("tokens_used", False),
        ("path", False),
        ("secretary", False),
        ("reason", False),
    ],
)
def test_is_secret_key(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_nest() -> None:
    assert nest({"client.address": "a", "client": {"name": "n"}, "x": 1}) == {
        "client": {"address": "a", "name": "n"},
        "x": 1,
    }
    assert nest({"a": 1, "a.b": 2}) == {"a": {"b": 2}}  # the dotted (more specific) fact wins
    assert nest({"a.b": 1, "a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    assert nest({}) == {}


def test_nest_merges_at_every_depth() -> None:
    assert nest({"a.b.c": 1, "a": {"b": {"d": 2}}}) == {"a": {"b": {"c": 1, "d": 2}}}


def test_clean_values() -> None:
    class Colour(Enum):
        RED = "red"

    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    doc = {
        "n": None,
        "b": True,
        "i": 3,
        "f": 1.5,
        "inf": float("inf"),
        "nan": float("nan"),
        "e": Colour.RED,
        "bytes": b"ok\xff",
        "when": when,
        "day": date(2026, 1, 2),
        "set": {1},
        "tuple": (1, "a"),
        "obj": Fraction(1, 3),
        "webhook_url": "https://u:p@h/x?q=1",
        "path": "/p?q=1",
        "password": "hunter2",
        "nested": {"Cookie": "c", "ok": "yes"},
    }
    out = clean(doc)
    assert out["n"] is None and out["b"] is True and out["i"] == 3 and out["f"] == 1.5
    assert (out["inf"], out["nan"]) == ("inf", "nan")  # JSON has no such numbers
    assert out["e"] == "red" and out["bytes"] == "ok\\xff"
    assert out["when"] == when.isoformat() and out["day"] == "2026-01-02"
    assert out["set"] == [1] and out["tuple"] == [1, "a"] and out["obj"] == "1/3"
    assert out["webhook_url"] == "https://h/x" and out["path"] == "/p"
    assert "password" not in out and out["nested"] == {"ok": "yes"}


def test_clean_is_bounded_in_size_and_depth() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(MAX_DEPTH + 5):
        node["d"] = {}
        node = node["d"]  # type: ignore[assignment]
    out = clean(deep)
    depth = 0
    while isinstance(out, dict):
        out = out["d"]
        depth += 1
    assert out == TRUNCATED and depth <= MAX_DEPTH + 2
    many = clean({f"k{i}": i for i in range(MAX_ITEMS * 2)})
    assert len(many) == MAX_ITEMS
    assert len(clean(list(range(MAX_ITEMS * 2)))) == MAX_ITEMS
    (key,) = clean({"k" * 1000: 1})
    assert len(key) == MAX_KEY + len(TRUNCATED)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("plain", "plain"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x1b[31m", "\\x1b[31m"),
        ("\x7f\x85", "\\x7f\\x85"),
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("back\\slash", "back\\\\slash"),
        ("ünï", "ünï"),
    ],
)
def test_escape_controls(raw: str, want: str) -> None:
    assert escape_controls(raw) == want


def test_escape_all_reaches_keys_and_nested_values() -> None:
    assert escape_all({"k\n": ["v\r", {"x": "\x00"}], "n": 1}) == {
        "k\\x0a": ["v\\x0d", {"x": "\\x00"}],
        "n": 1,
    }


# -- lone surrogates (bytes that are not UTF-8, as mitmproxy decodes them) --------------------------

SURROGATES = [("G\udc85T", "G\\x85T"), ("\udcff\udcfe", "\\xff\\xfe"), ("a\ud800b", "a\\ud800b"),
              ("\ud83d\ude00", "\\ud83d\\ude00"), ("ok-\u00e9", "ok-\u00e9")]


@pytest.mark.parametrize(("raw", "shown"), SURROGATES)
def test_lone_surrogates_are_written_as_text(raw: str, shown: str) -> None:
    assert text(raw) == shown and text(raw).encode("utf-8")
    assert clean({"method": raw, "path": "/" + raw, "url": "http://x/" + raw, raw: [raw]}) == {
        "method": shown, "path": "/" + shown, "url": "http://x/" + shown, shown: [shown]}
    assert truncate(raw * MAX_STR).endswith(TRUNCATED)


def _strict(doc: object) -> None:
    """Every string (keys too) is Unicode text a strict parser accepts (encodes as UTF-8)."""
    for s in _strings(doc):
        s.encode("utf-8")
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in s), s


def _strings(v: object) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        return [s for k, x in v.items() for s in [str(k), *_strings(x)]]
    if isinstance(v, list | tuple):
        return [s for x in v for s in _strings(x)]
    return []


def test_no_output_carries_a_lone_surrogate(tmp_path: Path) -> None:
    """JSON lines, OCSF, OpenTelemetry attributes and the syslog message all get the same text."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    from addons.config.models import TelemetryConfig
    from addons.telemetry.events import Telemetry
    from addons.telemetry.otel import OtelBridge
    from addons.telemetry.syslog import format_message

    hostile = record(method="G\udc85T", host="h\udcff.test", detail="d\ud800", client_user="u\udc80",
                     path="/p\udc85")
    for fmt in ("json", "ocsf"):
        t, out = make(log={"format": fmt})
        t.decision(hostile)
        t.emit("approval.decided", approval_id="a\udc85", reason="r\udcff", by="admin")
        for line in out.getvalue().splitlines():
            assert line.isascii()
            _strict(json.loads(line))  # a \udc85 escape would parse back to a lone surrogate
            # syslog sends that very line as the RFC 5424 MSG
            format_message(12, "2026-12-01T09:03:00.123Z", "gw", "portcullis", "1", "x", line).decode("utf-8")
        if fmt == "json":
            ev = lines(out)[0]
            assert ev["request"]["method"] == "G\\x85T" and ev["destination"]["host"] == "h\\xff.test"
            got = (ev["detail"], ev["client"]["user"], ev["request"]["path"])
            assert got == ("d\\ud800", "u\\x80", "/p\\x85")
    exp = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exp))
    import io

    t = Telemetry(TelemetryConfig(), stream=io.StringIO(), otel=OtelBridge(provider))
    t.decision(hostile)
    (rec,) = exp.get_finished_logs()
    attrs = dict(rec.log_record.attributes or {})
    _strict(attrs)
    assert (attrs["http.request.method"], attrs["http.request.method_original"]) == ("_OTHER", "G\\x85T")
    assert attrs["server.address"] == "h\\xff.test"
