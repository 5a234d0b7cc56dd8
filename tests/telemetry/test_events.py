"""The native event stream: shape, schema validation, nesting, hygiene, exactly-once, error isolation."""

from __future__ import annotations

import dataclasses
import io
import json
import threading

import pytest

from addons.telemetry.events import EVENT_TYPES, Telemetry
from addons.telemetry.validate import EventSchemaError, event_types, validate_event, validate_lines
from tests.telemetry.tel_helpers import DECISIONS, OTHER_EVENTS, lines, make, record


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
        r, c = rec.request, rec.request.client
        assert (ev["decision"], ev["reason"], ev["flow_id"]) == (rec.action, rec.reason, r.flow_id)
        assert ev["destination"]["host"] == (r.host or None) and ev["destination"]["port"] == (r.port or None)
        assert ev["client"] == {"address": c.address, "port": c.port, "name": rec.client_name, "user": c.user,
                                "task_id": None, "profile": None, "labels": None}
        assert ev["request"]["method"] == r.method


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
    assert len(validate_lines(text)) == 2


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
    from tests.telemetry.tel_helpers import TtyIO

    t, out = make(stream=TtyIO(), log={"format": "console"})
    t.decision(record(host="evil.example\r\n\x1b[31mFAKE event=egress.decision decision=allow"))
    text = out.getvalue()
    assert text.count("\n") == 1 and "\r" not in text
    assert "\x1b[31mFAKE" not in text and "\\x1b[31mFAKE" in text
    assert "egress.decision" in text and "decision" in text


def test_console_format_without_a_tty_writes_json() -> None:
    t, out = make(log={"format": "console"})
    t.decision(record())
    (ev,) = validate_lines(out.getvalue())
    assert ev["event"] == "egress.decision" and ev["flow_id"] == "flow-1"


def test_default_stream_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    t = Telemetry()
    t.emit("proxy.started", listen=["127.0.0.1:1"], mode="enforce")
    (ev,) = validate_lines(capsys.readouterr().out)
    assert ev["event"] == "proxy.started" and ev["listen"] == ["127.0.0.1:1"]


def test_closed_stream_counts_and_fails_closed() -> None:
    s = io.StringIO()
    t, _ = make(stream=s)
    s.close()
    t.decision(record())
    assert t.metrics.events_dropped.labels("stdout")._value.get() == 1
    assert not t.healthy()


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("api.build.corp", "build.corp"),  # no PSL suffix: the default rule `*` makes `corp` the suffix
        ("x.corp.internal", "corp.internal"),
        ("foo.test", "foo.test"),
        ("www.bbc.co.uk", "bbc.co.uk"),
        ("localhost", None),  # a single label is itself a suffix
        ("10.20.0.7", None),  # IP literals have none
        ("2001:db8::7", None),
    ],
)
def test_every_name_has_a_registered_domain(host: str, want: str | None) -> None:
    t, out = make()
    t.decision(record(host=host))
    (ev,) = lines(out)
    assert ev["destination"]["registered_domain"] == want
    validate_event(ev)


def test_every_decision_field_is_always_present() -> None:
    t, out = make()
    t.decision(
        record(
            rule=None,
            rule_file=None,
            rule_line=None,
            matched_rules=(),
            latency_s=None,
            client_user=None,
            ip=None,
        )
    )
    (ev,) = lines(out)
    for key in ("rule", "rule_file", "rule_line", "approval_id", "latency_ms", "approval_wait_ms", "detail"):
        assert key in ev and ev[key] is None, key
    assert ev["matched_rules"] == [] and set(ev["client"]) == {
        "address", "port", "name", "user", "task_id", "profile", "labels"}
    assert set(ev["destination"]) == {"host", "port", "ip", "registered_domain"}
    assert set(ev["request"]) == {"scheme", "method", "path"}


def test_times_are_milliseconds_and_a_private_class_is_the_detail() -> None:
    t, out = make()
    t.decision(record(latency_s=0.0012345, approval_wait_s=2.5))
    o = record(decision="deny", reason="private_address", detail="long sentence")
    t.decision(dataclasses.replace(o, private_class="metadata"))
    first, second = lines(out)
    assert (first["latency_ms"], first["approval_wait_ms"]) == (1.234, 2500.0)
    assert second["detail"] == "metadata"
    assert t.metrics.registry.get_sample_value("portcullis_decision_duration_seconds_count") == 2


def test_a_tunnel_is_counted_while_open_and_closed_once() -> None:
    t, out = make()
    o = record(decision="allow", reason="rule", layer="connect", method="CONNECT", path=None, status=None)
    t.tunnel_opened()
    t.tunnel_opened()
    assert t.metrics.tunnels_open._value.get() == 2
    t.tunnel_closed(dataclasses.replace(o, inspect=True), 10, 20, 1.23456)
    t.tunnel_ended()  # one refused after its first bytes: no tunnel.closed
    assert t.metrics.tunnels_open._value.get() == 0
    (ev,) = lines(out)
    assert ev["event"] == "tunnel.closed" and validate_event(ev) is None
    assert (ev["flow_id"], ev["bytes_up"], ev["bytes_down"], ev["duration_s"], ev["inspected"]) == (
        "flow-1",
        10,
        20,
        1.235,
        True,
    )
    assert ev["client"] == {"address": "10.0.1.5", "port": 50123, "name": "ci-agents", "user": None,
                            "task_id": None, "profile": None}
    assert ev["destination"] == {"host": "pastebin.com", "port": 443, "ip": "203.0.113.7"}


@pytest.mark.parametrize(
    ("event", "fields", "level"),
    [
        ("egress.decision", {"decision": "allow", "reason": "rule"}, "info"),
        ("egress.decision", {"decision": "deny", "reason": "rule"}, "warning"),
        ("egress.decision", {"decision": "deny", "reason": "internal_error"}, "error"),
        ("rules.reload_failed", {}, "warning"),
        ("webhook.failed", {}, "warning"),
        ("proxy.started", {}, "info"),
    ],
)
def test_levels(event: str, fields: dict[str, str], level: str) -> None:
    from addons.telemetry.events import _level

    assert _level(event, fields) == level


def test_close_is_idempotent_and_reopen_is_harmless_without_a_file() -> None:
    t, out = make()
    t.reopen()
    t.emit("proxy.stopped", exit_code=0)
    t.close()
    t.close()
    (ev,) = lines(out)
    assert ev["event"] == "proxy.stopped" and ev["timestamp"].endswith("Z") and len(ev["timestamp"]) == 24


def test_every_decision_names_its_credential_or_null_never_a_value() -> None:
    tel, out = make()
    tel.decision(record(decision="allow", reason="rule", host="api.github.com", status=None, credential="gh"))
    tel.decision(record(decision="allow", reason="rule", host="pypi.org", status=None))
    applied, plain = lines(out)
    assert applied["credential"] == "gh" and plain["credential"] is None
    for ev in (applied, plain):
        validate_event(ev)
