"""addons/proxy/addon.py in process: mitmproxy's own test flows (`mitmproxy.test.tflow`) driven through its
addon manager (`taddons`), no sockets. Each hook turns a flow into the pipeline's input, applies the one
Outcome to the flow (forward and stream, or answer 403/400/407/502 with both X-Portcullis headers) and
records it exactly once; a tunnel's first layer is waited for, refused or chosen; refusals mitmproxy makes
by itself are one bad_request decision; a closed tunnel is one tunnel.closed; any exception kills the flow.
The end-to-end proof (real proxy, real clients) is tests/proxy/e2e/."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mitmproxy import connection, http
from mitmproxy.options import Options
from mitmproxy.proxy import events, layer, server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.test import taddons, tflow

from addons.pipeline.decide import Pipeline
from addons.policy.evaluate import Policy
from addons.proxy import addon as addon_module
from addons.proxy.addon import Portcullis, incoming_connect, incoming_request, path_only
from addons.proxy.mitm_compat import CloseBoth, CountingRelay, CountingServerTLSLayer, Refusal
from addons.telemetry.events import Telemetry
from tests.pipeline import pipe_helpers as ph
from tests.pipeline.pipe_helpers import Lookup
from tests.telemetry.tel_helpers import lines
from tests.telemetry.tel_helpers import make as make_telemetry
from tests.tlsbytes import client_hello

PEER = ("10.9.0.1", 40000)


@pytest.fixture(scope="module")
def pol(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return ph.policy(tmp_path_factory.mktemp("addon"))


@dataclass
class Proxy:
    addon: Portcullis
    pipeline: Pipeline
    telemetry: Telemetry
    out: io.StringIO
    lookup: Lookup

    def events(self, name: str = "egress.decision") -> list[dict[str, Any]]:
        return [e for e in lines(self.out) if e["event"] == name]

    def decision(self) -> dict[str, Any]:
        (ev,) = self.events()  # exactly one
        return ev

    def tunnels_open(self) -> float:
        return self.telemetry.metrics.tunnels_open._value.get()

    async def hook(self, event: Any) -> None:
        """Through mitmproxy's addon manager, as the proxy core calls it."""
        with taddons.context(self.addon) as tctx:
            await tctx.master.addons.invoke_addon(self.addon, event)


def make(pol: Policy, **kw: Any) -> Proxy:
    pipeline, lookup, _ = ph.pipeline(pol, **kw)
    tel, out = make_telemetry()
    pipeline.healthy = tel.healthy
    return Proxy(Portcullis(pipeline, tel), pipeline, tel, out, lookup)


@pytest.fixture
def proxy(pol: Policy) -> Proxy:
    return make(pol)


def client(conn_id: str = "c1", peer: tuple[str, int] = PEER) -> connection.Client:
    c = tflow.tclient_conn()
    c.id = conn_id
    c.peername = peer
    return c


def request(
    host: str = "public.test",
    port: int = 80,
    method: str = "GET",
    path: str = "/x?q=1",
    scheme: str = "http",
    authority: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    http_version: str = "HTTP/1.1",
) -> http.Request:
    """A request as mitmproxy parses it: absolute-form on the proxy port unless `authority` is ''."""
    if authority is None:
        authority = host if port == {"http": 80, "https": 443}[scheme] else f"{host}:{port}"
    if headers is None:
        headers = [("Host", authority or host)]
    return http.Request(
        host,
        port,
        method.encode(),
        scheme.encode(),
        authority.encode(),
        path.encode(),
        http_version.encode(),
        http.Headers([(k.encode(), v.encode()) for k, v in headers]),
        b"",
        None,
        0.0,
        None,
    )


def flow(req: http.Request | None = None, conn: connection.Client | None = None) -> http.HTTPFlow:
    return tflow.tflow(client_conn=conn or client(), req=req or request())


def connect_flow(
    host: str = "public.test", port: int = 443, conn: connection.Client | None = None, **kw: Any
):
    headers = kw.pop("headers", [("Host", f"{host}:{port}")])
    r = request(host, port, "CONNECT", "", "http", f"{host}:{port}", headers)
    return flow(r, conn)


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


def answer(f: http.HTTPFlow) -> tuple[int, str, str, dict[str, Any]]:
    assert f.response is not None
    r = f.response
    return (
        r.status_code,
        r.headers["X-Portcullis-Decision"],
        r.headers["X-Portcullis-Reason"],
        json.loads(r.content or b""),
    )


