"""Value types of the approvals part: what the proxy asks, what it gets back, decision errors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from addons.approvals.store import ALLOWED, EXPIRED, PENDING, Approval
from addons.policy.model import Reason


@dataclass(frozen=True)
class ApprovalRequest:
    """What the proxy asks about: one request the policy judged `approval`."""

    client_key: str
    client_address: str | None
    client_name: str | None
    host: str
    port: int
    scheme: str | None
    method: str | None
    path: str | None
    rule: str | None
    flow_id: str


@dataclass(frozen=True)
class ApprovalOutcome:
    """The answer for one request: allowed or not, and why (a Reason the proxy logs)."""

    allowed: bool
    reason: Reason
    approval_id: str | None
    retry_after: int | None = None
    waited_s: float = 0.0
    scope: str | None = None
    decided_by: str | None = None


class DecideError(Exception):
    """A decision that cannot be taken; `status` is the admin API's HTTP status."""

    def __init__(self, status: int, code: str, message: str, approval: Approval | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.approval = status, code, message, approval


@dataclass(frozen=True)
class Verdict:
    """How an approval ended, as the waiters see it."""

    allowed: bool
    reason: Reason
    scope: str | None
    by: str | None


def stored_verdict(a: Approval | None) -> Verdict | None:
    """The verdict a stored approval carries, or None while it is still pending."""
    if a is None or a.state == PENDING:
        return None
    if a.state == EXPIRED:
        return Verdict(False, Reason.APPROVAL_TIMEOUT, None, None)
    allowed = a.state == ALLOWED
    return Verdict(allowed, Reason.APPROVED if allowed else Reason.APPROVAL_DENIED, a.scope, a.decided_by)


def rfc3339(ts: float) -> str:
    """Unix seconds -> RFC 3339 UTC with a Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def event_fields(a: Approval) -> dict[str, Any]:
    """The approval.* event fields, dotted like the egress.decision event's."""
    return {"client.address": a.client_address, "client.name": a.client_name, "destination.host": a.host,
            "destination.port": a.port, "request.scheme": a.scheme, "request.method": a.method,
            "request.path": a.path, "rule": a.rule, "created_at": rfc3339(a.created_at),
            "expires_at": rfc3339(a.expires_at)}
