"""Every Prometheus metric Portcullis exports, in one place. Labels are bounded sets only:
never a host, URL, client address or id."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values

PREFIX = "portcullis_"


class Metrics:
    """One registry per process (and per test): no global state, no duplicate registration."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests", "Egress decisions by verdict and reason.",
            ["decision", "reason", "enforced"], registry=r,
        )
        self.decision_seconds = Histogram(
            PREFIX + "decision_duration_seconds", "Time to decide (DNS included, approval waits excluded).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=r,
        )
        self.approvals_pending = Gauge(
            PREFIX + "approvals_pending", "Approvals waiting for a person.", registry=r,
            multiprocess_mode="livemax",
        )
        self.approval_requests = Counter(
            PREFIX + "approval_requests", "Approvals opened, by outcome.",
            ["outcome"], registry=r,
        )
        self.approval_wait_seconds = Histogram(
            PREFIX + "approval_wait_seconds", "How long requests waited for a person, by outcome.",
            ["outcome"], buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=r,
        )
        self.webhook_deliveries = Counter(
            PREFIX + "webhook_deliveries", "Webhook delivery attempts by result.",
            ["result"], registry=r,
        )
        self.rule_reloads = Counter(
            PREFIX + "rule_reloads", "Rule reloads by result.", ["result"], registry=r,
        )
        self.rules_loaded = Gauge(
            PREFIX + "rules_loaded", "Rules in the policy in force.", registry=r, multiprocess_mode="livemax",
        )
        self.events_dropped = Counter(
            PREFIX + "events_dropped", "Events that could not be written to a sink.", ["sink"], registry=r,
        )
        self.events_buffered = Gauge(
            PREFIX + "events_buffered", "Events held for a sink whose receiver is slow or away.", ["sink"],
            registry=r, multiprocess_mode="livesum",
        )
        self.credentials = Counter(
            PREFIX + "credentials", "Task credentials by what happened to them (minted, revoked, expired).",
            ["event"], registry=r,
        )
        self.credentials_live = Gauge(
            PREFIX + "credentials_live", "Task credentials that can be used now.", registry=r,
            multiprocess_mode="livemax",
        )
        self.store_up = Gauge(
            PREFIX + "store_up", "1 while the approvals store answers, 0 while it is unreachable (Redis).",
            registry=r, multiprocess_mode="livemin",
        )
        self.tunnels_open = Gauge(
            PREFIX + "tunnels_open", "CONNECT tunnels currently open.", registry=r,
            multiprocess_mode="livesum",
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def use_multiprocess(path: Path) -> None:
    """Every metric this process creates from now on lives in `path` (prometheus-client's multiprocess
    mode), where `multiprocess_render` reads every process's values. Worker processes inherit the
    environment variable and are in this mode from the start."""
    import os

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess_render(path: Path) -> bytes:
    """/metrics for `--workers N`: the values of every process, combined by prometheus-client."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return generate_latest(registry)
