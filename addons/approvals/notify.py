"""What the approvals part tells the world: the approval.requested / approval.decided events and the
approval_requests metric, and the webhooks (the thin payload, delivery through webhook.WebhookSender,
and the re-send after a restart of what the last shutdown cut short)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from addons.approvals.errors import ApprovalError
from addons.approvals.links import Links
from addons.approvals.model import Approval, Choice, Store, rfc3339
from addons.approvals.webhook import Endpoint, WebhookSender, parse_secret
from addons.background import spawn
from addons.config.models import WebhookConfig
from addons.policy.model import Reason
from addons.telemetry.events import Telemetry

log = logging.getLogger(__name__)

DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"
RESEND_GRACE_S = 5.0


def endpoints(webhooks: list[WebhookConfig]) -> list[Endpoint]:
    """The configured endpoints with their keys; ApprovalError names a missing or malformed secret."""
    found = []
    for wh in webhooks:
        value = os.environ.get(wh.secret_env)
        if not value:
            raise ApprovalError(f"webhook {wh.url}: environment variable {wh.secret_env} is not set")
        try:
            found.append(Endpoint(wh.url, parse_secret(value), wh.timeout))
        except ApprovalError as e:
            raise ApprovalError(f"webhook secret in {wh.secret_env}: {e}") from e
    return found


def event_fields(a: Approval) -> dict[str, Any]:
    """The approval.* event fields, dotted like the egress.decision event's."""
    return {"client.address": a.client_address, "client.name": a.client_name, "client.task_id": a.task_id,
            **({"client.labels": dict(a.labels)} if a.labels else {}), "destination.host": a.host,
            "destination.port": a.port, "request.scheme": a.scheme, "request.method": a.method,
            "request.path": a.path, "rule": a.rule, "credential": a.credential,
            "created_at": rfc3339(a.created_at), "expires_at": rfc3339(a.expires_at)}


def payload(a: Approval, admin_url: str) -> dict[str, Any]:
    """The thin webhook body: no headers, bodies or query strings."""
    return {"type": "approval.requested", "id": a.id, "client": a.client_name or a.client_address,
            "task_id": a.task_id, "labels": dict(a.labels),
            "task_expires_at": rfc3339(a.task_until) if a.task_until is not None else None,
            "host": a.host, "port": a.port, "scheme": a.scheme, "method": a.method,
            "path": a.path,
            "rule": a.rule, "credential": a.credential, "created_at": rfc3339(a.created_at),
            "expires_at": rfc3339(a.expires_at), "decide_url": f"{admin_url}/approvals/{a.id}"}


class Notifier:
    """Events, the metric and webhooks for the approvals of one process."""

    def __init__(self, telemetry: Telemetry, *, clock: Callable[[], float] = time.time,
                 admin_url: str | None = None, backoff: float = 0.5) -> None:
        self.telemetry = telemetry
        self.clock = clock
        self.links: Links | None = None
        self._admin_url = (admin_url or DEFAULT_ADMIN_URL).rstrip("/")
        self._url_known = admin_url is not None
        self._backoff = backoff
        self._resend_due = False
        self._grace: asyncio.TimerHandle | None = None
        self._store: Store | None = None
        self._still_pending: Callable[[str], Awaitable[bool]] | None = None
        self.sender: WebhookSender | None = None

    @property
    def admin_url(self) -> str:
        """Base of the decide_url. The launcher sets it once the admin port is bound."""
        return self._admin_url

    @admin_url.setter
    def admin_url(self, value: str) -> None:
        self._admin_url = value.rstrip("/")
        self._url_known = True
        self._resend()

    async def start(self, targets: list[Endpoint], store: Store,
                    still_pending: Callable[[str], Awaitable[bool]], resend: bool = True) -> None:
        """Start delivery. Webhooks cut short by the last shutdown are sent again (same webhook-id:
        receivers dedupe) once the decide_url is known, or after a grace period if nobody sets it."""
        self._store, self._still_pending = store, still_pending
        self.sender = WebhookSender(targets, self.telemetry, clock=self.clock, backoff_base=self._backoff)
        await self.sender.start()
        self._resend_due = resend  # with --workers N only the supervisor re-sends
        if self._url_known:
            self._resend()
        else:
            self._grace = asyncio.get_running_loop().call_later(RESEND_GRACE_S, self._resend)

    async def stop(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
        self._resend_due, self._store = False, None
        if self.sender is not None:
            await self.sender.stop()

    def requested(self, a: Approval, flow_id: str) -> None:
        """A new approval: its event, then its webhooks."""
        self.telemetry.emit("approval.requested", approval_id=a.id, **event_fields(a), flow_id=flow_id,
                            decide_url=f"{self.admin_url}/approvals/{a.id}")
        self._send(a)

    def decided(self, a: Approval, outcome: Reason) -> None:
        """A decision or an expiry this process took (`a` is the row after it): counted and logged once."""
        self.telemetry.metrics.approval_requests.labels(outcome.value).inc()
        self.telemetry.emit("approval.decided", approval_id=a.id, **event_fields(a),
                            decision=(a.decision or Choice.DENY).value,
                            scope=a.scope.value if a.scope else None, by=a.decided_by, reason=a.reason,
                            outcome=outcome.value, wait_s=round(max(0.0, self.clock() - a.created_at), 3))

    def payload(self, a: Approval) -> dict[str, Any]:
        body = payload(a, self.admin_url)
        if self.links is not None:  # a capability for this approval only (approvals.links)
            body["decide_link"] = self.links.url(self.admin_url, a.id, a.expires_at)
        return body

    def _send(self, a: Approval) -> None:
        if self.sender is None or not self.sender.endpoints:
            return
        approval_id = a.id
        self.sender.send(approval_id, self.payload(a), a.expires_at, lambda: self._pending(approval_id),
                         on_done=lambda: self._notified(approval_id))

    async def _pending(self, approval_id: str) -> bool:
        """Still worth notifying? A store that does not answer now: yes (until the expiry)."""
        if self._still_pending is None:
            return False
        try:
            return await self._still_pending(approval_id)
        except Exception:  # noqa: BLE001 - the store is away: keep notifying until the expiry
            return True

    def _notified(self, approval_id: str) -> None:
        if self._store is not None:
            spawn(self._mark(self._store, approval_id), "webhook notified")

    @staticmethod
    async def _mark(store: Store, approval_id: str) -> None:
        try:
            await store.mark_notified(approval_id)
        except Exception:  # noqa: BLE001 - then it is sent again after a restart (receivers dedupe)
            log.warning("could not mark the webhooks of %s as sent; they may be sent again", approval_id)

    def _resend(self) -> None:
        if not self._resend_due or self._store is None:
            return
        self._resend_due = False
        spawn(self._resend_cut_short(self._store), "webhook resend")

    async def _resend_cut_short(self, store: Store) -> None:
        try:
            pending = await store.pending()
        except Exception:  # noqa: BLE001 - no re-send this time; receivers are told of new ones
            log.warning("could not read the pending approvals to re-send their webhooks")
            return
        for a in pending:
            if not a.notified and a.expires_at > self.clock():
                self._send(a)