# -- requestheaders: plain HTTP ---------------------------------------------------------------------


async def test_an_allowed_request_is_forwarded_streamed_and_logged_once(proxy: Proxy) -> None:
    f = flow()
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    assert f.response is None and f.error is None and f.request.stream is True
    ev = proxy.decision()
    assert (ev["decision"], ev["reason"], ev["rule"], ev["layer"], ev["flow_id"]) == (
        "allow",
        "rule",
        "pub",
        "http",
        f.id,
    )
    assert ev["request"] == {"scheme": "http", "method": "GET", "path": "/x"}  # no query string
    assert ev["destination"]["host"] == "public.test" and ev["destination"]["ip"] == "8.8.8.8"
    assert ev["client"]["address"] == PEER[0] and ev["enforced"] is True
    assert proxy.pipeline.pins.get(f.client_conn.id, "public.test", 80) is not None


DENIALS = [
    # id, request, status, reason, rule
    ("rule", request("blocked.test"), 403, "rule", "blocked"),
    ("default", request("nothing.test"), 403, "default", None),
    ("private", request("127.0.0.1"), 403, "private_address", None),
    ("host-mismatch", request(headers=[("Host", "evil.test")]), 403, "host_mismatch", None),
    ("target-mismatch", request(authority="evil.test"), 403, "host_mismatch", None),
    ("bad-host", request("a..b"), 400, "bad_request", None),
    (
        "two-hosts",
        request(headers=[("Host", "public.test"), ("Host", "public.test")]),
        400,
        "bad_request",
        None,
    ),
    ("control-byte", request(headers=[("Host", "public.test"), ("X-A", "a\x01b")]), 400, "bad_request", None),
    ("header-name", request(headers=[("Host", "public.test"), ("X A", "b")]), 400, "bad_request", None),
    ("pri", request(method="PRI", path="*"), 400, "bad_request", None),
    ("asterisk", request(method="OPTIONS", path="*"), 400, "bad_request", None),
]


@pytest.mark.parametrize(
    ("req", "status", "reason", "rule"), [d[1:] for d in DENIALS], ids=[d[0] for d in DENIALS]
)
async def test_denials_are_answered_with_both_headers_and_logged_once(
    proxy: Proxy, req: http.Request, status: int, reason: str, rule: str | None
) -> None:
    f = flow(req)
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    got_status, decision, got_reason, body = answer(f)
    assert (got_status, decision, got_reason) == (status, "deny", reason)
    assert body["error"] == "egress_denied" and body["reason"] == reason and body["rule"] == rule
    assert f.response is not None and f.response.reason.startswith("Blocked by Portcullis: " + reason)
    # Answered at once, never forwarded (mitm_compat.answer_at_once: mitmproxy sends the set response)
    assert f.request.stream is True and "expect" not in f.request.headers
    ev = proxy.decision()
    assert (ev["decision"], ev["reason"], ev["status"], ev["rule"], ev["flow_id"]) == (
        "deny",
        reason,
        status,
        rule,
        f.id,
    )


async def test_407_asks_for_credentials_and_the_header_is_never_forwarded(pol: Policy) -> None:
    p = make(pol, auth=ph.auth())
    missing = flow(conn=client(peer=("10.2.0.7", 1)))
    await p.hook(http_layers.HttpRequestHeadersHook(missing))
    assert answer(missing)[:3] == (407, "deny", "proxy_auth")
    assert (
        missing.response is not None
        and missing.response.headers["Proxy-Authenticate"] == 'Basic realm="portcullis"'
    )
    wrong = flow(request(headers=[("Host", "public.test"), ("Proxy-Authorization", basic("rev", "nope"))]))
    await p.hook(http_layers.HttpRequestHeadersHook(wrong))
    assert answer(wrong)[:3] == (407, "deny", "proxy_auth")
    assert "proxy-authorization" not in wrong.request.headers
    right = flow(request(headers=[("Host", "public.test"), ("Proxy-Authorization", basic("rev", "pw"))]))
    await p.hook(http_layers.HttpRequestHeadersHook(right))
    assert right.response is None and right.request.stream is True
    assert "proxy-authorization" not in right.request.headers  # identified, then taken off the request
    evs = p.events()
    assert [e["reason"] for e in evs] == ["proxy_auth", "proxy_auth", "rule"]
    assert evs[2]["client"]["user"] == "rev" and evs[2]["client"]["name"] == "rev"
    assert "cmV2" not in p.out.getvalue()  # no credential reaches the event stream


