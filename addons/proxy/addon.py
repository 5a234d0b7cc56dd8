"""The Portcullis mitmproxy addon: decides every request and tunnel, pins upstreams, checks SNI."""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import connection, http
from mitmproxy.proxy import layer, server_hooks

from addons.policy.authority import same_destination
from addons.policy.hosts import normalize_host
from addons.policy.model import Reason
from addons.proxy.auth import AuthResult, ProxyAuth, public_client_refusal
from addons.proxy.mitm_compat import Refusal, already_refused
from addons.proxy.pinning import Pinner, PinStore
from addons.proxy.requestform import request_problem
from addons.proxy.responses import DECISION_HEADER, deny_response, upstream_error_response
from addons.proxy.tunnel import CloseClientLayer, FirstLayer, Tunnel, choose_first_layer
from addons.proxy.verdict import Decider, Request, Verdict, record, refusal
from addons.telemetry.record import DecisionRecord

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
        self.pinner = Pinner(pins)

    # ---- helpers -------------------------------------------------------------------------------
    def _conn(self, client_id: str) -> ConnState:
        st = self.conns.get(client_id)
        if st is None:
            st = self.conns[client_id] = ConnState()
        return st

    def _log(self, req: Request, v: Verdict) -> None:
        try:
            self._record(record(req, v))
        except Exception:
            log.exception("could not record a decision")

    def _record(self, rec: DecisionRecord) -> None:
        try:
            self.telemetry.decision(rec)
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
        if flow.error is not None or already_refused(flow.request):
            # mitmproxy refuses this request itself (malformed framing): its error page is the
            # answer, and that refusal is the one decision logged (record_refusal).
            if flow.error is None:
                flow.kill()  # type: ignore[no-untyped-call]
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
        # Inside a tunnel the CONNECT's identity applies; credentials are checked only outside.
        if (refused := self._identify(req, r.host, proxy_authz, check_auth=tunnel is None)) is not None:
            return req, refused
        host = req.host
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
        # Framing a lenient upstream could read differently (line folding, bare CR, control bytes,
        # a target that is not a plain path) is refused, never forwarded.
        absolute_form = tunnel is not None and bool(r.data.authority) and r.http_version.startswith("HTTP/1")
        if problem := request_problem(
            r.data.method, r.scheme, r.data.path, r.headers.fields, absolute_form=absolute_form
        ):
            return req, refusal(req, Reason.BAD_REQUEST, detail=problem, client_name=cname)
        if r.headers.get("upgrade", "").lower() == "h2c":
            # mitmproxy cannot relay h2c; drop the upgrade so the connection stays HTTP/1 (and judged).
            for name in ("upgrade", "http2-settings"):
                r.headers.pop(name, None)
            r.headers.pop("connection", None)
        v = await self.decider.decide(req, lambda: _client_alive(flow.client_conn))
        return req, v

    def record_refusal(self, r: Refusal) -> None:
        """A request mitmproxy refused by itself (malformed, before or without a hook): one decision."""
        st = self.conns.get(r.client.id)
        tunnel = st.tunnel if st else None
        peer = r.client.peername
        address = str(peer[0]) if peer else None
        req = r.request
        host: str | None = None
        port: int | None = None
        if tunnel is not None:
            host, port = tunnel.host, tunnel.port
        elif req is not None and req.host:
            try:
                host = normalize_host(req.host)
            except ValueError:
                host = None
            port = req.port or None
        method = req.method if req is not None and req.method.isascii() and req.method.isalpha() else None
        self._record(
            DecisionRecord(
                decision="deny",
                reason=Reason.BAD_REQUEST.value,
                enforced=True,
                host=host,
                port=port,
                flow_id=str(uuid.uuid4()),
                client_address=address,
                client_port=int(peer[1]) if peer else None,
                client_name=self._client_name(address, tunnel.client_user if tunnel else None),
                client_user=tunnel.client_user if tunnel else None,
                method=method,
                status=r.status,
                layer="inspected" if tunnel is not None else "http",
                detail=r.message[:300] or "malformed request",
            )
        )

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
            return req, refusal(req, Reason.BAD_REQUEST, detail="CONNECT inside a tunnel")
        if (refused := self._identify(req, r.host, r.headers.get("proxy-authorization"))) is not None:
            return req, refused
        return req, await self.decider.decide(req, lambda: _client_alive(flow.client_conn))

    def _identify(
        self, req: Request, raw_host: str, proxy_authz: str | None, check_auth: bool = True
    ) -> Verdict | None:
        """Authenticate the client (when asked) and normalise the host, filling `req`; a refusal
        (407 proxy_auth, or bad_request for an unusable host) when either fails."""
        if check_auth:
            res, user = self.auth.check(proxy_authz, req.client_address)
            if res is AuthResult.BAD:
                return refusal(req, Reason.PROXY_AUTH)
            req.client_user = user
        try:
            req.host = normalize_host(raw_host)
        except ValueError as e:
            return refusal(
                req,
                Reason.BAD_REQUEST,
                detail=str(e),
                client_name=self._client_name(req.client_address, req.client_user),
            )
        return None

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
            data: bytes = nl.data_client()  # type: ignore[no-untyped-call]
            server_spoke = bool(nl.data_server())  # type: ignore[no-untyped-call]
            choice = choose_first_layer(nl.context, t, data, server_spoke)
        except Exception:
            log.exception("tunnel layer decision failed")
            choice = FirstLayer(problem="internal error")
        if choice.problem is not None:
            self._refuse_tunnel(nl, t, choice.problem)
        elif choice.layer is None:
            nl.layer = None  # wait for the whole ClientHello
        else:
            t.layer_decided = True
            client = nl.context.client
            t.on_refused = lambda detail: self._log_tunnel_refusal(client, t, detail)
            nl.layer = choice.layer
        return True

    def _refuse_tunnel(self, nl: layer.NextLayer, t: Tunnel, detail: str) -> None:
        """An allowed CONNECT whose first bytes break the rules: a second decision on the same tunnel."""
        self._log_tunnel_refusal(nl.context.client, t, detail)
        nl.layer = CloseClientLayer(nl.context)

    def _log_tunnel_refusal(self, client: connection.Client, t: Tunnel, detail: str) -> None:
        if t.refused:
            return
        peer = client.peername
        req = Request(
            host=t.host,
            port=t.port,
            scheme=None,
            method="CONNECT",
            path=None,
            client_id=client.id,
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

    # ---- pinning ------------------------------------------------------------------------------------
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            self.pinner.pin(data)
        except Exception:
            log.exception("pinning failed; refusing the upstream connection")
            data.server.error = "portcullis: internal error"

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.pinner.restore(data.server)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.pinner.restore(data.server)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def client_connected(self, client: connection.Client) -> None:
        why = public_client_refusal(client.peername, self.client_cidrs)
        if why is not None:
            log.warning("refused a client: %s", why)
            client.error = f"Portcullis: {why}"

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
                    client={
                        "address": str(client.peername[0]) if client.peername else None,
                        "port": int(client.peername[1]) if client.peername else None,
                        "name": t.client_name,
                        "user": t.client_user,
                    },
                    destination={"host": t.host, "port": t.port, "ip": t.ip},
                    bytes_up=t.bytes_up,
                    bytes_down=t.bytes_down,
                    duration_s=round(time.monotonic() - t.started, 3),
                    inspected=t.inspect,
                )
            except Exception:
                log.exception("could not emit tunnel.closed")

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.pinner.forget(data.server)
