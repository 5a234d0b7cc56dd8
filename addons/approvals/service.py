"""The approval service: grants, coalesced pending approvals, holding waiters, decisions."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.approvals import persist
from addons.approvals.errors import ApprovalError
from addons.approvals.model import (  # re-exported: the proxy imports these from here
    ApprovalOutcome,
    ApprovalRequest,
    DecideError,
    Verdict,
    event_fields,
    rfc3339,
    stored_verdict,
)
from addons.approvals.store import EXPIRED, PENDING, Approval, Store, open_store
from addons.approvals.webhook import Endpoint, WebhookSender, parse_secret
from addons.config.models import ApprovalsConfig
from addons.policy.model import Reason
from addons.telemetry.events import Telemetry

__all__ = ["ApprovalOutcome", "ApprovalRequest", "ApprovalService", "DecideError", "rfc3339"]
log = logging.getLogger(__name__)

Key = tuple[str, str, int]
DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"
RESEND_GRACE_S = 5.0
RETRY_AFTER_MAX_S = 10  # hold: false; a retry is cheap and a person may answer within seconds
ALWAYS_BRIDGE_S = 60.0  # an `always` grant also covers its client until the hot reload has the new rule


@dataclass
class _Live:
    """In-memory side of one pending approval: the future every waiter awaits."""

    approval: Approval
    future: asyncio.Future[Verdict]
    waiters: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    synced: float = 0.0  # monotonic time of the last look at the store


class ApprovalService:
    """One per proxy process. All methods run on the proxy's event loop."""

    poll_interval = 1.0  # how often a waiter checks that its client is still there
    max_pending_per_client = 100

    def __init__(self, config: ApprovalsConfig, base_dir: Path, telemetry: Telemetry, *,
                 clock: Callable[[], float] = time.time, admin_url: str | None = None,
                 sweep_interval: float = 30.0, webhook_backoff: float = 0.5) -> None:
        self.config = config
        self.base_dir = base_dir
        self.telemetry = telemetry
        self.clock = clock
        self._admin_url = (admin_url or DEFAULT_ADMIN_URL).rstrip("/")
        self._url_known = admin_url is not None
        self._resend_due = False
        self.sweep_interval = sweep_interval
        self._webhook_backoff = webhook_backoff
        self._store: Store | None = None
        self._sender: WebhookSender | None = None
        self._live: dict[Key, _Live] = {}
        self._decide_lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def admin_url(self) -> str:
        """Base of the webhook's decide_url. The launcher sets it once the admin port is bound."""
        return self._admin_url

    @admin_url.setter
    def admin_url(self, value: str) -> None:
        self._admin_url = value.rstrip("/")
        self._url_known = True
        self._resend()

    @property
    def persist_path(self) -> Path | None:
        p = self.config.persist_to
        return None if p is None else self.base_dir / p

    @property
    def store(self) -> Store:
        if self._store is None:
            raise ApprovalError("ApprovalService.start() has not been called")
        return self._store

    # Lifecycle

    async def start(self) -> None:
        """Open the store, load pending approvals, sweep, start webhook delivery."""
        endpoints = []
        for wh in self.config.webhooks:
            value = os.environ.get(wh.secret_env)
            if not value:
                raise ApprovalError(f"webhook {wh.url}: environment variable {wh.secret_env} is not set")
            try:
                endpoints.append(Endpoint(wh.url, parse_secret(value)))
            except ApprovalError as e:
                raise ApprovalError(f"webhook secret in {wh.secret_env}: {e}") from e
        self._store = open_store(self.config.store, self.base_dir)
        self._sender = WebhookSender(endpoints, self.telemetry, clock=self.clock,
                                     backoff_base=self._webhook_backoff)
        await self._sender.start()
        self._sweep()
        loop = asyncio.get_running_loop()
        for a in self.store.pending():  # survived a restart: their waiters are gone, the decision is not
            self._track(a, loop)
        self._gauge()
        # Webhooks cut short by the last shutdown are sent again (same webhook-id: receivers dedupe),
        # once the decide_url is known, or after a grace period if nobody ever sets it.
        self._resend_due = True
        if self._url_known:
            self._resend()
        else:
            loop.call_later(RESEND_GRACE_S, self._resend)
        self._sweeper = loop.create_task(self._sweep_loop())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._sender is not None:
            await self._sender.stop()
        for live in self._live.values():
            if live.timer:
                live.timer.cancel()
            if not live.future.done():  # waiters still held at shutdown are denied, not left hanging
                live.future.set_result(Verdict(False, Reason.APPROVAL_TIMEOUT, None, None))
        self._live.clear()
        if self._store is not None:
            self._store.close()
            self._store = None

    # The proxy's entry point

    async def resolve(self, req: ApprovalRequest, client_alive: Callable[[], bool]) -> ApprovalOutcome:
        """Grant, or coalesce onto/open a pending approval and hold (or answer pending at once)."""
        try:
            return await self._resolve(req, client_alive)
        except asyncio.CancelledError:
            raise
        except Exception:  # fail closed: the proxy denies and logs the decision
            log.exception("approval resolve failed for %s:%s", req.host, req.port)
            return ApprovalOutcome(False, Reason.INTERNAL_ERROR, None)

    async def _resolve(self, req: ApprovalRequest, client_alive: Callable[[], bool]) -> ApprovalOutcome:
        now = self.clock()
        grant = self.store.take_grant(req.client_key, req.host, req.port, now)
        if grant is not None:
            allowed = grant.decision == "allow"
            src = self.store.get(grant.approval_id) if grant.approval_id else None
            return ApprovalOutcome(allowed, Reason.APPROVED if allowed else Reason.APPROVAL_DENIED,
                                   grant.approval_id, scope=grant.scope,
                                   decided_by=src.decided_by if src else None)
        key = (req.client_key, req.host, req.port)
        live = self._live.get(key)
        if live is not None and live.approval.expires_at <= now:
            self._expire(live)
            live = None
        if live is not None:
            self._sync(live)  # decided by another replica meanwhile? then this request asks afresh
            if live.future.done():
                live = None
        if live is None and (shared := self.store.pending_for(req.client_key, req.host, req.port, now)):
            live = self._track(shared, asyncio.get_running_loop())  # opened by another replica
            self._gauge()
        if live is None:  # no await between the lookup and _open: concurrent requests coalesce
            if self._open_for(req.client_key) >= self.max_pending_per_client:
                # An agent spraying new destinations must not flood the approvers' webhook channel.
                log.warning("client %s has %d pending approvals; not opening more", req.client_key,
                            self.max_pending_per_client)
                return ApprovalOutcome(False, Reason.APPROVAL_PENDING, None, retry_after=30)
            live = self._open(req, now)
        if not self.config.hold:
            left = live.approval.expires_at - now
            return ApprovalOutcome(False, Reason.APPROVAL_PENDING, live.approval.id,
                                   retry_after=max(1, min(RETRY_AFTER_MAX_S, math.ceil(left))))
        return await self._wait(live, client_alive)

    async def _wait(self, live: _Live, client_alive: Callable[[], bool]) -> ApprovalOutcome:
        start = time.monotonic()
        live.waiters += 1
        verdict: Verdict | None = None
        try:
            while verdict is None:
                if live.future.done():
                    verdict = live.future.result()
                    break
                remaining = live.approval.expires_at - self.clock()
                if remaining <= 0:
                    self._expire(live)
                    continue
                try:
                    # shield: one waiter timing out must not cancel the future the others share
                    verdict = await asyncio.wait_for(asyncio.shield(live.future),
                                                     min(self.poll_interval, remaining))
                except TimeoutError:
                    if not client_alive():
                        break
                    self._sync(live)
        finally:
            live.waiters -= 1
        waited = time.monotonic() - start
        if verdict is None:
            outcome = ApprovalOutcome(False, Reason.CLIENT_CLOSED, live.approval.id, waited_s=waited)
        else:
            outcome = ApprovalOutcome(verdict.allowed, verdict.reason, live.approval.id, waited_s=waited,
                                      scope=verdict.scope, decided_by=verdict.by)
        self.telemetry.metrics.approval_wait_seconds.labels(outcome.reason.value).observe(waited)
        return outcome

    # Opening, tracking and expiring pending approvals

    def _open_for(self, client_key: str) -> int:
        return sum(1 for k in self._live if k[0] == client_key)

    def _open(self, req: ApprovalRequest, now: float) -> _Live:
        a = Approval(
            id="apr_" + secrets.token_hex(16), client_key=req.client_key, client_address=req.client_address,
            client_name=req.client_name, host=req.host, port=req.port, scheme=req.scheme, method=req.method,
            path=req.path, rule=req.rule, created_at=now, expires_at=now + self.config.timeout,
        )
        self.store.insert(a)
        live = self._track(a, asyncio.get_running_loop())
        self._gauge()
        self.telemetry.emit("approval.requested", approval_id=a.id, **event_fields(a), flow_id=req.flow_id,
                            decide_url=f"{self.admin_url}/approvals/{a.id}")
        self._notify(a)
        return live

    def _notify(self, a: Approval) -> None:
        assert self._sender is not None
        if not self._sender.endpoints:
            return
        self._sender.send(a.id, self.payload(a), a.expires_at, lambda: self._is_pending(a.id),
                          on_done=lambda: self._notified(a.id))

    def _notified(self, approval_id: str) -> None:
        if self._store is not None:
            self._store.mark_notified(approval_id)

    def _resend(self) -> None:
        if not self._resend_due or self._store is None:
            return
        self._resend_due = False
        for a in self.store.pending():
            if not a.notified and a.expires_at > self.clock():
                self._notify(a)

    def payload(self, a: Approval) -> dict[str, Any]:
        """The thin webhook body: no headers, bodies or query strings."""
        return {"type": "approval.requested", "id": a.id, "client": a.client_name or a.client_address,
                "host": a.host, "port": a.port, "scheme": a.scheme, "method": a.method, "path": a.path,
                "rule": a.rule, "created_at": rfc3339(a.created_at), "expires_at": rfc3339(a.expires_at),
                "decide_url": f"{self.admin_url}/approvals/{a.id}"}

    def _track(self, a: Approval, loop: asyncio.AbstractEventLoop) -> _Live:
        live = _Live(a, loop.create_future())
        live.timer = loop.call_later(max(0.0, a.expires_at - self.clock()), self._expire, live)
        self._live[a.key] = live
        return live

    def _is_pending(self, approval_id: str) -> bool:
        a = self._store.get(approval_id) if self._store else None
        return a is not None and a.state == PENDING and a.expires_at > self.clock()

    def _expire(self, live: _Live) -> None:
        a = live.approval
        if self._live.get(a.key) is live:
            del self._live[a.key]
        if live.timer:
            live.timer.cancel()
        if self._store is None:
            return
        timeout = Verdict(False, Reason.APPROVAL_TIMEOUT, None, None)
        if self.store.expire(a.id, self.clock()):
            self._decided(a, timeout, "deny", None)
            verdict = timeout
        else:  # decided elsewhere (another replica sharing the store) just before expiry
            verdict = stored_verdict(self.store.get(a.id)) or timeout
        if not live.future.done():
            live.future.set_result(verdict)
        self._gauge()

    def _sync(self, live: _Live) -> None:
        """Pick up a decision taken by another process sharing the store (at most once per poll).

        A `once` decision taken elsewhere found nobody waiting there and left a single-use grant for
        a retry; when requests wait here, they are that use, so the grant goes.
        """
        now = time.monotonic()
        if live.future.done() or now - live.synced < self.poll_interval:
            return
        live.synced = now
        stored = self.store.get(live.approval.id)
        verdict = stored_verdict(stored)
        if verdict is None or stored is None:
            return
        if live.waiters > 0 and stored.scope == "once":
            self.store.drop_single_use(stored)
        if self._live.get(live.approval.key) is live:
            del self._live[live.approval.key]
        if live.timer:
            live.timer.cancel()
        live.future.set_result(verdict)
        self._gauge()

    def _sweep(self) -> None:
        now = self.clock()
        for a in self.store.due(now):
            live = self._live.get(a.key)
            if live is not None and live.approval.id == a.id:
                self._expire(live)
            elif self.store.expire(a.id, now):
                self._decided(a, Verdict(False, Reason.APPROVAL_TIMEOUT, None, None), "deny", None)
        self.store.sweep(now)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                self._sweep()
            except Exception:  # keep sweeping; a broken store also shows up on every resolve
                log.exception("approvals sweep failed")

    def _gauge(self) -> None:
        self.telemetry.metrics.approvals_pending.set(len(self._live))

    # Decisions (admin API, page, CLI)

    async def decide(self, approval_id: str, decision: str, scope: str, by: str | None,
                     reason: str | None) -> Approval:
        """The first decision wins. Raises DecideError (404, 409 with the standing one, 410, 500)."""
        async with self._decide_lock:
            a = self.store.get(approval_id)
            if a is None:
                raise DecideError(404, "not_found", f"no approval {approval_id}")
            now = self.clock()
            if a.state == PENDING and a.expires_at <= now:
                self._sweep()
                a = self.store.get(approval_id) or a
            if a.state == EXPIRED or (a.state == PENDING and a.expires_at <= now):
                raise DecideError(410, "expired", f"approval {approval_id} expired before a decision", a)
            if a.state != PENDING:
                raise DecideError(409, "already_decided",
                                  f"approval {approval_id} was already decided: {a.decision} "
                                  f"({a.scope}) by {a.decided_by or 'unknown'}; nothing changed", a)
            if scope == "always":
                await self._persist(a, decision, by, reason, now)
            if not self.store.decide(a.id, decision, scope, by, reason, now):
                # Lost a race (expiry while the rule was being written): say what did happen.
                cur = self.store.get(a.id)
                note = "; the rule was written to persist_to all the same" if scope == "always" else ""
                if cur is not None and cur.state == EXPIRED:
                    msg = f"approval {a.id} expired before the decision{note}"
                    raise DecideError(410, "expired", msg, cur)
                raise DecideError(409, "already_decided", f"decided concurrently; nothing changed{note}", cur)
            live = self._live.get(a.key)
            if live is not None and live.approval.id != a.id:
                live = None
            if live is not None:
                del self._live[a.key]
                if live.timer:
                    live.timer.cancel()
            self._grant(a, decision, scope, now, waiters=live.waiters if live else 0)
            allowed = decision == "allow"
            verdict = Verdict(allowed, Reason.APPROVED if allowed else Reason.APPROVAL_DENIED, scope, by)
            if live is not None and not live.future.done():
                live.future.set_result(verdict)
            self._decided(a, verdict, decision, scope, by=by, text=reason)
            self._gauge()
            return self.store.get(a.id) or a

    def _grant(self, a: Approval, decision: str, scope: str, now: float, waiters: int) -> None:
        s = self.store
        if scope == "session":
            s.add_grant(a.client_key, a.host, a.port, decision, scope, a.id, now,
                        now + self.config.session_ttl, single_use=False)
        elif scope == "always":
            s.add_grant(a.client_key, a.host, a.port, decision, scope, a.id, now,
                        now + min(self.config.session_ttl, ALWAYS_BRIDGE_S), single_use=False)
        elif waiters == 0:
            # Nobody is held (hold: false, or the waiters were lost to a restart or hung up): the
            # decision applies once, to the next retry within one approval timeout.
            s.add_grant(a.client_key, a.host, a.port, decision, scope, a.id, now,
                        now + self.config.timeout, single_use=True)

    async def _persist(self, a: Approval, decision: str, by: str | None, reason: str | None,
                       now: float) -> None:
        path = self.persist_path
        if path is None:
            raise DecideError(422, "no_persist_to", "scope always needs approvals.persist_to in the config; "
                              "use once or session", a)
        action = "allow" if decision == "allow" else "deny"
        try:
            await asyncio.to_thread(
                persist.append_rule, path, name=persist.rule_name(action, a.host, a.port, a.id),
                action=action, host=a.host, port=a.port, clients=[a.client_name] if a.client_name else None,
                by=by, reason=reason, now=now)
        except (ApprovalError, OSError) as e:
            msg = f"could not write the rule, nothing was decided: {e}"
            raise DecideError(500, "persist_failed", msg, a) from e

    def _decided(self, a: Approval, v: Verdict, decision: str, scope: str | None, *,
                 by: str | None = None, text: str | None = None) -> None:
        now = self.clock()
        self.telemetry.metrics.approval_requests.labels(v.reason.value).inc()
        self.telemetry.emit("approval.decided", approval_id=a.id, **event_fields(a), decision=decision,
                            scope=scope, by=by, reason=text, outcome=v.reason.value,
                            wait_s=round(max(0.0, now - a.created_at), 3))

    # Queries (admin API)

    def get(self, approval_id: str) -> Approval | None:
        return self.store.get(approval_id)

    def waiters(self, a: Approval) -> int:
        live = self._live.get(a.key)
        return live.waiters if live is not None and live.approval.id == a.id else 0

    def listing(self, recent: int = 50) -> list[Approval]:
        """Pending (oldest first), then the most recent decided or expired ones."""
        return [*self.store.pending(), *self.store.recent(recent)]
