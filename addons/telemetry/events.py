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
from addons.policy.model import Action, Reason
from addons.telemetry.documents import (  # noqa: F401 - SCHEMA and the builders are this module's API too
    SCHEMA,
    _c,
    _envelope,
    _head,
    decision_doc,
    decision_fields,
    now_rfc3339,
    registered_domain,
)
from addons.telemetry.fields import escape_all
from addons.telemetry.metrics import Metrics
from addons.telemetry.otel import OtelBridge
from addons.telemetry.pipesink import PipeSink, StallStats, usable_fd
from addons.telemetry.render import dumps_ascii
from addons.telemetry.sinks import FileSink, StreamSink
from addons.telemetry.syslog import SyslogSink

EVENT_TYPES = (
    "egress.decision", "tunnel.closed", "approval.requested", "approval.decided",
    "rules.reloaded", "rules.reload_failed", "webhook.failed", "proxy.started", "proxy.stopped",
    "worker.exited", "credential.minted", "credential.revoked", "credential.expired", "store.unreachable",
    "store.reconnected", "event_sink.resumed",
)
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
            if o.reason is Reason.EVENT_SINK_STALLED and isinstance(self._stdout, PipeSink):
                # stdout's queue is full: counted there and summarised by event_sink.resumed; the file
                # sink (if any) still gets this decision.
                with self._lock:
                    self._stdout.refused()
                    self._skip_stdout = True
                    try:
                        self._emit_doc(doc, level)
                    finally:
                        self._skip_stdout = False
                return
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

    def _emit_doc(self, doc: dict[str, Any], level: str) -> None:
        with self._lock:
            if self.otel is not None:
                self.otel(None, level, doc)  # catches and counts its own errors
            self._write(doc, level)

    def _write(self, doc: dict[str, Any], level: str) -> None:
        out = self._to_ocsf(doc) if self._to_ocsf is not None else doc
        line = dumps_ascii(out)
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


def _level(event: str, fields: Mapping[str, Any]) -> str:
    if fields.get("reason") == "internal_error":
        return "error"
    if event in _WARN_EVENTS or fields.get("decision") == "deny":
        return "warning"
    return "info"


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
