"""Layers for CONNECT tunnels: a byte-counting passthrough and a layer that just closes the client."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy.addons import next_layer
from mitmproxy.connection import ConnectionState
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tcp import TCPLayer
from mitmproxy.proxy.layers.tls import ServerTLSLayer, parse_client_hello


@dataclass
class Tunnel:
    """What the proxy knows about one allowed CONNECT tunnel (one per client connection)."""

    host: str  # normalised authority
    port: int
    flow_id: str
    inspect: bool
    raw_tcp: bool
    rule: str | None
    rule_file: str | None
    rule_line: int | None
    client_name: str | None
    client_user: str | None
    ip: str | None
    started: float = field(default_factory=time.monotonic)
    layer_decided: bool = False
    refused: bool = False
    bytes_up: int = 0
    bytes_down: int = 0


class CountingTunnelLayer(TCPLayer):
    """mitmproxy's raw TCP relay without a flow object (nothing stored), counting bytes per direction."""

    def __init__(self, context: Context, tunnel: Tunnel) -> None:
        super().__init__(context, ignore=True)
        self.tunnel = tunnel

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.tunnel.bytes_up += len(event.data)
            else:
                self.tunnel.bytes_down += len(event.data)
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


@dataclass(frozen=True, slots=True)
class FirstBytes:
    """Verdict on a tunnel's first client bytes."""

    need_more: bool = False
    tls: bool = False
    sni: str | None = None
    alpn: tuple[bytes, ...] = ()
    problem: str | None = None  # why these bytes are not an acceptable ClientHello


def inspect_first_bytes(data: bytes) -> FirstBytes:
    """Is this the start of a TLS ClientHello, and what SNI does it carry?"""
    if not data:
        return FirstBytes(need_more=True)
    if not starts_like_tls_record(data):
        if len(data) < 3 and data[0] == 0x16:
            return FirstBytes(need_more=True)
        return FirstBytes(problem="first bytes are not a TLS ClientHello")
    try:
        ch = parse_client_hello(data)
    except ValueError as e:
        return FirstBytes(problem=f"unparsable TLS ClientHello: {e}")
    if ch is None:
        return FirstBytes(need_more=True)
    return FirstBytes(tls=True, sni=ch.sni, alpn=tuple(ch.alpn_protocols))
