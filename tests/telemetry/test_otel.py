"""addons/telemetry/otel.py: events as OTel log records (in memory, and OTLP/HTTP to a loopback receiver);
at shutdown an unreachable collector costs close() its budget only, and what was lost is counted."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from opentelemetry._logs import SeverityNumber
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from addons.config.models import TelemetryConfig
from addons.telemetry.events import Telemetry
from addons.telemetry.otel import OtelBridge
from tests.telemetry.tel_helpers import DECISIONS, OTHER_EVENTS, lines, make, record


def _memory() -> tuple[OtelBridge, InMemoryLogRecordExporter]:
    exp = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource.create({"service.name": "portcullis-test"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exp))
    return OtelBridge(provider), exp


def test_every_event_becomes_one_log_record_with_semconv_names() -> None:
    bridge, exp = _memory()
    import io

    out = io.StringIO()
    t = Telemetry(TelemetryConfig(), stream=out, otel=bridge)
    for rec in DECISIONS:
        t.decision(rec)
    for name, fields in OTHER_EVENTS:
        t.emit(name, **fields)
    logs = exp.get_finished_logs()
    native = lines(out)
    assert len(logs) == len(native) == len(DECISIONS) + len(OTHER_EVENTS)
    for rec, ev in zip(logs, native, strict=True):
        assert rec.log_record.event_name == ev["event"] and rec.log_record.body == ev["event"]
    first = logs[0].log_record
    attrs = dict(first.attributes or {})
    o = DECISIONS[0]
    r = o.request
    assert attrs["server.address"] == r.host and attrs["server.port"] == r.port
    assert attrs["client.address"] == r.client.address and attrs["client.port"] == r.client.port
    assert attrs["http.request.method"] == r.method and attrs["url.scheme"] == r.scheme
    assert attrs["url.path"] == r.path
    assert attrs["portcullis.decision"] == "allow" and attrs["portcullis.reason"] == "rule"
    assert (
        o.rule is not None
        and attrs["portcullis.rule"] == o.rule.name
        and attrs["portcullis.flow_id"] == r.flow_id
    )
    assert list(attrs["portcullis.matched_rules"]) == [m.name for m in o.matched]
    assert not any(v is None for v in attrs.values())
    assert first.severity_number == SeverityNumber.INFO


def test_severity_follows_the_outcome_and_unknown_methods_are_other() -> None:
    bridge, exp = _memory()
    t, _ = make()
    t = Telemetry(TelemetryConfig(), stream=t.stream, otel=bridge)
    t.decision(record(decision="deny", reason="default"))
    t.decision(record(decision="deny", reason="internal_error"))
    t.decision(record(decision="allow", method="PROPFIND"))
    deny, err, odd = (x.log_record for x in exp.get_finished_logs())
    assert deny.severity_number == SeverityNumber.WARN and err.severity_number == SeverityNumber.ERROR
    assert odd.attributes is not None
    assert odd.attributes["http.request.method"] == "_OTHER"
    assert odd.attributes["http.request.method_original"] == "PROPFIND"


def test_an_exporter_failure_never_breaks_the_local_line() -> None:
    class Broken:
        def emit(self, **_: object) -> None:
            raise RuntimeError("collector exploded")

    bridge, _ = _memory()
    bridge._logger = Broken()  # type: ignore[assignment]
    dropped: list[int] = []
    bridge._on_error = lambda: dropped.append(1)
    t, out = make()
    t = Telemetry(TelemetryConfig(), stream=out, otel=bridge)
    t.decision(record())
    assert len(lines(out)) == 1 and dropped == [1] and t.healthy()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[ExportLogsServiceRequest]]]:
    got: list[ExportLogsServiceRequest] = []

    async def logs(request: web.Request) -> web.Response:
        msg = ExportLogsServiceRequest()
        msg.ParseFromString(await request.read())
        got.append(msg)
        return web.Response(status=200, content_type="application/x-protobuf", body=b"")

    app = web.Application()
    app.router.add_post("/v1/logs", logs)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", got
    finally:
        await runner.cleanup()


async def test_otlp_http_export_end_to_end(
    receiver: tuple[str, list[ExportLogsServiceRequest]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, got = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)  # the exporter appends /v1/logs
    monkeypatch.setenv("OTEL_SERVICE_NAME", "portcullis-e2e")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    t, out = make(otlp=True)
    for rec in DECISIONS[:5]:
        t.decision(rec)
    t.emit("proxy.stopped", reason="test")
    # close() force-flushes from this thread; run it off the loop so the receiver can answer.
    await asyncio.wait_for(asyncio.to_thread(t.close), timeout=20)
    records = [lr for req in got for rl in req.resource_logs for sl in rl.scope_logs for lr in sl.log_records]
    assert len(records) == 6 == len(lines(out))
    names = [r.event_name for r in records]
    assert names == ["egress.decision"] * 5 + ["proxy.stopped"]
    res = {kv.key: kv.value.string_value for kv in got[0].resource_logs[0].resource.attributes}
    assert res["service.name"] == "portcullis-e2e"
    attrs = {kv.key: kv.value for kv in records[0].attributes}
    assert attrs["server.address"].string_value == DECISIONS[0].request.host
    assert attrs["server.port"].int_value == DECISIONS[0].request.port
    assert attrs["portcullis.decision"].string_value == "allow"
    assert records[0].body.string_value == "egress.decision"


async def test_records_the_collector_refuses_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=400, text="no")  # not retryable: the exporter gives up at once

    app = web.Application()
    app.router.add_post("/v1/logs", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", f"http://127.0.0.1:{port}/v1/logs")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        t, out = make(otlp=True)
        for rec in DECISIONS[:3]:
            t.decision(rec)
        await asyncio.wait_for(asyncio.to_thread(t.close), timeout=20)
        assert len(lines(out)) == 3 and t.healthy()  # the local stream is complete; OTLP is extra
        assert t.metrics.events_dropped.labels("otlp")._value.get() == 3
    finally:
        await runner.cleanup()


# -- shutdown with an unreachable collector ------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unreachable_collector(monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"http://127.0.0.1:{closed_port()}/v1/logs"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    return url


def test_close_counts_what_the_collector_never_got(
    unreachable_collector: str, caplog: pytest.LogCaptureFixture
) -> None:
    t, out = make(otlp=True)
    for rec in DECISIONS[:5]:
        t.decision(rec)
    with caplog.at_level(logging.WARNING, logger="portcullis.telemetry"):
        closer = threading.Thread(target=t.close, daemon=True)
        closer.start()
        closer.join(60)   # a bound for the test, not a measurement: close() itself gives up after ~1 s
        assert not closer.is_alive()
    assert len(lines(out)) == 5 and t.healthy()
    assert t.metrics.registry.get_sample_value("portcullis_events_dropped_total", {"sink": "otlp"}) == 5
    assert "OTLP: 5 of 5 events were not exported" in caplog.text
