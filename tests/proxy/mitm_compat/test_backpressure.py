"""addons/proxy/mitm_compat/backpressure.py: every mitmproxy internal it relies on (each test breaks when an
upgrade changes one), and the gate's behaviour on real sockets.
End-to-end: tests/proxy/e2e/test_backpressure.py."""

from __future__ import annotations

import asyncio
import inspect
import socket
import struct
from collections import deque
from typing import Any

import pytest
from mitmproxy import options
from mitmproxy.connection import Client, ConnectionState
from mitmproxy.proxy import commands, events, layer, server
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HttpLayer
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler
from mitmproxy.proxy.server_hooks import ClientConnectedHook

from addons.proxy.mitm_compat import backpressure as bp
from tests.proxy.mitm_compat.compat_support import loopback_pair, proxy_handler

# ---- the internals relied on ------------------------------------------------------------------------


def test_the_handler_keeps_the_client_reader_in_transports_and_handle_connection_reads_it():
    async def main() -> None:
        r, w, peer, srv = await loopback_pair()
        h = proxy_handler(r, w)
        io = h.transports[h.client]
        reader = io.reader._inner if isinstance(io.reader, bp.GatedReader) else io.reader  # once installed
        assert isinstance(io, server.ConnectionIO) and reader is r and io.writer is w
        assert isinstance(w.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_TYPE), int)
        peer.close()
        w.close()
        srv.close()

    asyncio.run(main())
    # handle_connection fetches the reader from transports once, then only calls read(n) on it
    src = inspect.getsource(server.ConnectionHandler.handle_connection)
    assert "reader = self.transports[connection].reader" in src and "await reader.read(" in src
    init = ProxyConnectionHandler.__init__
    params = list(inspect.signature(getattr(init, "__wrapped__", init)).parameters)
    assert params[:3] == ["self", "master", "r"]


def test_layer_hooks_run_in_hook_task_and_a_blocking_hook_names_its_paused_layer():
    assert list(inspect.signature(server.ConnectionHandler.hook_task).parameters) == ["self", "hook"]
    assert "hook_task" not in vars(server.LiveConnectionHandler)  # ProxyConnectionHandler inherits it
    assert "self.hook_task(command)" in inspect.getsource(server.ConnectionHandler.server_event)
    assert "await self.server_event(events.HookCompleted(hook))" in inspect.getsource(
        server.ConnectionHandler.hook_task)

    class Held(layer.Layer):
        def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
            if isinstance(event, events.Start):
                yield ClientConnectedHook(self.context.client)

    ctx = Context(Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0,
                         state=ConnectionState.OPEN), options.Options())
    held = Held(ctx)
    [hook] = list(held.handle_event(events.Start()))
    assert isinstance(hook, commands.StartHook) and hook.blocking is held  # what Gate.begin is given
    list(held.handle_event(events.DataReceived(ctx.client, b"x" * 10)))
    assert isinstance(held._paused_event_queue, deque) and len(held._paused_event_queue) == 1
    assert bp._queued_bytes(held) == 10 and bp._queued_events(held) == 1


def test_http2_is_chosen_by_the_client_alpn():
    assert 'self.context.client.alpn == b"h2"' in inspect.getsource(HttpLayer)


def test_tcp_info_starts_with_the_state_and_tells_a_closed_or_reset_peer():
    async def main() -> None:
        for how in ("fin", "rst"):
            r, w, peer, srv = await loopback_pair()
            sock = w.get_extra_info("socket")
            assert not bp.peer_closed(sock)
            if how == "rst":
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
            for _ in range(100):  # the close reaches the kernel of the other side asynchronously
                if bp.peer_closed(sock):
                    break
                await asyncio.sleep(0.01)
            assert bp.peer_closed(sock), how
            w.close()
            srv.close()

    asyncio.run(main())


# ---- behaviour ----------------------------------------------------------------------------------------


