"""addons/credentials/service.py: minting, checking, revoking and sweeping, on a real SQLite store, with an
injected clock and a real Telemetry; two services sharing one store stand for two processes (over a real
LocalHub/LocalBus) or two replicas (no bus between them)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from addons.bus import Bus, LocalBus, LocalHub, NullBus
from addons.config.models import CredentialsConfig
from addons.credentials.model import Check, State, hash_secret
from addons.credentials.service import CACHE_TTL_S, KEEP_ENDED_S, UNKNOWN_TTL_S, CredentialService, MintError
from addons.credentials.stores import RedisCredentialStore, SqliteCredentialStore
from addons.telemetry.events import Telemetry
from addons.telemetry.validate import validate_lines
from tests.credentials.conftest import Clock, free_port

PROFILES = frozenset({"frontend", "release"})
RESERVED = frozenset({"ci-user"})
CONFIG = CredentialsConfig(default_ttl=3600, max_ttl=86400)


@dataclass
class Proc:
    """One process's CredentialService and what it emitted."""

    svc: CredentialService
    stream: io.StringIO

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        docs = [json.loads(x) for x in self.stream.getvalue().splitlines() if x.strip()]
        return [d for d in docs if kind is None or d["event"] == kind]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.svc.telemetry.metrics.registry.get_sample_value(name, labels)

    def minted(self) -> float:
        return self.metric("portcullis_credentials_total", event="minted") or 0.0


Factory = Callable[..., Any]


