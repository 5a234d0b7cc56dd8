"""The approval service: the asyncio side of the ledger (ledger.py).

`ApprovalService` is what the rest of Portcullis uses: the pipeline's `resolve` (addons/pipeline/
decide.py: the Approvals protocol), `decide` for the admin API, the page and the CLI, and the
queries. `Holds` keeps the requests held on a pending approval (one future per approval, one expiry
timer, the waiter count) and is the one place that looks for decisions another replica took on the
shared store (`Holds.sync`, polled by the waiters; a notification channel would call
`Ledger.refresh` from its subscriber instead).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from addons.approvals.errors import ApprovalError
from addons.approvals.ledger import Ledger
from addons.approvals.model import Approval, Choice, Scope, Store
from addons.approvals.notify import Notifier, endpoints
from addons.approvals.persist import Persister
from addons.approvals.stores import open_store
from addons.background import spawn
from addons.config.models import ApprovalsConfig
from addons.pipeline.decide import Approvals, Settlement
from addons.pipeline.model import Outcome
from addons.policy.model import Reason
from addons.telemetry.events import Telemetry

log = logging.getLogger(__name__)


@dataclass
class _Live:
    """The in-memory side of one pending approval: the future every waiter awaits."""

    approval: Approval
    future: asyncio.Future[Reason]
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    waiters: int = 0
    synced: float = 0.0  # monotonic time of the last look at the store


class Holds:
    """The ledger's Listener: futures, timers and waiters per pending approval; events via the notifier."""

    def __init__(self, notifier: Notifier, telemetry: Telemetry, clock: Callable[[], float],
                 poll_interval: float) -> None:
        self.notifier = notifier
        self.telemetry = telemetry
        self.clock = clock
        self.poll_interval = poll_interval  # how often a waiter checks its client and the shared store
        self.ledger: Ledger | None = None  # set once the ledger over this listener exists
        self._live: dict[str, _Live] = {}

    # Listener

    def tracked(self, a: Approval) -> None:
        loop = asyncio.get_running_loop()
        live = _Live(a, loop.create_future(), synced=time.monotonic())  # just read from the store
        live.timer = loop.call_later(max(0.0, a.expires_at - self.clock()), self._on_time, a)
        self._live[a.id] = live
        self._gauge()

    def opened(self, a: Approval, flow_id: str) -> None:
        self.notifier.requested(a, flow_id)

    def ended(self, a: Approval, reason: Reason, here: bool) -> None:
        live = self._live.pop(a.id, None)
        if live is not None:
            if live.timer:
                live.timer.cancel()
            if not live.future.done():
                live.future.set_result(reason)
        if here:
            self.notifier.decided(a, reason)
        self._gauge()

    # Waiting

    async def wait(self, a: Approval, client_alive: Callable[[], bool]) -> Settlement:
        """Hold until a decision, the expiry, or the client hangs up (checked every poll_interval)."""
        assert self.ledger is not None
        live = self._live[a.id]
        start = time.monotonic()
        live.waiters += 1
        reason: Reason | None = None
        try:
            while reason is None:
                if live.future.done():
                    reason = live.future.result()
                    break
                remaining = a.expires_at - self.clock()
                if remaining <= 0:
                    self.ledger.expire(a)
                    continue
                try:
                    # shield: one waiter timing out must not cancel the future the others share
                    reason = await asyncio.wait_for(asyncio.shield(live.future),
                                                    min(self.poll_interval, remaining))
                except TimeoutError:
                    if not client_alive():
                        break
                    self.sync(a)
        finally:
            live.waiters -= 1
        waited = time.monotonic() - start
        got = reason or Reason.CLIENT_CLOSED
        self.telemetry.metrics.approval_wait_seconds.labels(got.value).observe(waited)
        return Settlement(got is Reason.APPROVED, got, a.id, waited_s=waited)

    def sync(self, a: Approval) -> bool:
        """Did another process sharing the store decide `a`? (at most one look per poll_interval)"""
        live = self._live.get(a.id)
        now = time.monotonic()
        if self.ledger is None or live is None or live.future.done():
            return False
        if now - live.synced < self.poll_interval:
            return False
        live.synced = now
        return self.ledger.refresh(a, live.waiters)

    def waiters(self, a: Approval) -> int:
        live = self._live.get(a.id)
        return live.waiters if live is not None else 0

    def close(self) -> None:
        """At shutdown: requests still held are denied (approval_timeout), not left hanging."""
        for live in self._live.values():
            if live.timer:
                live.timer.cancel()
            if not live.future.done():
                live.future.set_result(Reason.APPROVAL_TIMEOUT)
        self._live.clear()
        self.ledger = None

    def _on_time(self, a: Approval) -> None:
        if self.ledger is not None:
            self.ledger.expire(a)

    def _gauge(self) -> None:
        n = self.ledger.open_count if self.ledger is not None else len(self._live)
        self.telemetry.metrics.approvals_pending.set(n)


