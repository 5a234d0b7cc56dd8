"""addons/approvals/ledger.py: the state machine, on a real SQLite store with a fake clock (async: the
store's calls are coroutines).

Two ledgers on one store file stand for two replicas. `Heard` records what the ledger tells its
listener (the service), so every ending is checked to be told exactly once, and logged where taken.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from addons.approvals.ledger import ALWAYS_BRIDGE_S, CAPPED_RETRY_S, Ledger
from addons.approvals.model import Approval, Choice, DecideError, Grant, Scope, State
from addons.approvals.stores.sqlite import SqliteStore
from addons.pipeline.decide import Settlement
from addons.policy.model import Reason
from tests.approvals.approvals_support import request

TIMEOUT, SESSION_TTL = 120.0, 3600.0
KEY = ("10.0.0.5", "unknown.example", 443)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Heard:
    """The listener: tracked / opened / ended calls, in order."""

    log: list[tuple[Any, ...]] = field(default_factory=list)

    def tracked(self, a: Approval) -> None:
        self.log.append(("tracked", a.id))

    def opened(self, a: Approval, flow_id: str) -> None:
        self.log.append(("opened", a.id, flow_id))

    def ended(self, a: Approval, reason: Reason, here: bool) -> None:
        self.log.append(("ended", a.id, a.state, reason, here))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.log if e[0] == kind]


@dataclass
class Replica:
    ledger: Ledger
    heard: Heard
    store: SqliteStore


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make(tmp_path: Path, clock: Clock):
    """`make()` -> a replica (ledger + listener) on the shared store file."""
    made: list[SqliteStore] = []
    ids = itertools.count(1)

    def factory(**kw: Any) -> Replica:
        store = SqliteStore(tmp_path / "approvals.db")
        made.append(store)
        heard = Heard()
        ledger = Ledger(store, heard, timeout=kw.get("timeout", TIMEOUT),
                        session_ttl=kw.get("session_ttl", SESSION_TTL), clock=clock,
                        make_id=lambda: f"apr_{next(ids):04d}")
        return Replica(ledger, heard, store)

    yield factory
    for s in made:
        await s.close()


@pytest.fixture
def r(make) -> Replica:
    return make()


async def opened(rep: Replica, **kw: Any) -> Approval:
    got = await rep.ledger.admit(request(**kw))
    assert isinstance(got, Approval), got
    return got


# Admitting a request

async def test_a_first_request_opens_an_approval_and_tells_the_listener(r, clock):
    a = await opened(r, flow_id="f7", client_name="ci", method="GET", path="/x", rule="ask")
    assert (a.id, a.created_at, a.expires_at, a.state) == (
        "apr_0001", clock.t, clock.t + TIMEOUT, State.PENDING)
    assert (a.client_name, a.method, a.path, a.rule) == ("ci", "GET", "/x", "ask")
    assert await r.store.get(a.id) == a
    assert r.heard.log == [("tracked", a.id), ("opened", a.id, "f7")]
    assert r.ledger.open_count == 1 and r.ledger.tracks(a)


@pytest.mark.parametrize(("second", "joins"), [
    ({}, True),
    ({"flow_id": "other-flow", "method": "POST", "path": "/elsewhere"}, True),  # same client/host/port
    ({"port": 8443}, False),
    ({"host": "other.example"}, False),
    ({"client": "10.0.0.6"}, False),
    ({"user": "bob"}, False),  # an authenticated user is its own client key
])
async def test_coalescing_is_by_client_host_and_port(r, second, joins):
    first = await opened(r)
    again = await opened(r, **second)
    assert (again.id == first.id) is joins
    assert len(r.heard.of("opened")) == (1 if joins else 2)
    assert len(await r.store.pending()) == (1 if joins else 2)


@pytest.mark.parametrize(("grants", "expect"), [
    ([(Choice.ALLOW, Scope.SESSION, False)], (True, Reason.APPROVED)),
    ([(Choice.DENY, Scope.SESSION, False)], (False, Reason.APPROVAL_DENIED)),
    ([(Choice.ALLOW, Scope.SESSION, False), (Choice.DENY, Scope.SESSION, False)],
     (False, Reason.APPROVAL_DENIED)),  # deny wins
    ([(Choice.ALLOW, Scope.ALWAYS, False)], (True, Reason.APPROVED)),
    ([(Choice.ALLOW, Scope.ONCE, True)], (True, Reason.APPROVED)),
    ([(Choice.DENY, Scope.ONCE, True)], (False, Reason.APPROVAL_DENIED)),
])
async def test_a_live_grant_settles_the_request_without_an_approval(r, clock, grants, expect):
    for i, (choice, scope, single) in enumerate(grants):
        await r.store.add_grant(KEY, choice, scope, f"apr_g{i}", clock.t, clock.t + 60, single_use=single)
    got = await r.ledger.admit(request())
    assert isinstance(got, Settlement)
    assert (got.allowed, got.reason) == expect
    assert got.approval_id is not None and got.approval_id.startswith("apr_g")
    assert r.heard.log == [] and await r.store.pending() == []


async def test_a_once_grant_is_used_by_one_request_then_the_next_one_asks(r, clock):
    await r.store.add_grant(KEY, Choice.ALLOW, Scope.ONCE, "apr_g", clock.t, clock.t + 60, single_use=True)
    assert isinstance(await r.ledger.admit(request()), Settlement)
    assert isinstance(await r.ledger.admit(request()), Approval)


async def test_an_expired_grant_is_ignored(r, clock):
    await r.store.add_grant(KEY, Choice.ALLOW, Scope.SESSION, "apr_g", clock.t, clock.t + 60,
                            single_use=False)
    clock.t += 60
    assert isinstance(await r.ledger.admit(request()), Approval)


async def test_a_tracked_approval_past_its_time_expires_and_the_request_opens_a_new_one(r, clock):
    first = await opened(r)
    clock.t += TIMEOUT
    second = await opened(r)
    assert second.id != first.id
    assert r.heard.of("ended") == [("ended", first.id, State.EXPIRED, Reason.APPROVAL_TIMEOUT, True)]
    assert (await r.store.get(first.id)).state is State.EXPIRED


async def test_a_request_joins_the_approval_another_replica_opened(make):
    a, b = make(), make()
    on_a = await opened(a)
    on_b = await opened(b)
    assert on_b.id == on_a.id
    assert b.heard.log == [("tracked", on_a.id)]  # tracked on B, but opened (and notified) once, on A
    assert len(a.heard.of("opened")) == 1


@pytest.mark.parametrize(("left", "retry_after"), [(120.0, 10), (10.0, 10), (3.2, 4), (0.3, 1)])
async def test_hold_false_answers_pending_with_a_retry_after_within_the_time_left(r, clock, left,
                                                                                  retry_after):
    a = await opened(r)
    clock.t = a.expires_at - left
    assert r.ledger.answer_pending(a) == Settlement(False, Reason.APPROVAL_PENDING, a.id,
                                                    retry_after=retry_after)


async def test_the_per_client_cap(make, clock):
    a, b = make(), make()
    a.ledger.max_pending_per_client = 2
    await opened(a, host="h1.example")
    await opened(a, host="h2.example")
    capped = await a.ledger.admit(request(host="h3.example"))
    assert capped == Settlement(False, Reason.APPROVAL_PENDING, None, retry_after=CAPPED_RETRY_S)
    assert len(a.heard.of("opened")) == 2 and len(await a.store.pending()) == 2
    other_client = await a.ledger.admit(request(host="h3.example", client="10.9.9.9"))
    assert isinstance(other_client, Approval)
    assert (await opened(a, host="h1.example")).id == (await a.store.pending())[0].id  # joining is not capped
    # At the cap, an approval another replica opened for this key is still joined.
    shared = await opened(b, host="h4.example")
    assert (await opened(a, host="h4.example")).id == shared.id
    # The joined one counts too (3 tracked for the client): one ending leaves it at the cap, two do not.
    mine = [x for x in await a.store.pending() if x.client_key == "10.0.0.5"]
    await a.ledger.decide(mine[0], Choice.DENY, Scope.ONCE, None, None, clock.t, held=1)
    assert isinstance(await a.ledger.admit(request(host="h5.example")), Settlement)
    await a.ledger.decide(mine[1], Choice.DENY, Scope.ONCE, None, None, clock.t, held=1)
    assert isinstance(await a.ledger.admit(request(host="h5.example")), Approval)


# Deciding

@pytest.mark.parametrize(("choice", "scope", "held", "grant"), [
    (Choice.ALLOW, Scope.ONCE, 1, None),  # the held requests are the use
    (Choice.ALLOW, Scope.ONCE, 0, (Choice.ALLOW, Scope.ONCE, TIMEOUT, True)),  # for the next retry
    (Choice.DENY, Scope.ONCE, 0, (Choice.DENY, Scope.ONCE, TIMEOUT, True)),
    (Choice.DENY, Scope.ONCE, 3, None),
    (Choice.ALLOW, Scope.SESSION, 2, (Choice.ALLOW, Scope.SESSION, SESSION_TTL, False)),
    (Choice.DENY, Scope.SESSION, 0, (Choice.DENY, Scope.SESSION, SESSION_TTL, False)),
    (Choice.ALLOW, Scope.ALWAYS, 1, (Choice.ALLOW, Scope.ALWAYS, ALWAYS_BRIDGE_S, False)),  # until the reload
    (Choice.DENY, Scope.ALWAYS, 0, (Choice.DENY, Scope.ALWAYS, ALWAYS_BRIDGE_S, False)),
])
async def test_a_decision_leaves_a_grant_by_its_scope(r, clock, choice, scope, held, grant):
    a = await opened(r)
    clock.t += 5
    seen = await r.ledger.check(a.id, clock.t)
    after = await r.ledger.decide(seen, choice, scope, "ann", "why", clock.t, held=held)
    assert (after.state, after.decision, after.scope, after.decided_by, after.reason, after.decided_at) == (
        choice.state, choice, scope, "ann", "why", clock.t)
    assert await r.store.get(a.id) == after
    assert r.heard.of("ended") == [("ended", a.id, choice.state, choice.reason, True)]
    assert not r.ledger.tracks(a) and r.ledger.open_count == 0
    stored = await r.store.grants(clock.t)
    got = [(g.decision, g.scope, g.expires_at - g.created_at, g.single_use) for g in stored]
    assert got == ([] if grant is None else [grant])
    assert all(isinstance(g, Grant) and g.approval_id == a.id for g in await r.store.grants(clock.t))


async def test_the_session_ttl_caps_the_always_bridge(make, clock):
    r = make(session_ttl=10.0)
    a = await opened(r)
    await r.ledger.decide(a, Choice.ALLOW, Scope.ALWAYS, None, None, clock.t, held=0)
    [g] = await r.store.grants(clock.t)
    assert g.expires_at - g.created_at == 10.0


async def test_check_refuses_what_cannot_be_decided(r, clock):
    with pytest.raises(DecideError) as e:
        await r.ledger.check("apr_missing", clock.t)
    assert (e.value.status, e.value.code) == (404, "not_found")
    a = await opened(r)
    await r.ledger.decide(a, Choice.ALLOW, Scope.SESSION, "kim", None, clock.t, held=0)
    with pytest.raises(DecideError) as e:
        await r.ledger.check(a.id, clock.t)
    assert (e.value.status, e.value.code) == (409, "already_decided")
    assert "allow (session) by kim; nothing changed" in e.value.message
    assert e.value.approval.decided_by == "kim"


async def test_check_past_the_expiry_expires_it_and_answers_410(r, clock):
    a = await opened(r)
    clock.t = a.expires_at
    with pytest.raises(DecideError) as e:
        await r.ledger.check(a.id, clock.t)
    assert (e.value.status, e.value.code, e.value.approval.state) == (410, "expired", State.EXPIRED)
    assert r.heard.of("ended") == [("ended", a.id, State.EXPIRED, Reason.APPROVAL_TIMEOUT, True)]
    with pytest.raises(DecideError) as e:  # and stays expired
        await r.ledger.check(a.id, clock.t + 1)
    assert e.value.status == 410


@pytest.mark.parametrize("scope", [Scope.ONCE, Scope.ALWAYS])
async def test_the_first_decision_wins_across_replicas(make, clock, scope):
    a, b = make(), make()
    pend = await opened(a)
    seen_by_a = await a.ledger.check(pend.id, clock.t)
    seen_by_b = await b.ledger.check(pend.id, clock.t)
    await b.ledger.decide(seen_by_b, Choice.DENY, Scope.ONCE, "b", None, clock.t, held=0)
    with pytest.raises(DecideError) as e:
        await a.ledger.decide(seen_by_a, Choice.ALLOW, scope, "a", None, clock.t, held=0)
    assert (e.value.status, e.value.code) == (409, "already_decided")
    assert ("written to persist_to all the same" in e.value.message) is (scope is Scope.ALWAYS)
    assert e.value.approval.decided_by == "b"
    assert a.heard.of("ended") == [] and len(b.heard.of("ended")) == 1  # logged once, where it was taken
    assert [g.decision for g in await a.store.grants(clock.t)] == [Choice.DENY]  # the loser left no grant


async def test_a_decision_that_loses_to_the_expiry_is_410_with_the_persist_note(r, clock):
    a = await opened(r)
    seen = await r.ledger.check(a.id, clock.t)
    clock.t = a.expires_at
    await r.ledger.expire(a)  # the timer fired while the rule was being written
    with pytest.raises(DecideError) as e:
        await r.ledger.decide(seen, Choice.ALLOW, Scope.ALWAYS, None, None, clock.t, held=0)
    assert e.value.status == 410 and "written to persist_to all the same" in e.value.message
    assert await r.store.grants(clock.t) == []


# Endings: expiry, other replicas, sweeping, restarts

async def test_expire_is_told_once_and_a_lost_race_takes_the_stored_decision(make, clock):
    a, b = make(), make()
    pend = await opened(a)
    assert (await opened(b)).id == pend.id
    clock.t = pend.expires_at
    await b.ledger.expire(pend)
    await a.ledger.expire(pend)  # the other replica's timer: the compare-and-set finds it expired already
    assert b.heard.of("ended") == [("ended", pend.id, State.EXPIRED, Reason.APPROVAL_TIMEOUT, True)]
    assert a.heard.of("ended") == [("ended", pend.id, State.EXPIRED, Reason.APPROVAL_TIMEOUT, False)]

    other = await opened(a, host="o.example")
    await b.ledger.decide(other, Choice.ALLOW, Scope.SESSION, "b", None, clock.t, held=0)
    await a.ledger.expire(other)  # decided elsewhere just before the expiry: the waiters get that decision
    assert a.heard.log[-1] == ("ended", other.id, State.ALLOWED, Reason.APPROVED, False)


@pytest.mark.parametrize(("held", "grants_left"), [(0, 1), (2, 0)])
async def test_refresh_picks_up_a_decision_taken_elsewhere(make, clock, held, grants_left):
    a, b = make(), make()
    pend = await opened(a)
    assert not await a.ledger.refresh(pend, held)  # still pending: nothing changes
    assert a.ledger.tracks(pend)
    seen = await b.ledger.check(pend.id, clock.t)
    await b.ledger.decide(seen, Choice.ALLOW, Scope.ONCE, "b", None, clock.t, held=0)
    assert await a.ledger.refresh(pend, held)
    assert a.heard.of("ended") == [("ended", pend.id, State.ALLOWED, Reason.APPROVED, False)]
    assert not a.ledger.tracks(pend)
    # B found nobody waiting and left a `once` for a retry; requests held on A are that use.
    assert len(await a.store.grants(clock.t)) == grants_left


async def test_refresh_of_a_vanished_row_changes_nothing(r):
    a = await opened(r)
    r.store._db.execute("DELETE FROM approvals WHERE id = ?", (a.id,))
    assert not await r.ledger.refresh(a, 1) and r.ledger.tracks(a)


async def test_sweep_expires_due_approvals_tracked_or_not_and_drops_dead_grants(make, clock):
    a, b = make(), make()
    mine = await opened(a, host="mine.example")
    theirs = await opened(b, host="theirs.example")
    await a.store.add_grant(KEY, Choice.ALLOW, Scope.SESSION, mine.id, clock.t, clock.t + 10,
                            single_use=False)
    clock.t += TIMEOUT
    await a.ledger.sweep()
    assert a.heard.of("ended") == [
        ("ended", mine.id, State.EXPIRED, Reason.APPROVAL_TIMEOUT, True),
        ("ended", theirs.id, State.EXPIRED, Reason.APPROVAL_TIMEOUT, True),  # nobody tracked it here
    ]
    assert await a.store.grants(0) == [] and a.ledger.open_count == 0
    await b.ledger.sweep()  # already expired: nothing to tell
    assert b.heard.of("ended") == []


async def test_load_after_a_restart_tracks_what_is_pending_and_expires_what_ran_out(make, clock):
    first = make()
    late = await opened(first, host="late.example")
    clock.t += TIMEOUT / 2
    live = await opened(first, host="live.example")
    clock.t = late.expires_at
    after = make()
    await after.ledger.load()
    assert after.heard.log == [("ended", late.id, State.EXPIRED, Reason.APPROVAL_TIMEOUT, True),
                               ("tracked", live.id)]
    assert after.ledger.tracks(live) and after.ledger.open_count == 1


async def test_queries(r, clock):
    a = await opened(r, host="a.example")
    b = await opened(r, host="b.example")
    assert await r.ledger.is_pending(a.id) and not await r.ledger.is_pending("apr_missing")
    await r.ledger.decide(b, Choice.DENY, Scope.ONCE, None, None, clock.t, held=0)
    assert not await r.ledger.is_pending(b.id)
    assert [x.id for x in await r.ledger.listing()] == [a.id, b.id]  # pending first, then recent
    clock.t = a.expires_at
    assert not await r.ledger.is_pending(a.id)  # past its time, even before the sweep


# Scope task: the rest of the asking task's life, that task only

async def test_scope_task_grants_until_the_credential_expires_for_that_task_only(r, clock):
    until = clock.t + 600
    a = await opened(r, task="build-7", task_until=until, labels=(("repo", "web"),))
    assert (a.client_key, a.task_id, a.task_until, a.labels) == ("task:build-7", "build-7", until,
                                                                 (("repo", "web"),))
    assert await r.store.get(a.id) == a  # labels and the task's expiry are stored with the row
    await r.ledger.decide(a, Choice.ALLOW, Scope.TASK, "alice", None, clock.t, held=lambda: 1)
    (g,) = await r.store.grants(clock.t)
    assert (g.client_key, g.scope, g.expires_at) == ("task:build-7", Scope.TASK, until)
    clock.t += 500  # past any approval timeout, still inside the task's life
    got = await r.ledger.admit(request(task="build-7", task_until=until))
    assert isinstance(got, Settlement) and (got.allowed, got.reason) == (True, Reason.APPROVED)
    other = await r.ledger.admit(request(task="build-8", task_until=until))
    assert isinstance(other, Approval)  # another task asks afresh
    clock.t = until
    assert isinstance(await r.ledger.admit(request(task="build-7", task_until=until + 600)), Approval)


@pytest.mark.parametrize("kw", [{}, {"user": "bob"}])
async def test_scope_task_is_refused_for_an_approval_no_task_asked(r, clock, kw):
    a = await opened(r, **kw)
    with pytest.raises(DecideError) as e:
        await r.ledger.decide(a, Choice.ALLOW, Scope.TASK, "alice", None, clock.t, held=lambda: 1)
    assert (e.value.status, e.value.code) == (422, "not_a_task")
    assert (await r.store.get(a.id)).state is State.PENDING  # nothing decided
    assert await r.store.grants(clock.t) == []


async def test_scope_task_is_refused_once_the_tasks_credential_expired(r, clock):
    a = await opened(r, task="build-7", task_until=clock.t + 5)
    clock.t += 5
    with pytest.raises(DecideError) as e:
        await r.ledger.decide(a, Choice.ALLOW, Scope.TASK, "alice", None, clock.t, held=lambda: 1)
    assert e.value.status == 422


async def test_a_revoked_tasks_grants_are_dropped_and_no_one_elses(r, clock):
    for who in ("task:build-7", "task:build-8", "10.0.0.5"):
        for scope in (Scope.SESSION, Scope.TASK):
            await r.store.add_grant((who, "h.example", 443), Choice.ALLOW, scope, None, clock.t, clock.t + 60,
                                    single_use=False)
    assert await r.store.drop_grants_of("task:build-7") == 2
    assert sorted({g.client_key for g in await r.store.grants(clock.t)}) == ["10.0.0.5", "task:build-8"]
