"""addons/proxy/mitm_compat/closing.py: the mitmproxy internals it relies on (each test breaks when an
upgrade changes one), and a cancelled reader's connection closed, on a real loopback socket.
End-to-end: tests/proxy/e2e/test_backpressure.py (bytes pipelined behind a held GET)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from mitmproxy.proxy import server

from addons.proxy.mitm_compat import closing
from tests.proxy.mitm_compat.compat_support import loopback_pair, proxy_handler


def test_handle_connection_closes_the_writer_and_unregisters_at_its_end_only():
    # What the patch completes: the writer is closed and the connection popped at the end of
    # handle_connection, after a server_event that is outside the try catching CancelledError.
    method = server.ConnectionHandler.handle_connection
    src = inspect.getsource(getattr(method, "__wrapped__", method))
    assert "writer.close()" in src and "self.transports.pop(connection)" in src
    handing_on = src.index("await self.server_event(events.DataReceived(connection, data))")
    assert handing_on < src.index("writer.close()")
    assert list(inspect.signature(method).parameters) == ["self", "connection"]
    assert "async with self._server_event_lock" in inspect.getsource(server.ConnectionHandler.server_event)


def test_a_reader_cancelled_while_waiting_for_the_event_lock_still_closes_its_connection():
    closing.install()

    async def main() -> None:
        r, w, peer, srv = await loopback_pair()
        h = proxy_handler(r, w)
        await h._server_event_lock.acquire()  # another event (a hook's replay) is being handled
        task = asyncio.ensure_future(h.handle_connection(h.client))
        peer.sendall(b"more bytes")  # read, then handed to server_event: it waits for the lock
        for _ in range(100):
            await asyncio.sleep(0.01)
            if h._server_event_lock._waiters:
                break
        assert h._server_event_lock._waiters, "the reader never reached the lock"
        task.cancel()  # what close_connection does for a layer's CloseConnection
        await asyncio.gather(task, return_exceptions=True)
        assert h.client not in h.transports and w.is_closing()
        peer.settimeout(5)
        assert peer.recv(100) == b""  # the peer sees the close at once
        h._server_event_lock.release()
        peer.close()
        srv.close()

    asyncio.run(main())


def test_the_usual_way_out_is_left_alone():
    class IO:
        def __init__(self) -> None:
            self.writer = None

    transports: dict[Any, Any] = {}
    assert closing.close_forgotten(transports, "client") is False
    transports["client"] = IO()
    assert closing.close_forgotten(transports, "client") is True and transports == {}
