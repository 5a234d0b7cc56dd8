"""Minting, checking and revoking task credentials, for every process of every replica.

The store is the truth. Each process caches what it read (a revocation is a bus message, and every
process drops its copy at once: the next request with that credential is refused everywhere). A
cached copy is read again once it is CACHE_TTL_S old, so a revocation whose message never arrives
(replicas without a shared bus, a lost message) still takes effect within that time. A credential
the store does not know is remembered as unknown for a few seconds only, so spraying random users
cannot turn into a store read per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from addons.background import spawn
from addons.bus import Bus, Message, NullBus
from addons.config.models import CredentialsConfig
from addons.credentials.model import (
    LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    TASK_ID,
    Check,
    Credential,
    CredentialStore,
    Labels,
    State,
    hash_secret,
)
from addons.telemetry.events import Telemetry

log = logging.getLogger(__name__)

UNKNOWN_TTL_S = 5.0
CACHE_TTL_S = 1.0  # like the approvals' poll of the store: the fallback to the bus
MAX_REMEMBERED = 10_000  # credentials of ended tasks kept in the cache / unknown names, at most
KEEP_ENDED_S = 7 * 86400


class MintError(Exception):
    """A mint or revoke the API refuses: `status` is its HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Minted:
    credential: Credential
    secret: str  # shown once, to whoever minted it; never stored


