"""CONNECT tunnels in mitmproxy: the first-layer choice, byte-counting relays, and a closing layer
(the layers themselves, built on mitmproxy's, and the NextLayer addon are in mitm_compat.layers)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy.proxy import layer
from mitmproxy.proxy.context import Context

from addons.pipeline.firstbytes import Relay, handshake_watch
from addons.pipeline.model import Outcome
from addons.proxy import mitm_compat


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


def first_layer(context: Context, t: Tunnel, relay: Relay) -> layer.Layer:
    """The mitmproxy layer that relays an allowed tunnel the way the pipeline judged it."""
    if relay is Relay.INSPECT:
        return mitm_compat.counting_interception(context, t)
    return mitm_compat.CountingRelay(context, t, handshake_watch(t.outcome) if relay is Relay.TLS else None)


def closing_layer(context: Context) -> layer.Layer:
    """Closes the client (and the eagerly opened upstream) without relaying a single byte."""
    return mitm_compat.CloseBoth(context)
