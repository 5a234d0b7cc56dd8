"""The approval service: the asyncio side of the ledger (ledger.py).

`ApprovalService` is what the rest of Portcullis uses: the pipeline's `resolve` (addons/pipeline/
decide.py: the Approvals protocol), `decide` for the admin API, the page and the CLI, and the
queries. The requests it holds are in `Holds` (holds.py), which hears decisions taken in other
processes and replicas on the bus. A store that cannot be reached (StoreUnavailable) fails closed:
a request that needs it is denied `internal_error` with the store's message as the detail, and the
admin API answers 503 (api.py); `health` (health.py) says when it is away and when it is back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from addons.approvals.errors import ApprovalError, StoreUnavailable
from addons.approvals.health import StoreHealth
from addons.approvals.holds import Holds
from addons.approvals.ledger import Ledger
from addons.approvals.links import Links
from addons.approvals.model import Approval, Choice, DecideError, Scope, Store
from addons.approvals.notify import Notifier, endpoints
from addons.approvals.persist import Persister
from addons.approvals.stores import open_store
from addons.approvals.stores.redis import safe_url
from addons.background import spawn
from addons.bus import Bus, Message, NullBus
from addons.config.models import ApprovalsConfig
from addons.pipeline.decide import Approvals, Settlement
from addons.pipeline.model import Outcome
from addons.policy.model import Reason
from addons.telemetry.events import Telemetry

log = logging.getLogger(__name__)


ASK_AFRESH = 3  # a request whose approval ends as it arrives asks again, this many times at most


def _poll_interval() -> float:
    """How often a held request checks its client and the store (the fallback to the bus); the
    environment can stretch it (tests prove a release came by message, not by this poll)."""
    try:
        return max(0.05, float(os.environ.get("PORTCULLIS_APPROVAL_POLL_S", "1.0")))
    except ValueError:
        return 1.0


class ApprovalService:
    """One per proxy process. All methods run on the proxy's event loop."""

    poll_interval = _poll_interval()

    def __init__(self, config: ApprovalsConfig, base_dir: Path, telemetry: Telemetry, *,
                 clock: Callable[[], float] = time.time, admin_url: str | None = None,
                 sweep_interval: float = 30.0, webhook_backoff: float = 0.5, leader: bool = True,
                 bus: Bus | None = None, health: StoreHealth | None = None,
                 require_store: bool = True) -> None:
        """`leader` (one process, or the supervisor of `--workers N`) sweeps, re-sends the webhooks a
        restart cut short and reports the pending count; a worker (leader False) does none of these.
        `bus` carries "approval X changed" between the processes that share the store; `health` hears
        whether the store answers (the RedisBus reports there too). Not `require_store` (a worker the
        supervisor starts again, having checked the store itself at start): start even while the
        store is unreachable, failing closed, and load the pending approvals once it answers."""
        self.require_store = require_store
        self._loaded = False
        self.leader = leader
        self.bus: Bus = bus if bus is not None else NullBus()
        self.health = health if health is not None else StoreHealth(telemetry, safe_url(config.store))
        self.config = config
        self.base_dir = base_dir
        self.telemetry = telemetry
        self.clock = clock
        self.sweep_interval = sweep_interval
        self.notifier = Notifier(telemetry, clock=clock, admin_url=admin_url, backoff=webhook_backoff)
        self.links: Links | None = None  # decision links (approvals.links), set up by start()
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
        self.links = self.notifier.links = Links.from_config(self.config.links)  # its key must be set
        store = await open_store(self.config.store, self.base_dir, self.health, self.require_store)
        holds = Holds(self.notifier, self.telemetry, self.clock, self.poll_interval, self.leader, self.bus)
        ledger = Ledger(store, holds, timeout=self.config.timeout, session_ttl=self.config.session_ttl,
                        clock=self.clock)
        self._holds, self._ledger, holds.ledger = holds, ledger, ledger
        try:
            await self._load()
        except BaseException:
            await store.close()
            raise
        await self.notifier.start(targets, store, ledger.is_pending, resend=self.leader)
        self.bus.subscribe(self._on_message)
        self.health.on_up(self._store_is_back)
        if self.leader:
            self._sweeper = spawn(self._sweep_loop(), "approvals sweep")

    async def _load(self) -> None:
        try:
            await self.ledger.load()
            self._loaded = True
        except StoreUnavailable:
            if self.require_store:
                raise
            log.warning("approvals store unreachable at start; pending approvals are loaded once it answers")

    def _store_is_back(self) -> None:
        """What was said while the store was away is lost: look again at everything held (and load
        what a start without the store could not)."""
        if self._holds is not None:
            self._holds.resync()
        if not self._loaded and self._ledger is not None:
            spawn(self._load(), "approvals load")

    def _on_message(self, m: Message) -> None:
        if self._holds is not None:
            self._holds.on_message(m)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.notifier.stop()
        if self._holds is not None:
            self._holds.close()
        if self._ledger is not None:
            await self._ledger.store.close()
            self._ledger = None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.ledger.sweep()
            except StoreUnavailable:
                pass  # told once by the store's health; the next sweep catches up
            except Exception:  # keep sweeping; a broken store also shows up on every resolve
                log.exception("approvals sweep failed")

    # The pipeline's entry point

    async def resolve(self, pending: Outcome, client_alive: Callable[[], bool]) -> Settlement:
        """Grant, or coalesce onto/open a pending approval and hold (or answer pending at once).
        Never raises: any internal error denies (internal_error), and the pipeline logs it."""
        try:
            assert self._holds is not None
            last: Approval | None = None
            for _ in range(ASK_AFRESH):
                got = await self.ledger.admit(pending)
                if isinstance(got, Settlement):
                    return got
                last = got
                if await self._holds.sync(got):  # decided elsewhere meanwhile: this request asks afresh
                    continue
                if not self.config.hold:
                    return self.ledger.answer_pending(got)
                if (settled := await self._holds.wait(got, client_alive)) is not None:
                    return settled
            assert last is not None
            return self.ledger.answer_pending(last)  # it kept ending under this request's feet: retry
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as e:  # fail closed, and say why (the health logged it once)
            return Settlement(False, Reason.INTERNAL_ERROR, None, detail=str(e))
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
            a = await self.ledger.check(approval_id, now)
            if scope is Scope.ALWAYS and a.credential is not None:
                raise DecideError(422, "credential_scope", f"approval {a.id} is about the first use of "
                                  f"credential {a.credential!r} in a task: decide it once or for the session")
            if scope is Scope.ALWAYS:  # the rule first: if it cannot be written, nothing is decided
                await self.persister.write(a, choice, by, reason, now)
            held = functools.partial(self.waiters, a)  # counted once the decision is in the store
            decided = await self.ledger.decide(a, choice, scope, by, reason, now, held=held)
        self.bus.publish({"t": "approval", "id": decided.id})  # releases the waiters of every process
        return decided

    async def forget_task(self, task_id: str) -> int:
        """A task's credential was revoked: its session and task grants go with it (every replica reads
        the same store). Returns how many grants were removed."""
        return await self.store.drop_grants_of(f"task:{task_id}")

    # Queries (admin API, page)

    async def get(self, approval_id: str) -> Approval | None:
        return await self.store.get(approval_id)

    def waiters(self, a: Approval) -> int:
        return self._holds.waiters(a) if self._holds is not None else 0

    async def listing(self, recent: int = 50) -> list[Approval]:
        """Pending (oldest first), then the most recent decided or expired ones."""
        return await self.ledger.listing(recent)


if TYPE_CHECKING:
    def _is_the_pipelines_approvals(s: ApprovalService) -> Approvals:
        return s  # mypy: ApprovalService is what Pipeline(approvals=...) takes
