"""The mitmproxy adapter: each hook turns a flow into the pipeline's input (`Incoming`), awaits the
one `Outcome` (addons/pipeline/decide.py), applies it to the flow and records it once."""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from mitmproxy import connection, http
from mitmproxy.proxy import layer, server_hooks

from addons.pipeline.decide import Pipeline
from addons.pipeline.firstbytes import Relay, judge_first_bytes
from addons.pipeline.identity import public_client_refusal
from addons.pipeline.inject import body_watch
from addons.pipeline.model import Incoming, Outcome
from addons.pipeline.requestform import request_problem, size_problem
from addons.policy.authority import format_authority
from addons.policy.model import Layer, Reason
from addons.proxy import credentials
from addons.proxy.mitm_compat import Refusal, already_refused, answer_at_once, raw_target
from addons.proxy.pinning import Pinner
from addons.proxy.responses import DECISION_HEADER, deny_response, upstream_error_response
from addons.proxy.tunnel import Tunnel, closing_layer, first_layer
from addons.telemetry.events import Telemetry

log = logging.getLogger(__name__)


@dataclass
class ConnState:
    """Per client connection: the allowed tunnel (if this connection became one)."""

    tunnel: Tunnel | None = None


class Portcullis:
    """One instance per proxy process. Every decision is recorded exactly once (`_record`)."""

    def __init__(
        self,
        pipeline: Pipeline,
        telemetry: Telemetry,
        client_cidrs: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    ) -> None:
        self.pipeline = pipeline
        self.telemetry = telemetry
        self.client_cidrs = tuple(client_cidrs)
        self.conns: dict[str, ConnState] = {}
        self.pinner = Pinner(pipeline.pins)
        self.bodies = credentials.BodyWatch()

    # ---- plain HTTP and requests inside inspected tunnels -------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            if flow.response is not None:
                return
            if flow.error is not None or already_refused(flow.request):
                # mitmproxy refuses this request itself (malformed framing): its error page is the
                # answer, and that refusal is the one decision recorded (record_refusal).
                if flow.error is None:
                    flow.kill()  # type: ignore[no-untyped-call]
                return
            st = self.conns.get(flow.client_conn.id)
            inc = incoming_request(flow, st.tunnel if st else None)
            outcome = await self.pipeline.decide(inc, lambda: _client_alive(flow.client_conn))
            self._record(outcome)
            if outcome.passes:
                _forward(flow, outcome)
                credentials.inject(flow, outcome)
                self.bodies.start(flow, outcome, body_watch(self.pipeline.policies.policy, outcome))
            else:
                self._respond(flow, outcome)
                answer_at_once(flow)  # not after the body; no "100 Continue" invites it
        except Exception:
            # Last resort (the pipeline has its own handler): never let an undecided request pass.
            log.exception("requestheaders failed; killing the flow")
            flow.kill()  # type: ignore[no-untyped-call]

    def request(self, flow: http.HTTPFlow) -> None:
        # The whole body is in (held) or has streamed: one carrying a credential needle is refused.
        try:
            refusal = self.bodies.finished(flow)
        except Exception:
            log.exception("body check failed; killing the flow")
            self.bodies.forget(flow)
            flow.kill()  # type: ignore[no-untyped-call]
            return
        if refusal is not None:
            self._record(refusal)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.bodies.refuse_answer(flow):
            flow.kill()  # type: ignore[no-untyped-call]
            return
        # Portcullis never looks at response bodies: stream them all (server-sent events from model
        # APIs arrive as they are sent; large downloads are not held in memory).
        if flow.response is not None:
            flow.response.stream = True

    def error(self, flow: http.HTTPFlow) -> None:
        self.bodies.forget(flow)

    # ---- CONNECT ---------------------------------------------------------------------------------
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        st = self.conns.setdefault(flow.client_conn.id, ConnState())
        try:
            outcome = await self.pipeline.decide(
                incoming_connect(flow, inside_tunnel=st.tunnel is not None),
                lambda: _client_alive(flow.client_conn),
            )
            self._record(outcome)
            if not outcome.passes:
                self._respond(flow, outcome)
                return
            st.tunnel = Tunnel(outcome)
            self.telemetry.tunnel_opened()
        except Exception:
            log.exception("http_connect failed; killing the flow")
            if st.tunnel is not None and st.tunnel.outcome.request.flow_id == flow.id:
                st.tunnel = None
            flow.kill()  # type: ignore[no-untyped-call]

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's own 502 for a failed eager connect: replace it, keeping decision=allow visible.
        resp = flow.response
        if resp is not None and resp.status_code == 502 and DECISION_HEADER not in resp.headers:
            msg = resp.get_text(strict=False) or "connect failed"
            flow.response = upstream_error_response(
                flow.request.host, flow.request.port, msg.split(" If you")[0]
            )
            st = self.conns.get(flow.client_conn.id)
            if st is not None and st.tunnel is not None and st.tunnel.outcome.request.flow_id == flow.id:
                st.tunnel = None
                self.telemetry.tunnel_ended()

    # ---- tunnel first bytes: SNI and raw TCP -----------------------------------------------------
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
            relay, problem = judge_first_bytes(t.outcome, data, server_spoke)
        except Exception:
            log.exception("tunnel layer decision failed")
            relay, problem = Relay.REFUSE, "internal error"
        if relay is Relay.REFUSE:
            self._refuse_tunnel(t, problem or "refused")
            nl.layer = closing_layer(nl.context)
        elif relay is Relay.WAIT:
            nl.layer = None  # wait for the whole ClientHello
        else:
            t.layer_decided = True
            t.on_refused = lambda detail: self._refuse_tunnel(t, detail)
            nl.layer = first_layer(nl.context, t, relay)
        return True

    def _refuse_tunnel(self, t: Tunnel, detail: str) -> None:
        """An allowed CONNECT whose bytes break the rules: a second decision on the same tunnel,
        enforced even in audit mode (a mismatched SNI is a bypass, not a rule question)."""
        if not t.refused:
            t.refused = True
            self._record(t.outcome.refused(Reason.SNI_MISMATCH, detail))

    # ---- requests mitmproxy refuses by itself ---------------------------------------------------
    def record_refusal(self, r: Refusal) -> None:
        """A request mitmproxy refused before or without a hook (mitm_compat reports it): one decision."""
        st = self.conns.get(r.client.id)
        tunnel = st.tunnel if st else None
        req = r.request
        inc = Incoming(
            layer=Layer.INSPECTED if tunnel is not None else Layer.HTTP,
            host=req.host if req is not None else "",
            port=req.port if req is not None else 0,
            conn_id=r.client.id,
            flow_id=str(uuid.uuid4()),
            peer=_peer(r.client),
            method=req.method if req is not None and req.method.isascii() and req.method.isalpha() else None,
            tunnel=tunnel.outcome if tunnel is not None else None,
        )
        self._record(self.pipeline.malformed(inc, r.message[:300] or "malformed request", r.status))

    # ---- pinning -----------------------------------------------------------------------------
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

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.pinner.forget(data.server)

    # ---- client lifecycle -----------------------------------------------------------------------
    def client_connected(self, client: connection.Client) -> None:
        why = public_client_refusal(client.peername, self.client_cidrs)
        if why is not None:
            log.warning("refused a client: %s", why)
            client.error = f"Portcullis: {why}"

    def client_disconnected(self, client: connection.Client) -> None:
        st = self.conns.pop(client.id, None)
        self.pipeline.pins.drop_client(client.id)
        if st is None or st.tunnel is None:
            return
        t = st.tunnel
        if t.refused:
            self.telemetry.tunnel_ended()
            return
        try:
            self.telemetry.tunnel_closed(t.outcome, t.bytes_up, t.bytes_down, time.monotonic() - t.started)
        except Exception:
            log.exception("could not emit tunnel.closed")

    # ---- applying an outcome -------------------------------------------------------------------
    def _record(self, outcome: Outcome) -> None:
        try:
            self.telemetry.decision(outcome)
        except Exception:
            log.exception("could not record a decision")

    @staticmethod
    def _respond(flow: http.HTTPFlow, o: Outcome) -> None:
        if o.status == 502:
            flow.response = upstream_error_response(
                o.request.host, o.request.port, o.detail or "upstream failed"
            )
        else:
            flow.response = deny_response(o)


