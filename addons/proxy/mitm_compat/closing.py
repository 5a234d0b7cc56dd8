"""A connection mitmproxy closes is closed, whatever its reader was doing (mitmproxy private APIs).

`ConnectionHandler.handle_connection` reads a connection until EOF and closes its writer at the end.
A `CloseConnection` from a layer cancels that task. When the cancellation lands while the task waits
for the server-event lock (it read more bytes and queues them behind another event, typically a hook
replaying what it held), the CancelledError leaves `handle_connection` before its `writer.close()`:
mitmproxy forgets the connection, the socket stays open and unread, and its sender blocks until the
socket is garbage collected. Seen through the real proxy: a 400 for bytes pipelined behind a held
request was sent, and the connection then stayed open with the client's send blocked (measured: >60 s).

Here a cancellation that escapes `handle_connection` with the connection still registered closes its
writer and removes it, as the normal end of `handle_connection` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine
from typing import Any

_INSTALLED = "_portcullis_closing_installed"


def install() -> None:
    """Patch `ConnectionHandler.handle_connection` (idempotent)."""
    from mitmproxy.proxy.server import ConnectionHandler

    if getattr(ConnectionHandler, _INSTALLED, False):
        return
    original: Callable[..., Coroutine[Any, Any, None]] = ConnectionHandler.handle_connection

    @functools.wraps(original)
    async def handle_connection(self: Any, connection: Any) -> None:
        try:
            await original(self, connection)
        except asyncio.CancelledError:
            close_forgotten(self.transports, connection)
            raise

    ConnectionHandler.handle_connection = handle_connection  # type: ignore[method-assign]
    setattr(ConnectionHandler, _INSTALLED, True)


def close_forgotten(transports: dict[Any, Any], connection: Any) -> bool:
    """Close and drop `connection` when handle_connection left it registered; True when it did."""
    io = transports.get(connection)
    if io is None:
        return False  # closed by handle_connection itself (the usual way out of a cancellation)
    writer = getattr(io, "writer", None)
    if writer is not None:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()
    transports.pop(connection, None)
    return True
