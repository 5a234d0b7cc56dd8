"""mitm_compat.sockets: where mitmproxy keeps its listening sockets, and how its servers listen."""

from __future__ import annotations

import inspect
import socket
from typing import Any

import pytest

from addons.proxy import mitm_compat


def test_raise_listen_backlog_reaches_the_listening_sockets() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)

        class Server:
            sockets = (s,)

        class Instance:
            _servers = (Server(),)

        class Proxyserver:
            servers = (Instance(),)

        assert mitm_compat.raise_listen_backlog(Proxyserver(), 64) == 1
        assert s.fileno() >= 0  # the shared socket stays open (only the dup was closed)
    assert mitm_compat.raise_listen_backlog(object(), 64) == 0


def test_the_proxyserver_keeps_its_asyncio_servers_where_the_backlog_helper_looks() -> None:
    # raise_listen_backlog walks proxyserver.servers -> instance._servers -> server.sockets.
    from mitmproxy.addons import proxyserver
    from mitmproxy.proxy import mode_servers

    assert "self._servers = await self.listen(" in inspect.getsource(mode_servers.AsyncioServerInstance)
    assert "self.servers = Servers(self)" in inspect.getsource(proxyserver.Proxyserver.__init__)
    assert "__iter__" in vars(proxyserver.Servers)  # iterating it yields the server instances


def test_listen_addresses_are_the_proxyservers() -> None:
    from mitmproxy.addons import proxyserver

    src = inspect.getsource(proxyserver.Proxyserver.listen_addrs)
    assert "for server in self.servers for addr in server.listen_addrs" in src
    assert mitm_compat.listen_addresses(proxyserver.Proxyserver()) == []  # nothing bound yet
    assert mitm_compat.listen_addresses(None) == []


def test_the_regular_server_listens_through_the_method_listen_on_replaces() -> None:
    from mitmproxy.proxy import mode_servers

    listen = inspect.unwrap(mode_servers.AsyncioServerInstance.listen)
    assert list(inspect.signature(listen).parameters) == ["self", "host", "port"]
    assert "listen" not in vars(mode_servers.RegularInstance)  # the regular mode inherits it
    handle = inspect.signature(mode_servers.ServerInstance.handle_stream)
    assert list(handle.parameters)[:3] == ["self", "reader", "writer"]
    assert "await asyncio.start_server(" in inspect.getsource(listen)  # what the replacement does too


async def test_listen_on_accepts_on_the_inherited_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from mitmproxy.proxy import mode_servers

    # monkeypatch restores mitmproxy's own listen after the test.
    monkeypatch.setattr(mode_servers.RegularInstance, "listen", mode_servers.RegularInstance.listen)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    accepted = asyncio.Event()

    class Instance:
        async def handle_stream(self, reader: Any, writer: Any) -> None:
            accepted.set()
            writer.close()

    mitm_compat.listen_on(sock)
    (server,) = await mode_servers.RegularInstance.listen(Instance(), "ignored", 1)  # type: ignore[arg-type]
    try:
        _, writer = await asyncio.open_connection(*sock.getsockname())
        await asyncio.wait_for(accepted.wait(), 10)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