# ---- from a flow to the pipeline's input ---------------------------------------------------------


def incoming_request(flow: http.HTTPFlow, tunnel: Tunnel | None) -> Incoming:
    """A plain HTTP request, or one inside an inspected tunnel, as the pipeline's input.

    The Proxy-Authorization header is taken off the request here: it is never forwarded upstream.
    """
    r = flow.request
    scheme = r.scheme
    if r.headers.get("upgrade", "").lower() == "websocket":
        scheme = "wss" if scheme == "https" else "ws"
    proxy_credentials = r.headers.pop("proxy-authorization", None)
    status: int | None = None
    raw_method, raw_path, raw_authority = raw_target(r)
    if r.method == "PRI" or r.path == "*":
        problem: str | None = "not a proxy request"
    elif (too_large := size_problem(raw_path, r.headers.fields)) is not None:
        status, problem = too_large  # HTTP/2 (an HTTP/1 head is bounded while it arrives)
    else:
        # Framing a lenient upstream could read differently (line folding, bare CR, control bytes,
        # a target that is not a plain path) is refused, never forwarded.
        absolute_form = tunnel is not None and bool(raw_authority) and r.http_version.startswith("HTTP/1")
        problem = request_problem(
            raw_method, r.scheme, raw_path, r.headers.fields, absolute_form=absolute_form
        )
    return Incoming(
        layer=Layer.INSPECTED if tunnel is not None else Layer.HTTP,
        host=r.host,
        port=r.port,
        conn_id=flow.client_conn.id,
        flow_id=flow.id,
        peer=_peer(flow.client_conn),
        scheme=scheme,
        method=r.method,
        path=path_only(r.path),
        credentials=proxy_credentials,
        host_header=r.host_header,
        host_headers=len(r.headers.get_all("host")),
        target_authority=r.authority or None,
        problem=problem,
        problem_status=status,
        http_version=r.http_version,
        tunnel=tunnel.outcome if tunnel is not None else None,
        target=r.path,
        headers=_header_texts(r.headers.fields),
        tls_verified=credentials.upstream_verified(flow, tunnel is not None and tunnel.inspect),
    )


