"""CONNECT tunnels in mitmproxy: the first-layer choice, byte-counting relays, and a closing layer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy.addons import next_layer
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tcp import TCPLayer
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer

from addons.pipeline.clienthello import HandshakeWatch
from addons.pipeline.firstbytes import Relay, handshake_watch
from addons.pipeline.model import Outcome


@dataclass
class Tunnel:
    """One allowed CONNECT tunnel (one per client connection): its decision and what it carried."""

    outcome: Outcome  # the CONNECT's decision (its request names the authority)
    started: float = field(default_factory=time.monotonic)
    layer_decided: bool = False
    refused: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    on_refused: Callable[[str], None] | None = None  # a refusal after the first bytes (logged once)

    @property
    def inspect(self) -> bool:
        return self.outcome.inspect


class CountingTunnelLayer(TCPLayer):
    """mitmproxy's raw TCP relay without a flow object (nothing stored), counting bytes per direction.

    For TLS, `watch` follows the cleartext handshake: a second ClientHello (after a HelloRetryRequest)
    must name the authority too, else the tunnel is closed before it is relayed.
    """

    def __init__(self, context: Context, tunnel: Tunnel, watch: HandshakeWatch | None = None) -> None:
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

    def __init__(self, context: Context, tunnel: Tunnel) -> None:
        super().__init__(context)
        self.tunnel = tunnel

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.tunnel.bytes_up += len(event.data)
            elif event.connection == self.context.server:
                self.tunnel.bytes_down += len(event.data)
        yield from super()._handle_event(event)


class TunnelAwareNextLayer(next_layer.NextLayer):
    """mitmproxy's NextLayer addon, asking Portcullis first about the first layer of a tunnel.

    One addon, so mitmproxy never builds (and leaves on the context's layer stack) TLS layers that
    Portcullis then replaces; while Portcullis waits for a whole ClientHello, nothing is chosen.
    """

    def __init__(self, first: Callable[[layer.NextLayer], bool]) -> None:
        super().__init__()
        self._first = first

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if self._first(nextlayer):
            return
        super().next_layer(nextlayer)


class CloseClientLayer(layer.Layer):
    """Closes the client (and the eagerly opened upstream) without relaying a single byte."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            if self.context.server.state is not ConnectionState.CLOSED:
                yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)


def first_layer(context: Context, t: Tunnel, relay: Relay) -> layer.Layer:
    """The mitmproxy layer that relays an allowed tunnel the way the pipeline judged it."""
    if relay is Relay.INSPECT:
        # What mitmproxy's NextLayer builds for TLS (server TLS over client TLS), counting bytes.
        server_tls = CountingServerTLSLayer(context, t)
        server_tls.child_layer = ClientTLSLayer(context)
        return server_tls
    watch = handshake_watch(t.outcome) if relay is Relay.TLS else None
    return CountingTunnelLayer(context, t, watch)
