"""addons/proxy/tunnel.py: the allowed tunnel's state, mitmproxy's NextLayer asking Portcullis first, and
the layer built for each way the pipeline judged a tunnel's first bytes (the relays themselves are
mitmproxy subclasses: tests/proxy/mitm_compat/test_layers.py)."""

from __future__ import annotations

from typing import Any

import pytest
from mitmproxy.options import Options
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.tls import ClientTLSLayer
from mitmproxy.test import taddons, tflow

from addons.pipeline.clienthello import HandshakeWatch
from addons.pipeline.firstbytes import Relay
from addons.pipeline.model import Outcome
from addons.policy.model import Action, Client, Layer, Reason, Request
from addons.proxy.mitm_compat import CloseBoth, CountingRelay, CountingServerTLSLayer, TunnelAwareNextLayer
from addons.proxy.tunnel import Tunnel, closing_layer, first_layer

REQ = Request("public.test", 443, Client("10.0.0.1"), None, "CONNECT", None, Layer.CONNECT, "t1")


def tunnel(inspect: bool = False) -> Tunnel:
    return Tunnel(Outcome(REQ, Action.ALLOW, Reason.RULE, inspect=inspect))


def test_a_new_tunnel_has_carried_nothing_yet() -> None:
    t = tunnel()
    assert (t.bytes_up, t.bytes_down, t.layer_decided, t.refused, t.on_refused) == (0, 0, False, False, None)
    assert t.started > 0 and t.inspect is False and tunnel(inspect=True).inspect is True


def http_proxy_next_layer() -> layer.NextLayer:
    c = tflow.tclient_conn()
    ctx = Context(c, Options())
    ctx.layers = [modes.HttpProxy(ctx)]
    nl = layer.NextLayer(ctx)
    nl.events.append(events.DataReceived(c, b"GET http://public.test/ HTTP/1.1\r\nHost: public.test\r\n\r\n"))
    return nl


@pytest.mark.parametrize("ours", [True, False])
async def test_next_layer_asks_portcullis_first(ours: bool) -> None:
    asked: list[Any] = []

    def first(nl: layer.NextLayer) -> bool:
        asked.append(nl)
        return ours

    addon = TunnelAwareNextLayer(first)
    nl = http_proxy_next_layer()
    with taddons.context(addon) as tctx:
        await tctx.master.addons.invoke_addon(addon, layer.NextLayerHook(nl))
    assert asked == [nl]
    if ours:
        assert nl.layer is None  # Portcullis waits (or chose): mitmproxy builds nothing
    else:
        assert type(nl.layer).__name__ == "HttpLayer"  # mitmproxy's own choice for a plain request


def context() -> Context:
    return Context(tflow.tclient_conn(), Options())


def test_an_inspected_tunnel_is_mitmproxys_interception_stack_counting_bytes() -> None:
    t = tunnel(inspect=True)
    top = first_layer(context(), t, Relay.INSPECT)
    assert isinstance(top, CountingServerTLSLayer) and top.tunnel is t
    assert isinstance(top.child_layer, ClientTLSLayer)


def test_a_passed_through_tls_tunnel_is_a_watched_relay() -> None:
    t = tunnel()
    relay = first_layer(context(), t, Relay.TLS)
    assert isinstance(relay, CountingRelay) and relay.tunnel is t and isinstance(relay.watch, HandshakeWatch)


def test_a_raw_tunnel_is_an_unwatched_relay() -> None:
    relay = first_layer(context(), tunnel(), Relay.RAW)
    assert isinstance(relay, CountingRelay) and relay.watch is None


def test_a_refused_tunnel_gets_the_closing_layer() -> None:
    assert isinstance(closing_layer(context()), CloseBoth)
