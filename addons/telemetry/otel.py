"""OpenTelemetry log export: each event becomes one OTel LogRecord (OTLP/HTTP, configured by OTEL_*).

Every `opentelemetry.sdk._logs` import lives here: the logs SDK is not stable yet.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from functools import cache
from typing import Any

from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.resources import Resource

SCOPE = "portcullis.events"
_SEVERITY = {
    "info": SeverityNumber.INFO, "warning": SeverityNumber.WARN, "error": SeverityNumber.ERROR,
}
# Native field (dotted path) -> semantic-convention attribute. Anything else is `portcullis.<path>`.
SEMCONV = {
    "destination.host": "server.address",
    "destination.port": "server.port",
    "client.address": "client.address",
    "client.port": "client.port",
    "request.method": "http.request.method",
    "request.scheme": "url.scheme",
    "request.path": "url.path",
    "status": "http.response.status_code",
}
_SKIP = frozenset({"schema", "timestamp", "event"})
# Methods semconv knows; anything else is `_OTHER` plus http.request.method_original.
_KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})


def attributes(doc: Mapping[str, Any]) -> dict[str, Any]:
    """OTel attributes of a native event: semconv names where they exist, `portcullis.*` otherwise."""
    out: dict[str, Any] = {}
    for path, value in _leaves(doc):
        if path in _SKIP or value is None:
            continue
        name = SEMCONV.get(path, "portcullis." + path)
        if name == "http.request.method" and str(value).upper() not in _KNOWN_METHODS:
            out["http.request.method_original"] = value
            value = "_OTHER"
        out[name] = value
    return out


def _leaves(doc: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    leaves: list[tuple[str, Any]] = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            leaves.extend(_leaves(value, path + "."))
        elif isinstance(value, list):
            if all(isinstance(v, str) for v in value):
                leaves.append((path, list(value)))
            elif value:
                leaves.append((path, json.dumps(value, ensure_ascii=True, default=str)))
        else:
            leaves.append((path, value))
    return leaves


class OtelBridge:
    """A structlog processor: emits the event as an OTel log record, passes it on unchanged.

    The batch processor exports from its own thread, so a slow collector never stalls the
    proxy; when its queue is full the SDK drops records (the JSON lines stay the audit trail).
    """

    def __init__(
        self, provider: LoggerProvider, on_error: Callable[[], None] | None = None,
        counting: _Counting | None = None,
    ) -> None:
        self.provider = provider
        self._logger = provider.get_logger(SCOPE, product_version())
        self._on_error = on_error
        self._counting = counting
        self.emitted = 0  # records handed to the SDK

    @classmethod
    def from_env(
        cls, on_error: Callable[[], None] | None = None, exporter: LogRecordExporter | None = None,
    ) -> OtelBridge:
        """Provider + BatchLogRecordProcessor + OTLP/HTTP exporter, all configured by OTEL_* variables."""
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            exporter = OTLPLogExporter()
        provider = LoggerProvider(resource=_resource())
        counting = _Counting(exporter, on_error)
        provider.add_log_record_processor(BatchLogRecordProcessor(counting))
        return cls(provider, on_error, counting)

    def __call__(self, _logger: Any, method: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        try:
            name = str(ed.get("event", ""))
            self._logger.emit(
                timestamp=time.time_ns(),
                severity_number=_SEVERITY.get(method, SeverityNumber.INFO),
                severity_text=method.upper(),
                body=name,
                event_name=name,
                attributes=attributes(ed),
            )
            self.emitted += 1
        except Exception:  # noqa: BLE001 - OTLP is an extra sink: never lose the local line for it
            if self._on_error is not None:
                self._on_error()
        return ed

    def force_flush(self) -> None:
        self.provider.force_flush()

    def shutdown(self, deadline: float | None = None) -> tuple[int, int]:
        """Export what is queued until `deadline` (time.monotonic(); default 0.9 s from now), then stop.

        The SDK's own shutdown retries an unreachable collector for seconds; it runs in a helper thread
        and is abandoned at the deadline. Returns (records never exported, records emitted) over the
        bridge's life; the ones not exported by the deadline are counted through `on_error` too.
        """
        if deadline is None:
            deadline = time.monotonic() + 0.9
        helper = threading.Thread(target=self.provider.shutdown, name="portcullis-otlp-shutdown", daemon=True)
        helper.start()
        helper.join(max(0.0, deadline - time.monotonic()))
        if self._counting is None:
            return 0, self.emitted
        lost = self._counting.finish(self.emitted)
        if self._on_error is not None:
            for _ in range(lost):
                self._on_error()
        self._counting.shutdown()  # ends the exporter's retry wait, so its thread stops soon
        return self._counting.failed + lost, self.emitted


class _Counting(LogRecordExporter):
    """Wraps the OTLP exporter so records the collector did not take are counted (events_dropped{otlp}).

    After `finish()` nothing more is counted: whatever was still queued or in flight then is
    counted once by the caller of `finish()`.
    """

    def __init__(self, inner: LogRecordExporter, on_error: Callable[[], None] | None) -> None:
        self.inner = inner
        self.on_error = on_error
        self.exported = 0
        self.failed = 0
        self._finished = False
        self._shut = False
        self._lock = threading.Lock()

    def export(self, batch: Sequence[Any]) -> Any:
        try:
            result = self.inner.export(batch)
        except Exception:  # noqa: BLE001 - a broken exporter is a failed export, nothing more
            result = LogRecordExportResult.FAILURE
        with self._lock:
            if self._finished:
                return result
            if result == LogRecordExportResult.SUCCESS:
                self.exported += len(batch)
                return result
            self.failed += len(batch)
        if self.on_error is not None:
            for _ in batch:
                self.on_error()
        return result

    def finish(self, emitted: int) -> int:
        """Stop counting; returns how many of `emitted` records were neither exported nor counted."""
        with self._lock:
            self._finished = True
            return max(0, emitted - self.exported - self.failed)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))

    def shutdown(self) -> None:
        with self._lock:
            if self._shut:
                return
            self._shut = True
        self.inner.shutdown()  # type: ignore[no-untyped-call]


def _resource() -> Resource:
    attrs: dict[str, Any] = {"service.version": product_version()}
    env_attrs = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in env_attrs:
        attrs["service.name"] = "portcullis"
    return Resource.create(attrs)


@cache
def product_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("portcullis")
    except PackageNotFoundError:
        return "0.0.0"