class CredentialService:
    def __init__(
        self,
        config: CredentialsConfig,
        open_store: Callable[[], CredentialStore],
        telemetry: Telemetry,
        *,
        profiles: Callable[[], frozenset[str]],
        reserved_users: frozenset[str] = frozenset(),
        bus: Bus | None = None,
        leader: bool = True,
        clock: Callable[[], float] = time.time,
        sweep_interval: float = 30.0,
        on_revoke: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        self.config = config
        self._open_store = open_store
        self._store: CredentialStore | None = None
        self.telemetry = telemetry
        self.profiles = profiles
        self.reserved = reserved_users  # proxy_auth users of the config: no task may take their name
        self.bus: Bus = bus if bus is not None else NullBus()
        self.leader = leader
        self.clock = clock
        self.sweep_interval = sweep_interval
        self.on_revoke = on_revoke  # what else ends with the task (its approval grants)
        self._cache: dict[str, tuple[Credential, float]] = {}  # task id -> (credential, read at)
        self._unknown: dict[str, float] = {}  # task id -> until when "unknown" is believed
        # Invalidations are numbered; a read that overlapped one of its task's is read again.
        self._seq = 0
        self._invalidated: dict[str, int] = {}  # task id -> number of its last invalidation
        self._all_invalidated = 0  # number of the last invalidation of every task (a resync)
        self._refreshing: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._counting: asyncio.Task[None] | None = None  # the live gauge's count, one at a time
        self._count_again = False
        self.bus.subscribe(self._on_message)

    @property
    def store(self) -> CredentialStore:
        if self._store is None:
            raise RuntimeError("CredentialService.start() has not been called")
        return self._store

    async def start(self) -> None:
        self._store = self._open_store()
        if self.leader:
            await self._sweep()
            self._sweeper = spawn(self._sweep_loop(), "credentials sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._counting is not None:
            self._counting.cancel()
            await asyncio.gather(self._counting, return_exceptions=True)
        if self._store is not None:
            await self._store.close()
            self._store = None

    # ---- the admin API ------------------------------------------------------------------------
    async def mint(
        self, task_id: str, profile: str | None, ttl: float | None, labels: Mapping[str, str], by: str | None
    ) -> Minted:
        if not TASK_ID.fullmatch(task_id):
            raise MintError(
                422,
                "bad_task_id",
                "task_id: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        if task_id in self.reserved:
            raise MintError(422, "bad_task_id", f"task_id {task_id!r} is a proxy_auth user of the config")
        if profile is not None and profile not in self.profiles():
            known = ", ".join(sorted(self.profiles())) or "the config declares none"
            raise MintError(422, "unknown_profile", f"unknown profile {profile!r} ({known})")
        life = self.config.default_ttl if ttl is None else ttl
        if not 0 < life <= self.config.max_ttl:
            raise MintError(422, "bad_ttl", f"ttl must be more than 0 and at most {self.config.max_ttl:g} s")
        now = self.clock()
        secret = secrets.token_urlsafe(32)
        c = Credential(task_id, profile, _labels(labels), hash_secret(secret), now, now + life, None, by)
        if not await self.store.insert(c, now):
            raise MintError(409, "already_live", f"task {task_id!r} has a live credential; revoke it first")
        self._forget(task_id)
        self.bus.publish({"t": "credential", "id": task_id})
        self.telemetry.metrics.credentials.labels("minted").inc()
        self._event("credential.minted", c, by)
        self._gauge()
        return Minted(c, secret)

    async def revoke(self, task_id: str, by: str | None) -> Credential:
        c = await self.store.revoke(task_id, self.clock())
        if c is None:
            raise MintError(404, "not_found", f"no live credential for task {task_id!r}")
        self._forget(task_id)
        self.bus.publish({"t": "credential", "id": task_id})  # every process drops its copy now
        if self.on_revoke is not None:
            try:
                await self.on_revoke(task_id)
            except Exception:  # noqa: BLE001 - the credential is revoked all the same: its requests get 407
                log.warning("grants of revoked task %s could not be removed", task_id, exc_info=True)
        self.telemetry.metrics.credentials.labels("revoked").inc()
        self._event("credential.revoked", c, by)
        self._gauge()
        return c

    async def listing(self) -> list[Credential]:
        return await self.store.all()

    # ---- the pipeline ---------------------------------------------------------------------------
    def knows(self, user: str) -> bool:
        """Could `user` be a task (rather than a proxy_auth user of the config)?"""
        return user not in self.reserved and TASK_ID.fullmatch(user) is not None

    async def verify(self, task_id: str, secret: str) -> tuple[Check, Credential | None]:
        """A presented task credential: OK with the credential, or why not. Never raises. A revoked or
        expired credential whose secret matches comes back too (who it was, for the refusal's event);
        without the secret nothing is said about a task."""
        now = self.clock()
        try:
            hit = self._cache.get(task_id)
            c = hit[0] if hit is not None and now - hit[1] < CACHE_TTL_S else None
            if c is None:
                if self._unknown.get(task_id, 0.0) > now:
                    return Check.UNKNOWN, None
                c = await self._read(task_id, now)
                if c is None:
                    return Check.UNKNOWN, None
        except Exception:  # noqa: BLE001 - a store failure refuses (fail closed), it never lets through
            log.exception("credential store failed")
            return Check.UNAVAILABLE, None
        if not c.matches(secret):
            return Check.WRONG_SECRET, None
        state = c.state(now)
        if state is State.REVOKED:
            return Check.REVOKED, c
        if state is State.EXPIRED:
            return Check.EXPIRED, c
        return Check.OK, c

    def still_valid(self, task_id: str) -> bool:
        """For requests inside a tunnel opened with this task's credential: the cached state (a copy
        CACHE_TTL_S old is read again in the background, for the tunnel's next request)."""
        hit = self._cache.get(task_id)
        if hit is None:
            return False
        now = self.clock()
        if now - hit[1] >= CACHE_TTL_S and task_id not in self._refreshing:
            self._refreshing.add(task_id)
            spawn(self._refresh(task_id), "credential refresh")
        return hit[0].state(now) is State.LIVE

    async def _read(self, task_id: str, now: float) -> Credential | None:
        """The store's copy, cached. A read that a revocation (or mint) of the same task overtook may
        hold the old state: it is read again, and never cached while invalidations keep overtaking it."""
        for _ in range(3):
            started = self._seq
            c = await self.store.get(task_id)
            if max(self._invalidated.get(task_id, 0), self._all_invalidated) <= started:
                break
        else:
            return c  # answer with the newest read, but keep no copy of it
        if c is None:
            self._cache.pop(task_id, None)
            if len(self._unknown) >= MAX_REMEMBERED:
                self._unknown.clear()
            self._unknown[task_id] = now + UNKNOWN_TTL_S
            return None
        if len(self._cache) >= MAX_REMEMBERED and task_id not in self._cache:
            # Bounded: drop ended credentials (live ones may be tunnels' identities).
            self._cache = {k: v for k, v in self._cache.items() if v[0].state(now) is State.LIVE}
        self._cache[task_id] = (c, now)
        return c

    async def _refresh(self, task_id: str) -> None:
        try:
            await self._read(task_id, self.clock())
        except Exception:  # noqa: BLE001 - keep the cached answer; new requests fail closed meanwhile
            log.warning("credential store failed re-reading task %s", task_id, exc_info=True)
        finally:
            self._refreshing.discard(task_id)

    # ---- keeping every process right ----------------------------------------------------------------
    def _on_message(self, m: Message) -> None:
        kind = m.get("t")
        if kind == "credential":
            self._forget(str(m.get("id")))
            self._gauge()
        elif kind == "resync":  # the bus may have lost messages: trust no cached copy
            self._seq += 1
            self._all_invalidated = self._seq
            self._cache = {k: (c, -math.inf) for k, (c, _) in self._cache.items()}
            self._unknown.clear()

    def _forget(self, task_id: str) -> None:
        self._seq += 1
        if len(self._invalidated) >= MAX_REMEMBERED:  # bounded: forgetting numbers counts as invalidating all
            self._invalidated.clear()
            self._all_invalidated = self._seq
        self._invalidated[task_id] = self._seq
        self._cache.pop(task_id, None)
        self._unknown.pop(task_id, None)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self._sweep()
            except Exception:  # noqa: BLE001 - keep sweeping; a broken store also shows on every check
                log.exception("credentials sweep failed")

    async def _sweep(self) -> None:
        for c in await self.store.sweep(self.clock(), KEEP_ENDED_S):
            self.telemetry.metrics.credentials.labels("expired").inc()
            self._event("credential.expired", c, None)
        await self._count_live()

    def _gauge(self) -> None:
        """Count the live credentials again, soon: a burst of mints or messages costs one count in
        progress and one more after it, never one per mint."""
        if not self.leader:
            return
        if self._counting is not None and not self._counting.done():
            self._count_again = True
            return
        self._counting = spawn(self._refresh_gauge(), "credentials gauge")

    async def _refresh_gauge(self) -> None:
        while True:
            self._count_again = False
            try:
                await self._count_live()
            except Exception:  # noqa: BLE001
                log.exception("could not count credentials")
            if not self._count_again:
                return

    async def _count_live(self) -> None:
        if self.leader:
            self.telemetry.metrics.credentials_live.set(await self.store.count_live(self.clock()))

    def _event(self, name: str, c: Credential, by: str | None) -> None:
        self.telemetry.emit(
            name,
            task_id=c.task_id,
            profile=c.profile,
            labels=dict(c.labels),
            by=by,
            expires_at=_rfc3339(c.expires_at),
        )


def _labels(labels: Mapping[str, str]) -> Labels:
    if len(labels) > MAX_LABELS:
        raise MintError(422, "bad_labels", f"at most {MAX_LABELS} labels")
    out = []
    for k, v in labels.items():
        if not isinstance(k, str) or not LABEL_KEY.fullmatch(k):
            raise MintError(422, "bad_labels", f"label key {k!r}: letters, digits, '.', '_', '/', '-'")
        if not isinstance(v, str) or len(v) > MAX_LABEL_VALUE or not v.isprintable():
            raise MintError(
                422, "bad_labels", f"label {k!r}: a printable string of at most {MAX_LABEL_VALUE}"
            )
        out.append((k, v))
    return tuple(sorted(out))


def _rfc3339(ts: float) -> str:
    from addons.approvals.model import rfc3339

    return rfc3339(ts)
