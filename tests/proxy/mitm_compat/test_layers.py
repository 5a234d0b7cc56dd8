"""mitm_compat.layers: the relays built on mitmproxy's TCP/TLS layers, driven with its own events, the
NextLayer addon Portcullis subclasses, and the pinned server's address."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy.connection import ConnectionState
from mitmproxy.options import Options
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer
from mitmproxy.test import taddons, tflow

from addons.proxy import mitm_compat


class Counts:
    def __init__(self) -> None:
        self.bytes_up = 0
        self.bytes_down = 0
        self.refusals: list[str] = []
        self.on_refused: Callable[[str], None] | None = self.refusals.append


class Watch:
    """Refuses the client bytes that contain b"evil"; done once the server said b"done"."""

    def __init__(self) -> None:
        self.done = False
        self.seen: list[bytes] = []

    def client(self, data: bytes) -> str | None:
        self.seen.append(data)
        return "evil bytes" if b"evil" in data else None

    def server(self, data: bytes) -> None:
        self.done = b"done" in data


def open_context() -> Context:
    ctx = Context(tflow.tclient_conn(), Options())
    ctx.server = tflow.tserver_conn()
    ctx.server.state = ConnectionState.OPEN
    ctx.server.timestamp_start = 1.0
    return ctx


def run(gen: Any) -> list[Any]:
    """Every command a layer yields for one event (none of them block here)."""
    out: list[Any] = []
    try:
        cmd = next(gen)
        while True:
            out.append(cmd)
            cmd = gen.send(None)
    except StopIteration:
        return out


def test_the_counting_relay_relays_and_counts_each_direction() -> None:
    ctx, t = open_context(), Counts()
    relay = mitm_compat.CountingRelay(ctx, t)
    assert run(relay.handle_event(events.Start())) == []  # the upstream is already open (eager connect)
    (up,) = run(relay.handle_event(events.DataReceived(ctx.client, b"hello")))
    (down,) = run(relay.handle_event(events.DataReceived(ctx.server, b"world!")))
    assert isinstance(up, commands.SendData) and (up.connection, up.data) == (ctx.server, b"hello")
    assert isinstance(down, commands.SendData) and (down.connection, down.data) == (ctx.client, b"world!")
    assert (t.bytes_up, t.bytes_down) == (5, 6)
    assert relay.flow is None  # nothing stored: no TCP flow object (ignore=True)


def test_a_watch_that_refuses_closes_both_sides_before_relaying() -> None:
    ctx, t, w = open_context(), Counts(), Watch()
    relay = mitm_compat.CountingRelay(ctx, t, w)
    run(relay.handle_event(events.Start()))
    assert [type(c) for c in run(relay.handle_event(events.DataReceived(ctx.client, b"ok")))] == [
        commands.SendData
    ]
    cmds = run(relay.handle_event(events.DataReceived(ctx.client, b"evil")))
    assert [(type(c), c.connection) for c in cmds] == [
        (commands.CloseConnection, ctx.server),
        (commands.CloseConnection, ctx.client),
    ]
    assert t.refusals == ["evil bytes"] and relay.closed
    assert run(relay.handle_event(events.DataReceived(ctx.client, b"more"))) == []  # nothing after the close
    assert (t.bytes_up, t.bytes_down) == (6, 0)


def test_a_finished_watch_is_dropped() -> None:
    ctx, t, w = open_context(), Counts(), Watch()
    relay = mitm_compat.CountingRelay(ctx, t, w)
    run(relay.handle_event(events.Start()))
    run(relay.handle_event(events.DataReceived(ctx.server, b"done")))
    assert relay.watch is None
    (sent,) = run(relay.handle_event(events.DataReceived(ctx.client, b"evil, but encrypted by now")))
    assert isinstance(sent, commands.SendData) and w.seen == [] and t.refusals == []


def test_close_both_closes_an_open_upstream_and_the_client() -> None:
    ctx = open_context()
    cmds = run(mitm_compat.CloseBoth(ctx).handle_event(events.Start()))
    assert [(type(c), c.connection) for c in cmds] == [
        (commands.CloseConnection, ctx.server),
        (commands.CloseConnection, ctx.client),
    ]
    ctx.server.state = ConnectionState.CLOSED
    (only,) = run(mitm_compat.CloseBoth(ctx).handle_event(events.Start()))
    assert (type(only), only.connection) == (commands.CloseConnection, ctx.client)


def test_the_counting_interception_stack_is_what_mitmproxy_builds() -> None:
    t = Counts()
    top = mitm_compat.counting_interception(open_context(), t)
    assert isinstance(top, ServerTLSLayer) and isinstance(top.child_layer, ClientTLSLayer)
    assert top.tunnel is t  # type: ignore[attr-defined]


def test_an_open_server_gets_its_name_back() -> None:
    server = tflow.tserver_conn()
    server.state = ConnectionState.OPEN
    with pytest.raises(RuntimeError):  # what mitmproxy forbids, and the helper bypasses
        server.address = ("public.test", 443)
    mitm_compat.set_open_server_address(server, ("public.test", 443))
    assert server.address == ("public.test", 443)


def test_the_counting_tls_layer_sees_every_event_of_mitmproxys_tls_layer() -> None:
    from mitmproxy.proxy import tunnel
    from mitmproxy.proxy.layers import tls

    # Events reach a TLS layer through TunnelLayer._handle_event, which neither TLS class overrides.
    assert "_handle_event" in vars(tunnel.TunnelLayer)
    assert not {"_handle_event", "handle_event"} & (set(vars(tls.TLSLayer)) | set(vars(tls.ServerTLSLayer)))
    ctx, t = open_context(), Counts()
    top = mitm_compat.counting_interception(ctx, t)
    run(top.handle_event(events.Start()))
    assert run(top.handle_event(events.DataReceived(ctx.client, b"\x16\x03\x01\x00"))) == []  # waits for more
    assert (t.bytes_up, t.bytes_down) == (4, 0)


def test_the_nextlayer_addon_is_subclassed_as_mitmproxy_builds_it() -> None:
    from mitmproxy.addons import next_layer, proxyserver

    # TunnelAwareNextLayer calls NextLayer() without arguments and defers to its hook method, which
    # leaves a layer another addon (Portcullis) chose alone.
    assert "__init__" not in vars(next_layer.NextLayer)
    src = inspect.getsource(next_layer.NextLayer.next_layer)
    assert "if nextlayer.layer:" in src and "return  # do not override" in src
    # The proxyserver looks the addon up by the built-in's name (it warns when none has it).
    assert 'ctx.master.addons.get("nextlayer")' in inspect.getsource(proxyserver.Proxyserver.configure)
    addon = mitm_compat.TunnelAwareNextLayer(lambda nl: False)
    with taddons.context(addon) as tctx:
        assert tctx.master.addons.get("nextlayer") is addon
