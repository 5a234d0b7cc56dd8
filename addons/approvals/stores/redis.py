"""Redis store for approvals and grants (`approvals.store: redis://HOST:PORT/DB`), for several replicas.

State changes run as Lua scripts on the server (one atomic step each); a single-use grant is
consumed by the one caller whose DEL answers 1. The client is synchronous (sub-millisecond on a
near Redis); every method is one logical round trip, so it can move to redis.asyncio as it is.
"""

from __future__ import annotations

from dataclasses import fields
from types import ModuleType
from typing import Any

from addons.approvals.errors import ApprovalError
from addons.approvals.model import Approval, Choice, Grant, Key, Scope, State

PREFIX = "portcullis:"
_SEP = "\x1f"  # cannot occur in a client key, a normalised host or a port
MISSING = "store redis://... needs the Redis client: pip install 'portcullis[redis]'"

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


def _redis() -> ModuleType:
    try:
        import redis
    except ImportError as e:
        raise ApprovalError(MISSING) from e
    return redis


class RedisStore:
    """Same contract as SqliteStore (addons/approvals/model.py: Store)."""

    def __init__(self, url: str) -> None:
        redis = _redis()
        try:
            # Any: redis-py's return types are unions over RESP versions; with decode_responses
            # every reply used here is str (or a list/dict of str).
            self._r: Any = redis.Redis.from_url(url, decode_responses=True, socket_timeout=2.0,
                                                socket_connect_timeout=2.0)
            self._r.ping()
        except (redis.RedisError, ValueError) as e:
            raise ApprovalError(f"cannot use the approvals store {_safe(url)}: {e}") from e
        self._open = self._r.register_script(_OPEN)
        self._transition = self._r.register_script(_TRANSITION)
        self._mark = self._r.register_script(_MARK)

    def close(self) -> None:
        self._r.close()

    # Approvals

    def open(self, a: Approval, now: float) -> Approval:
        pairs = [x for kv in _encode(a).items() for x in kv]
        keys = [_apr(a.id), PREFIX + "pending", _pkey(a.key)]
        standing = self._open(keys=keys, args=[a.id, repr(a.expires_at), repr(now), PREFIX, *pairs])
        if standing == a.id:
            return a
        return self.get(standing) or a

    def get(self, approval_id: str) -> Approval | None:
        return _decode(self._r.hgetall(_apr(approval_id)))

    def pending(self) -> list[Approval]:
        found = _many(self._r, list(self._r.zrange(PREFIX + "pending", 0, -1)))
        return sorted((a for a in found if a.state is State.PENDING), key=lambda a: a.created_at)

    def pending_for(self, key: Key, now: float) -> Approval | None:
        approval_id = self._r.get(_pkey(key))
        a = self.get(approval_id) if approval_id else None
        return a if a is not None and a.state is State.PENDING and a.expires_at > now else None

    def recent(self, limit: int = 100) -> list[Approval]:
        return _many(self._r, list(self._r.zrevrange(PREFIX + "recent", 0, limit - 1)))

    def decide(self, approval_id: str, choice: Choice, scope: Scope, by: str | None, reason: str | None,
               now: float) -> bool:
        extra = ["decision", choice.value, "scope", scope.value]
        for k, v in (("decided_by", by), ("reason", reason)):
            if v is not None:
                extra += [k, v]
        return self._cas(approval_id, choice.state, now, extra)

    def expire(self, approval_id: str, now: float) -> bool:
        return self._cas(approval_id, State.EXPIRED, now, [])

    def _cas(self, approval_id: str, state: State, now: float, extra: list[str]) -> bool:
        a = self.get(approval_id)
        if a is None:
            return False
        keys = [_apr(approval_id), PREFIX + "pending", PREFIX + "recent", _pkey(a.key)]
        return bool(self._transition(keys=keys, args=[approval_id, state.value, repr(now), *extra]))

    def mark_notified(self, approval_id: str) -> None:
        self._mark(keys=[_apr(approval_id)])

    def due(self, now: float) -> list[Approval]:
        ids = list(self._r.zrangebyscore(PREFIX + "pending", "-inf", now))
        return [a for a in _many(self._r, ids) if a.state is State.PENDING]

    # Grants

    def add_grant(self, key: Key, choice: Choice, scope: Scope, approval_id: str | None, now: float,
                  expires_at: float, single_use: bool) -> int:
        gid = int(self._r.incr(PREFIX + "gseq"))
        client_key, host, port = key
        g = {"client_key": client_key, "host": host, "port": port, "decision": choice.value,
             "scope": scope.value, "approval_id": approval_id or "", "created_at": repr(now),
             "expires_at": repr(expires_at), "single_use": int(single_use)}
        p = self._r.pipeline(transaction=True)
        p.hset(_grant_key(gid), mapping=g)
        p.zadd(_grants_for(key), {str(gid): expires_at})
        p.zadd(PREFIX + "grants", {str(gid): expires_at})
        p.execute()
        return gid

    def take_grant(self, key: Key, now: float) -> Grant | None:
        gids = list(self._r.zrangebyscore(_grants_for(key), f"({now!r}", "+inf"))
        live = sorted(_grants(self._r, gids),
                      key=lambda g: (g.decision is not Choice.DENY, g.single_use, -g.created_at))
        for g in live:
            if not g.single_use:
                return g
            # DEL answers 1 to exactly one caller: a `once` grant is used by one request, across replicas.
            if self._r.delete(_grant_key(g.id)) == 1:
                _drop_grant(self._r, g)
                return g
        return None

    def drop_single_use(self, a: Approval) -> int:
        gids = list(self._r.zrange(_grants_for(a.key), 0, -1))
        mine = [g for g in _grants(self._r, gids) if g.single_use and g.approval_id == a.id]
        n = 0
        for g in mine:
            if self._r.delete(_grant_key(g.id)) == 1:
                _drop_grant(self._r, g)
                n += 1
        return n

    def grants(self, now: float) -> list[Grant]:
        gids = list(self._r.zrangebyscore(PREFIX + "grants", f"({now!r}", "+inf"))
        return sorted(_grants(self._r, gids), key=lambda g: g.created_at)

    def sweep(self, now: float, keep_decided_s: float = 7 * 86400) -> int:
        old = _grants(self._r, list(self._r.zrangebyscore(PREFIX + "grants", "-inf", now)))
        for g in old:
            _drop_grant(self._r, g)
        stale = list(self._r.zrangebyscore(PREFIX + "recent", "-inf", now - keep_decided_s))
        if stale:
            p = self._r.pipeline(transaction=False)
            for i in stale:
                p.delete(_apr(i))
                p.zrem(PREFIX + "recent", i)
            p.execute()
        return len(old)


