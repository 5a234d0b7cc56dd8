"""The `server_connect` side of pinning: every upstream connection goes to an address a decision checked."""

from __future__ import annotations

import logging

from mitmproxy import connection
from mitmproxy.proxy import server_hooks

from addons.pipeline.dns import PinStore
from addons.policy.hosts import is_ip, normalize_host
from addons.proxy import mitm_compat

log = logging.getLogger(__name__)


class Pinner:
    """The `server_connect` side: point every upstream connection at its checked address.

    A connect that no decision covered is refused. The name is restored once connected, so
    mitmproxy's connection reuse (which compares addresses) keeps working (else the 6th
    keep-alive request on a connection hangs); `peername` keeps the real IP.
    """

    def __init__(self, pins: PinStore) -> None:
        self.pins = pins
        self._orig: dict[str, tuple[str, int]] = {}

    def pin(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.error or data.server.address is None:
            return
        host_raw, port = str(data.server.address[0]), int(data.server.address[1])
        try:
            host = normalize_host(host_raw)
        except ValueError:
            data.server.error = "portcullis: unusable destination"
            return
        pin = self.pins.get(data.client.id, host, port)
        if pin is None:
            log.warning("refused an upstream connection to %s:%s that no decision covered", host, port)
            data.server.error = "portcullis: destination was not checked"
            return
        if not is_ip(host) and data.server.sni is None:
            data.server.sni = host  # upstream TLS is verified against the name, not the pinned IP
        self._orig[data.server.id] = (host_raw, port)
        data.server.address = (pin.ip, port)

    def restore(self, server: connection.Server) -> None:
        orig = self._orig.pop(server.id, None)
        if orig is not None:
            mitm_compat.set_open_server_address(server, orig)

    def forget(self, server: connection.Server) -> None:
        self._orig.pop(server.id, None)
