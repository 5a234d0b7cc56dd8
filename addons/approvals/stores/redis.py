"""Redis store for approvals and grants (`approvals.store: redis://HOST:PORT/DB`), for several replicas.

State changes run as Lua scripts on the server (one atomic step each); a single-use grant is
consumed by the one caller whose DEL answers 1. The client is redis.asyncio: a call waits without
blocking the event loop, and every call has a deadline (CALL_TIMEOUT_S), so a slow or vanished Redis
costs the requests that need it at most that long and never stalls the others. A call that cannot
reach Redis raises StoreUnavailable and tells `health` (addons/approvals/health.py); the next call
that gets an answer tells it Redis is back. Connections are made again by the client on demand.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import fields
from types import ModuleType
from typing import Any, Concatenate, Protocol

from addons.approvals.errors import ApprovalError, StoreUnavailable
from addons.approvals.model import Approval, Choice, Grant, Key, Scope, State, decode_labels

PREFIX = "portcullis:"
_SEP = "\x1f"  # cannot occur in a client key, a normalised host or a port
MISSING = "store redis://... needs the Redis client: pip install 'portcullis[redis]'"
SOCKET_TIMEOUT_S = 1.0  # connect, and each reply (Redis answers in well under a millisecond)
CALL_TIMEOUT_S = 2.0  # one store call, all its round trips and its one retry included
MAX_CONNECTIONS = 32  # per process; a request waits for a free one within its call's deadline

# Insert a pending approval unless a live one stands for its key (one approval per key, across replicas).
# KEYS: new approval hash, pending zset, pending-key index.
# ARGV: id, expires_at, now, key prefix, then field/value pairs.
# The standing approval's hash is named from the index (single-node Redis; the keys share one prefix).
_OPEN = """
local cur = redis.call('GET', KEYS[3])
if cur then
  local h = redis.call('HMGET', ARGV[4] .. 'apr:' .. cur, 'state', 'expires_at')
  if h[1] == 'pending' and tonumber(h[2]) > tonumber(ARGV[3]) then return cur end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
return ARGV[1]
"""
# Compare-and-set pending -> a final state, atomically on the server.
# KEYS: approval hash, pending zset, recent zset, pending-key index.
# ARGV: id, state, decided_at, then field/value pairs.
_TRANSITION = """
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'decided_at', ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 1
"""
_MARK = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'notified', '1') end return 0"


class Health(Protocol):
    """Who hears whether Redis answers (addons/approvals/health.py: StoreHealth)."""

    @property
    def up(self) -> bool: ...
    def failed(self, error: BaseException) -> None: ...
    def ok(self) -> None: ...


def _redis() -> ModuleType:
    try:
        import redis
    except ImportError as e:
        raise ApprovalError(MISSING) from e
    return redis


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What "Redis cannot be reached in time" looks like (a refused or lost connection, a timeout,
    Redis still loading its data after a restart). Other Redis errors are bugs, not outages."""
    redis = _redis()
    return (redis.ConnectionError, redis.TimeoutError, OSError, TimeoutError)


def client(url: str, *, max_connections: int = MAX_CONNECTIONS, retries: int = 1) -> Any:
    """A redis.asyncio client for `url` with short timeouts and one quick retry (a pooled connection
    that a Redis restart closed is made again once, at once). Any: redis-py's reply types are unions
    over RESP versions; with decode_responses every reply used here is str (or a list/dict of str)."""
    redis = _redis()
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=CALL_TIMEOUT_S, decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries), health_check_interval=0)
    return redis.asyncio.Redis.from_pool(pool)


