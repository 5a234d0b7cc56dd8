"""The event stream: one structured event per decision and per lifecycle fact, built with structlog."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import structlog

from addons.config.models import TelemetryConfig
from addons.pipeline.model import Outcome
from addons.policy import hosts as policy_hosts
from addons.policy.model import Reason
from addons.telemetry.fields import clean, escape_all, nest
from addons.telemetry.metrics import Metrics
from addons.telemetry.otel import OtelBridge
from addons.telemetry.pipesink import PipeSink, StallStats, usable_fd
from addons.telemetry.sinks import FileSink, StreamSink
from addons.telemetry.syslog import SyslogSink

SCHEMA = "portcullis.event/v1"
EVENT_TYPES = (
    "egress.decision", "tunnel.closed", "approval.requested", "approval.decided",
    "rules.reloaded", "rules.reload_failed", "webhook.failed", "proxy.started", "proxy.stopped",
    "worker.exited", "credential.minted", "credential.revoked", "credential.expired", "store.unreachable",
    "store.reconnected", "event_sink.resumed",
)
_ENVELOPE = ("schema", "timestamp", "event")
_WARN_EVENTS = frozenset({"rules.reload_failed", "webhook.failed", "worker.exited", "store.unreachable"})
# close(): what the network sinks (OTLP, syslog) may still deliver at shutdown, together, in seconds.
CLOSE_BUDGET_S = 0.9
# close(): how long stdout's writer may still take to write what is queued (a reader that stopped
# reading loses the rest, reported on stderr).
STDOUT_CLOSE_S = 2.0

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
        # A real descriptor (pipe, file, terminal) is written by a thread through a bounded queue, so a
        # reader that stops reading never blocks the event loop (pipesink.py); in-memory streams
        # (tests) are written at once.
        fd = usable_fd(self.stream)
        self._stdout: StreamSink | PipeSink
        if fd is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stream.flush()
            self._stdout = PipeSink(fd, log.stdout_buffer, self._resumed, self._pipe_failed)
            self.metrics.events_buffered.labels("stdout").set_function(lambda: self._stdout_buffered())
        else:
            self._stdout = StreamSink(self.stream)
        self._skip_stdout = False
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
        self._json = structlog.processors.JSONRenderer(
            serializer=json.dumps, ensure_ascii=True, separators=(",", ":"), default=str,
        )
        self.otel = otel
        if self.otel is None and self.config.otlp:
            self.otel = OtelBridge.from_env(on_error=self._otel_dropped)
        processors: list[Processor] = [_envelope]
        if self.otel is not None:
            processors.append(self.otel)
        processors.append(_to_doc)
        # A private BoundLogger: no global structlog configuration, which other code may own.
        context = {} if worker is None else {"worker": worker}
        self._log = structlog.BoundLogger(_Dispatch(self._write), processors, context)

    # ---- public API -------------------------------------------------------------------

    def decision(self, o: Outcome) -> None:
        """Exactly one `egress.decision` event and the request metrics for one outcome."""
        try:
            enforced = "true" if o.enforced else "false"
            self.metrics.requests.labels(o.action.value, o.reason.value, enforced).inc()
            if o.latency_s is not None:
                self.metrics.decision_seconds.observe(o.latency_s)
        except Exception:  # noqa: BLE001 - metrics must never break the decision path
            self._dropped("metrics")
        try:
            fields = decision_fields(o)
        except Exception:  # noqa: BLE001
            self._dropped("render")
            return
        if o.reason is Reason.EVENT_SINK_STALLED and isinstance(self._stdout, PipeSink):
            # stdout's queue is full: counted there and summarised by event_sink.resumed; the file
            # sink (if any) still gets this decision.
            with self._lock:
                self._stdout.refused()
                self._skip_stdout = True
                try:
                    self.emit("egress.decision", **fields)
                finally:
                    self._skip_stdout = False
            return
        self.emit("egress.decision", **fields)

    def tunnel_opened(self) -> None:
        self.metrics.tunnels_open.inc()

    def tunnel_ended(self) -> None:
        """A tunnel that ends without a `tunnel.closed` (refused after its first bytes, or never opened)."""
        self.metrics.tunnels_open.dec()

    def tunnel_closed(self, o: Outcome, bytes_up: int, bytes_down: int, duration_s: float) -> None:
        """The close of an allowed tunnel (`o` is its CONNECT's outcome): one `tunnel.closed` event."""
        self.tunnel_ended()
        c = o.request.client
        self.emit(
            "tunnel.closed",
            flow_id=o.request.flow_id,
            client={"address": c.address, "port": c.port, "name": o.client_name, "user": c.user,
                    "task_id": c.task_id, "profile": c.profile},
            destination={"host": o.request.host, "port": o.request.port, "ip": o.ip},
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            duration_s=round(duration_s, 3),
            inspected=o.inspect,
        )

    def emit(self, event: str, **fields: Any) -> None:
        """Any event: adds schema, timestamp and event name; writes one line per sink.

        Fields may be nested dicts (`client={"address": ...}`) or dotted keys
        (`**{"client.address": ...}`); both are written as nested objects.
        """
        try:
            level = _level(event, fields)
            with self._lock:
                getattr(self._log, level)(event, **fields)
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
        failed = isinstance(self._stdout, PipeSink) and self._stdout.failed
        return (self._ok and not failed) or not self._fail_closed

    def stdout_stalled(self) -> bool:
        """True while stdout's reader has stopped reading and its queue is full (pipesink.py)."""
        return isinstance(self._stdout, PipeSink) and self._stdout.stalled

    def sink_stalled(self) -> bool:
        """True while new requests must be refused because stdout is stalled (fail closed only)."""
        return self._fail_closed and self.stdout_stalled()

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits (bounded) until stdout's queue is written (tests, shutdown)."""
        return self._stdout.flush(timeout) if isinstance(self._stdout, PipeSink) else True

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
            if isinstance(self._stdout, PipeSink):
                left = self._stdout.close(max(deadline, time.monotonic() + STDOUT_CLOSE_S))
                if left:
                    log.warning("%d events were not written to stdout: its reader stopped reading", left)
            else:
                self._stdout.close()
            if self._file is not None:
                self._file.close()

    # ---- internals --------------------------------------------------------------------

    def _write(self, doc: dict[str, Any], level: str) -> None:
        out = self._to_ocsf(doc) if self._to_ocsf is not None else doc
        line = str(self._json(None, "info", dict(out)))
        why = ""
        sinks: list[StreamSink | PipeSink | FileSink] = [] if self._skip_stdout else [self._stdout]
        if self._file is not None:
            sinks.append(self._file)
        for sink in sinks:
            try:
                if sink is self._stdout and self._console is not None:
                    sink.write(str(self._console(None, "info", escape_all(_flat(doc)))))
                else:
                    sink.write(line)
            except Exception as e:  # noqa: BLE001 - OSError, closed stream, encoding: all the same to us
                why = why or f"{sink.name}: {type(e).__name__}: {e}"
                self._dropped(sink.name, why)
        if sinks:
            self._health(not why, why)
        if self._syslog is not None:
            try:  # only queues the message; the network is the sender thread's business
                self._syslog.write(line, level, str(doc.get("event", "")), str(doc.get("timestamp", "")))
            except Exception:  # noqa: BLE001
                self._dropped("syslog")

    def _dropped(self, sink: str, why: str = "") -> None:
        with contextlib.suppress(Exception):  # the counter is the last resort
            self.metrics.events_dropped.labels(sink).inc()
        if sink in ("stdout", "file", "render"):
            self._health(False, why or f"{sink}: the event could not be built")

    def _health(self, ok: bool, why: str = "") -> None:
        """Say on stderr, once per change, that decision records are being lost and what follows."""
        if ok == self._ok:
            return
        self._ok = ok
        with contextlib.suppress(Exception):  # stderr is the last channel left; nothing more to do
            if not ok:
                then = ("every new request is denied (internal_error) until they can" if self._fail_closed
                        else "requests are still decided (on_write_error: open) and the records lost")
                log.error("events cannot be written (%s): %s; counted in "
                          "portcullis_events_dropped_total", why, then)
            else:
                log.warning("events can be written again%s",
                            "; requests are served again" if self._fail_closed else "")

    def _resumed(self, s: StallStats) -> None:
        """stdout is read again (the writer thread calls this): the summary of the stall."""
        self.emit(
            "event_sink.resumed",
            sink="stdout",
            since=datetime.fromtimestamp(s.since, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            stalled_s=round(s.stalled_s, 3),
            refused=s.refused,
            dropped=s.dropped,
        )

    def _pipe_failed(self, n: int) -> None:
        with contextlib.suppress(Exception):
            self.metrics.events_dropped.labels("stdout").inc(n)

    def _stdout_buffered(self) -> int:
        return self._stdout.buffered if isinstance(self._stdout, PipeSink) else 0

    def _otel_dropped(self) -> None:
        self._dropped("otlp")

    def _syslog_dropped(self, n: int) -> None:
        with contextlib.suppress(Exception):
            self.metrics.events_dropped.labels("syslog").inc(n)

    def _syslog_buffered(self) -> int:
        return self._syslog.buffered if self._syslog is not None else 0


class _Dispatch:
    """The structlog 'logger': receives the finished event dict and hands it to the sinks."""

    def __init__(self, write: Callable[[dict[str, Any], str], None]) -> None:
        self._write = write

    def info(self, doc: dict[str, Any]) -> None:
        self._write(doc, "info")

    def warning(self, doc: dict[str, Any]) -> None:
        self._write(doc, "warning")

    def error(self, doc: dict[str, Any]) -> None:
        self._write(doc, "error")

    msg = info


def _envelope(_logger: Any, _method: str, ed: MutableMapping[str, Any]) -> dict[str, Any]:
    """schema, timestamp, event first; then the caller's fields, nested and cleaned."""
    event = str(ed.pop("event", ""))
    for key in _ENVELOPE:
        ed.pop(key, None)
    body = clean(nest(ed))
    return {"schema": SCHEMA, "timestamp": now_rfc3339(), "event": clean(event), **body}


def _to_doc(_logger: Any, _method: str, ed: MutableMapping[str, Any]) -> tuple[tuple[()], dict[str, Any]]:
    return (), {"doc": dict(ed)}


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
        "decision": o.action.value,
        "reason": o.reason.value,
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


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
