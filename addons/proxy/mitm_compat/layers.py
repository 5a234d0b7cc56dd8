"""Tunnels built from mitmproxy's layers: its NextLayer addon asking Portcullis first, byte-counting
relays on its TCP and TLS layers, a layer that closes both sides, and a pinned upstream's name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mitmproxy import connection
from mitmproxy.addons import next_layer
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tcp import TCPLayer
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer


class TunnelAwareNextLayer(next_layer.NextLayer):
    """mitmproxy's NextLayer addon, asking Portcullis first about the first layer of a tunnel.

    One addon, so mitmproxy never builds (and leaves on the context's layer stack) TLS layers that
    Portcullis then replaces; while Portcullis waits for a whole ClientHello, nothing is chosen.
    """

    name = "nextlayer"  # the built-in's name: mitmproxy's proxyserver looks for it (and warns without)

    def __init__(self, first: Callable[[layer.NextLayer], bool]) -> None:
        super().__init__()
        self._first = first

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if self._first(nextlayer):
            return
        super().next_layer(nextlayer)


def set_open_server_address(server: connection.Server, address: tuple[str, int]) -> None:
    """Give a connected server back the address (name) it was asked for, after pinning dialled an IP.

    mitmproxy's connection reuse compares addresses, so without this every keep-alive request would
    open a new upstream connection (and the per-address connection limit then stalls the sixth).
    `Server.__setattr__` forbids changing `address` while the connection is open; this bypasses it.
    """
    object.__setattr__(server, "address", address)


class Counts(Protocol):
    """What a relay updates: bytes per direction, and who to tell when it refuses the tunnel."""

    bytes_up: int
    bytes_down: int
    on_refused: Callable[[str], None] | None


class Watch(Protocol):
    """Judges the client's bytes of a passed-through TLS handshake (HandshakeWatch)."""

    done: bool

    def client(self, data: bytes) -> str | None: ...
    def server(self, data: bytes) -> None: ...


class CountingRelay(TCPLayer):
    """mitmproxy's raw TCP relay without a flow object (nothing stored), counting bytes per direction.

    For TLS, `watch` follows the cleartext handshake: a second ClientHello (after a HelloRetryRequest)
    must name the authority too, else the tunnel is closed before it is relayed.
    """

    def __init__(self, context: Context, tunnel: Counts, watch: Watch | None = None) -> None:
        super().__init__(context, ignore=True)
        self.tunnel = tunnel
        self.watch = watch
        self.closed = False

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.closed:
            return
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.tunnel.bytes_up += len(event.data)
                if self.watch is not None and (problem := self.watch.client(event.data)):
                    self.closed = True
                    if self.tunnel.on_refused is not None:
                        self.tunnel.on_refused(problem)
                    yield commands.CloseConnection(self.context.server)
                    yield commands.CloseConnection(self.context.client)
                    return
            else:
                self.tunnel.bytes_down += len(event.data)
                if self.watch is not None:
                    self.watch.server(event.data)
            if self.watch is not None and self.watch.done:
                self.watch = None
        yield from super().relay_messages(event)


class CountingServerTLSLayer(ServerTLSLayer):
    """The top of an inspected tunnel (as mitmproxy builds it), counting raw bytes per direction."""

    def __init__(self, context: Context, tunnel: Counts) -> None:
        super().__init__(context)
        self.tunnel = tunnel

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.tunnel.bytes_up += len(event.data)
            elif event.connection == self.context.server:
                self.tunnel.bytes_down += len(event.data)
        yield from super()._handle_event(event)


def counting_interception(context: Context, tunnel: Counts) -> layer.Layer:
    """What mitmproxy's NextLayer builds for TLS it intercepts (server TLS over client TLS), counting."""
    server_tls = CountingServerTLSLayer(context, tunnel)
    server_tls.child_layer = ClientTLSLayer(context)
    return server_tls


class CloseBoth(layer.Layer):
    """Closes the client (and the eagerly opened upstream) without relaying a single byte."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            if self.context.server.state is not ConnectionState.CLOSED:
                yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)