class ApprovalService:
    """One per proxy process. All methods run on the proxy's event loop."""

    poll_interval = 1.0

    def __init__(self, config: ApprovalsConfig, base_dir: Path, telemetry: Telemetry, *,
                 clock: Callable[[], float] = time.time, admin_url: str | None = None,
                 sweep_interval: float = 30.0, webhook_backoff: float = 0.5) -> None:
        self.config = config
        self.base_dir = base_dir
        self.telemetry = telemetry
        self.clock = clock
        self.sweep_interval = sweep_interval
        self.notifier = Notifier(telemetry, clock=clock, admin_url=admin_url, backoff=webhook_backoff)
        self.persister = Persister(None if config.persist_to is None else base_dir / config.persist_to)
        self._holds: Holds | None = None
        self._ledger: Ledger | None = None
        self._decide_lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def admin_url(self) -> str:
        """Base of the webhook's decide_url. The launcher sets it once the admin port is bound."""
        return self.notifier.admin_url

    @admin_url.setter
    def admin_url(self, value: str) -> None:
        self.notifier.admin_url = value

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise ApprovalError("ApprovalService.start() has not been called")
        return self._ledger

    @property
    def store(self) -> Store:
        return self.ledger.store

    # Lifecycle

    async def start(self) -> None:
        """Check the webhook secrets, open the store, load pending approvals, start webhook delivery."""
        targets = endpoints(self.config.webhooks)
        store = open_store(self.config.store, self.base_dir)
        holds = Holds(self.notifier, self.telemetry, self.clock, self.poll_interval)
        ledger = Ledger(store, holds, timeout=self.config.timeout, session_ttl=self.config.session_ttl,
                        clock=self.clock)
        self._holds, self._ledger, holds.ledger = holds, ledger, ledger
        ledger.load()
        await self.notifier.start(targets, store, ledger.is_pending)
        self._sweeper = spawn(self._sweep_loop(), "approvals sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.notifier.stop()
        if self._holds is not None:
            self._holds.close()
        if self._ledger is not None:
            self._ledger.store.close()
            self._ledger = None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                self.ledger.sweep()
            except Exception:  # keep sweeping; a broken store also shows up on every resolve
                log.exception("approvals sweep failed")

    # The pipeline's entry point

    async def resolve(self, pending: Outcome, client_alive: Callable[[], bool]) -> Settlement:
        """Grant, or coalesce onto/open a pending approval and hold (or answer pending at once).
        Never raises: any internal error denies (internal_error), and the pipeline logs it."""
        try:
            got = self.ledger.admit(pending)
            assert self._holds is not None
            if isinstance(got, Approval) and self._holds.sync(got):  # decided by another replica meanwhile:
                got = self.ledger.admit(pending)  # this request asks afresh
            if isinstance(got, Settlement):
                return got
            if not self.config.hold:
                return self.ledger.answer_pending(got)
            return await self._holds.wait(got, client_alive)
        except asyncio.CancelledError:
            raise
        except Exception:  # fail closed: the pipeline denies and logs the decision
            log.exception("approval resolve failed for %s:%s", pending.request.host, pending.request.port)
            return Settlement(False, Reason.INTERNAL_ERROR, None)

    # Decisions (admin API, page, CLI)

    async def decide(self, approval_id: str, decision: Choice, scope: Scope, by: str | None,
                     reason: str | None) -> Approval:
        """The first decision wins. Raises DecideError (404, 409 with the standing one, 410, 422, 500)."""
        choice, scope = Choice(decision), Scope(scope)  # a plain "allow"/"once" is read the same way
        async with self._decide_lock:
            now = self.clock()
            a = self.ledger.check(approval_id, now)
            if scope is Scope.ALWAYS:  # the rule first: if it cannot be written, nothing is decided
                await self.persister.write(a, choice, by, reason, now)
            return self.ledger.decide(a, choice, scope, by, reason, now, held=self.waiters(a))

    # Queries (admin API, page)

    def get(self, approval_id: str) -> Approval | None:
        return self.store.get(approval_id)

    def waiters(self, a: Approval) -> int:
        return self._holds.waiters(a) if self._holds is not None else 0

    def listing(self, recent: int = 50) -> list[Approval]:
        """Pending (oldest first), then the most recent decided or expired ones."""
        return self.ledger.listing(recent)


if TYPE_CHECKING:
    def _is_the_pipelines_approvals(s: ApprovalService) -> Approvals:
        return s  # mypy: ApprovalService is what Pipeline(approvals=...) takes
