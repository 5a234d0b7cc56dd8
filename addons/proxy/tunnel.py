"""CONNECT tunnels: the first-bytes rule (SNI, raw TCP), byte-counting relays, and a closing layer."""

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

from addons.policy.hosts import is_ip, normalize_host
from addons.proxy.clienthello import FirstBytes, HandshakeWatch, Kind, read_first_bytes


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
    on_refused: Callable[[str], None] | None = None  # a refusal after the first bytes (logged once)


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


@dataclass(frozen=True, slots=True)
class FirstLayer:
    """What to do with a tunnel's first bytes: wait (layer and problem None), relay through `layer`,
    or refuse for `problem` (a second decision about the tunnel, reason sni_mismatch)."""

    layer: layer.Layer | None = None
    problem: str | None = None


def choose_first_layer(context: Context, t: Tunnel, data: bytes, server_spoke: bool) -> FirstLayer:
    """Anything a TLS server would read as a ClientHello must name exactly the authority: no server
    name only for an IP literal or raw_tcp; a server name that is present but unreadable, invalid or
    one of several is refused everywhere. Bytes no server reads as TLS only for raw_tcp (never when
    inspected). Allowed: a byte-counting raw relay, or TLS interception when inspected."""
    fb = read_first_bytes(data)
    if fb.kind is Kind.NEED_MORE:
        if data or not server_spoke:
            return FirstLayer()
        # The server spoke first: not TLS from the client, so only raw_tcp tunnels carry it.
        if t.raw_tcp and not t.inspect:
            return FirstLayer(CountingTunnelLayer(context, t))
        return FirstLayer(problem="the server spoke first (not a TLS tunnel)")
    if fb.kind is Kind.BAD:
        return FirstLayer(problem=fb.problem)
    if fb.kind is Kind.NOT_TLS:
        if t.inspect or not t.raw_tcp:
            return FirstLayer(problem=fb.problem)
        return FirstLayer(CountingTunnelLayer(context, t))
    if problem := sni_problem(t, fb):
        return FirstLayer(problem=problem)
    if t.inspect:
        # What mitmproxy's NextLayer builds for TLS (server TLS over client TLS), counting bytes.
        server_tls = CountingServerTLSLayer(context, t)
        server_tls.child_layer = ClientTLSLayer(context)
        return FirstLayer(server_tls)
    return FirstLayer(CountingTunnelLayer(context, t, HandshakeWatch(lambda hello: sni_problem(t, hello))))


def sni_problem(t: Tunnel, hello: FirstBytes) -> str | None:
    """A ClientHello's server name against the tunnel: equal to the authority, or absent where allowed."""
    if hello.sni is None:
        if not is_ip(t.host) and not t.raw_tcp:
            return "the TLS ClientHello has no server name"
        return None
    try:
        sni: str | None = normalize_host(hello.sni)
    except ValueError:
        sni = None
    if sni != t.host:
        return "the TLS server name differs from the CONNECT host"
    return None