def _many(r: Any, ids: list[str]) -> list[Approval]:
    p = r.pipeline(transaction=False)
    for i in ids:
        p.hgetall(_apr(i))
    return [a for a in (_decode(h) for h in p.execute()) if a is not None]


def _grants(r: Any, gids: list[str]) -> list[Grant]:
    p = r.pipeline(transaction=False)
    for gid in gids:
        p.hgetall(_grant_key(int(gid)))
    return [_grant(int(gid), h) for gid, h in zip(gids, p.execute(), strict=True) if h]


def _drop_grant(r: Any, g: Grant) -> None:
    p = r.pipeline(transaction=False)
    p.delete(_grant_key(g.id))
    p.zrem(_grants_for((g.client_key, g.host, g.port)), str(g.id))
    p.zrem(PREFIX + "grants", str(g.id))
    p.execute()


def _apr(approval_id: str) -> str:
    return f"{PREFIX}apr:{approval_id}"


def _pkey(key: Key) -> str:
    return f"{PREFIX}pkey:{key[0]}{_SEP}{key[1]}{_SEP}{key[2]}"


def _grants_for(key: Key) -> str:
    return f"{PREFIX}grants:{key[0]}{_SEP}{key[1]}{_SEP}{key[2]}"


def _grant_key(gid: int) -> str:
    return f"{PREFIX}grant:{gid}"


_INT = {"port"}
_FLOAT = {"created_at", "expires_at", "decided_at"}
_ENUM: dict[str, type[State | Choice | Scope]] = {"state": State, "decision": Choice, "scope": Scope}


def _encode(a: Approval) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in fields(Approval):
        v = getattr(a, f.name)
        if v is None:
            continue
        if isinstance(v, bool):
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
        if v is None:
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


def _safe(url: str) -> str:
    """The URL without a password."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
