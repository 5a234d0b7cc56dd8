"""OpenTelemetry log export: each event becomes one OTel LogRecord (OTLP/HTTP, configured by OTEL_*).

Every `opentelemetry.sdk._logs` import lives here: the logs SDK is not stable yet.
"""

from __future__ import annotations

import json
import os
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

    def __init__(self, provider: LoggerProvider, on_error: Callable[[], None] | None = None) -> None:
        self.provider = provider
        self._logger = provider.get_logger(SCOPE, product_version())
        self._on_error = on_error

    @classmethod
    def from_env(
        cls, on_error: Callable[[], None] | None = None, exporter: LogRecordExporter | None = None,
    ) -> OtelBridge:
        """Provider + BatchLogRecordProcessor + OTLP/HTTP exporter, all configured by OTEL_* variables."""
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            exporter = OTLPLogExporter()
        provider = LoggerProvider(resource=_resource())
        provider.add_log_record_processor(BatchLogRecordProcessor(_Counting(exporter, on_error)))
        return cls(provider, on_error)

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
        except Exception:  # noqa: BLE001 - OTLP is an extra sink: never lose the local line for it
            if self._on_error is not None:
                self._on_error()
        return ed

    def force_flush(self) -> None:
        self.provider.force_flush()

    def shutdown(self) -> None:
        """Flush what is queued and stop the export thread (proxy shutdown)."""
        try:
            self.provider.force_flush()
        finally:
            self.provider.shutdown()


class _Counting(LogRecordExporter):
    """Wraps the OTLP exporter so records the collector did not take are counted (events_dropped{otlp})."""

    def __init__(self, inner: LogRecordExporter, on_error: Callable[[], None] | None) -> None:
        self.inner = inner
        self.on_error = on_error

    def export(self, batch: Sequence[Any]) -> Any:
        try:
            result = self.inner.export(batch)
        except Exception:  # noqa: BLE001 - a broken exporter is a failed export, nothing more
            result = LogRecordExportResult.FAILURE
        if result != LogRecordExportResult.SUCCESS and self.on_error is not None:
            for _ in batch:
                self.on_error()
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))

    def shutdown(self) -> None:
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
