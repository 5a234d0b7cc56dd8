"""The facts of one egress decision, handed by the proxy to telemetry (one record, one event)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """Everything an `egress.decision` event says. Built once per decision by the proxy.

    `decision` is the final verdict the proxy acted on (allow|deny); in audit mode a policy
    deny is recorded as decision=deny with enforced=False while the traffic goes through.
    `method` is "CONNECT" for a tunnel decided on its authority; `path` has no query string.
    """

    decision: str                   # "allow" | "deny"
    reason: str                     # addons.policy.model.Reason value
    enforced: bool
    host: str | None                # null only when a malformed request named no usable host
    port: int | None
    flow_id: str
    rule: str | None = None
    rule_file: str | None = None
    rule_line: int | None = None
    matched_rules: tuple[str, ...] = ()
    client_address: str | None = None
    client_port: int | None = None
    client_name: str | None = None
    client_user: str | None = None
    ip: str | None = None           # the address connected to (or the literal), when known
    scheme: str | None = None       # http | https | ws | wss | None (tunnel)
    method: str | None = None
    path: str | None = None
    approval_id: str | None = None
    status: int | None = None       # the status the proxy answered with, when it answered itself
    layer: str = "http"             # http | connect | inspected
    latency_s: float | None = None  # time spent deciding (incl. DNS, excl. approval waits)
    approval_wait_s: float | None = None
    detail: str | None = None
