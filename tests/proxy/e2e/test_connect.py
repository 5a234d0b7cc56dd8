"""CONNECT tunnels through a real proxy: passthrough, SNI checks, raw TCP, inspection, upstream TLS."""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from tests.harness import PortcullisProc, base_config, read_reply, tls_client_hello

pytestmark = pytest.mark.e2e

RULES = [
    {"name": "public", "action": "allow", "hosts": ["public.test"]},
    {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
    {
        "name": "api-reads",
        "action": "allow",
        "hosts": ["api.public.test", "wrongcert.test"],
        "methods": ["GET"],
        "paths": ["/ok/*"],
    },
    {"name": "raw", "action": "allow", "hosts": ["www.public.test"], "raw_tcp": True},
    {"name": "by-ip", "action": "allow", "hosts": ["127.0.0.2"]},
]


@pytest.fixture(scope="module")
def proxy(upstreams, tmp_path_factory):
    folder = tmp_path_factory.mktemp("connect")
    cfg = base_config(upstreams, folder)
    cfg["network"]["resolve"]["wrongcert.test"] = "127.0.0.3"
    with PortcullisProc(folder, upstreams, rules=RULES, config=cfg) as p:
        yield p


def assert_denied(reply, reason: str, rule: str | None = None) -> None:
    assert reply.status == 403, (reply.status, reply.body[:200])
    assert reply.headers["x-portcullis-decision"] == "deny"
    assert reply.headers["x-portcullis-reason"] == reason
    body = reply.json()
    assert body["reason"] == reason and body["rule"] == rule and body["error"] == "egress_denied"
    assert reply.reason == f"Blocked by Portcullis: {reason} ({rule or 'none'})"


def closed_by_proxy(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True


def sink_bytes_after(upstreams, fn) -> tuple[int, int]:
    c0, b0 = upstreams.sink.snapshot()
    fn()
    time.sleep(0.3)  # let any relayed bytes land before counting (bounded; the assertion is on bytes)
    c1, b1 = upstreams.sink.snapshot()
    return c1 - c0, b1 - b0


def test_allowed_tunnel_is_passed_through_without_interception(proxy, upstreams):
    # Trusting only the upstream's test CA: works only if the proxy did not intercept.
    r = proxy.curl(f"https://public.test:{upstreams.tls_port}/pt", "--cacert", str(upstreams.ca_pem))
    assert r.exit_code == 0 and r.status == 200, r.stderr
    ev = proxy.wait_event(
        "egress.decision",
        **{"destination.port": upstreams.tls_port, "layer": "connect", "destination.host": "public.test"},
    )
    assert (
        ev["decision"] == "allow" and ev["request"]["method"] == "CONNECT" and ev["request"]["path"] is None
    )
    closed = proxy.wait_event("tunnel.closed", flow_id=ev["flow_id"])
    assert closed["bytes_up"] > 0 and closed["bytes_down"] > 0


def test_denied_connect_gets_403_before_any_upstream_connection(proxy, upstreams):
    def go():
        s, rep = proxy.connect_tunnel(f"blocked.test:{upstreams.sink_port}")
        s.close()
        assert_denied(rep, "rule", "no-blocked")

    conns, nbytes = sink_bytes_after(upstreams, go)
    assert (conns, nbytes) == (0, 0)


def test_default_connect(proxy, upstreams):
    s, rep = proxy.connect_tunnel(f"nothing.test:{upstreams.tls_port}")
    s.close()
    assert_denied(rep, "default")


@pytest.mark.parametrize(
    "first",
    [
        tls_client_hello("evil.test"),
        tls_client_hello(None),
        b"GET / HTTP/1.1\r\nHost: public.test\r\n\r\n",
        b"SSH-2.0-x\r\n",
    ],
    ids=["sni-mismatch", "no-sni", "plain-http", "not-tls"],
)
def test_bad_first_bytes_close_the_tunnel_and_nothing_reaches_upstream(proxy, upstreams, first):
    flow = {}
    n = len(proxy.decisions(reason="sni_mismatch"))

    def go():
        s, rep = proxy.connect_tunnel(f"public.test:{upstreams.sink_port}")
        assert rep.status == 200
        s.sendall(first)
        assert closed_by_proxy(s)
        s.close()
        flow["ev"] = proxy.wait_event("egress.decision", reason="sni_mismatch", count=n + 1)

    _, nbytes = sink_bytes_after(upstreams, go)
    assert nbytes == 0
    ev = flow["ev"]
    assert (
        ev["decision"] == "deny" and ev["layer"] == "connect" and ev["destination"]["host"] == "public.test"
    )
    # The same tunnel has exactly two decisions: the CONNECT allow, then this refusal.
    same = proxy.decisions(flow_id=ev["flow_id"])
    assert [e["decision"] for e in same] == ["allow", "deny"]


def test_raw_tcp_rule_carries_non_tls_bytes(proxy, upstreams):
    def go():
        s, rep = proxy.connect_tunnel(f"www.public.test:{upstreams.sink_port}")
        assert rep.status == 200
        s.sendall(b"x" * 1000)
        time.sleep(0.2)
        s.close()

    _, nbytes = sink_bytes_after(upstreams, go)
    assert nbytes == 1000


def test_raw_tcp_server_speaks_first(proxy, upstreams):
    s, rep = proxy.connect_tunnel(f"www.public.test:{upstreams.greet_port}")
    assert rep.status == 200
    s.settimeout(5)
    greeting = rep.body  # the greeting may arrive in the same read as the 200
    while len(greeting) < len(b"SSH-2.0-test"):
        greeting += s.recv(100)
    assert greeting.startswith(b"SSH-2.0-test")
    s.sendall(b"ping")
    assert s.recv(100) == b"ping"
    s.close()


def test_server_speaking_first_without_raw_tcp_is_refused(proxy, upstreams):
    s, rep = proxy.connect_tunnel(f"public.test:{upstreams.greet_port}")
    assert rep.status == 200
    assert closed_by_proxy(s)
    s.close()


def test_ip_literal_authority_may_omit_sni(proxy, upstreams):
    def go():
        s, rep = proxy.connect_tunnel(f"127.0.0.2:{upstreams.sink_port}")
        assert rep.status == 200
        s.sendall(tls_client_hello(None))
        time.sleep(0.2)
        s.close()

    _, nbytes = sink_bytes_after(upstreams, go)
    assert nbytes > 0


def test_upstream_failure_after_allowed_connect_is_502_allow(proxy, upstreams):
    s, rep = proxy.connect_tunnel(f"public.test:{upstreams.closed_port}")
    s.close()
    assert rep.status == 502
    assert rep.headers["x-portcullis-decision"] == "allow"
    assert rep.json()["reason"] == "upstream_error"


# ---- inspected tunnels (a rule with methods/paths) ------------------------------------------------------


def test_inspected_tunnel_decides_each_request(proxy, upstreams):
    base = f"https://api.public.test:{upstreams.tls_port}"
    r = proxy.curl(base + "/ok/1")
    assert r.exit_code == 0 and r.status == 200, r.stderr
    ev = proxy.wait_event("egress.decision", **{"request.path": "/ok/1", "layer": "inspected"})
    assert ev["decision"] == "allow" and ev["rule"] == "api-reads" and ev["request"]["scheme"] == "https"
    r = proxy.curl(base + "/elsewhere")
    assert r.status == 403 and r.headers["x-portcullis-reason"] == "default"
    assert r.json()["reason"] == "default"
    r = proxy.curl(base + "/ok/1", "-X", "POST", "-d", "x")
    assert r.status == 403 and r.headers["x-portcullis-decision"] == "deny"
    assert not upstreams.seen(lambda q: q["path"] == "/elsewhere" or q["method"] == "POST")


def tls_tunnel(proxy, authority: str, server_name: str) -> ssl.SSLSocket:
    s, rep = proxy.connect_tunnel(authority)
    assert rep.status == 200
    ctx = ssl.create_default_context(cafile=str(proxy.trust_bundle()))
    return ctx.wrap_socket(s, server_hostname=server_name)


@pytest.mark.parametrize(
    "request_head",
    [
        "GET /ok/1 HTTP/1.1\r\nHost: public.test:{port}\r\n\r\n",
        "GET /ok/1 HTTP/1.1\r\nHost: api.public.test:1\r\n\r\n",
        "GET https://public.test:{port}/ok/1 HTTP/1.1\r\nHost: api.public.test:{port}\r\n\r\n",
        "GET https://public.test:{port}/ok/1 HTTP/1.1\r\nHost: public.test:{port}\r\n\r\n",
    ],
    ids=["host-header", "host-port", "absolute-other-host", "absolute-and-host-other"],
)
def test_inspected_tunnel_requests_must_name_the_connect_authority(proxy, upstreams, request_head):
    port = upstreams.tls_port
    before = len(upstreams.seen())
    with tls_tunnel(proxy, f"api.public.test:{port}", "api.public.test") as t:
        t.sendall(request_head.format(port=port).encode())
        r = read_reply(t)
    assert_denied(r, "host_mismatch")
    assert len(upstreams.seen()) == before


def test_inspected_tunnel_keepalive(proxy, upstreams):
    port = upstreams.tls_port
    with tls_tunnel(proxy, f"api.public.test:{port}", "api.public.test") as t:
        for i in range(21):
            t.sendall(f"GET /ok/{i} HTTP/1.1\r\nHost: api.public.test:{port}\r\n\r\n".encode())
            assert read_reply(t).status == 200, i
    inner = proxy.wait_event("egress.decision", **{"request.path": "/ok/20", "layer": "inspected"})
    connect = [
        e
        for e in proxy.decisions(layer="connect", reason="inspect")
        if e["client"]["port"] == inner["client"]["port"]
    ]
    assert len(connect) == 1
    closed = proxy.wait_event("tunnel.closed", flow_id=connect[0]["flow_id"])
    assert closed["inspected"] is True and closed["bytes_up"] > 0 and closed["bytes_down"] > 0


def test_upstream_tls_is_verified_against_the_name_not_the_pinned_ip(proxy, upstreams):
    # wrongcert.test is pinned to 127.0.0.3, whose certificate is for other.test only.
    r = proxy.curl(f"https://wrongcert.test:{upstreams.other_tls_port}/ok/1")
    assert r.status == 502, (r.status, r.stderr)
    assert r.headers["x-portcullis-decision"] == "allow"
    assert not upstreams.seen(lambda q: q["server"] == "other")


# ---- HTTP/2 from clients --------------------------------------------------------------------------------


def test_http2_through_a_passthrough_tunnel(proxy, upstreams):
    r = proxy.curl(
        f"https://public.test:{upstreams.h2_port}/h2pt", "--http2", "--cacert", str(upstreams.ca_pem)
    )
    assert r.exit_code == 0 and r.status == 200, r.stderr
    assert r.json()["server"] == "h2"


def test_http2_in_an_inspected_tunnel_is_decided_per_request(proxy, upstreams):
    base = f"https://api.public.test:{upstreams.h2_port}"
    r = proxy.curl(base + "/ok/h2", "--http2", "-v")
    assert r.exit_code == 0 and r.status == 200, r.stderr
    assert "using HTTP/2" in r.stderr and r.json()["server"] == "h2"
    ev = proxy.wait_event("egress.decision", **{"request.path": "/ok/h2", "layer": "inspected"})
    assert ev["decision"] == "allow"
    r = proxy.curl(base + "/denied/h2", "--http2", "-v")
    assert "using HTTP/2" in r.stderr
    assert r.status == 403 and r.headers["x-portcullis-decision"] == "deny"
    assert r.headers["x-portcullis-reason"] == "default" and r.json()["reason"] == "default"
    assert not upstreams.seen(lambda q: q["path"] == "/denied/h2")


def test_inspect_always_decides_every_request_and_asks_about_requests_not_tunnels(upstreams, tmp_path):
    cfg = base_config(
        upstreams,
        tmp_path,
        tls={"inspect": "always", "ca_dir": "certs/", "upstream_ca": str(upstreams.ca_pem)},
    )
    cfg["approvals"]["hold"] = False
    rules = [RULES[0], {"name": "ask", "action": "approval", "hosts": ["approve.test"]}]
    with PortcullisProc(tmp_path, upstreams, rules=rules, config=cfg) as p:
        r = p.curl(f"https://public.test:{upstreams.tls_port}/always?x=1")
        assert r.status == 200, r.stderr
        ev = p.wait_event("egress.decision", **{"request.path": "/always"})
        assert ev["layer"] == "inspected" and ev["decision"] == "allow" and ev["rule"] == "public"
        r = p.curl(f"https://approve.test:{upstreams.tls_port}/held")
        assert r.status == 403 and r.headers["x-portcullis-reason"] == "approval_pending"
        assert int(r.headers["retry-after"]) > 0
        body = r.json()
        assert body["reason"] == "approval_pending" and body["approval_id"] and body["rule"] == "ask"
        assert not upstreams.seen(lambda q: q["path"] == "/held")


@pytest.mark.parametrize("spelling", ["BLOCKED.TEST", "blocked.test.", "Blocked.Test.", "xn--blocked-.test"])
def test_denied_name_spellings_on_connect(proxy, upstreams, spelling):
    s, rep = proxy.connect_tunnel(f"{spelling}:{upstreams.tls_port}")
    s.close()
    if spelling.startswith("xn--"):  # not valid punycode: mitmproxy's parser refuses it; our 400 page
        assert rep.status == 400 and rep.headers["x-portcullis-decision"] == "deny"
        assert rep.headers["x-portcullis-reason"] == "bad_request" and rep.json()["reason"] == "bad_request"
    else:
        assert_denied(rep, "rule", "no-blocked")


def test_trailing_dot_authority_with_plain_sni_is_the_same_host(proxy, upstreams):
    r = proxy.curl(f"https://public.test.:{upstreams.tls_port}/dot", "--cacert", str(upstreams.ca_pem))
    assert r.exit_code == 0 and r.status == 200, r.stderr


def _h2_request(tls: ssl.SSLSocket, authority: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/2 request on an already negotiated (ALPN h2) TLS socket; returns status, headers, body."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path)],
        end_stream=True,
    )
    tls.sendall(conn.data_to_send())
    status, headers, body = 0, {}, b""
    while True:
        data = tls.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                headers = {str(k): str(v) for k, v in ev.headers}
                status = int(headers[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                return status, headers, body
        tls.sendall(conn.data_to_send())
    return status, headers, body


@pytest.mark.parametrize("authority", ["public.test:{port}", "api.public.test:1", "evil.test"])
def test_http2_authority_must_name_the_connect_authority(proxy, upstreams, authority):
    port = upstreams.h2_port
    before = len(upstreams.seen())
    s, rep = proxy.connect_tunnel(f"api.public.test:{port}")
    assert rep.status == 200
    ctx = ssl.create_default_context(cafile=str(proxy.trust_bundle()))
    ctx.set_alpn_protocols(["h2"])
    with ctx.wrap_socket(s, server_hostname="api.public.test") as t:
        assert t.selected_alpn_protocol() == "h2"
        status, headers, body = _h2_request(t, authority.format(port=port), "/ok/1")
    assert status == 403 and headers["x-portcullis-decision"] == "deny"
    assert headers["x-portcullis-reason"] == "host_mismatch"
    assert json.loads(body)["reason"] == "host_mismatch"
    assert len(upstreams.seen()) == before


def test_ip_literal_authority_with_a_name_in_sni_is_refused(proxy, upstreams):
    def go():
        s, rep = proxy.connect_tunnel(f"127.0.0.2:{upstreams.sink_port}")
        assert rep.status == 200
        s.sendall(tls_client_hello("blocked.test"))
        assert closed_by_proxy(s)
        s.close()

    _, nbytes = sink_bytes_after(upstreams, go)
    assert nbytes == 0
