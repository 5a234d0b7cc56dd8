"""The requests held on pending approvals, in one process: the ledger's Listener (ledger.py).

One future per approval, one expiry timer, the waiter count. `Holds` is the one place that looks for
decisions another process took on the shared store (`sync`): at once when the bus says so
(addons/bus.py, addons/redisbus.py: a decision taken in another process or replica), for everything
held after the bus or the store was away (`resync`: what was said meanwhile is lost), and once per
poll as the fallback. A store that cannot be reached does not end a hold: the request keeps waiting
(denied at its expiry if nobody can decide meanwhile) and is looked at again when the store is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from addons.approvals.errors import StoreUnavailable
from addons.approvals.ledger import Ledger
from addons.approvals.model import Approval
from addons.approvals.notify import Notifier
from addons.background import spawn
from addons.bus import Bus, Message, NullBus
from addons.pipeline.decide import Settlement
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
    syncing: bool = False  # a look at the store is under way
    again: bool = False  # ... and the bus spoke meanwhile: look once more when it is done


class Holds:
    """The ledger's Listener: futures, timers and waiters per pending approval; events via the notifier."""

    def __init__(self, notifier: Notifier, telemetry: Telemetry, clock: Callable[[], float],
                 poll_interval: float, leader: bool = True, bus: Bus | None = None) -> None:
        self.leader = leader
        self.bus: Bus = bus if bus is not None else NullBus()
        self.notifier = notifier
        self.telemetry = telemetry
        self.clock = clock
        self.poll_interval = poll_interval  # how often a waiter checks its client and the shared store
        self.ledger: Ledger | None = None  # set once the ledger over this listener exists
        self._live: dict[str, _Live] = {}
        self._counting = self._recount = False

    # Listener

    def tracked(self, a: Approval) -> None:
        loop = asyncio.get_running_loop()
        live = _Live(a, loop.create_future(), synced=time.monotonic())  # just read from the store
        live.timer = loop.call_later(max(0.0, a.expires_at - self.clock()), self._on_time, a)
        self._live[a.id] = live
        self._gauge()

    def opened(self, a: Approval, flow_id: str) -> None:
        self.notifier.requested(a, flow_id)
        self.bus.publish({"t": "approval", "id": a.id})

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

    async def wait(self, a: Approval, client_alive: Callable[[], bool]) -> Settlement | None:
        """Hold until a decision, the expiry, or the client hangs up (checked every poll_interval).
        None: `a` ended before this request began to wait (a look at the store under way found it
        decided): the request asks afresh."""
        assert self.ledger is not None
        live = self._live.get(a.id)
        if live is None:
            return None
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
                    await self.ledger.expire(a)
                    continue
                try:
                    # shield: one waiter timing out must not cancel the future the others share
                    reason = await asyncio.wait_for(asyncio.shield(live.future),
                                                    min(self.poll_interval, remaining))
                except TimeoutError:
                    if not client_alive():
                        break
                    await self._look(a)
        finally:
            live.waiters -= 1
        waited = time.monotonic() - start
        got = reason or Reason.CLIENT_CLOSED
        self.telemetry.metrics.approval_wait_seconds.labels(got.value).observe(waited)
        return Settlement(got is Reason.APPROVED, got, a.id, waited_s=waited)

    async def sync(self, a: Approval, now_please: bool = False) -> bool:
        """Did another process sharing the store decide `a`? (at most one look per poll_interval,
        unless the bus just said something changed). Raises StoreUnavailable."""
        live = self._live.get(a.id)
        if self.ledger is None or live is None or live.future.done():
            return False
        if live.syncing:  # a look is under way; it may have read the store before the change
            live.again = live.again or now_please
            return False
        if time.monotonic() - live.synced < self.poll_interval and not now_please:
            return False
        live.syncing = True
        try:
            while True:
                live.again = False
                live.synced = time.monotonic()
                if await self.ledger.refresh(a, lambda: live.waiters):
                    return True
                if not live.again:
                    return False
        finally:
            live.syncing = False

    async def _look(self, a: Approval, now_please: bool = False) -> None:
        """sync, for the waiters, the bus and the resync: a store away now is looked at again later."""
        try:
            await self.sync(a, now_please)
        except StoreUnavailable:
            pass  # told once by the store's health; the hold goes on
        except Exception:  # noqa: BLE001 - a broken look must not end the hold: the expiry still will
            log.exception("looking at approval %s in the store failed", a.id)

    def on_message(self, m: Message) -> None:
        """The bus: approval `id` changed in another process (release its waiters here now), or
        `resync`: this process was cut off from the bus or the store, so look again at everything."""
        kind = m.get("t")
        if kind == "approval":
            live = self._live.get(str(m.get("id")))
            if live is not None:
                spawn(self._look(live.approval, now_please=True), "approval look")
        elif kind == "resync":
            self.resync()
        else:
            return
        self._gauge()

    def resync(self) -> None:
        for live in list(self._live.values()):
            spawn(self._look(live.approval, now_please=True), "approval resync")

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
            spawn(self.ledger.expire(a), "approval expiry")

    def _gauge(self) -> None:
        """The pending count (with --workers N only the supervisor, which counts the shared store's),
        recounted in the background: one count at a time, and one more if something changed meanwhile."""
        if not self.leader:
            return
        if self.ledger is None:
            self.telemetry.metrics.approvals_pending.set(len(self._live))
        elif self._counting:
            self._recount = True
        else:
            self._counting = True
            spawn(self._count(), "approvals gauge")

    async def _count(self) -> None:
        try:
            while self.ledger is not None:
                self._recount = False
                self.telemetry.metrics.approvals_pending.set(await self.ledger.pending_count())
                if not self._recount:
                    break
        except StoreUnavailable:
            pass  # the gauge keeps its last value; the health said the store is away
        except Exception:  # noqa: BLE001 - a count is never worth more than a log line
            log.exception("counting the pending approvals failed")
        finally:
            self._counting = False
