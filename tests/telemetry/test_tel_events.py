"""The native event stream: shape, schema validation, nesting, hygiene, exactly-once, error isolation."""

from __future__ import annotations

import io
import json
import threading

import pytest
from tel_helpers import DECISIONS, OTHER_EVENTS, lines, make, record

from addons.telemetry.events import EVENT_TYPES, Telemetry
from addons.telemetry.validate import EventSchemaError, event_types, validate_event, validate_lines


def test_every_event_type_has_a_schema() -> None:
    assert sorted(EVENT_TYPES) == event_types()


def test_every_decision_kind_is_one_valid_event() -> None:
    t, out = make()
    for rec in DECISIONS:
        t.decision(rec)
    events = validate_lines(out.getvalue())
    assert len(events) == len(DECISIONS)
    for rec, ev in zip(DECISIONS, events, strict=True):
        assert ev["schema"] == "portcullis.event/v1" and ev["event"] == "egress.decision"
        assert ev["timestamp"].endswith("Z")
        assert (ev["decision"], ev["reason"], ev["flow_id"]) == (rec.decision, rec.reason, rec.flow_id)
        assert ev["destination"]["host"] == rec.host and ev["destination"]["port"] == rec.port
        assert ev["client"] == {
            "address": rec.client_address,
            "port": rec.client_port,
            "name": rec.client_name,
            "user": rec.client_user,
        }
        assert ev["request"]["method"] == rec.method


def test_every_other_event_type_validates() -> None:
    t, out = make()
    for name, fields in OTHER_EVENTS:
        t.emit(name, **fields)
    events = validate_lines(out.getvalue())
    assert [e["event"] for e in events] == [n for n, _ in OTHER_EVENTS]
    assert {e["event"] for e in events} | {"egress.decision"} == set(EVENT_TYPES)


def test_dotted_keys_and_nested_dicts_end_up_nested() -> None:
    t, out = make()
    t.emit(
        "approval.requested",
        approval_id="a1",
        client={"name": "ci"},
        **{"client.address": "10.0.0.9", "destination.host": "h.example", "destination.port": 443},
    )
    (ev,) = lines(out)
    assert ev["client"] == {"name": "ci", "address": "10.0.0.9"}
    assert ev["destination"] == {"host": "h.example", "port": 443}
    validate_event(ev)


def test_no_query_string_no_credentials_no_header_values() -> None:
    t, out = make()
    t.decision(record(path="/search?q=secret&token=abc#frag"))
    t.emit(
        "webhook.failed",
        approval_id="a1",
        url="https://user:pw@hooks.example.com/p?sig=xyz",
        attempt=1,
        headers={"Authorization": "Bearer s3cr3t"},
        proxy_authorization="Basic Zm9vOmJhcg==",
        password="hunter2",
        status=None,
        error="timeout",
        final=False,
    )
    text = out.getvalue()
    for secret in ("secret", "token=abc", "frag", "user:pw", "sig=xyz", "s3cr3t", "Zm9vOmJhcg", "hunter2"):
        assert secret not in text
    first, second = lines(out)
    assert first["request"]["path"] == "/search"
    assert second["url"] == "https://hooks.example.com/p"
    validate_lines(text)


def test_schema_rejects_a_forged_or_broken_event() -> None:
    t, out = make()
    t.decision(record())
    (ev,) = lines(out)
    validate_event(ev)
    for mutate in (
        lambda e: e.update(decision="maybe"),
        lambda e: e.pop("flow_id"),
        lambda e: e.update(injected=True),
        lambda e: e["request"].update(path="/a?b=1"),
        lambda e: e.update(schema="portcullis.event/v0"),
        lambda e: e.update(event="nope"),
    ):
        bad = json.loads(json.dumps(ev))
        mutate(bad)
        with pytest.raises(EventSchemaError):
            validate_event(bad)


def test_a_field_that_cannot_render_is_counted_never_raised() -> None:
    class Boom:
        def __str__(self) -> str:
            raise RuntimeError("no")

    t, out = make()
    t.emit("proxy.started", listen=Boom())  # must not raise into the caller
    assert t.metrics.events_dropped.labels("render")._value.get() == 1
    assert out.getvalue() == ""
    assert not t.healthy()  # fail closed by default
    t.emit("proxy.stopped")  # the next good event restores health
    assert t.healthy()
    assert len(lines(out)) == 1


def test_exactly_one_line_per_decision_under_threads() -> None:
    t, out = make()
    n_threads, per_thread = 8, 200

    def work(k: int) -> None:
        for i in range(per_thread):
            t.decision(record(flow_id=f"f-{k}-{i}", host="a" * (i % 50 + 1) + ".example"))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    events = validate_lines(out.getvalue())
    ids = [e["flow_id"] for e in events]
    assert len(ids) == len(set(ids)) == n_threads * per_thread
    total = sum(
        s.value
        for m in t.metrics.registry.collect()
        if m.name == "portcullis_requests"
        for s in m.samples
        if s.name.endswith("_total")
    )
    assert total == n_threads * per_thread


def test_console_format_on_a_tty_is_readable_and_one_line(tmp_path: object) -> None:
    from tel_helpers import TtyIO

    t, out = make(stream=TtyIO(), log={"format": "console"})
    t.decision(record(host="evil.example\r\n\x1b[31mFAKE event=egress.decision decision=allow"))
    text = out.getvalue()
    assert text.count("\n") == 1 and "\r" not in text
    assert "\x1b[31mFAKE" not in text and "\\x1b[31mFAKE" in text
    assert "egress.decision" in text and "decision" in text


def test_console_format_without_a_tty_writes_json() -> None:
    t, out = make(log={"format": "console"})
    t.decision(record())
    validate_lines(out.getvalue())


def test_default_stream_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    t = Telemetry()
    t.emit("proxy.started", listen=["127.0.0.1:1"], mode="enforce")
    validate_lines(capsys.readouterr().out)


def test_closed_stream_counts_and_fails_closed() -> None:
    s = io.StringIO()
    t, _ = make(stream=s)
    s.close()
    t.decision(record())
    assert t.metrics.events_dropped.labels("stdout")._value.get() == 1
    assert not t.healthy()


@pytest.mark.parametrize(("host", "want"), [
    ("api.build.corp", "build.corp"),        # no PSL suffix: the default rule `*` makes `corp` the suffix
    ("x.corp.internal", "corp.internal"),
    ("foo.test", "foo.test"),
    ("www.bbc.co.uk", "bbc.co.uk"),
    ("localhost", None),                     # a single label is itself a suffix
    ("10.20.0.7", None),                     # IP literals have none
    ("2001:db8::7", None),
])
def test_every_name_has_a_registered_domain(host: str, want: str | None) -> None:
    t, out = make()
    t.decision(record(host=host))
    (ev,) = lines(out)
    assert ev["destination"]["registered_domain"] == want
    validate_event(ev)
