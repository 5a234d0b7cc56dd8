"""The Portcullis mitmproxy addon: decides every request and tunnel, pins upstreams, checks SNI."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import connection, http
from mitmproxy.proxy import layer, server_hooks
from mitmproxy.proxy.layers import ClientTLSLayer

from addons.policy.hosts import is_ip, normalize_host
from addons.policy.model import Reason
from addons.proxy.auth import AuthResult, ProxyAuth
from addons.proxy.hostcheck import same_destination
from addons.proxy.pinning import PinStore
from addons.proxy.responses import DECISION_HEADER, deny_response, upstream_error_response
from addons.proxy.tunnel import (
    CloseClientLayer,
    CountingServerTLSLayer,
    CountingTunnelLayer,
    Tunnel,
    inspect_first_bytes,
)
from addons.proxy.verdict import Decider, Request, Verdict, record, refusal

log = logging.getLogger(__name__)


@dataclass
class ConnState:
    """Per client connection: the allowed tunnel (if this connection became one)."""

    tunnel: Tunnel | None = None


def _client_alive(client: connection.Client) -> bool:
    # mitmproxy keeps reading while a hook is pending and clears CAN_READ on EOF (notes §1).
    return bool(client.state & connection.ConnectionState.CAN_READ)


def _path_only(path: str) -> str:
    """The request path without query string or fragment (never logged)."""
    if path == "*":
        return path
    p = urlsplit(path).path if "://" in path else path.split("?", 1)[0].split("#", 1)[0]
    return p or "/"


class Portcullis:
    """One instance per proxy. Every decision produces exactly one telemetry.decision() call."""

    def __init__(
        self,
        decider: Decider,
        telemetry: Any,
        auth: ProxyAuth,
        pins: PinStore,
        client_cidrs: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    ) -> None:
        self.decider = decider
        self.telemetry = telemetry
        self.auth = auth
        self.pins = pins
        self.client_cidrs = tuple(client_cidrs)
        self.conns: dict[str, ConnState] = {}
        self._orig_address: dict[str, tuple[str, int]] = {}

    # ---- helpers -------------------------------------------------------------------------------
    def _conn(self, client_id: str) -> ConnState:
        st = self.conns.get(client_id)
        if st is None:
            st = self.conns[client_id] = ConnState()
        return st

    def _log(self, req: Request, v: Verdict) -> None:
        try:
            self.telemetry.decision(record(req, v))
        except Exception:
            log.exception("could not record a decision")

    def _client_name(self, address: str | None, user: str | None) -> str | None:
        try:
            return self.decider.holder.policy.client_name(address, user)
        except Exception:
            return None

    @staticmethod
    def _respond(flow: http.HTTPFlow, req: Request, v: Verdict) -> None:
        if v.status == 502:
            flow.response = upstream_error_response(req.host, req.port, v.detail or "upstream failed")
            return
        flow.response = deny_response(
            v.reason,
            req.host,
            req.port,
            rule=v.rule.name if v.rule else None,
            approval_id=v.approval_id,
            detail=v.detail,
            retry_after=v.retry_after,
            status=v.status or 403,
        )

    def _base_request(
        self,
        flow: http.HTTPFlow,
        host: str,
        port: int,
        layer_name: str,
        user: str | None,
        scheme: str | None,
        method: str | None,
        path: str | None,
    ) -> Request:
        peer = flow.client_conn.peername
        return Request(
            host=host,
            port=port,
            scheme=scheme,
            method=method,
            path=path,
            client_id=flow.client_conn.id,
            client_address=str(peer[0]) if peer else None,
            client_port=int(peer[1]) if peer else None,
            client_user=user,
            flow_id=flow.id,
            layer=layer_name,
        )

    async def _finish(self, flow: http.HTTPFlow, req: Request, v: Verdict) -> None:
        self._log(req, v)
        if not v.passes:
            self._respond(flow, req, v)
        else:
            flow.request.stream = True  # decided on headers: the body is relayed, never buffered

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Portcullis never looks at response bodies: stream them all (server-sent events from model
        # APIs arrive as they are sent; large downloads are not held in memory).
        if flow.response is not None:
            flow.response.stream = True

    # ---- plain HTTP and requests inside inspected tunnels -----------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            await self._requestheaders(flow)
        except Exception:
            # Last resort (the decision path has its own handler): never let an undecided request pass.
            log.exception("requestheaders failed; killing the flow")
            flow.kill()  # type: ignore[no-untyped-call]

    async def _requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        st = self._conn(flow.client_conn.id)
        tunnel = st.tunnel
        raw_host = flow.request.host
        req = self._base_request(
            flow,
            raw_host,
            flow.request.port,
            "inspected" if tunnel else "http",
            tunnel.client_user if tunnel else None,
            flow.request.scheme,
            flow.request.method,
            None,
        )
        try:
            req, v = await self._judge_request(flow, req, tunnel)
        except Exception:
            log.exception("decision failed")
            v = refusal(req, Reason.INTERNAL_ERROR, client_name=None)
        await self._finish(flow, req, v)

    async def _judge_request(
        self, flow: http.HTTPFlow, req: Request, tunnel: Tunnel | None
    ) -> tuple[Request, Verdict]:
        r = flow.request
        path = _path_only(r.path) if r.method != "CONNECT" else None
        scheme = r.scheme
        if r.headers.get("upgrade", "").lower() == "websocket":
            scheme = "wss" if scheme == "https" else "ws"
        req.path, req.scheme = path, scheme
        proxy_authz = r.headers.pop("proxy-authorization", None)  # never forwarded upstream
        if tunnel is None:
            res, user = self.auth.check(proxy_authz, req.client_address)
            if res is AuthResult.BAD:
                return req, refusal(req, Reason.PROXY_AUTH, status=407)
            req.client_user = user
        try:
            host = normalize_host(r.host)
        except ValueError as e:
            return req, refusal(
                req,
                Reason.BAD_REQUEST,
                detail=str(e),
                client_name=self._client_name(req.client_address, req.client_user),
            )
        req.host = host
        cname = self._client_name(req.client_address, req.client_user)
        if r.method == "PRI" or r.path == "*":
            return req, refusal(req, Reason.BAD_REQUEST, detail="not a proxy request", client_name=cname)
        if len(r.headers.get_all("host")) > 1:
            return req, refusal(
                req, Reason.BAD_REQUEST, detail="more than one Host header", client_name=cname
            )
        # On the proxy port mitmproxy has already turned an origin-form request into one for its Host
        # header (and cleared the HTTP/1 authority), so the target and Host agree by construction there.
        # Inside a tunnel every request must name exactly the CONNECT authority.
        if tunnel is not None and (host != tunnel.host or req.port != tunnel.port):
            return req, refusal(
                req,
                Reason.HOST_MISMATCH,
                client_name=cname,
                detail=f"request names {host}:{req.port} inside a tunnel to {tunnel.host}:{tunnel.port}",
            )
        hh = r.host_header
        if r.authority and not same_destination(r.authority, host, req.port, r.scheme):
            return req, refusal(
                req, Reason.HOST_MISMATCH, client_name=cname, detail="the request target names another host"
            )
        if hh is not None and not same_destination(hh, host, req.port, r.scheme):
            return req, refusal(
                req,
                Reason.HOST_MISMATCH,
                client_name=cname,
                detail="the Host header differs from the request target",
            )
        if r.headers.get("upgrade", "").lower() == "h2c":
            # mitmproxy cannot relay h2c; drop the upgrade so the connection stays HTTP/1 (and judged).
            for name in ("upgrade", "http2-settings"):
                r.headers.pop(name, None)
            r.headers.pop("connection", None)
        v = await self.decider.decide(req, lambda: _client_alive(flow.client_conn))
        return req, v

    # ---- CONNECT ----------------------------------------------------------------------------------
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        try:
            await self._http_connect(flow)
        except Exception:
            log.exception("http_connect failed; killing the flow")
            st = self.conns.get(flow.client_conn.id)
            if st is not None and st.tunnel is not None and st.tunnel.flow_id == flow.id:
                st.tunnel = None
            flow.kill()  # type: ignore[no-untyped-call]

    async def _http_connect(self, flow: http.HTTPFlow) -> None:
        st = self._conn(flow.client_conn.id)
        req = self._base_request(
            flow, flow.request.host, flow.request.port, "connect", None, None, "CONNECT", None
        )
        try:
            req, v = await self._judge_connect(flow, req, st)
        except Exception:
            log.exception("CONNECT decision failed")
            v = refusal(req, Reason.INTERNAL_ERROR)
        self._log(req, v)
        if not v.passes:
            self._respond(flow, req, v)
            return
        rule = v.rule
        st.tunnel = Tunnel(
            host=req.host,
            port=req.port,
            flow_id=flow.id,
            inspect=v.inspect,
            raw_tcp=v.raw_tcp,
            rule=rule.name if rule else None,
            rule_file=rule.file if rule else None,
            rule_line=rule.line if rule else None,
            client_name=v.client_name,
            client_user=req.client_user,
            ip=v.ip,
        )
        self.telemetry.metrics.tunnels_open.inc()

    async def _judge_connect(
        self, flow: http.HTTPFlow, req: Request, st: ConnState
    ) -> tuple[Request, Verdict]:
        r = flow.request
        if st.tunnel is not None:
            return req, refusal(req, Reason.HOST_MISMATCH, detail="CONNECT inside a tunnel")
        res, user = self.auth.check(r.headers.get("proxy-authorization"), req.client_address)
        if res is AuthResult.BAD:
            return req, refusal(req, Reason.PROXY_AUTH, status=407)
        req.client_user = user
        try:
            host = normalize_host(r.host)
        except ValueError as e:
            return req, refusal(
                req,
                Reason.BAD_REQUEST,
                detail=str(e),
                client_name=self._client_name(req.client_address, user),
            )
        req.host = host
        return req, await self.decider.decide(req, lambda: _client_alive(flow.client_conn))

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's own 502 for a failed eager connect: replace it, keeping decision=allow visible.
        resp = flow.response
        if resp is not None and resp.status_code == 502 and DECISION_HEADER not in resp.headers:
            msg = resp.get_text(strict=False) or "connect failed"
            flow.response = upstream_error_response(
                flow.request.host, flow.request.port, msg.split(" If you")[0]
            )
            st = self.conns.get(flow.client_conn.id)
            if st is not None and st.tunnel is not None and st.tunnel.flow_id == flow.id:
                st.tunnel = None
                self.telemetry.metrics.tunnels_open.dec()

    # ---- tunnel first bytes: SNI and raw TCP ------------------------------------------------------
    def tunnel_next_layer(self, nl: layer.NextLayer) -> bool:
        """Called by TunnelAwareNextLayer before mitmproxy's own choice. True when this is the first
        layer of an allowed tunnel, which is ours to choose (or to wait for more bytes on)."""
        st = self.conns.get(nl.context.client.id)
        t = st.tunnel if st else None
        if t is None or t.layer_decided:
            return False
        if t.refused:
            return True
        try:
            self._tunnel_layer(nl, t)
        except Exception:
            log.exception("tunnel layer decision failed")
            self._refuse_tunnel(nl, t, "internal error")
        return True

    def _tunnel_layer(self, nl: layer.NextLayer, t: Tunnel) -> None:
        data: bytes = nl.data_client()  # type: ignore[no-untyped-call]
        fb = inspect_first_bytes(data)
        if fb.need_more:
            if not data and nl.data_server():  # type: ignore[no-untyped-call]
                # The server spoke first: not TLS from the client, so only raw_tcp tunnels carry it.
                if t.raw_tcp and not t.inspect:
                    t.layer_decided = True
                    nl.layer = CountingTunnelLayer(nl.context, t)
                else:
                    self._refuse_tunnel(nl, t, "the server spoke first (not a TLS tunnel)")
                return
            nl.layer = None  # wait for the whole ClientHello
            return
        problem: str | None = None
        if fb.tls:
            if fb.sni is None:
                if not is_ip(t.host) and not t.raw_tcp:
                    problem = "the TLS ClientHello has no server name"
            else:
                try:
                    sni = normalize_host(fb.sni)
                except ValueError:
                    sni = None
                if sni != t.host:
                    problem = "the TLS server name differs from the CONNECT host"
        elif t.inspect or not t.raw_tcp:
            problem = fb.problem or "not TLS"
        if problem is not None:
            self._refuse_tunnel(nl, t, problem)
            return
        t.layer_decided = True
        if fb.tls and t.inspect:
            # What mitmproxy's NextLayer builds for TLS (server TLS over client TLS), counting bytes.
            server_tls = CountingServerTLSLayer(nl.context, t)
            server_tls.child_layer = ClientTLSLayer(nl.context)
            nl.layer = server_tls
            return
        nl.layer = CountingTunnelLayer(nl.context, t)

    def _refuse_tunnel(self, nl: layer.NextLayer, t: Tunnel, detail: str) -> None:
        """An allowed CONNECT whose first bytes break the rules: a second decision on the same tunnel."""
        peer = nl.context.client.peername
        req = Request(
            host=t.host,
            port=t.port,
            scheme=None,
            method="CONNECT",
            path=None,
            client_id=nl.context.client.id,
            client_address=str(peer[0]) if peer else None,
            client_port=int(peer[1]) if peer else None,
            client_user=t.client_user,
            flow_id=t.flow_id,
            layer="connect",
        )
        v = Verdict(
            False,
            "deny",
            Reason.SNI_MISMATCH.value,
            t.host,
            t.port,
            client_name=t.client_name,
            ip=t.ip,
            detail=detail,
        )
        self._log(req, v)  # enforced even in audit mode: a mismatched SNI is a bypass, not a rule question
        t.refused = True
        nl.layer = CloseClientLayer(nl.context)

    # ---- pinning ------------------------------------------------------------------------------------
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            self._pin(data)
        except Exception:
            log.exception("pinning failed; refusing the upstream connection")
            data.server.error = "portcullis: internal error"

    def _pin(self, data: server_hooks.ServerConnectionHookData) -> None:
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
            # Every upstream connection must go to an address the policy checked for this client.
            log.warning("refused an upstream connection to %s:%s that no decision covered", host, port)
            data.server.error = "portcullis: destination was not checked"
            return
        if not is_ip(host) and data.server.sni is None:
            data.server.sni = host  # upstream TLS is verified against the name, not the pinned IP
        self._orig_address[data.server.id] = (host_raw, port)
        data.server.address = (pin.ip, port)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore(data.server)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore(data.server)

    def _restore(self, server: connection.Server) -> None:
        # Put the name back so mitmproxy reuses this upstream connection (notes §3: else the 6th
        # keep-alive request hangs); peername keeps the real IP.
        orig = self._orig_address.pop(server.id, None)
        if orig is not None:
            object.__setattr__(server, "address", orig)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def client_connected(self, client: connection.Client) -> None:
        # mitmproxy's default (its Block addon, not loaded here): a proxy is not for clients on the
        # public internet. A global client address is refused unless a configured client group names it.
        peer = client.peername
        if not peer:
            return
        try:
            addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except ValueError:
            return
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.is_global and not any(addr.version == n.version and addr in n for n in self.client_cidrs):
            log.warning("refused a client from a public address %s (add it to a clients: cidrs group)", addr)
            client.error = "Portcullis: clients from public addresses are not served"

    def client_disconnected(self, client: connection.Client) -> None:
        st = self.conns.pop(client.id, None)
        self.pins.drop_client(client.id)
        if st is None or st.tunnel is None:
            return
        t = st.tunnel
        self.telemetry.metrics.tunnels_open.dec()
        if not t.refused:
            try:
                self.telemetry.emit(
                    "tunnel.closed",
                    flow_id=t.flow_id,
                    host=t.host,
                    port=t.port,
                    bytes_up=t.bytes_up,
                    bytes_down=t.bytes_down,
                    duration_s=round(time.monotonic() - t.started, 3),
                    inspected=t.inspect,
                )
            except Exception:
                log.exception("could not emit tunnel.closed")

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._orig_address.pop(data.server.id, None)
