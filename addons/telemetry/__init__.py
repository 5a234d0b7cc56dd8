"""Telemetry: the event stream (JSON lines, OCSF, OpenTelemetry) and Prometheus metrics."""
