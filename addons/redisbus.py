"""The bus between replicas: Redis pub/sub on one channel (`portcullis:bus`), for `store: redis://`.

Every process of every replica (each worker, each supervisor, each single process) subscribes, so a
message one publishes ("look again at approval X": a decision, a session grant, an `always` rule)
reaches all the others at once. As with the local bus (addons/bus.py) the store stays the source of
truth: a message only says "look again". Messages sent while a process is cut off are lost to it, so
after every (re)subscription the bus tells its own subscribers `{"t": "resync"}` and they look again
at everything they hold. The subscription is watched with a PING every few seconds; a lost one is
made again with bounded backoff (0.1 s doubling to 5 s), and `health` hears when Redis does not
answer and when it answers again. Publishing never blocks the caller: messages go out in order from a
queue, retried while Redis is away, and dropped after PUBLISH_DEADLINE_S (the resync covers them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any

from addons.approvals.errors import ApprovalError
from addons.approvals.stores.redis import (
    CALL_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    Health,
    client,
    safe_url,
    unreachable_errors,
)
from addons.background import spawn
from addons.bus import MAX_LINE, Handler, Message, deliver

log = logging.getLogger(__name__)

CHANNEL = "portcullis:bus"
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
TICK_S = 0.5  # how often an idle subscription looks at the clock
PING_EVERY_S = 5.0  # an idle subscription is PINGed this often (every tick while Redis is down)
DEAD_AFTER_S = PING_EVERY_S + 2 * SOCKET_TIMEOUT_S  # no reply at all for this long: the link is dead
PUBLISH_DEADLINE_S = 10.0
QUEUE_MAX = 1000
RESYNC: Message = {"t": "resync"}


class RedisBus:
    """One process's side of the replicas' bus (the Bus protocol of addons/bus.py, plus start)."""

    def __init__(self, url: str, health: Health | None = None, channel: str = CHANNEL) -> None:
        self.url = url
        self.name = safe_url(url)
        self.health = health
        self.channel = channel
        self.origin = secrets.token_hex(8)  # this process: its own messages come back and are skipped
        self.connected = False
        self.subscriptions = 0  # how many times the subscription was made (1 + the reconnects)
        self._handlers: list[Handler] = []
        self._queue: asyncio.Queue[tuple[float, str]] = asyncio.Queue(QUEUE_MAX)
        self._r: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unreachable: tuple[type[BaseException], ...] = ()

    async def start(self, required: bool = True) -> None:
        """Subscribe now, then listen and publish in the background. Redis must answer now if
        `required`; else (a worker started again during an outage) the bus keeps trying."""
        self._unreachable = unreachable_errors()
        self._r = client(self.url, max_connections=4, retries=0)  # the loop below does the retrying
        ps: Any = None
        try:
            ps = await self._subscribe()
        except self._unreachable as e:
            if required:
                await self._r.aclose()
                raise ApprovalError(f"cannot subscribe to {self.channel} on {self.name}: "
                                    f"{type(e).__name__}: {e}") from e
            if self.health is not None:
                self.health.failed(e)
        else:
            self._subscribed()
        self._tasks = [spawn(self._run(ps), "redis-bus-listen"), spawn(self._send(), "redis-bus-publish")]

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def publish(self, message: Message) -> None:
        """To this process's subscribers now, and to every other process through Redis."""
        deliver(self._handlers, message)
        data = json.dumps({**message, "o": self.origin}, separators=(",", ":"))
        if self._queue.full():  # Redis away for long and many decisions: the oldest go (resync covers)
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            log.warning("redis bus: publish queue full; dropped the oldest message")
        self._queue.put_nowait((time.monotonic(), data))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        self._handlers.clear()
        if self._r is not None:
            with contextlib.suppress(Exception):
                await self._r.aclose()
            self._r = None

    # Listening

    async def _subscribe(self) -> Any:
        """A new subscription, active on the server when this returns (its confirmation was read)."""
        ps = self._r.pubsub()
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await ps.subscribe(self.channel)
                m = None
                while m is None or m.get("type") != "subscribe":
                    m = await ps.get_message(timeout=SOCKET_TIMEOUT_S)
        except BaseException:
            await _drop(ps)
            raise
        return ps

    def _subscribed(self) -> None:
        self.connected = True
        self.subscriptions += 1
        if self.health is not None:
            self.health.ok()
        # Whatever was published while this process was not subscribed is lost to it: look again.
        deliver(self._handlers, dict(RESYNC))

    async def _run(self, ps: Any) -> None:
        """`ps`: the subscription made at start, or None (none yet: keep trying)."""
        while True:
            if ps is not None:
                try:
                    await self._listen(ps)
                except self._unreachable as e:
                    log.warning("redis bus: lost the subscription on %s (%s: %s); subscribing again",
                                self.name, type(e).__name__, e)
                self.connected = False
                await _drop(ps)
            ps = await self._resubscribe()
            self._subscribed()

    async def _resubscribe(self) -> Any:
        delay = BACKOFF_MIN_S
        while True:
            try:
                return await self._subscribe()
            except self._unreachable as e:
                if self.health is not None:
                    self.health.failed(e)
            await asyncio.sleep(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)

    async def _listen(self, ps: Any) -> None:
        """Deliver messages until the link fails (raises one of the unreachable errors)."""
        last_seen = last_ping = time.monotonic()
        while True:
            m = await ps.get_message(timeout=TICK_S)
            now = time.monotonic()
            if m is not None:
                last_seen = now
                if self.health is not None:
                    self.health.ok()  # Redis answered (a message or a PONG)
                if m.get("type") == "message":
                    self._received(m.get("data"))
                continue
            if now - last_seen > DEAD_AFTER_S:
                raise TimeoutError(f"no reply from Redis for {now - last_seen:.1f} s")
            down = self.health is not None and not self.health.up
            if now - last_ping >= (TICK_S if down else PING_EVERY_S):
                last_ping = now
                await ps.ping()

    def _received(self, data: object) -> None:
        if not isinstance(data, str) or len(data) > MAX_LINE:
            return
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("redis bus: dropped a message that is not JSON")
            return
        if not isinstance(message, dict) or message.pop("o", None) == self.origin:
            return
        deliver(self._handlers, message)

    # Publishing

    async def _send(self) -> None:
        while True:
            born, data = await self._queue.get()
            delay = BACKOFF_MIN_S
            while time.monotonic() - born < PUBLISH_DEADLINE_S:
                try:
                    async with asyncio.timeout(CALL_TIMEOUT_S):
                        await self._r.publish(self.channel, data)
                    break
                except self._unreachable:
                    await asyncio.sleep(delay)
                    delay = min(BACKOFF_MAX_S, delay * 2)
            else:
                log.warning("redis bus: could not publish for %.0f s; dropped a message (the other processes "
                            "look again when they reconnect, and at their next poll)", PUBLISH_DEADLINE_S)


async def _drop(ps: Any) -> None:
    with contextlib.suppress(Exception):
        await ps.aclose()
