"""TCP backpressure on a client whose flow is held in a hook (mitmproxy private APIs, in this one module).

While a blocking hook runs (an approval hold in `requestheaders` or `http_connect` can last up to
`approvals.timeout`), mitmproxy keeps reading the client and queues every event behind the paused
layer, so a held upload (or bytes pipelined behind a held request) grows memory without bound.
Here the client's reader stops reading once `BOUND` bytes (or `MAX_EVENTS` queued events) are waiting
behind pending hooks, and reads again when they complete: the kernel's socket buffers then push back
on the client (its send blocks).

- HTTP/1, TLS and raw connections carry one exchange at a time: everything read while a hook runs
  waits for it, so the count is the bytes read since the oldest pending hook began.
- HTTP/2 multiplexes streams and mitmproxy pauses only the held stream's layer: the count is the
  bytes queued behind the paused layers themselves, so other streams flow until a held stream has
  queued `BOUND`; then the whole connection waits for that hold (mitmproxy acknowledges HTTP/2 data
  at once with a 2 GiB window, so there is no per-stream flow control to use instead).
- A paused reader sees no EOF; every `PROBE_EVERY` seconds it asks the kernel for the TCP state
  (TCP_INFO, Linux) and, once the peer has closed or reset, reads again so mitmproxy sees the close
  (a hold then ends as "client gone"). A peer whose FIN waits behind unsent bytes is seen only when
  its kernel gives up; until then the hold runs to its timeout.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

BOUND = 256 * 1024  # bytes a held client may have read and queued before reading stops
MAX_EVENTS = 1024  # events queued behind one paused layer (tiny chunks cost more than their bytes)
PROBE_EVERY = 1.0  # seconds between checks that a paused peer is still connected
_ATTR = "_portcullis_gate"  # on each handler: its Gate
_INSTALLED = "_portcullis_backpressure_installed"
_TCP_ESTABLISHED = 1


@dataclass(eq=False)
class _Hold:
    started_at: int  # Gate.read when the hook began
    layer: Any  # the layer the hook paused (mitmproxy sets `command.blocking` to it)


@dataclass(eq=False)
class Gate:
    """Per client connection: bytes read, and the hooks pending on it."""

    multiplexed: Any  # () -> bool: the connection is HTTP/2
    read: int = 0
    holds: list[_Hold] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def full(self) -> bool:
        if not self.holds:
            return False
        if any(_queued_events(h.layer) > MAX_EVENTS for h in self.holds):
            return True
        if self.multiplexed():
            return sum(_queued_bytes(h.layer) for h in self.holds) > BOUND
        return self.read - min(h.started_at for h in self.holds) > BOUND

    def begin(self, layer: Any) -> _Hold:
        hold = _Hold(self.read, layer)
        self.holds.append(hold)
        return hold

    def end(self, hold: _Hold) -> None:
        self.holds.remove(hold)
        self.changed.set()


def _queue(layer: Any) -> Iterable[Any]:
    q = getattr(layer, "_paused_event_queue", None)
    return q if q is not None else ()


def _queued_events(layer: Any) -> int:
    return len(getattr(layer, "_paused_event_queue", ()))


def _queued_bytes(layer: Any) -> int:
    return sum(len(d) for ev in _queue(layer) if isinstance(d := getattr(ev, "data", None), bytes))


def peer_closed(sock: Any) -> bool:
    """True when the kernel says the peer has closed or reset this TCP connection (Linux TCP_INFO)."""
    info = getattr(socket, "TCP_INFO", None)
    if sock is None or info is None or not sys.platform.startswith("linux"):
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, info, 8)[0]
    except OSError:
        return True
    return bool(state != _TCP_ESTABLISHED)


class GatedReader:
    """The client's StreamReader, reading only while its gate is not full (or once its peer is gone)."""

    def __init__(self, inner: asyncio.StreamReader, gate: Gate, sock: Any) -> None:
        self._inner = inner
        self._gate = gate
        self._sock = sock
        self._gone = False

    async def read(self, n: int = -1) -> bytes:
        while not self._gone and self._gate.full():
            self._gate.changed.clear()
            try:
                await asyncio.wait_for(self._gate.changed.wait(), PROBE_EVERY)
            except TimeoutError:
                self._gone = peer_closed(self._sock)
        data = await self._inner.read(n)
        self._gate.read += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install() -> None:
    """Gate the client reader of every proxy connection mitmproxy creates (idempotent)."""
    from mitmproxy.proxy.mode_servers import ProxyConnectionHandler

    if getattr(ProxyConnectionHandler, _INSTALLED, False):
        return
    original_init: Callable[..., None] = ProxyConnectionHandler.__init__
    original_hook_task = ProxyConnectionHandler.hook_task

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807 - a patched __init__
        original_init(self, *args, **kwargs)
        io = self.transports.get(self.client)
        if io is None or not isinstance(io.reader, asyncio.StreamReader):
            return  # UDP / QUIC streams are not TCP: left alone
        client = self.client
        gate = Gate(multiplexed=lambda: client.alpn == b"h2")
        io.reader = GatedReader(io.reader, gate, io.writer.get_extra_info("socket"))
        setattr(self, _ATTR, gate)

    @functools.wraps(original_hook_task)
    async def hook_task(self: Any, hook: Any) -> None:
        gate: Gate | None = getattr(self, _ATTR, None)
        if gate is None or not hook.blocking:
            return await original_hook_task(self, hook)
        hold = gate.begin(hook.blocking)
        try:
            await original_hook_task(self, hook)  # runs the hook, then replays what it queued
        finally:
            gate.end(hold)

    ProxyConnectionHandler.__init__ = __init__  # type: ignore[method-assign]
    ProxyConnectionHandler.hook_task = hook_task  # type: ignore[method-assign]
    setattr(ProxyConnectionHandler, _INSTALLED, True)
