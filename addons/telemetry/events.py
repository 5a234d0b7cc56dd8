"""The event stream: one structured event per decision and per lifecycle fact.

MINIMAL FIRST VERSION (lead): the public API below is the contract the proxy and the
approvals service call. The telemetry work fills in structlog rendering, OCSF, OTLP, the
file sink with reopen, and fail-closed/open handling behind the same methods.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from addons.policy.config import TelemetryConfig
from addons.telemetry.metrics import Metrics
from addons.telemetry.record import DecisionRecord

SCHEMA = "portcullis.event/v1"


class Telemetry:
    """Emits events and owns the metrics. One instance per running proxy."""

    def __init__(
        self,
        config: TelemetryConfig | None = None,
        base_dir: Path | None = None,
        metrics: Metrics | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.config = config or TelemetryConfig()
        self.base_dir = base_dir or Path.cwd()
        self.metrics = metrics or Metrics()
        self.stream = stream if stream is not None else sys.stdout

    def decision(self, rec: DecisionRecord) -> None:
        """Exactly one `egress.decision` event and the request metrics for one decision."""
        self.metrics.requests.labels(rec.decision, rec.reason, str(rec.enforced).lower()).inc()
        if rec.latency_s is not None:
            self.metrics.decision_seconds.observe(rec.latency_s)
        fields = asdict(rec)
        self.emit("egress.decision", **fields)

    def emit(self, event: str, **fields: Any) -> None:
        """Any event: adds schema, timestamp and event name; writes one line."""
        doc = {"schema": SCHEMA, "timestamp": _now(), "event": event, **fields}
        self.stream.write(json.dumps(doc, separators=(",", ":"), default=str) + "\n")
        self.stream.flush()

    def healthy(self) -> bool:
        """False when events cannot be written and the sink is set to fail closed."""
        return True

    def reopen(self) -> None:
        """Reopen file sinks (SIGHUP, log rotation)."""

    def close(self) -> None:
        """Flush and close every sink (after proxy.stopped)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
