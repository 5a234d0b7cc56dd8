"""mitmproxy's listening sockets: their accept queue, the addresses they are bound to, and accepting
on a socket inherited from the supervisor (`portcullis run --workers N`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any


def listen_addresses(proxyserver_addon: Any) -> list[tuple[Any, ...]]:
    """The addresses mitmproxy's proxyserver addon listens on (empty when it could not bind)."""
    return list(proxyserver_addon.listen_addrs()) if proxyserver_addon is not None else []


def raise_listen_backlog(proxyserver_addon: Any, backlog: int) -> int:
    """Re-listen mitmproxy's listening sockets with a larger accept queue (asyncio's default is 100;
    the kernel caps it at somaxconn). Returns how many sockets were raised."""
    raised = 0
    for instance in getattr(proxyserver_addon, "servers", ()):
        for server in getattr(instance, "_servers", ()):
            for tsock in getattr(server, "sockets", ()):
                with contextlib.suppress(OSError, ValueError):
                    dup = socket.socket(fileno=os.dup(tsock.fileno()))
                    try:
                        dup.listen(backlog)  # applies to the shared socket, not just this descriptor
                        raised += 1
                    finally:
                        dup.close()
    return raised


def listen_on(sock: socket.socket) -> None:
    """Make mitmproxy's regular-mode server accept on `sock` (bound and listening already, shared by
    every worker of `portcullis run --workers N`) instead of binding the listen address itself."""
    from mitmproxy.proxy import mode_servers

    sock.setblocking(False)

    async def listen(self: Any, host: str, port: int) -> list[Any]:
        return [await asyncio.start_server(self.handle_stream, sock=sock)]

    mode_servers.RegularInstance.listen = listen  # type: ignore[method-assign]