@pytest.fixture
async def make(tmp_path: Path, clock: Clock) -> AsyncIterator[Factory]:
    """`await make(bus=..., leader=..., sweep_interval=...)` -> a started Proc on tmp_path's SQLite file."""
    started: list[CredentialService] = []

    async def factory(
        *,
        bus: Bus | None = None,
        leader: bool = True,
        sweep_interval: float = 3600.0,
        open_store: Callable[[], Any] | None = None,
    ) -> Proc:
        stream = io.StringIO()
        svc = CredentialService(
            CONFIG,
            open_store or (lambda: SqliteCredentialStore(tmp_path / "state" / "approvals.db")),
            Telemetry(stream=stream),
            profiles=lambda: PROFILES,
            reserved_users=RESERVED,
            bus=bus,
            leader=leader,
            clock=clock,
            sweep_interval=sweep_interval,
        )
        await svc.start()
        started.append(svc)
        return Proc(svc, stream)

    yield factory
    for svc in started:
        await svc.stop()


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition (bounded): never a fixed sleep."""
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


# ---- minting ------------------------------------------------------------------------------------

GOOD: dict[str, Any] = {"task_id": "build-1", "profile": "frontend", "ttl": None, "labels": {}, "by": "admin"}


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"task_id": ""}, 422, "bad_task_id"),
        ({"task_id": "-lead"}, 422, "bad_task_id"),
        ({"task_id": ".hidden"}, 422, "bad_task_id"),
        ({"task_id": "_x"}, 422, "bad_task_id"),
        ({"task_id": "a" * 65}, 422, "bad_task_id"),
        ({"task_id": "a b"}, 422, "bad_task_id"),
        ({"task_id": "a/b"}, 422, "bad_task_id"),
        ({"task_id": "a:b"}, 422, "bad_task_id"),  # a colon would end the user in Basic user:secret
        ({"task_id": "tâche"}, 422, "bad_task_id"),
        ({"task_id": "x\n"}, 422, "bad_task_id"),
        ({"task_id": "x\x00y"}, 422, "bad_task_id"),
        ({"task_id": "ci-user"}, 422, "bad_task_id"),  # a proxy_auth user of the config
        ({"profile": "nope"}, 422, "unknown_profile"),
        ({"profile": ""}, 422, "unknown_profile"),
        ({"profile": "Frontend"}, 422, "unknown_profile"),
        ({"ttl": 0.0}, 422, "bad_ttl"),
        ({"ttl": -5.0}, 422, "bad_ttl"),
        ({"ttl": 86400.001}, 422, "bad_ttl"),
        ({"ttl": math.nan}, 422, "bad_ttl"),
        ({"ttl": math.inf}, 422, "bad_ttl"),
        ({"labels": {f"k{i}": "v" for i in range(17)}}, 422, "bad_labels"),
        ({"labels": {"-k": "v"}}, 422, "bad_labels"),
        ({"labels": {"a b": "v"}}, 422, "bad_labels"),
        ({"labels": {"k" * 64: "v"}}, 422, "bad_labels"),
        ({"labels": {"": "v"}}, 422, "bad_labels"),
        ({"labels": {"k": "v" * 129}}, 422, "bad_labels"),
        ({"labels": {"k": "line\nbreak"}}, 422, "bad_labels"),
        ({"labels": {"k": "\x1b[31m"}}, 422, "bad_labels"),
        ({"labels": {"k": 5}}, 422, "bad_labels"),
    ],
)
async def test_mint_refusals(make, change, status, code):
    p = await make()
    args = GOOD | change
    with pytest.raises(MintError) as e:
        await p.svc.mint(args["task_id"], args["profile"], args["ttl"], args["labels"], args["by"])
    assert (e.value.status, e.value.code) == (status, code)
    assert e.value.message and str(e.value) == e.value.message
    assert await p.svc.listing() == [] and p.events() == [] and p.minted() == 0


@pytest.mark.parametrize(
    "change",
    [
        {"task_id": "a" * 64},
        {"task_id": "0"},
        {"task_id": "Build_1.retry-2"},
        {"profile": None},
        {"profile": "release"},
        {"ttl": 86400.0},
        {"ttl": 0.5},
        {"labels": {f"k{i}": "v" * 128 for i in range(16)}},
        {"labels": {"k" * 63: "", "k8s.io/ns": "agents", "x": "üñí códe"}},
        {"by": None},
    ],
)
async def test_mint_accepts_the_edges(make, clock, change):
    p = await make()
    args = GOOD | change
    m = await p.svc.mint(args["task_id"], args["profile"], args["ttl"], args["labels"], args["by"])
    c = m.credential
    assert (c.task_id, c.profile, dict(c.labels), c.minted_by) == (
        args["task_id"],
        args["profile"],
        args["labels"],
        args["by"],
    )
    assert c.created_at == clock.now and c.expires_at == clock.now + (args["ttl"] or CONFIG.default_ttl)
    assert await p.svc.store.get(c.task_id) == c and p.minted() == 1


async def test_a_live_task_cannot_be_minted_twice(make, clock):
    p = await make()
    first = await p.svc.mint("t", None, 60, {}, "admin")
    with pytest.raises(MintError) as e:
        await p.svc.mint("t", None, 60, {}, "admin")
    assert (e.value.status, e.value.code) == (409, "already_live")
    assert await p.svc.store.get("t") == first.credential and p.minted() == 1
    await p.svc.revoke("t", "admin")
    second = await p.svc.mint("t", None, 60, {}, "admin")  # revoked: minted again
    clock.advance(60)
    third = await p.svc.mint("t", None, 60, {}, "admin")  # expired: minted again
    assert len({first.secret, second.secret, third.secret}) == 3 and p.minted() == 3


async def test_the_secret_is_high_entropy_shown_once_and_never_stored(make, tmp_path):
    p = await make()
    minted = [await p.svc.mint(f"t{i}", "frontend", None, {"repo": "web"}, "admin") for i in range(20)]
    secrets = [m.secret for m in minted]
    assert len(set(secrets)) == 20
    for m in minted:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", m.secret)  # 32 random bytes, URL-safe base64
        assert m.credential.secret_hash == hash_secret(m.secret) and m.credential.matches(m.secret)
        assert (await p.svc.store.get(m.credential.task_id)).secret_hash == hash_secret(m.secret)  # type: ignore[union-attr]
    files = b"".join(f.read_bytes() for f in (tmp_path / "state").iterdir() if f.is_file())
    assert hash_secret(secrets[0]).encode() in files  # the hash is what is on disk ...
    assert not any(s.encode() in files for s in secrets)  # ... never the secret
    text = p.stream.getvalue()
    assert not any(s in text or hash_secret(s) in text for s in secrets)  # nor in any event


async def test_mint_and_revoke_events_and_metrics(make, clock):
    p = await make()
    m = await p.svc.mint("build-7", "release", 600, {"team": "ui", "repo": "web"}, "alice")
    await until(lambda: p.metric("portcullis_credentials_live") == 1)
    clock.advance(10)
    c = await p.svc.revoke("build-7", "bob")
    assert c.revoked_at == clock.now and c.state(clock.now) is State.REVOKED
    await until(lambda: p.metric("portcullis_credentials_live") == 0)
    assert p.metric("portcullis_credentials_total", event="revoked") == 1 and p.minted() == 1
    events = validate_lines(p.stream.getvalue(), min_events=2)
    assert [e["event"] for e in events] == ["credential.minted", "credential.revoked"]
    minted, revoked = events
    assert minted["task_id"] == "build-7" and minted["profile"] == "release" and minted["by"] == "alice"
    assert minted["labels"] == {"repo": "web", "team": "ui"}
    assert minted["expires_at"].startswith("1970-01-12T") and minted["expires_at"].endswith("Z")
    assert revoked["by"] == "bob" and revoked["task_id"] == "build-7"
    assert m.secret not in p.stream.getvalue()


@pytest.mark.parametrize("setup", ["unknown", "revoked", "expired"])
async def test_revoke_refuses_what_is_not_live(make, clock, setup):
    p = await make()
    if setup != "unknown":
        await p.svc.mint("t", None, 60, {}, "admin")
    if setup == "revoked":
        await p.svc.revoke("t", "admin")
    if setup == "expired":
        clock.advance(61)
    events = len(p.events())
    with pytest.raises(MintError) as e:
        await p.svc.revoke("t", "admin")
    assert (e.value.status, e.value.code) == (404, "not_found") and len(p.events()) == events


# ---- checking -----------------------------------------------------------------------------------


async def test_verify_table(make, clock):
    p = await make()
    ok = await p.svc.mint("ok", "frontend", 600, {"a": "b"}, "admin")
    rev = await p.svc.mint("rev", None, 600, {}, "admin")
    exp = await p.svc.mint("exp", None, 10, {}, "admin")
    for m in (ok, rev, exp):  # every one read (and cached) while live
        assert (await p.svc.verify(m.credential.task_id, m.secret))[0] is Check.OK
    await p.svc.revoke("rev", "admin")
    clock.advance(10)
    cases = [
        ("ok", ok.secret, Check.OK),
        ("ok", rev.secret, Check.WRONG_SECRET),
        ("ok", ok.secret + "x", Check.WRONG_SECRET),
        ("ok", "", Check.WRONG_SECRET),
        ("nobody", ok.secret, Check.UNKNOWN),
        ("rev", rev.secret, Check.REVOKED),
        ("rev", "guess", Check.WRONG_SECRET),  # without the secret, nothing about its state
        ("exp", exp.secret, Check.EXPIRED),
        ("exp", "guess", Check.WRONG_SECRET),
    ]
    for task, secret, want in cases:
        check, c = await p.svc.verify(task, secret)
        assert check is want, (task, want)
        # A matching secret names its credential, live or not (the refusal's event says who tried).
        assert (c is not None) == (want in (Check.OK, Check.REVOKED, Check.EXPIRED)), (task, want)
        assert c is None or c.task_id == task
    check, c = await p.svc.verify("ok", ok.secret)
    assert c == ok.credential and dict(c.labels) == {"a": "b"}


async def test_verify_reads_the_store_when_nothing_is_cached(make, tmp_path):
    """A credential minted by another process (no bus) is found on its first use."""
    a, b = await make(), await make()
    m = await a.svc.mint("t", "release", 60, {}, "admin")
    check, c = await b.svc.verify("t", m.secret)
    assert check is Check.OK and c is not None and c.profile == "release"


async def test_a_store_failure_fails_closed(make, tmp_path):
    p = await make()
    m = await p.svc.mint("t", None, 600, {}, "admin")
    await p.svc.store.close()  # the database is gone: every read raises
    check, c = await p.svc.verify("other", "x")
    assert (check, c) == (Check.UNAVAILABLE, None)
    check, c = await p.svc.verify("t", m.secret)  # minted here, but not read back: nothing cached
    assert (check, c) == (Check.UNAVAILABLE, None)


async def test_an_unreachable_redis_fails_closed(make):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    p = await make(open_store=lambda: RedisCredentialStore(url), leader=False)
    assert await p.svc.verify("t", "secret") == (Check.UNAVAILABLE, None)
    assert await p.svc.verify("t", "secret") == (Check.UNAVAILABLE, None)  # not remembered as unknown
    with pytest.raises(Exception, match="(?i)connect"):
        await p.svc.mint("t", None, 60, {}, "admin")


async def test_unknown_is_remembered_for_unknown_ttl_then_the_store_is_read_again(make, clock):
    a, b = await make(), await make()  # two replicas: no bus between them
    assert (await b.svc.verify("late", "x"))[0] is Check.UNKNOWN
    m = await a.svc.mint("late", None, 600, {}, "admin")  # minted elsewhere, after b's look
    clock.advance(UNKNOWN_TTL_S - 0.01)
    assert (await b.svc.verify("late", m.secret))[0] is Check.UNKNOWN  # still believed unknown
    clock.advance(0.01)
    assert (await b.svc.verify("late", m.secret))[0] is Check.OK
    # A mint in the same process forgets "unknown" at once.
    assert (await a.svc.verify("here", "x"))[0] is Check.UNKNOWN
    m2 = await a.svc.mint("here", None, 600, {}, "admin")
    assert (await a.svc.verify("here", m2.secret))[0] is Check.OK


async def test_the_unknown_memory_is_bounded(make):
    p = await make()
    for i in range(10_050):
        assert (await p.svc.verify(f"spray-{i}", "x"))[0] is Check.UNKNOWN
    assert len(p.svc._unknown) <= 10_001  # noqa: SLF001 - the bound is the point


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Callable[[], Any]]:
    """A real LocalHub on a unix socket and `await connect()` -> a started LocalBus (a worker's)."""
    h = LocalHub(tmp_path / "bus.sock")
    await h.start()
    buses: list[LocalBus] = []

    async def connect() -> LocalBus:
        b = LocalBus(h.path)
        await b.start()
        buses.append(b)
        return b

    yield connect
    for b in buses:
        await b.close()
    await h.close()


def heard(bus: Bus, kind: str = "credential") -> asyncio.Event:
    """Set when `bus` delivers a message of `kind` (subscribed after the service: it ran first)."""
    got = asyncio.Event()
    bus.subscribe(lambda m: got.set() if m.get("t") == kind else None)
    return got


async def test_a_revoke_in_one_process_is_refused_in_another_at_once(make, hub, clock):
    bus_a, bus_b = await hub(), await hub()
    a, b = await make(bus=bus_a), await make(bus=bus_b, leader=False)
    m = await a.svc.mint("t", None, 600, {}, "admin")
    assert (await b.svc.verify("t", m.secret))[0] is Check.OK  # b has it cached now
    assert b.svc.still_valid("t")
    arrived = heard(bus_b)
    await a.svc.revoke("t", "admin")
    await asyncio.wait_for(arrived.wait(), 5)
    assert (await b.svc.verify("t", m.secret))[0] is Check.REVOKED  # same instant: no cache expiry
    assert not b.svc.still_valid("t")


async def test_without_a_bus_a_revoke_reaches_another_replica_within_the_cache_ttl(make, clock):
    """Two replicas sharing the store with no message between them: the revoked credential is refused
    once the cached copy is CACHE_TTL_S old, and tunnels opened with it end too."""
    a, b = await make(), await make()
    m = await a.svc.mint("t", None, 600, {}, "admin")
    assert (await b.svc.verify("t", m.secret))[0] is Check.OK
    await a.svc.revoke("t", "admin")
    assert (await b.svc.verify("t", m.secret))[0] is Check.OK  # cached: the store is not read per request
    clock.advance(CACHE_TTL_S)
    assert (await b.svc.verify("t", m.secret))[0] is Check.REVOKED
    assert not b.svc.still_valid("t")


async def test_a_tunnel_on_another_replica_ends_after_a_revoke(make, clock):
    a, b = await make(), await make()
    m = await a.svc.mint("t", None, 600, {}, "admin")
    assert (await b.svc.verify("t", m.secret))[0] is Check.OK
    await a.svc.revoke("t", "admin")
    clock.advance(CACHE_TTL_S)
    assert b.svc.still_valid("t")  # answered from the cache; the stale copy is re-read meanwhile
    await until(lambda: not b.svc.still_valid("t"))


async def test_a_resync_rereads_every_cached_credential(make, clock):
    """After `{"t": "resync"}` (a bus that may have lost messages), nothing cached is trusted."""
    bus = NullBus()
    a, b = await make(), await make(bus=bus)
    m = await a.svc.mint("t", None, 600, {}, "admin")
    assert (await b.svc.verify("t", m.secret))[0] is Check.OK
    assert (await b.svc.verify("ghost", "x"))[0] is Check.UNKNOWN
    g = await a.svc.mint("ghost", None, 600, {}, "admin")
    await a.svc.revoke("t", "admin")
    assert (await b.svc.verify("t", m.secret))[0] is Check.OK  # no message yet: b still trusts its copy
    bus.publish({"t": "resync"})
    assert (await b.svc.verify("t", m.secret))[0] is Check.REVOKED
    assert (await b.svc.verify("ghost", g.secret))[0] is Check.OK


async def test_still_valid(make, clock):
    p = await make()
    m = await p.svc.mint("t", None, 60, {}, "admin")
    assert not p.svc.still_valid("t")  # never presented here: no tunnel can have been opened with it
    assert (await p.svc.verify("t", m.secret))[0] is Check.OK
    assert p.svc.still_valid("t")
    clock.advance(59.9)
    assert p.svc.still_valid("t")
    clock.advance(0.1)
    assert not p.svc.still_valid("t")  # expired
    n = await p.svc.mint("u", None, 60, {}, "admin")
    await p.svc.verify("u", n.secret)
    await p.svc.revoke("u", "admin")
    assert not p.svc.still_valid("u") and not p.svc.still_valid("nobody")


def test_knows():
    svc = CredentialService(
        CONFIG,
        lambda: SqliteCredentialStore(Path("/nonexistent/never-opened.db")),
        Telemetry(stream=io.StringIO()),
        profiles=lambda: PROFILES,
        reserved_users=RESERVED,
    )
    assert svc.knows("build-1") and svc.knows("a" * 64)
    assert not svc.knows("ci-user")  # the config's proxy_auth user: checked by ProxyAuth, not here
    assert not svc.knows("a" * 65) and not svc.knows("a:b") and not svc.knows("")
    with pytest.raises(RuntimeError, match="start"):
        _ = svc.store


# ---- expiry -------------------------------------------------------------------------------------


async def test_an_expiry_is_one_event_whichever_process_sweeps(make, clock):
    a = await make()
    await a.svc.mint("t", "frontend", 30, {"repo": "web"}, "alice")
    await a.svc.mint("live", None, 600, {}, "alice")
    await until(lambda: a.metric("portcullis_credentials_live") == 2)
    clock.advance(31)
    b = await make()  # a replica starting now sweeps at start: it reports the expiry
    c = await make()  # and the next one does not
    await a.svc.stop()
    await a.svc.start()  # nor does a after a restart
    expired = [e for p in (a, b, c) for e in p.events("credential.expired")]
    assert len(expired) == 1 and b.events("credential.expired") == expired
    e = expired[0]
    assert (e["task_id"], e["profile"], e["labels"], e["by"]) == ("t", "frontend", {"repo": "web"}, None)
    assert b.metric("portcullis_credentials_total", event="expired") == 1
    assert (c.metric("portcullis_credentials_total", event="expired") or 0) == 0
    assert b.metric("portcullis_credentials_live") == 1 and c.metric("portcullis_credentials_live") == 1
    for p in (a, b, c):
        validate_lines(p.stream.getvalue(), min_events=0)


async def test_the_sweep_loop_reports_expiries_and_forgets_old_credentials(make, clock):
    p = await make(sweep_interval=0.02)
    await p.svc.mint("t", None, 30, {}, "admin")
    clock.advance(31)
    await until(lambda: len(p.events("credential.expired")) == 1)
    await until(lambda: p.metric("portcullis_credentials_live") == 0)
    assert [c.task_id for c in await p.svc.listing()] == ["t"]  # listed as expired for a while
    clock.advance(KEEP_ENDED_S)
    for _ in range(500):
        if not await p.svc.listing():
            break
        await asyncio.sleep(0.01)
    assert await p.svc.listing() == []
    assert len(p.events("credential.expired")) == 1


async def test_only_the_leader_sweeps_and_counts(make, clock):
    w = await make(leader=False)
    await w.svc.mint("t", None, 30, {}, "admin")
    clock.advance(31)
    await w.svc.stop()
    await w.svc.start()
    assert w.events("credential.expired") == [] and w.metric("portcullis_credentials_live") == 0
    lead = await make()
    assert len(lead.events("credential.expired")) == 1


async def test_the_cache_keeps_live_credentials_and_drops_ended_ones_past_its_bound(make, clock, monkeypatch):
    import addons.credentials.service as service

    monkeypatch.setattr(service, "MAX_REMEMBERED", 4)
    p = await make()
    old = [await p.svc.mint(f"old{i}", None, 10, {}, "admin") for i in range(3)]
    live = await p.svc.mint("live", None, 600, {}, "admin")
    for m in [*old, live]:
        assert (await p.svc.verify(m.credential.task_id, m.secret))[0] is Check.OK
    clock.advance(10)  # the three old ones have expired
    new = await p.svc.mint("new", None, 600, {}, "admin")
    assert (await p.svc.verify("new", new.secret))[0] is Check.OK
    assert sorted(p.svc._cache) == ["live", "new"]  # noqa: SLF001 - the bound is the point
    assert p.svc.still_valid("live") and p.svc.still_valid("new")
    assert (await p.svc.verify("old0", old[0].secret))[0] is Check.EXPIRED  # read again: still refused


async def test_a_burst_of_mints_counts_the_live_credentials_once_at_a_time(make):
    """Each mint asks for the live gauge again; a burst must not queue one full count per mint (each
    reads the whole store, on the leader's event loop)."""
    p = await make()
    for i in range(50):
        await p.svc.mint(f"t{i}", None, 600, {}, "admin")  # SQLite: no await yields in between
    counting = [t for t in asyncio.all_tasks() if t.get_name() == "credentials gauge" and not t.done()]
    assert len(counting) <= 1
    await until(lambda: p.metric("portcullis_credentials_live") == 50)
    await p.svc.revoke("t0", "admin")
    await until(lambda: p.metric("portcullis_credentials_live") == 49)