def _guarded[**P, T](fn: Callable[Concatenate[RedisStore, P], Awaitable[T]]
                     ) -> Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, T]]:
    """One store call: bounded by CALL_TIMEOUT_S; "unreachable" becomes StoreUnavailable (fail closed
    upstream) and is told to the health, as is the first answer after it."""
    async def call(self: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            async with asyncio.timeout(self.call_timeout):
                out = await fn(self, *args, **kwargs)
        except self._unreachable as e:
            if self.health is not None:
                self.health.failed(e)
            raise StoreUnavailable(unreachable_message(self.name, e)) from e
        if self.health is not None:
            self.health.ok()
        return out
    call.__name__, call.__qualname__, call.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return call


def unreachable_message(name: str, e: BaseException) -> str:
    what = str(e) or ("no answer within the deadline" if isinstance(e, TimeoutError) else "")
    return f"the approvals store {name} is unreachable ({type(e).__name__}: {what})"


class RedisStore:
    """Same contract as SqliteStore (addons/approvals/model.py: Store)."""

    call_timeout = CALL_TIMEOUT_S

    def __init__(self, url: str, health: Health | None = None) -> None:
        self.name = safe_url(url)
        self.health = health
        self._unreachable = unreachable_errors()
        try:
            self._r: Any = client(url)
        except ValueError as e:
            raise ApprovalError(f"cannot use the approvals store {self.name}: {e}") from e
        self._open = self._r.register_script(_OPEN)
        self._transition = self._r.register_script(_TRANSITION)
        self._mark = self._r.register_script(_MARK)

    async def connect(self) -> None:
        """At start: Redis must answer (a config error is found before anything listens)."""
        redis = _redis()
        try:
            async with asyncio.timeout(self.call_timeout):
                await self._r.ping()
        except (redis.RedisError, OSError, TimeoutError) as e:
            await self.close()
            raise ApprovalError(f"cannot use the approvals store {self.name}: "
                                f"{type(e).__name__}: {e or 'no answer'}") from e

    @_guarded
    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()

    # Approvals

    @_guarded
    async def open(self, a: Approval, now: float) -> Approval:
        pairs = [x for kv in _encode(a).items() for x in kv]
        keys = [_apr(a.id), PREFIX + "pending", _pkey(a.key)]
        standing = await self._open(keys=keys, args=[a.id, repr(a.expires_at), repr(now), PREFIX, *pairs])
        if standing == a.id:
            return a
        return _decode(await self._r.hgetall(_apr(standing))) or a

    @_guarded
    async def get(self, approval_id: str) -> Approval | None:
        return _decode(await self._r.hgetall(_apr(approval_id)))

    @_guarded
    async def pending(self) -> list[Approval]:
        found = await _many(self._r, list(await self._r.zrange(PREFIX + "pending", 0, -1)))
        return sorted((a for a in found if a.state is State.PENDING), key=lambda a: a.created_at)

    async def count_pending(self) -> int:
        return len(await self.pending())  # the pending set may hold decided ids until they are swept

    @_guarded
    async def pending_for(self, key: Key, now: float) -> Approval | None:
        approval_id = await self._r.get(_pkey(key))
        a = _decode(await self._r.hgetall(_apr(approval_id))) if approval_id else None
        return a if a is not None and a.state is State.PENDING and a.expires_at > now else None

    @_guarded
    async def recent(self, limit: int = 100) -> list[Approval]:
        return await _many(self._r, list(await self._r.zrevrange(PREFIX + "recent", 0, limit - 1)))

    @_guarded
    async def decide(self, approval_id: str, choice: Choice, scope: Scope, by: str | None,
                     reason: str | None, now: float) -> bool:
        extra = ["decision", choice.value, "scope", scope.value]
        for k, v in (("decided_by", by), ("reason", reason)):
            if v is not None:
                extra += [k, v]
        return await self._cas(approval_id, choice.state, now, extra)

    @_guarded
    async def expire(self, approval_id: str, now: float) -> bool:
        return await self._cas(approval_id, State.EXPIRED, now, [])

    async def _cas(self, approval_id: str, state: State, now: float, extra: list[str]) -> bool:
        a = _decode(await self._r.hgetall(_apr(approval_id)))
        if a is None:
            return False
        keys = [_apr(approval_id), PREFIX + "pending", PREFIX + "recent", _pkey(a.key)]
        return bool(await self._transition(keys=keys, args=[approval_id, state.value, repr(now), *extra]))

    @_guarded
    async def mark_notified(self, approval_id: str) -> None:
        await self._mark(keys=[_apr(approval_id)])

    @_guarded
    async def due(self, now: float) -> list[Approval]:
        ids = list(await self._r.zrangebyscore(PREFIX + "pending", "-inf", now))
        return [a for a in await _many(self._r, ids) if a.state is State.PENDING]

    # Grants

    @_guarded
    async def add_grant(self, key: Key, choice: Choice, scope: Scope, approval_id: str | None, now: float,
                        expires_at: float, single_use: bool) -> int:
        gid = int(await self._r.incr(PREFIX + "gseq"))
        client_key, host, port = key
        g = {"client_key": client_key, "host": host, "port": port, "decision": choice.value,
             "scope": scope.value, "approval_id": approval_id or "", "created_at": repr(now),
             "expires_at": repr(expires_at), "single_use": int(single_use)}
        p = self._r.pipeline(transaction=True)
        p.hset(_grant_key(gid), mapping=g)
        p.zadd(_grants_for(key), {str(gid): expires_at})
        p.zadd(PREFIX + "grants", {str(gid): expires_at})
        await p.execute()
        return gid

    @_guarded
    async def take_grant(self, key: Key, now: float) -> Grant | None:
        gids = list(await self._r.zrangebyscore(_grants_for(key), f"({now!r}", "+inf"))
        live = sorted(await _grants(self._r, gids),
                      key=lambda g: (g.decision is not Choice.DENY, g.single_use, -g.created_at))
        for g in live:
            if not g.single_use:
                return g
            # DEL answers 1 to exactly one caller: a `once` grant is used by one request, across replicas.
            if await self._r.delete(_grant_key(g.id)) == 1:
                await _drop_grant(self._r, g)
                return g
        return None

    @_guarded
    async def drop_single_use(self, a: Approval) -> int:
        gids = list(await self._r.zrange(_grants_for(a.key), 0, -1))
        mine = [g for g in await _grants(self._r, gids) if g.single_use and g.approval_id == a.id]
        n = 0
        for g in mine:
            if await self._r.delete(_grant_key(g.id)) == 1:
                await _drop_grant(self._r, g)
                n += 1
        return n

    @_guarded
    async def grants(self, now: float) -> list[Grant]:
        gids = list(await self._r.zrangebyscore(PREFIX + "grants", f"({now!r}", "+inf"))
        return sorted(await _grants(self._r, gids), key=lambda g: g.created_at)

    @_guarded
    async def drop_grants_of(self, client_key: str) -> int:
        every = await _grants(self._r, list(await self._r.zrange(PREFIX + "grants", 0, -1)))
        mine = [g for g in every if g.client_key == client_key]
        for g in mine:
            await _drop_grant(self._r, g)
        return len(mine)

    @_guarded
    async def sweep(self, now: float, keep_decided_s: float = 7 * 86400) -> int:
        old = await _grants(self._r, list(await self._r.zrangebyscore(PREFIX + "grants", "-inf", now)))
        for g in old:
            await _drop_grant(self._r, g)
        stale = list(await self._r.zrangebyscore(PREFIX + "recent", "-inf", now - keep_decided_s))
        if stale:
            p = self._r.pipeline(transaction=False)
            for i in stale:
                p.delete(_apr(i))
                p.zrem(PREFIX + "recent", i)
            await p.execute()
        return len(old)


async def _many(r: Any, ids: list[str]) -> list[Approval]:
    if not ids:
        return []
    p = r.pipeline(transaction=False)
    for i in ids:
        p.hgetall(_apr(i))
    return [a for a in (_decode(h) for h in await p.execute()) if a is not None]


async def _grants(r: Any, gids: list[str]) -> list[Grant]:
    if not gids:
        return []
    p = r.pipeline(transaction=False)
    for gid in gids:
        p.hgetall(_grant_key(int(gid)))
    return [_grant(int(gid), h) for gid, h in zip(gids, await p.execute(), strict=True) if h]


async def _drop_grant(r: Any, g: Grant) -> None:
    p = r.pipeline(transaction=False)
    p.delete(_grant_key(g.id))
    p.zrem(_grants_for((g.client_key, g.host, g.port)), str(g.id))
    p.zrem(PREFIX + "grants", str(g.id))
    await p.execute()


def _apr(approval_id: str) -> str:
    return f"{PREFIX}apr:{approval_id}"


def _pkey(key: Key) -> str:
    return f"{PREFIX}pkey:{key[0]}{_SEP}{key[1]}{_SEP}{key[2]}"


def _grants_for(key: Key) -> str:
    return f"{PREFIX}grants:{key[0]}{_SEP}{key[1]}{_SEP}{key[2]}"


def _grant_key(gid: int) -> str:
    return f"{PREFIX}grant:{gid}"


_INT = {"port"}
_FLOAT = {"created_at", "expires_at", "decided_at", "task_until"}
_ENUM: dict[str, type[State | Choice | Scope]] = {"state": State, "decision": Choice, "scope": Scope}


def _encode(a: Approval) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in fields(Approval):
        v = getattr(a, f.name)
        if v is None or v == ():
            continue
        if f.name == "labels":
            out[f.name] = json.dumps(dict(v))
        elif isinstance(v, bool):
            out[f.name] = str(int(v))
        elif isinstance(v, float):
            out[f.name] = repr(v)
        else:  # str, int, or an enum member (its value)
            out[f.name] = str(v)
    return out


def _decode(h: dict[str, str]) -> Approval | None:
    if not h or "id" not in h:
        return None
    kw: dict[str, Any] = {}
    for f in fields(Approval):
        v = h.get(f.name)
        if f.name == "labels":
            kw[f.name] = decode_labels(v)
        elif v is None:
            kw[f.name] = False if f.name == "notified" else None
        elif f.name in _INT:
            kw[f.name] = int(v)
        elif f.name in _FLOAT:
            kw[f.name] = float(v)
        elif f.name in _ENUM:
            kw[f.name] = _ENUM[f.name](v)
        elif f.name == "notified":
            kw[f.name] = v == "1"
        else:
            kw[f.name] = v
    return Approval(**kw)


def _grant(gid: int, h: dict[str, str]) -> Grant:
    return Grant(gid, h["client_key"], h["host"], int(h["port"]), Choice(h["decision"]), Scope(h["scope"]),
                 h.get("approval_id") or None, float(h["created_at"]), float(h["expires_at"]),
                 h.get("single_use") == "1")


def safe_url(url: str) -> str:
    """The URL without a password."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
