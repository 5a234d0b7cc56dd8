"""The approvals ledger: the state machine over a store and a clock.

For one request the policy judged `approval` (`admit`): a live grant settles it; else it joins the
pending approval for its (client, host, port), or opens one (unless the client has too many open).
A decision (`check`, then `decide`) is a compare-and-set in the store, so the first one wins, and
leaves a grant by its scope. Approvals expire (`expire`, `sweep`); replicas sharing the store see
each other's decisions (`refresh`). The store's calls are coroutines, so the methods that touch it
are too; the logic is the same as if they were not, because no step relies on two store calls being
adjacent, and concurrent requests for one key open (or join) one approval together (`_opening`). The
service (service.py) holds the requests, arms the timers and listens to what happens (`Listener`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from addons.approvals.errors import StoreUnavailable
from addons.approvals.model import Approval, Choice, DecideError, Key, Scope, State, Store, client_key
from addons.pipeline.decide import Settlement
from addons.pipeline.model import Outcome
from addons.policy.model import Reason

log = logging.getLogger(__name__)

RETRY_AFTER_MAX_S = 10  # hold: false; a retry is cheap and a person may answer within seconds
CAPPED_RETRY_S = 30  # the client has max_pending_per_client approvals open
ALWAYS_BRIDGE_S = 60.0  # an `always` grant also covers its client until the hot reload has the new rule


class Listener(Protocol):
    """What the ledger tells the service. Called after the ledger's own state has changed."""

    def tracked(self, a: Approval) -> None:
        """`a` is pending and tracked here now (opened, joined from another replica, or reloaded)."""

    def opened(self, a: Approval, flow_id: str) -> None:
        """`a` was opened by this request: approval.requested, webhooks."""

    def ended(self, a: Approval, reason: Reason, here: bool) -> None:
        """`a` is no longer pending (its row after the change). `here`: this process decided or
        expired it (it is logged once); else another process sharing the store did."""


Held = int | Callable[[], int]  # how many requests wait on an approval here (or how to count them now)


def _count(held: Held) -> int:
    return held() if callable(held) else held


def new_id() -> str:
    return "apr_" + secrets.token_hex(16)