def test_install_gates_the_client_reader_and_counts_blocking_hooks_only():
    bp.install()
    bp.install()  # idempotent

    async def main() -> None:
        r, w, peer, srv = await loopback_pair()
        h = proxy_handler(r, w)
        reader = h.transports[h.client].reader
        gate = getattr(h, bp._ATTR)
        assert isinstance(reader, bp.GatedReader) and isinstance(gate, bp.Gate)
        seen: list[int] = []

        async def handle_hook(hook: commands.StartHook) -> None:
            seen.append(len(gate.holds))

        async def server_event(event: events.Event) -> None:
            seen.append(-len(gate.holds))  # HookCompleted: the queue is replayed while still held

        h.handle_hook = handle_hook  # type: ignore[method-assign]
        h.server_event = server_event  # type: ignore[method-assign]
        nb = ClientConnectedHook(h.client)
        nb.blocking = False
        await h.hook_task(nb)
        blocking = ClientConnectedHook(h.client)
        blocking.blocking = object()  # type: ignore[assignment]
        await h.hook_task(blocking)
        assert seen == [0, 1, -1] and gate.holds == []
        peer.close()
        w.close()
        srv.close()

    asyncio.run(main())


class _Paused:
    def __init__(self) -> None:
        self._paused_event_queue: deque[Any] = deque()


def test_a_held_client_is_read_up_to_the_bound_then_again_when_the_hook_ends():
    async def main() -> None:
        r, w, peer, srv = await loopback_pair()
        gate = bp.Gate(multiplexed=lambda: False)
        reader = bp.GatedReader(r, gate, w.get_extra_info("socket"))
        peer.sendall(b"a" * 1000)
        assert await reader.read(100) == b"a" * 100  # no hook: reads
        hold = gate.begin(_Paused())
        gate.read += bp.BOUND + 1  # as if more than BOUND bytes came in since the hook began
        pending = asyncio.ensure_future(reader.read(100))
        done, _ = await asyncio.wait([pending], timeout=0.3)
        assert not done  # stopped reading (cannot pass by accident: it would have read)
        gate.end(hold)
        assert await asyncio.wait_for(pending, 10) == b"a" * 100
        peer.close()
        w.close()
        srv.close()

    asyncio.run(main())


def test_http2_counts_only_what_waits_behind_the_paused_layer():
    paused = _Paused()
    gate = bp.Gate(multiplexed=lambda: True)
    gate.begin(paused)
    gate.read += 10 * bp.BOUND  # other streams' bytes flowed: not held
    assert not gate.full()
    paused._paused_event_queue.append(events.DataReceived(None, b"x" * (bp.BOUND + 1)))  # type: ignore[arg-type]
    assert gate.full()
    plain = bp.Gate(multiplexed=lambda: False)
    plain.begin(_Paused())
    plain.read += bp.BOUND + 1
    assert plain.full()


def test_tiny_events_are_bounded_by_count():
    paused = _Paused()
    gate = bp.Gate(multiplexed=lambda: True)
    gate.begin(paused)
    paused._paused_event_queue.extend(events.DataReceived(None, b"x") for _ in range(bp.MAX_EVENTS + 1))  # type: ignore[arg-type]
    assert gate.full()


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_paused_reader_reads_again_once_its_peer_is_gone(how, monkeypatch):
    monkeypatch.setattr(bp, "PROBE_EVERY", 0.05)

    async def main() -> None:
        r, w, peer, srv = await loopback_pair()
        gate = bp.Gate(multiplexed=lambda: False)
        reader = bp.GatedReader(r, gate, w.get_extra_info("socket"))
        gate.begin(_Paused())
        gate.read += bp.BOUND + 1
        peer.sendall(b"tail")
        if how == "rst":
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        got = b""
        for _ in range(3):
            try:
                data = await asyncio.wait_for(reader.read(100), 10)
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
        assert got in (b"tail", b"")  # what was in flight, then EOF or the reset: mitmproxy sees the close
        w.close()
        srv.close()

    asyncio.run(main())