def incoming_connect(flow: http.HTTPFlow, inside_tunnel: bool) -> Incoming:
    r = flow.request
    return Incoming(
        layer=Layer.CONNECT,
        host=r.host,
        port=r.port,
        conn_id=flow.client_conn.id,
        flow_id=flow.id,
        peer=_peer(flow.client_conn),
        method="CONNECT",
        credentials=r.headers.get("proxy-authorization"),
        # As received: mitmproxy reads Unicode digits as a port and drops brackets around any host.
        target_authority=raw_target(r)[2].decode("utf-8", "surrogateescape"),
        problem="CONNECT inside a tunnel" if inside_tunnel else None,
        http_version=r.http_version,
        target=r.authority or None,
        headers=tuple(h for h in _header_texts(r.headers.fields) if h[0].lower() != "proxy-authorization"),
    )


def _header_texts(fields: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[str, str], ...]:
    """Header names and values as text (what credential needles are searched in; never logged)."""
    return tuple((k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                 for k, v in fields)


def path_only(path: str) -> str:
    """The request path without query string or fragment (never logged, never matched)."""
    if path == "*":
        return path
    p = urlsplit(path).path if "://" in path else path.split("?", 1)[0].split("#", 1)[0]
    return p or "/"


def _forward(flow: http.HTTPFlow, outcome: Outcome) -> None:
    r = flow.request
    if r.http_version == "HTTP/1.0" and "host" not in r.headers:
        # mitmproxy sends HTTP/1 in origin-form and adds no Host (RFC 9112 §3.2.2: a proxy must send
        # the target's authority): the decided destination, the CONNECT's inside a tunnel.
        req = outcome.request
        r.headers.insert(0, "Host", format_authority(req.host, req.port, r.scheme))
    if r.headers.get("upgrade", "").lower() == "h2c":
        # mitmproxy cannot relay h2c; drop the upgrade so the connection stays HTTP/1 (and judged).
        for name in ("upgrade", "http2-settings", "connection"):
            r.headers.pop(name, None)
    r.stream = True  # decided on headers: the body is relayed, never buffered


def _peer(client: connection.Client) -> tuple[str, int] | None:
    peer = client.peername
    return (str(peer[0]), int(peer[1])) if peer else None


def _client_alive(client: connection.Client) -> bool:
    # mitmproxy keeps reading while a hook is pending and clears CAN_READ on EOF.
    return bool(client.state & connection.ConnectionState.CAN_READ)