async def test_an_allowed_name_with_nowhere_to_connect_is_502_with_decision_allow(proxy: Proxy) -> None:
    f = flow(request("nx.test"))
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    status, decision, reason, body = answer(f)
    assert (status, decision, reason) == (502, "allow", "upstream_error")
    assert body["error"] == "upstream_failed" and "nx.test" in body["message"]
    ev = proxy.decision()
    assert (ev["decision"], ev["reason"], ev["status"]) == ("allow", "rule", 502)


async def test_audit_mode_forwards_a_rule_denial_and_logs_it_unenforced(pol: Policy) -> None:
    p = make(pol, audit=True)
    f = flow(request("blocked.test"))
    await p.hook(http_layers.HttpRequestHeadersHook(f))
    assert f.response is None and f.request.stream is True
    ev = p.decision()
    assert (ev["decision"], ev["reason"], ev["enforced"], ev["status"]) == ("deny", "rule", False, None)


async def test_an_h2c_upgrade_is_dropped_so_the_connection_stays_judged(proxy: Proxy) -> None:
    hdrs = [
        ("Host", "public.test"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Accept", "*/*"),
    ]
    f = flow(request(headers=hdrs))
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    assert f.response is None and f.request.stream is True
    for name in ("upgrade", "http2-settings", "connection"):
        assert name not in f.request.headers
    assert f.request.headers["accept"] == "*/*"


@pytest.mark.parametrize(
    ("req", "host"),
    [
        (request(headers=[], http_version="HTTP/1.0"), "public.test"),
        (request(port=8080, headers=[("Accept", "*/*")], http_version="HTTP/1.0"), "public.test:8080"),
        (request("PUBLIC.test.", 8080, authority="PUBLIC.test.:8080", headers=[], http_version="HTTP/1.0"),
         "public.test:8080"),  # the decided (normalised) destination
    ],
)
async def test_an_http10_request_without_host_gets_the_targets(
    proxy: Proxy, req: http.Request, host: str
) -> None:
    # mitmproxy sends HTTP/1 in origin-form and adds no Host: the upstream would see none at all.
    f = flow(req)
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    assert f.response is None and f.request.headers.get_all("host") == [host]
    assert f.request.headers.fields[0][0] == b"Host"


async def test_an_http11_request_without_host_is_bad_request(proxy: Proxy) -> None:
    f = flow(request(headers=[("Accept", "*/*")]))
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    assert answer(f)[:3] == (400, "deny", "bad_request") and "host" not in f.request.headers
    assert "Host header" in proxy.decision()["detail"]


async def test_an_http2_request_over_the_size_limits_is_414_or_431(proxy: Proxy) -> None:
    f = flow(request(path="/" + "a" * 9000, http_version="HTTP/2.0"))
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    assert answer(f)[:3] == (414, "deny", "bad_request")
    pad = [("Host", "public.test")] + [("X-Pad", "p" * 1000)] * 70
    g = flow(request(headers=pad, http_version="HTTP/2.0"))
    await proxy.hook(http_layers.HttpRequestHeadersHook(g))
    assert answer(g)[:3] == (431, "deny", "bad_request")
    got = [(e["status"], e["reason"]) for e in proxy.events()]
    assert got == [(414, "bad_request"), (431, "bad_request")]


async def test_a_denied_request_is_answered_before_its_body(proxy: Proxy) -> None:
    hdrs = [("Host", "blocked.test"), ("Expect", "100-continue"), ("Content-Length", "5")]
    f = flow(request("blocked.test", method="POST", headers=hdrs))
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    assert answer(f)[0] == 403  # mitm_compat.answer_at_once: sent now, no 100 Continue first
    assert f.request.stream is True and "expect" not in f.request.headers


@pytest.mark.parametrize(
    ("authority", "reason"),
    [("public.test:443", "rule"), ("public.test:\uff14\uff14\uff13", "bad_request"),
     ("[public.test]:443", "bad_request")],
)
async def test_a_connect_is_judged_on_its_target_as_received(
    proxy: Proxy, authority: str, reason: str
) -> None:
    # mitmproxy reads fullwidth digits as a port and drops brackets around any host: the raw bytes decide.
    f = connect_flow()
    f.request.data.authority = authority.encode()
    await proxy.hook(http_layers.HttpConnectHook(f))
    assert proxy.decision()["reason"] == reason


async def test_a_websocket_upgrade_is_kept_and_logged_as_ws(proxy: Proxy) -> None:
    hdrs = [("Host", "public.test"), ("Upgrade", "websocket"), ("Connection", "Upgrade")]
    f = flow(request(headers=hdrs))
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    assert f.response is None and f.request.headers["upgrade"] == "websocket"
    assert proxy.decision()["request"]["scheme"] == "ws"


async def test_responses_are_streamed(proxy: Proxy) -> None:
    f = tflow.tflow(resp=True)
    await proxy.hook(http_layers.HttpResponseHeadersHook(f))
    assert f.response is not None and f.response.stream is True
    proxy.addon.responseheaders(tflow.tflow())  # no response yet: nothing to do, nothing raised


async def test_a_flow_already_answered_or_failed_is_not_decided_again(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered = tflow.tflow(resp=True)
    await proxy.hook(http_layers.HttpRequestHeadersHook(answered))
    failed = tflow.tflow(err=True)
    await proxy.hook(http_layers.HttpRequestHeadersHook(failed))
    assert failed.error is not None and failed.error.msg == "error"  # mitmproxy's own error, untouched
    # mitmproxy answered with its own error page (record_refusal logged it): killed, not decided.
    monkeypatch.setattr(addon_module, "already_refused", lambda r: True)
    refused = flow()
    await proxy.hook(http_layers.HttpRequestHeadersHook(refused))
    assert refused.error is not None and refused.response is None
    assert proxy.events() == []


# -- requests inside an inspected tunnel ------------------------------------------------------------


async def _inspected(p: Proxy, conn: connection.Client) -> None:
    await p.hook(http_layers.HttpConnectHook(connect_flow("insp.test", conn=conn)))
    st = p.addon.conns[conn.id]
    assert st.tunnel is not None and st.tunnel.inspect


@pytest.mark.parametrize(
    ("req", "status", "reason"),
    [
        (request("insp.test", 443, path="/ok/1", scheme="https", authority=""), None, "rule"),
        (request("insp.test", 443, path="/admin", scheme="https", authority=""), 403, "default"),
        (
            request("public.test", 443, scheme="https", authority="", headers=[("Host", "public.test")]),
            403,
            "host_mismatch",
        ),
        (
            request("insp.test", 443, path="/ok/1", scheme="https", headers=[("Host", "insp.test")]),
            400,
            "bad_request",
        ),  # absolute-form inside a tunnel
    ],
    ids=["allowed-path", "other-path", "other-host", "absolute-form"],
)
async def test_inner_requests_are_decided_one_by_one(
    proxy: Proxy, req: http.Request, status: int | None, reason: str
) -> None:
    conn = client()
    await _inspected(proxy, conn)
    f = flow(req, conn)
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    if status is None:
        assert f.response is None and f.request.stream is True
    else:
        assert answer(f)[:3] == (status, "deny", reason)
    connect_ev, inner_ev = proxy.events()
    assert connect_ev["layer"] == "connect" and connect_ev["reason"] == "inspect"
    assert (inner_ev["layer"], inner_ev["reason"], inner_ev["flow_id"]) == ("inspected", reason, f.id)


# -- http_connect -----------------------------------------------------------------------------------


async def test_an_allowed_connect_opens_a_tunnel(proxy: Proxy) -> None:
    f = connect_flow()
    await proxy.hook(http_layers.HttpConnectHook(f))
    assert f.response is None and f.error is None
    t = proxy.addon.conns[f.client_conn.id].tunnel
    assert t is not None and t.outcome.request.flow_id == f.id and not t.inspect
    assert proxy.tunnels_open() == 1
    ev = proxy.decision()
    assert (ev["layer"], ev["decision"], ev["request"]["method"], ev["request"]["path"]) == (
        "connect",
        "allow",
        "CONNECT",
        None,
    )


@pytest.mark.parametrize(
    ("host", "status", "reason"),
    [("blocked.test", 403, "rule"), ("a..b", 400, "bad_request"), ("nx.test", 502, "upstream_error")],
)
async def test_a_refused_connect_is_answered_and_opens_nothing(
    proxy: Proxy, host: str, status: int, reason: str
) -> None:
    f = connect_flow(host)
    await proxy.hook(http_layers.HttpConnectHook(f))
    got = answer(f)
    assert got[:3] == (status, "allow" if status == 502 else "deny", reason)
    assert proxy.addon.conns[f.client_conn.id].tunnel is None and proxy.tunnels_open() == 0
    assert len(proxy.events()) == 1


async def test_a_connect_inside_a_tunnel_is_bad_request(proxy: Proxy) -> None:
    conn = client()
    await proxy.hook(http_layers.HttpConnectHook(connect_flow(conn=conn)))
    second = connect_flow("public.test", 8443, conn=conn)
    await proxy.hook(http_layers.HttpConnectHook(second))
    assert answer(second)[:3] == (400, "deny", "bad_request")
    ev = proxy.events()[1]
    assert ev["reason"] == "bad_request" and ev["detail"] == "CONNECT inside a tunnel"


async def test_a_connect_needs_credentials_too(pol: Policy) -> None:
    p = make(pol, auth=ph.auth())
    f = connect_flow(conn=client(peer=("10.2.0.7", 1)))
    await p.hook(http_layers.HttpConnectHook(f))
    assert answer(f)[:3] == (407, "deny", "proxy_auth")
    ok = connect_flow(
        conn=client("c2", ("10.2.0.7", 2)), headers=[("Proxy-Authorization", basic("rev", "pw"))]
    )
    await p.hook(http_layers.HttpConnectHook(ok))
    assert ok.response is None and p.addon.conns["c2"].tunnel is not None
    assert p.events()[1]["client"]["user"] == "rev"


async def test_mitmproxys_502_for_a_failed_connect_keeps_decision_allow(proxy: Proxy) -> None:
    f = connect_flow()
    await proxy.hook(http_layers.HttpConnectHook(f))
    f.response = http.Response.make(502, b"Connection refused. If you think this is a bug ...")
    await proxy.hook(http_layers.HttpConnectErrorHook(f))
    status, decision, reason, body = answer(f)
    assert (status, decision, reason) == (502, "allow", "upstream_error")
    assert body["message"].endswith("Connection refused.") and "If you" not in body["message"]
    assert proxy.addon.conns[f.client_conn.id].tunnel is None and proxy.tunnels_open() == 0
    ours = f.response
    await proxy.hook(http_layers.HttpConnectErrorHook(f))  # already ours: left as is
    assert f.response is ours and proxy.tunnels_open() == 0


# -- the tunnel's first layer -----------------------------------------------------------------------


@pytest.fixture
def opened(proxy: Proxy) -> Iterator[Any]:
    count = iter(range(1, 100))

    async def open_tunnel(host: str = "public.test", port: int = 443) -> tuple[connection.Client, Any]:
        conn = client(f"c{next(count)}")
        await proxy.hook(http_layers.HttpConnectHook(connect_flow(host, port, conn=conn)))
        t = proxy.addon.conns[conn.id].tunnel
        assert t is not None
        return conn, t

    yield open_tunnel


def next_layer(
    conn: connection.Client, client_data: bytes = b"", server_data: bytes = b""
) -> layer.NextLayer:
    ctx = Context(conn, Options())
    nl = layer.NextLayer(ctx)
    if client_data:
        nl.events.append(events.DataReceived(ctx.client, client_data))
    if server_data:
        nl.events.append(events.DataReceived(ctx.server, server_data))
    return nl


def test_a_connection_that_is_no_tunnel_is_left_to_mitmproxy(proxy: Proxy) -> None:
    nl = next_layer(client("lonely"), b"GET / HTTP/1.1\r\n\r\n")
    assert proxy.addon.tunnel_next_layer(nl) is False and nl.layer is None


async def test_the_first_layer_waits_for_a_whole_client_hello(proxy: Proxy, opened: Any) -> None:
    conn, t = await opened()
    hello = client_hello([b"public.test"])
    for data in (b"", hello[:3], hello[:-1]):
        nl = next_layer(conn, data)
        assert proxy.addon.tunnel_next_layer(nl) is True and nl.layer is None
        assert not t.layer_decided and not t.refused
    assert len(proxy.events()) == 1  # only the CONNECT


async def test_a_hello_naming_the_authority_is_relayed_and_watched(proxy: Proxy, opened: Any) -> None:
    conn, t = await opened()
    nl = next_layer(conn, client_hello([b"PUBLIC.test"]))
    assert proxy.addon.tunnel_next_layer(nl) is True
    assert isinstance(nl.layer, CountingRelay) and nl.layer.watch is not None and nl.layer.tunnel is t
    assert t.layer_decided and not t.refused and t.on_refused is not None
    assert proxy.addon.tunnel_next_layer(next_layer(conn, b"more")) is False  # decided once
    assert len(proxy.events()) == 1


async def test_an_inspected_tunnel_is_intercepted(proxy: Proxy, opened: Any) -> None:
    conn, t = await opened("insp.test")
    nl = next_layer(conn, client_hello([b"insp.test"]))
    assert proxy.addon.tunnel_next_layer(nl) is True
    assert isinstance(nl.layer, CountingServerTLSLayer) and t.layer_decided


async def test_a_raw_tcp_tunnel_carries_other_bytes_unwatched(proxy: Proxy, opened: Any) -> None:
    conn, t = await opened("ssh.test", 22)
    nl = next_layer(conn, b"SSH-2.0-OpenSSH_9.6\r\n")
    assert proxy.addon.tunnel_next_layer(nl) is True
    assert isinstance(nl.layer, CountingRelay) and nl.layer.watch is None and t.layer_decided
    server_first = await opened("ssh.test", 2222)
    nl2 = next_layer(server_first[0], b"", b"SSH-2.0-server\r\n")
    assert proxy.addon.tunnel_next_layer(nl2) is True and isinstance(nl2.layer, CountingRelay)


@pytest.mark.parametrize(
    ("data", "server", "detail"),
    [
        (client_hello([b"evil.test"]), b"", "the TLS server name differs from the CONNECT host"),
        (client_hello(None), b"", "the TLS ClientHello has no server name"),
        (b"GET / HTTP/1.1\r\nHost: public.test\r\n\r\n", b"", "first bytes are not a TLS ClientHello"),
        (b"", b"220 smtp ready\r\n", "the server spoke first (not a TLS tunnel)"),
    ],
    ids=["other-sni", "no-sni", "not-tls", "server-first"],
)
async def test_a_tunnel_whose_first_bytes_break_the_rules_is_closed_and_logged_once(
    proxy: Proxy, opened: Any, data: bytes, server: bytes, detail: str
) -> None:
    conn, t = await opened()
    nl = next_layer(conn, data, server)
    assert proxy.addon.tunnel_next_layer(nl) is True
    assert isinstance(nl.layer, CloseBoth) and t.refused and not t.layer_decided
    connect_ev, refused = proxy.events()
    assert (refused["decision"], refused["reason"], refused["detail"], refused["flow_id"]) == (
        "deny",
        "sni_mismatch",
        detail,
        connect_ev["flow_id"],
    )
    assert refused["enforced"] is True and refused["layer"] == "connect"
    again = next_layer(conn, data + b"x", server)
    assert proxy.addon.tunnel_next_layer(again) is True  # still ours: nothing more relayed or logged
    assert len(proxy.events()) == 2


async def test_a_refusal_in_audit_mode_is_still_enforced(pol: Policy) -> None:
    p = make(pol, audit=True)
    conn = client()
    await p.hook(http_layers.HttpConnectHook(connect_flow(conn=conn)))
    nl = next_layer(conn, client_hello([b"evil.test"]))
    p.addon.tunnel_next_layer(nl)
    assert isinstance(nl.layer, CloseBoth)
    assert p.events()[1]["enforced"] is True


async def test_an_error_while_choosing_the_layer_refuses_the_tunnel(proxy: Proxy, opened: Any) -> None:
    conn, t = await opened()
    nl = next_layer(conn, client_hello([b"public.test"]))

    def broken() -> bytes:
        raise RuntimeError("boom")

    nl.data_client = broken  # type: ignore[method-assign]
    assert proxy.addon.tunnel_next_layer(nl) is True
    assert isinstance(nl.layer, CloseBoth) and t.refused
    assert proxy.events()[1]["detail"] == "internal error"


async def test_a_second_hello_that_breaks_the_rules_is_a_second_decision(proxy: Proxy, opened: Any) -> None:
    conn, t = await opened()
    proxy.addon.tunnel_next_layer(next_layer(conn, client_hello([b"public.test"])))
    assert t.on_refused is not None
    t.on_refused("the TLS server name differs from the CONNECT host")  # what the relay's watch reports
    t.on_refused("again")  # logged once
    evs = proxy.events()
    assert [e["reason"] for e in evs] == ["rule", "sni_mismatch"] and t.refused


# -- refusals mitmproxy makes by itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "status", "host", "method"),
    [
        (None, 400, None, None),
        (request("PUBLIC.test"), 400, "public.test", "GET"),
        (request("a..b"), 400, None, "GET"),
        (request(method="G\u00e9T"), 400, "public.test", None),  # not a method we can name
        (None, None, None, None),  # an HTTP/2 connection error: no status at all
    ],
    ids=["nothing-parsed", "parsed", "bad-host", "odd-method", "goaway"],
)
def test_a_refusal_is_one_bad_request_decision(
    proxy: Proxy, req: http.Request | None, status: int | None, host: str | None, method: str | None
) -> None:
    proxy.addon.record_refusal(Refusal(client(), status, "Bad HTTP request line: " + "x" * 400, req))
    ev = proxy.decision()
    assert (ev["decision"], ev["reason"], ev["status"], ev["layer"]) == (
        "deny",
        "bad_request",
        status,
        "http",
    )
    assert ev["destination"]["host"] == host and ev["request"]["method"] == method
    assert ev["detail"].startswith("Bad HTTP request line: ") and len(ev["detail"]) == 300
    assert ev["client"]["address"] == PEER[0] and ev["flow_id"]


async def test_a_refusal_inside_a_tunnel_names_the_tunnel(proxy: Proxy, opened: Any) -> None:
    conn, _ = await opened("insp.test")
    proxy.addon.record_refusal(Refusal(conn, None, "", None))
    connect_ev, ev = proxy.events()
    assert (ev["layer"], ev["destination"]["host"], ev["destination"]["port"]) == (
        "inspected",
        "insp.test",
        443,
    )
    assert ev["detail"] == "malformed request" and ev["flow_id"] != connect_ev["flow_id"]


# -- client lifecycle -------------------------------------------------------------------------------


async def test_a_closed_tunnel_is_one_tunnel_closed_event(proxy: Proxy, opened: Any) -> None:
    conn, t = await opened()
    t.bytes_up, t.bytes_down = 517, 4096
    assert len(proxy.pipeline.pins) == 1
    await proxy.hook(server_hooks.ClientDisconnectedHook(conn))
    (closed,) = proxy.events("tunnel.closed")
    assert closed["flow_id"] == proxy.decision()["flow_id"]
    assert (closed["bytes_up"], closed["bytes_down"], closed["inspected"]) == (517, 4096, False)
    assert closed["destination"] == {"host": "public.test", "port": 443, "ip": "8.8.8.8"}
    assert closed["duration_s"] >= 0 and proxy.tunnels_open() == 0
    assert len(proxy.pipeline.pins) == 0 and conn.id not in proxy.addon.conns
    await proxy.hook(server_hooks.ClientDisconnectedHook(conn))  # once only
    assert len(proxy.events("tunnel.closed")) == 1 and proxy.tunnels_open() == 0


async def test_a_refused_tunnel_gets_no_tunnel_closed(proxy: Proxy, opened: Any) -> None:
    conn, _ = await opened()
    proxy.addon.tunnel_next_layer(next_layer(conn, b"not tls"))
    await proxy.hook(server_hooks.ClientDisconnectedHook(conn))
    assert proxy.events("tunnel.closed") == [] and proxy.tunnels_open() == 0


async def test_a_plain_http_client_leaves_its_pins_behind_it(proxy: Proxy) -> None:
    f = flow()
    await proxy.hook(http_layers.HttpRequestHeadersHook(f))
    assert len(proxy.pipeline.pins) == 1
    await proxy.hook(server_hooks.ClientDisconnectedHook(f.client_conn))
    assert len(proxy.pipeline.pins) == 0 and proxy.events("tunnel.closed") == []


@pytest.mark.parametrize(
    ("peer", "cidrs", "refused"),
    [
        ("8.8.8.8", [], True),
        ("2001:4860::8888", [], True),
        ("::ffff:8.8.8.8", [], True),
        ("8.8.8.8", ["8.8.8.0/24"], False),
        ("10.1.2.3", [], False),
        ("127.0.0.1", [], False),
        ("172.17.0.2", [], False),
        ("fd00::5", [], False),
    ],
)
async def test_clients_on_public_addresses_are_refused_unless_configured(
    proxy: Proxy, peer: str, cidrs: list[str], refused: bool
) -> None:
    import ipaddress

    proxy.addon.client_cidrs = tuple(ipaddress.ip_network(c) for c in cidrs)
    c = client(peer=(peer, 40000))
    c.error = None
    await proxy.hook(server_hooks.ClientConnectedHook(c))
    assert bool(c.error) is refused
    if refused:
        assert c.error is not None and "cidrs" in c.error


# -- fail closed ------------------------------------------------------------------------------------


async def test_an_error_outside_the_decision_kills_the_flow(proxy: Proxy) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("boom")

    proxy.addon.pipeline.decide = boom  # type: ignore[method-assign]
    f = tflow.tflow()
    await proxy.addon.requestheaders(f)
    assert f.error is not None and f.error.msg  # killed: never forwarded undecided
    assert f.response is None and f.request.stream is False
    c = tflow.tflow()
    c.request.method = "CONNECT"
    await proxy.addon.http_connect(c)
    assert c.error is not None and c.response is None
    assert proxy.addon.conns[c.client_conn.id].tunnel is None and proxy.tunnels_open() == 0


async def test_an_error_applying_an_allowed_connect_kills_it_and_forgets_the_tunnel(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("metrics down")

    monkeypatch.setattr(proxy.telemetry, "tunnel_opened", broken)
    f = connect_flow()
    await proxy.addon.http_connect(f)
    assert f.error is not None and proxy.addon.conns[f.client_conn.id].tunnel is None


async def test_a_decision_that_cannot_be_recorded_is_still_applied(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(o: Any) -> None:
        raise RuntimeError("sink exploded")

    monkeypatch.setattr(proxy.telemetry, "decision", broken)
    denied = flow(request("blocked.test"))
    await proxy.addon.requestheaders(denied)
    assert answer(denied)[:3] == (403, "deny", "rule")


async def test_a_tunnel_closed_that_cannot_be_emitted_does_not_raise(
    proxy: Proxy, opened: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, _ = await opened()

    def broken(*a: Any) -> None:
        raise RuntimeError("sink exploded")

    monkeypatch.setattr(proxy.telemetry, "tunnel_closed", broken)
    proxy.addon.client_disconnected(conn)
    assert conn.id not in proxy.addon.conns


async def test_an_unhealthy_event_sink_denies_through_the_adapter(proxy: Proxy) -> None:
    proxy.out.close()  # stdout cannot be written: the telemetry turns unhealthy on the next write
    proxy.addon.record_refusal(Refusal(client(), 400, "x", None))
    assert not proxy.telemetry.healthy()
    f = flow()
    await proxy.addon.requestheaders(f)
    assert answer(f)[:3] == (403, "deny", "internal_error")


# -- from a flow to the pipeline's input ---------------------------------------------------------------


def test_incoming_request_reads_the_flow_and_takes_the_credentials_off() -> None:
    r = request(
        "Public.Test",
        8080,
        path="/a/b?secret=1#frag",
        headers=[("Host", "public.test:8080"), ("Host", "x"), ("Proxy-Authorization", "Basic abc")],
    )
    f = flow(r)
    inc = incoming_request(f, None)
    assert (inc.host, inc.port, inc.scheme, inc.method, inc.path) == (
        "Public.Test",
        8080,
        "http",
        "GET",
        "/a/b",
    )
    assert inc.credentials == "Basic abc" and "proxy-authorization" not in f.request.headers
    assert (inc.host_header, inc.host_headers, inc.target_authority) == (
        "public.test:8080, x",  # mitmproxy joins them; two Host headers are refused (bad_request)
        2,
        "Public.Test:8080",
    )
    assert (inc.conn_id, inc.flow_id, inc.peer, inc.problem, inc.tunnel) == (
        f.client_conn.id,
        f.id,
        PEER,
        None,
        None,
    )
    assert "Basic abc" not in repr(inc)  # never shown


def test_incoming_connect_keeps_the_header_for_the_tunnel() -> None:
    f = connect_flow(headers=[("Proxy-Authorization", "Basic abc")])
    inc = incoming_connect(f, inside_tunnel=False)
    assert (inc.layer.value, inc.method, inc.path, inc.credentials, inc.problem) == (
        "connect",
        "CONNECT",
        None,
        "Basic abc",
        None,
    )
    assert incoming_connect(f, inside_tunnel=True).problem == "CONNECT inside a tunnel"


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/a?b=1", "/a"),
        ("/a#f", "/a"),
        ("", "/"),
        ("?x", "/"),
        ("*", "*"),
        ("http://h/p?q", "/p"),
        ("/", "/"),
    ],
)
def test_path_only(path: str, want: str) -> None:
    assert path_only(path) == want
