"""The fast event path: the orjson line renderer and the directly built decision document.

Both must give exactly what the generic path gave: `json.dumps(ensure_ascii=True)` bytes for the
line, and `_envelope(decision_fields(o))` for the document.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.pipeline.model import Outcome
from addons.policy.model import Action, Client, Layer, Reason, Request, RuleRef
from addons.telemetry import events
from addons.telemetry.events import Telemetry
from addons.telemetry.fields import MAX_ITEMS, MAX_STR, TRUNCATED
from addons.telemetry.render import dumps_ascii
from tests.telemetry.tel_helpers import DECISIONS, lines, make, record


def reference(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":"), default=str)


PRINTABLE = re.compile(r"[\x20-\x7e]*")

# Every character class a reader could split a line on or a terminal interpret, and a few more.
NASTY = (
    "".join(chr(i) for i in range(0x20))
    + "\x7f"
    + "".join(chr(i) for i in range(0x80, 0xA0))
    + "\u2028\u2029\ufeff\u200b\u202e"
    + "é中😀\U0010ffff"
    + '"\\/'
)


def test_every_control_and_non_ascii_character_is_escaped_like_json_dumps() -> None:
    doc = {"host": NASTY, NASTY: [NASTY, {"k": NASTY}], "n": 1, "b": True, "z": None}
    line = dumps_ascii(doc)
    assert PRINTABLE.fullmatch(line)
    assert line == reference(doc)
    assert json.loads(line) == doc
    for c in "\x00\n\r\x1b\x7f\x85\u2028\u2029":
        assert c not in line
    assert "\\u007f" in line and "\\u0085" in line and "\\u2028" in line and "\\u2029" in line
    assert "\\ud83d\\ude00" in line  # astral characters as surrogate pairs, as json.dumps writes them


def test_del_alone_in_an_otherwise_ascii_line_is_escaped() -> None:
    assert dumps_ascii({"a": "x\x7fy"}) == '{"a":"x\\u007fy"}'


@pytest.mark.parametrize(
    "doc",
    [
        {"lone": "\udc80 surrogate"},  # orjson refuses lone surrogates
        {"big": 2**70},  # and integers beyond 64 bits
        {1: "non-str key"},
        {"obj": object.__new__(type("Thing", (), {"__str__": lambda self: "thing\u2028"}))},
    ],
)
def test_what_orjson_refuses_or_cannot_encode_is_rendered_by_json_dumps(doc: dict[Any, Any]) -> None:
    line = dumps_ascii(doc)
    assert line == reference(doc)
    assert PRINTABLE.fullmatch(line)


def test_deep_nesting_falls_back_too() -> None:
    doc: Any = "leaf\x85"
    for _ in range(300):  # deeper than orjson's limit
        doc = [doc]
    assert dumps_ascii(doc) == reference(doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_document_renders_exactly_as_json_dumps(doc: Any) -> None:
    line = dumps_ascii(doc)
    assert line == reference(doc)
    assert PRINTABLE.fullmatch(line)


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_round_trip(value: float) -> None:
    assert json.loads(dumps_ascii({"f": value})) == {"f": value}


# ---- the decision document -------------------------------------------------------------------


def generic(o: Outcome) -> dict[str, Any]:
    """What the generic path (emit with decision_fields) builds, without the timestamp."""
    doc = events._envelope("egress.decision", events.decision_fields(o))
    doc.pop("timestamp")
    return doc


def fast(o: Outcome) -> dict[str, Any]:
    doc = events.decision_doc(o)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc.pop("timestamp"))
    return doc


HOSTILE = ["evil\r\n{}", "nul\x00", "sep\u2028\x85", "a" * (MAX_STR + 10), "", "ünï.example", "q?x=1#f",
           "lone \udc85 surrogate \ud800"]


@pytest.mark.parametrize("o", DECISIONS)
def test_the_decision_document_is_the_generic_one(o: Outcome) -> None:
    assert fast(o) == generic(o)
    assert list(fast(o)) == list(generic(o))  # same key order on the line


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_are_cleaned_the_same_way(value: str) -> None:
    o = record(host=value, path="/" + value, detail=value, client_user=value, approval_id=value,
               rule=value, flow_id=value, method=value, scheme=value)
    assert fast(o) == generic(o)


def with_task(o: Outcome, **labels: str) -> Outcome:
    c = dataclasses.replace(o.request.client, task_id="t-1\udc80", profile="ci", labels=tuple(labels.items()))
    return dataclasses.replace(o, request=dataclasses.replace(o.request, client=c))


def test_a_task_credentials_fields_are_cleaned_the_same_way() -> None:
    o = with_task(record(), repo="acme/x", api_token="s3cret", note="line\nbreak\udc85")
    got = fast(o)
    assert got == generic(o)
    assert got["client"]["task_id"] == "t-1\\x80" and got["client"]["profile"] == "ci"
    assert "api_token" not in got["client"]["labels"] and got["client"]["labels"]["repo"] == "acme/x"
    named = dataclasses.replace(o, credential="github\u2028token")  # the credential applied, by name
    assert fast(named) == generic(named) and fast(named)["credential"].startswith("github")
    plain = fast(record())
    assert plain == generic(record()) and plain["client"]["labels"] is None


def test_the_worker_follows_the_event_name() -> None:
    o = record()
    doc = events.decision_doc(o, 3)
    doc.pop("timestamp")
    want = events._envelope("egress.decision", events.decision_fields(o), 3)
    want.pop("timestamp")
    assert doc == want and list(doc)[:3] == ["schema", "event", "worker"] and doc["worker"] == 3
    out = io.StringIO()
    t = Telemetry(stream=out, worker=2)
    t.decision(o)
    t.tunnel_closed(record(decision="allow", reason="rule", status=None, layer="connect"), 1, 2, 0.5)
    t.emit("rules.reloaded", rules=3)
    assert [e["worker"] for e in lines(out)] == [2, 2, 2]


def test_odd_values_are_cleaned_the_same_way() -> None:
    base = record()
    odd = dataclasses.replace(
        base,
        latency_s=float("inf"),
        approval_wait_s=float("nan"),
        matched=tuple(RuleRef(f"r{i}", Action.ALLOW, "f", 1) for i in range(MAX_ITEMS + 5)),
        private_class="metadata",
        request=Request("h.example", 0, Client(None), None, None, None, Layer.CONNECT, ""),
    )
    got = fast(odd)
    assert got == generic(odd)
    assert len(got["matched_rules"]) == MAX_ITEMS and got["detail"] == "metadata"
    assert got["latency_ms"] == "inf"


def test_the_level_follows_the_decision() -> None:
    t, out = make()
    t.decision(record(decision="allow", reason="rule", status=None))
    t.decision(record(decision="deny", reason="rule"))
    t.decision(record(decision="deny", reason=Reason.INTERNAL_ERROR.value))
    assert [e["decision"] for e in lines(out)] == ["allow", "deny", "deny"]
    levels = []

    class Spy:
        def __call__(self, _logger: Any, method: str, ed: Any) -> Any:
            levels.append(method)
            return ed

    t2, _ = make()
    t2.otel = Spy()  # type: ignore[assignment]
    t2.decision(record(decision="allow", reason="rule", status=None))
    t2.decision(record(decision="deny", reason="rule"))
    t2.decision(record(decision="deny", reason="internal_error"))
    t2.emit("rules.reload_failed", errors=["x"])
    assert levels == ["info", "warning", "error", "warning"]


def test_timestamps_are_utc_milliseconds_truncated() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    text = events.now_rfc3339()
    after = datetime.now(UTC)
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before <= parsed <= after
    assert text.endswith("Z") and len(text) == len("2026-01-02T03:04:05.678Z")


def test_the_tunnel_closed_document_is_the_generic_one() -> None:
    t, out = make()
    o = record(decision="allow", reason="rule", status=None, layer="connect", method="CONNECT", path=None,
               host="x" * (MAX_STR + 1), client_user="u\u2028")
    t.tunnel_closed(o, 10, 20, 1.23456)
    c = o.request.client
    want = events._envelope("tunnel.closed", {
        "flow_id": o.request.flow_id,
        "client": {"address": c.address, "port": c.port, "name": o.client_name, "user": c.user,
                   "task_id": c.task_id, "profile": c.profile},
        "destination": {"host": o.request.host, "port": o.request.port, "ip": o.ip},
        "bytes_up": 10, "bytes_down": 20, "duration_s": 1.235, "inspected": False,
    })
    (got,) = lines(out)
    want.pop("timestamp"), got.pop("timestamp")
    assert got == want and got["destination"]["host"].endswith(TRUNCATED)
