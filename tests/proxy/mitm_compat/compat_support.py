"""Real loopback connections and mitmproxy connection handlers over them, for the compat tests."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from mitmproxy import options
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler
from mitmproxy.proxy.mode_specs import ProxyMode


async def loopback_pair() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, socket.socket, Any]:
    """A real loopback TCP connection: the server side as asyncio streams, the client as a socket,
    and the server (close it when done)."""
    got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    srv = await asyncio.start_server(lambda r, w: got.set_result((r, w)), "127.0.0.1", 0)
    peer = socket.create_connection(srv.sockets[0].getsockname()[:2])
    r, w = await got
    return r, w, peer, srv


def proxy_handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> ProxyConnectionHandler:
    """mitmproxy's handler of one regular-mode proxy client connection over `r`/`w`."""
    return ProxyConnectionHandler(None, r, w, options.Options(), ProxyMode.parse("regular"))
