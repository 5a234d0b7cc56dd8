"""The event stream: one structured event per decision and per lifecycle fact.

Every event is one document (schema, timestamp, event name, then its fields, nested and cleaned by
`fields.clean`), handed to the OTLP bridge when it is on and written as one ASCII JSON line
(`render.dumps_ascii`) to every sink. A decision's document is built directly from its `Outcome`
(`decision_doc`: the same document the generic path would build from `decision_fields`, without its
generic walks), because one is written for every request and every tunnel.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from addons.config.models import TelemetryConfig
from addons.pipeline.model import Outcome
from addons.policy import hosts as policy_hosts
from addons.policy.model import Action, Reason
from addons.telemetry.fields import MAX_ITEMS, clean, escape_all, nest, truncate
from addons.telemetry.metrics import Metrics
from addons.telemetry.otel import OtelBridge
from addons.telemetry.render import dumps_ascii
from addons.telemetry.sinks import FileSink, StreamSink
from addons.telemetry.syslog import SyslogSink

SCHEMA = "portcullis.event/v1"
EVENT_TYPES = (
    "egress.decision", "tunnel.closed", "approval.requested", "approval.decided",
    "rules.reloaded", "rules.reload_failed", "webhook.failed", "proxy.started", "proxy.stopped",
    "worker.exited", "credential.minted", "credential.revoked", "credential.expired", "store.unreachable",
    "store.reconnected",
)
_ENVELOPE = ("schema", "timestamp", "event")
_WARN_EVENTS = frozenset({"rules.reload_failed", "webhook.failed", "worker.exited", "store.unreachable"})
# close(): what the network sinks (OTLP, syslog) may still deliver at shutdown, together, in seconds.
CLOSE_BUDGET_S = 0.9

log = logging.getLogger("portcullis.telemetry")

Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]


class Telemetry:
    """Emits events and owns the metrics. One instance per running proxy.

    Nothing raised while building, rendering or writing an event ever reaches the caller:
    it is counted in `portcullis_events_dropped_total{sink}`; with `on_write_error: closed`
    `healthy()` turns False until a write succeeds again, and the proxy denies meanwhile.
    The network sinks (OTLP, syslog) never block the caller and never make the proxy unhealthy.
    """

    def __init__(
        self,
        config: TelemetryConfig | None = None,
        base_dir: Path | None = None,
        metrics: Metrics | None = None,
        stream: TextIO | None = None,
        *,
        otel: OtelBridge | None = None,
        worker: int | None = None,
    ) -> None:
        """`otel` overrides the OTLP exporter built from OTEL_* (tests pass an in-memory one);
        `worker` (with `--workers N`) is written into every event this process emits."""
        self.config = config or TelemetryConfig()
        self.base_dir = base_dir or Path.cwd()
        self.metrics = metrics or Metrics()
        self.stream = stream if stream is not None else sys.stdout
        log = self.config.log
        self._fail_closed = log.on_write_error == "closed"
        self._format = log.format
        self._lock = threading.RLock()   # the approvals service may emit from a worker thread
        self._ok = True
        self._closed = False
        self._stdout = StreamSink(self.stream)
        self._file: FileSink | None = None
        if log.file:
            path = Path(log.file)
            self._file = FileSink(path if path.is_absolute() else self.base_dir / path)
        self._syslog: SyslogSink | None = None
        if self.config.syslog is not None:
            self._syslog = SyslogSink(self.config.syslog, self.base_dir, self._syslog_dropped)
            self.metrics.events_buffered.labels("syslog").set_function(lambda: self._syslog_buffered())
        self._to_ocsf: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        if self._format == "ocsf":
            from addons.telemetry.ocsf import to_ocsf
            self._to_ocsf = to_ocsf
        self._console: Processor | None = None
        if self._format == "console" and _isatty(self.stream):
            self._console = structlog.dev.ConsoleRenderer(colors=True)
        self.otel = otel
        if self.otel is None and self.config.otlp:
            self.otel = OtelBridge.from_env(on_error=self._otel_dropped)
        self._counted: dict[tuple[str, str, str], Any] = {}  # requests counter children by labels
        self._worker = worker

    # ---- public API -------------------------------------------------------------------

    def decision(self, o: Outcome) -> None:
        """Exactly one `egress.decision` event and the request metrics for one outcome."""
        try:
            labels = (o.action._value_, o.reason._value_, "true" if o.enforced else "false")
            child = self._counted.get(labels)
            if child is None:
                child = self._counted[labels] = self.metrics.requests.labels(*labels)
            child.inc()
            if o.latency_s is not None:
                self.metrics.decision_seconds.observe(o.latency_s)
        except Exception:  # noqa: BLE001 - metrics must never break the decision path
            self._dropped("metrics")
        try:
            doc = decision_doc(o, self._worker)
            level = "error" if o.reason is Reason.INTERNAL_ERROR else (
                "warning" if o.action is Action.DENY else "info")
            self._emit_doc(doc, level)
        except Exception:  # noqa: BLE001 - an event that cannot be built is counted, never raised
            self._dropped("render")

    def tunnel_opened(self) -> None:
        self.metrics.tunnels_open.inc()

    def tunnel_ended(self) -> None:
        """A tunnel that ends without a `tunnel.closed` (refused after its first bytes, or never opened)."""
        self.metrics.tunnels_open.dec()

    def tunnel_closed(self, o: Outcome, bytes_up: int, bytes_down: int, duration_s: float) -> None:
        """The close of an allowed tunnel (`o` is its CONNECT's outcome): one `tunnel.closed` event."""
        self.tunnel_ended()
        r, c = o.request, o.request.client
        try:
            doc = _head("tunnel.closed", self._worker)
            doc.update({
                "flow_id": _c(r.flow_id),
                "client": {"address": _c(c.address), "port": _c(c.port), "name": _c(o.client_name),
                           "user": _c(c.user), "task_id": _c(c.task_id), "profile": _c(c.profile)},
                "destination": {"host": _c(r.host), "port": _c(r.port), "ip": _c(o.ip)},
                "bytes_up": _c(bytes_up), "bytes_down": _c(bytes_down),
                "duration_s": _c(round(duration_s, 3)), "inspected": _c(o.inspect),
            })
            self._emit_doc(doc, "info")
        except Exception:  # noqa: BLE001
            self._dropped("render")

    def emit(self, event: str, **fields: Any) -> None:
        """Any event: adds schema, timestamp and event name; writes one line per sink.

        Fields may be nested dicts (`client={"address": ...}`) or dotted keys
        (`**{"client.address": ...}`); both are written as nested objects.
        """
        try:
            self._emit_doc(_envelope(event, fields, self._worker), _level(event, fields))
        except Exception:  # noqa: BLE001 - an event that cannot be built is counted, never raised
            self._dropped("render")

    def relay_line(self, line: str) -> None:
        """A whole event line another process rendered (a worker's), onto this process's stdout."""
        with self._lock:
            try:
                self._stdout.write(line.rstrip("\n"))
            except Exception:  # noqa: BLE001
                self._dropped("stdout")

    def healthy(self) -> bool:
        """False when events cannot be written and the sink is set to fail closed."""
        return self._ok or not self._fail_closed

    def reopen(self) -> None:
        """Reopen file sinks (SIGHUP, log rotation)."""
        with self._lock:
            if self._file is not None:
                self._file.reopen()

    def close(self) -> None:
        """Flush and close every sink (after proxy.stopped).

        The OTLP exporter and the syslog sink get CLOSE_BUDGET_S together to deliver what they hold;
        what they could not deliver by then is counted in events_dropped and reported on stderr.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            deadline = time.monotonic() + CLOSE_BUDGET_S
            if self._syslog is not None:
                self._syslog.begin_close(deadline)
            if self.otel is not None:
                failed, emitted = self.otel.shutdown(deadline)
                if failed:
                    log.warning("OTLP: %d of %d events were not exported (collector unreachable or refusing; "
                                "counted in portcullis_events_dropped_total{sink=\"otlp\"})", failed, emitted)
            if self._syslog is not None:
                self._syslog.close(deadline)
            self._stdout.close()
            if self._file is not None:
                self._file.close()

    # ---- internals --------------------------------------------------------------------

    def _emit_doc(self, doc: dict[str, Any], level: str) -> None:
        with self._lock:
            if self.otel is not None:
                self.otel(None, level, doc)  # catches and counts its own errors
            self._write(doc, level)

    def _write(self, doc: dict[str, Any], level: str) -> None:
        out = self._to_ocsf(doc) if self._to_ocsf is not None else doc
        line = dumps_ascii(out)
        ok = True
        sinks: list[StreamSink | FileSink] = [self._stdout]
        if self._file is not None:
            sinks.append(self._file)
        for sink in sinks:
            try:
                if sink is self._stdout and self._console is not None:
                    sink.write(str(self._console(None, "info", escape_all(_flat(doc)))))
                else:
                    sink.write(line)
            except Exception:  # noqa: BLE001 - OSError, closed stream, encoding: all the same to us
                ok = False
                self._dropped(sink.name)
        self._ok = ok
        if self._syslog is not None:
            try:  # only queues the message; the network is the sender thread's business
                self._syslog.write(line, level, str(doc.get("event", "")), str(doc.get("timestamp", "")))
            except Exception:  # noqa: BLE001
                self._dropped("syslog")

    def _dropped(self, sink: str) -> None:
        with contextlib.suppress(Exception):  # the counter is the last resort
            self.metrics.events_dropped.labels(sink).inc()
        if sink in ("stdout", "file", "render"):
            self._ok = False

    def _otel_dropped(self) -> None:
        self._dropped("otlp")

    def _syslog_dropped(self, n: int) -> None:
        with contextlib.suppress(Exception):
            self.metrics.events_dropped.labels("syslog").inc(n)

    def _syslog_buffered(self) -> int:
        return self._syslog.buffered if self._syslog is not None else 0


def _envelope(event: str, fields: Mapping[str, Any], worker: int | None = None) -> dict[str, Any]:
    """schema, timestamp, event (and the worker) first; then the caller's fields, nested and cleaned."""
    body = clean(nest({k: v for k, v in fields.items() if k not in _ENVELOPE}))
    doc = _head(clean(event), worker)
    doc.update(body)
    return doc


def _level(event: str, fields: Mapping[str, Any]) -> str:
    if fields.get("reason") == "internal_error":
        return "error"
    if event in _WARN_EVENTS or fields.get("decision") == "deny":
        return "warning"
    return "info"


def decision_fields(o: Outcome) -> dict[str, Any]:
    """The `egress.decision` fields of one outcome (nested, in schema order)."""
    r, c = o.request, o.request.client
    return {
        "decision": o.action._value_,  # the plain str: Enum.value is a slow descriptor
        "reason": o.reason._value_,
        "enforced": o.enforced,
        "rule": o.rule.name if o.rule else None,
        "rule_file": o.rule.file if o.rule else None,
        "rule_line": o.rule.line if o.rule else None,
        "matched_rules": [m.name for m in o.matched],
        "client": {"address": c.address, "port": c.port, "name": o.client_name, "user": c.user,
                   "task_id": c.task_id, "profile": c.profile,
                   "labels": dict(c.labels) if c.task_id else None},
        "destination": {"host": r.host or None, "port": r.port or None, "ip": o.ip,
                        "registered_domain": registered_domain(r.host)},
        "request": {"scheme": r.scheme, "method": r.method, "path": r.path},  # clean() drops any query
        "approval_id": o.approval_id,
        "flow_id": r.flow_id,
        "layer": r.layer.value,
        "status": o.status,
        "latency_ms": _ms(o.latency_s),
        "approval_wait_ms": _ms(o.approval_wait_s),
        # For a private destination the event names the class ("loopback", "metadata", "self" ...).
        "detail": o.private_class if o.private_class is not None else o.detail,
        "credential": o.credential,  # a name, never the value (the Outcome's injection is not rendered)
    }


def decision_doc(o: Outcome, worker: int | None = None) -> dict[str, Any]:
    """The whole `egress.decision` document of one outcome: what `_envelope` makes of
    `decision_fields(o)` (tests/telemetry/test_render.py holds them equal), built directly."""
    r, c = o.request, o.request.client
    rule = o.rule
    doc = _head("egress.decision", worker)
    doc.update({
        "decision": o.action._value_,  # the plain str: Enum.value is a slow descriptor
        "reason": o.reason._value_,
        "enforced": _c(o.enforced),
        "rule": _c(rule.name) if rule else None,
        "rule_file": _c(rule.file) if rule else None,
        "rule_line": _c(rule.line) if rule else None,
        "matched_rules": [_c(m.name) for m in o.matched[:MAX_ITEMS]],
        "client": {"address": _c(c.address), "port": _c(c.port), "name": _c(o.client_name),
                   "user": _c(c.user), "task_id": _c(c.task_id), "profile": _c(c.profile),
                   # a mapping: clean() drops secret-looking keys, at the depth the generic path has
                   "labels": clean(dict(c.labels), "labels", 2) if c.task_id else None},
        "destination": {"host": _c(r.host or None), "port": _c(r.port or None), "ip": _c(o.ip),
                        "registered_domain": _c(registered_domain(r.host))},
        "request": {"scheme": _c(r.scheme), "method": _c(r.method), "path": clean(r.path, "path")},
        "approval_id": _c(o.approval_id),
        "flow_id": _c(r.flow_id),
        "layer": r.layer._value_,
        "status": _c(o.status),
        "latency_ms": _c(_ms(o.latency_s)),
        "approval_wait_ms": _c(_ms(o.approval_wait_s)),
        "detail": _c(o.private_class if o.private_class is not None else o.detail),
        "credential": _c(o.credential),  # a name, never the value
    })
    return doc


def _head(event: str, worker: int | None) -> dict[str, Any]:
    """schema, timestamp, event, then the worker (with `--workers N`): every event starts so."""
    doc: dict[str, Any] = {"schema": SCHEMA, "timestamp": now_rfc3339(), "event": event}
    if worker is not None:
        doc["worker"] = worker
    return doc


def _c(v: Any) -> Any:
    """`clean(v)` for a field whose key needs no special handling, fast for the usual types."""
    t = type(v)
    if t is str:
        return truncate(v)  # bounded, lone surrogates written as text
    if v is None or t is int or t is bool:
        return v
    if t is float:
        return v if math.isfinite(v) else str(v)
    return clean(v)


def registered_domain(host: str | None) -> str | None:
    """The registrable domain (offline PSL, its default rule for unlisted suffixes); None for IP
    literals, bare suffixes and hosts that could not be read."""
    if not host:
        return None
    try:
        return policy_hosts.registered_domain(host)
    except Exception:  # noqa: BLE001 - an odd host never breaks an event
        return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _flat(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for the console renderer (one `key=value` per fact)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text (one tuple: thread-safe)


def now_rfc3339() -> str:
    """Now, UTC, to the millisecond (truncated, as datetime.isoformat does): 2026-01-02T03:04:05.678Z."""
    global _second
    now = time.time()
    sec = int(now)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{int((now - sec) * 1000):03d}Z"