class Ledger:
    """One per proxy process, over the store it shares with its replicas."""

    max_pending_per_client = 100

    def __init__(self, store: Store, listener: Listener, *, timeout: float, session_ttl: float,
                 clock: Callable[[], float] = time.time, make_id: Callable[[], str] = new_id) -> None:
        self.store = store
        self.listener = listener
        self.timeout = timeout
        self.session_ttl = session_ttl
        self.clock = clock
        self.make_id = make_id
        self._open: dict[Key, Approval] = {}  # pending approvals tracked here
        self._per_client: Counter[str] = Counter()
        self._opening: dict[Key, asyncio.Task[Settlement | Approval]] = {}  # one open per key at a time

    @property
    def open_count(self) -> int:
        return len(self._open)

    async def pending_count(self) -> int:
        """Pending approvals in the store, whichever process opened them."""
        return await self.store.count_pending()

    def tracks(self, a: Approval) -> bool:
        t = self._open.get(a.key)
        return t is not None and t.id == a.id

    async def load(self) -> None:
        """At start: expire what ran out while nobody was running, track what is still pending."""
        await self.sweep()
        # Survived a restart: their waiters are gone, the decision is not.
        for a in await self.store.pending():
            self._track(a)

    # Requests

    async def admit(self, pending: Outcome) -> Settlement | Approval:
        """A grant's settlement, or the pending approval this request waits on (joined or opened)."""
        r = pending.request
        key, now = (client_key(pending), r.host, r.port), self.clock()
        grant = await self.store.take_grant(key, now)
        if grant is not None:
            return Settlement(grant.decision is Choice.ALLOW, grant.decision.reason, grant.approval_id)
        a = self._open.get(key)
        if a is not None and a.expires_at <= now:
            await self.expire(a)
            a = None
        if a is not None:
            return a
        # Requests for one key that arrive together share one look-up/open (a task of its own, so a
        # request that goes away does not cancel it for the others).
        task = self._opening.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open_or_join(pending, key, now),
                                                          name="approval open")
            self._opening[key] = task
            task.add_done_callback(functools.partial(self._opened, key))
        return await asyncio.shield(task)

    def _opened(self, key: Key, task: asyncio.Task[Settlement | Approval]) -> None:
        if self._opening.get(key) is task:
            del self._opening[key]
        if not task.cancelled():
            task.exception()  # retrieved here; the requests that awaited it were given it

    async def _open_or_join(self, pending: Outcome, key: Key, now: float) -> Settlement | Approval:
        if self._per_client[key[0]] >= self.max_pending_per_client:
            # An agent spraying new destinations must not flood the approvers' webhook channel;
            # an approval another replica opened for this key is still joined.
            if (shared := await self.store.pending_for(key, now)) is None:
                log.warning("client %s has %d pending approvals; not opening more", key[0],
                            self.max_pending_per_client)
                return Settlement(False, Reason.APPROVAL_PENDING, None, retry_after=CAPPED_RETRY_S)
            self._track(shared)
            return shared
        new = Approval.opened(self.make_id(), pending, now, self.timeout)
        a = await self.store.open(new, now)  # or the one another replica opened for this key
        self._track(a)
        if a.id == new.id:
            self.listener.opened(a, pending.request.flow_id)
        return a

    def answer_pending(self, a: Approval) -> Settlement:
        """hold: false: refused at once, with a Retry-After within the time left."""
        left = a.expires_at - self.clock()
        return Settlement(False, Reason.APPROVAL_PENDING, a.id,
                          retry_after=max(1, min(RETRY_AFTER_MAX_S, math.ceil(left))))

    # Endings

    async def expire(self, a: Approval) -> None:
        """`a`'s time is up (its timer, a waiter or a request noticed)."""
        self._untrack(a)
        now = self.clock()
        try:
            if await self.store.expire(a.id, now):
                self.listener.ended(a.expired(now), Reason.APPROVAL_TIMEOUT, True)
                return
            cur = await self.store.get(a.id)  # decided elsewhere (another replica) just before expiry
        except StoreUnavailable:
            # Its time is up all the same: its waiters here are answered approval_timeout; the row is
            # expired (and that logged once) by the sweep once the store answers again.
            self.listener.ended(a.expired(now), Reason.APPROVAL_TIMEOUT, False)
            return
        self.listener.ended(cur or a, (cur.ending if cur else None) or Reason.APPROVAL_TIMEOUT, False)

    async def refresh(self, a: Approval, held: Held) -> bool:
        """Was `a` decided by another process sharing the store? Then it ends here too (True).

        A `once` decision taken elsewhere found nobody waiting there and left a single-use grant for
        a retry; when `held` requests wait here, they are that use, so the grant goes.
        """
        stored = await self.store.get(a.id)
        reason = stored.ending if stored is not None else None
        if stored is None or reason is None:
            return False
        if _count(held) > 0 and stored.scope is Scope.ONCE:  # counted now: one may have joined meanwhile
            await self.store.drop_single_use(stored)
        self._untrack(a)
        self.listener.ended(stored, reason, False)
        return True

    async def sweep(self) -> None:
        """Expire every approval past its time (tracked here or not); drop dead grants and old rows."""
        now = self.clock()
        for a in await self.store.due(now):
            if self.tracks(a):
                await self.expire(self._open[a.key])
            elif await self.store.expire(a.id, now):
                self.listener.ended(a.expired(now), Reason.APPROVAL_TIMEOUT, True)
        await self.store.sweep(now)

    # Decisions

    async def check(self, approval_id: str, now: float) -> Approval:
        """The approval, if it can still be decided; else DecideError 404, 409 (with the standing one)
        or 410."""
        a = await self.store.get(approval_id)
        if a is None:
            raise DecideError(404, "not_found", f"no approval {approval_id}")
        if a.state is State.PENDING and a.expires_at <= now:
            await self.sweep()
            a = await self.store.get(approval_id) or a
        if a.state is State.EXPIRED or (a.state is State.PENDING and a.expires_at <= now):
            raise DecideError(410, "expired", f"approval {approval_id} expired before a decision", a)
        if a.state is not State.PENDING:
            raise DecideError(409, "already_decided",
                              f"approval {approval_id} was already decided: {a.decision} "
                              f"({a.scope}) by {a.decided_by or 'unknown'}; nothing changed", a)
        return a

    async def decide(self, a: Approval, choice: Choice, scope: Scope, by: str | None, reason: str | None,
                     now: float, held: Held) -> Approval:
        """The first decision wins (compare-and-set); it leaves a grant by its scope. `held`: how many
        requests wait on `a` here (a `once` with nobody held applies to the next retry instead)."""
        if scope is Scope.TASK and (a.task_id is None or a.task_until is None or a.task_until <= now):
            raise DecideError(422, "not_a_task", f"scope task: approval {a.id} was not asked by a live task "
                              "credential (use once, session or always)", a)
        if not await self.store.decide(a.id, choice, scope, by, reason, now):
            # Lost a race (expiry while the rule was being written, another replica): say what did happen.
            cur = await self.store.get(a.id)
            note = "; the rule was written to persist_to all the same" if scope is Scope.ALWAYS else ""
            if cur is not None and cur.state is State.EXPIRED:
                raise DecideError(410, "expired", f"approval {a.id} expired before the decision{note}", cur)
            raise DecideError(409, "already_decided", f"decided concurrently; nothing changed{note}", cur)
        self._untrack(a)
        await self._grant(a, choice, scope, now, held)
        after = a.decided(choice, scope, by, reason, now)
        self.listener.ended(after, choice.reason, True)
        return after

    async def _grant(self, a: Approval, choice: Choice, scope: Scope, now: float, held: Held) -> None:
        if scope is Scope.SESSION:
            await self.store.add_grant(a.key, choice, scope, a.id, now, now + self.session_ttl,
                                       single_use=False)
        elif scope is Scope.TASK:
            assert a.task_until is not None  # checked before the compare-and-set
            await self.store.add_grant(a.key, choice, scope, a.id, now, a.task_until, single_use=False)
        elif scope is Scope.ALWAYS:
            until = now + min(self.session_ttl, ALWAYS_BRIDGE_S)
            await self.store.add_grant(a.key, choice, scope, a.id, now, until, single_use=False)
        elif _count(held) == 0:  # counted after the compare-and-set: a request may have joined meanwhile
            # Nobody is held (hold: false, or the waiters were lost to a restart or hung up): the
            # decision applies once, to the next retry within one approval timeout.
            await self.store.add_grant(a.key, choice, scope, a.id, now, now + self.timeout, single_use=True)

    # Queries

    async def is_pending(self, approval_id: str) -> bool:
        a = await self.store.get(approval_id)
        return a is not None and a.state is State.PENDING and a.expires_at > self.clock()

    async def listing(self, recent: int = 50) -> list[Approval]:
        """Pending (oldest first), then the most recent decided or expired ones."""
        return [*await self.store.pending(), *await self.store.recent(recent)]

    # Tracking

    def _track(self, a: Approval) -> None:
        # Only ever called for a key nothing is tracked under (a tracked approval is joined, or
        # expired first); tracking the same approval twice changes nothing.
        if a.key in self._open:
            return
        self._open[a.key] = a
        self._per_client[a.client_key] += 1
        self.listener.tracked(a)

    def _untrack(self, a: Approval) -> None:
        if self.tracks(a):
            del self._open[a.key]
            self._per_client[a.client_key] -= 1
            if self._per_client[a.client_key] <= 0:
                del self._per_client[a.client_key]
