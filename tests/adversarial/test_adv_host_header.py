"""Host against the target: plain HTTP, inspected tunnels (HTTP/1 and HTTP/2), TLS straight to the
proxy port, h2c and websocket upgrades, and keep-alive / pipelined host switching.

Oracles: the recorder upstreams keep every byte and parse every request head as a lenient server
would (folded and bare-CR lines split out); a head that arrived must carry exactly one Host, naming
the allowed authority, and `blocked.test` must appear nowhere in what arrived.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from tests.adversarial.adv import (
    Adv,
    ForbiddenArrival,
    Replies,
    Window,
    _ok,
    case,
    h2_request,
    judge,
    proxy_fixture,
)

pytestmark = pytest.mark.e2e

proxy = proxy_fixture(
    "hosthdr",
    [
        {"name": "public", "action": "allow", "hosts": ["public.test"]},
        {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
        {"name": "api-reads", "action": "allow", "hosts": ["api.public.test"], "methods": ["GET", "POST"],
         "paths": ["/ok/*"]},
    ],
)



def heads_name_only(w: Window, authority: str) -> None:
    """Every request head that arrived carries exactly one Host, and it is `authority`."""
    for c in w.conns:
        for h in c.heads:
            hosts = [v for k, v in h["headers"] if k == "host"]
            _ok(len(hosts) == 1 and _same(hosts[0], authority),
                f"a request head reached the upstream with Host {hosts} (allowed: {authority}): {h['line']}",
                ForbiddenArrival)


def _same(host_header: str, authority: str) -> bool:
    from addons.policy.authority import same_destination

    host, port = authority.rsplit(":", 1)
    return same_destination(host_header, host, int(port), "http")


# ---- plain HTTP --------------------------------------------------------------------------------------

PLAIN = [
    # (request with {P} = recorder port, expectation)
    case("matching", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\n\r\n", "allow"),
    case("case-and-dot", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: PUBLIC.Test.:{P}\r\n\r\n", "allow"),
    case("tab-around-value", "GET http://public.test:{P}/a HTTP/1.1\r\nHost:\tpublic.test:{P}\t\r\n\r\n",
         "allow"),
    case("other-host", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: blocked.test\r\n\r\n",
         "deny:host_mismatch"),
    case("other-host-port", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: blocked.test:{P}\r\n\r\n",
         "deny:host_mismatch"),
    case("other-port", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:1\r\n\r\n",
         "deny:host_mismatch"),
    case("default-port", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test\r\n\r\n",
         "deny:host_mismatch"),
    case("host-list", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}, blocked.test\r\n\r\n",
         "deny:host_mismatch"),
    case("empty-host", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: \r\n\r\n", "deny:host_mismatch"),
    case("duplicate-host", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\n"
         "Host: blocked.test\r\n\r\n", "deny:bad_request"),
    case("duplicate-host-same", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\n"
         "Host: public.test:{P}\r\n\r\n", "deny:bad_request"),
    case("duplicate-host-lowercase", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\n"
         "host: blocked.test\r\n\r\n", "deny:bad_request"),
    case("lf-line-endings-second-host", "GET http://public.test:{P}/a HTTP/1.1\nHost: public.test:{P}\n"
         "X-A: 1\nHost: blocked.test\n\n", "deny:bad_request"),
    case("space-before-colon", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\n"
         "Host : blocked.test\r\n\r\n", "deny:bad_request:4xx"),
    case("obs-fold-host-line", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\n"
         "X-Note: a\r\n Host: blocked.test\r\n\r\n", "deny:bad_request:4xx"),
    case("obs-fold-host-value", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\n"
         " blocked.test\r\n\r\n", "deny:host_mismatch"),
    case("obs-fold-first-line", "GET http://public.test:{P}/a HTTP/1.1\r\n Host: blocked.test\r\n"
         "Host: public.test:{P}\r\n\r\n", "deny:bad_request:4xx"),
    case("bare-cr", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\nX-A: 1\r"
         "Host: blocked.test\r\n\r\n", "deny:bad_request:4xx"),
    case("nul-in-value", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\nX-A: 1\x00"
         "Host: blocked.test\r\n\r\n", "deny:bad_request:4xx"),
    # RFC 9112 3.2: HTTP/1.1 without Host is a 400; HTTP/1.0 gets the target's authority as Host
    # (heads_name_only: every head that arrives names exactly public.test:{P}).
    case("no-host-http11", "GET http://public.test:{P}/a HTTP/1.1\r\n\r\n", "deny:bad_request:400"),
    case("no-host-http10", "GET http://public.test:{P}/a HTTP/1.0\r\n\r\n", "allow"),
    case("https-absolute-denied", "GET https://blocked.test:{P}/ HTTP/1.1\r\nHost: blocked.test:{P}\r\n\r\n",
         "deny:rule"),
    case("origin-form-denied-host", "GET /a HTTP/1.1\r\nHost: blocked.test:{P}\r\n\r\n", "deny:rule"),
    case("origin-form-no-host", "GET /a HTTP/1.1\r\n\r\n", "deny:bad_request:4xx"),
    case("websocket-denied", "GET http://blocked.test:{P}/ws HTTP/1.1\r\nHost: blocked.test:{P}\r\n"
         "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
         "Sec-WebSocket-Version: 13\r\n\r\n", "deny:rule"),
    case("websocket-host-mismatch", "GET http://public.test:{P}/ws HTTP/1.1\r\nHost: blocked.test:{P}\r\n"
         "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
         "Sec-WebSocket-Version: 13\r\n\r\n", "deny:host_mismatch"),
    case("h2c-upgrade-stripped", "GET http://public.test:{P}/a HTTP/1.1\r\nHost: public.test:{P}\r\n"
         "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
         "allow"),
    case("h2c-upgrade-to-denied", "GET http://blocked.test:{P}/a HTTP/1.1\r\nHost: blocked.test:{P}\r\n"
         "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
         "deny:rule"),
]


@pytest.mark.parametrize(("request_text", "expect"), PLAIN)
def test_host_against_target_plain_http(proxy, request_text, expect):
    port = proxy.rec.http
    m = proxy.mark()
    out = proxy.send(request_text.replace("{P}", str(port)).encode("latin-1"), timeout=3)
    w = proxy.window(m)
    heads_name_only(w, f"public.test:{port}")
    judge(w, out, expect)


# ---- upgrades: what the client sends after a 101 must not reach anyone as a new request --------------

SMUGGLED = "GET http://blocked.test:{P}/after HTTP/1.1\r\nHost: blocked.test:{P}\r\n\r\n"
UPGRADES = [
    case("websocket", "websocket", 101, 0),
    case("h2c-and-websocket", "h2c, websocket", 101, 0),
    case("unknown-protocol", "foo/1.0", 101, 0),
    case("h2c-uppercase", "H2C", 200, 2),  # stripped, so the bytes after it are pipelined requests
]


@pytest.mark.parametrize(("upgrade", "status", "denied_after"), UPGRADES)
def test_bytes_after_an_upgrade_are_never_a_new_request(proxy, upgrade, status, denied_after):
    port = proxy.rec.upgrade
    m = proxy.mark()
    with socket.create_connection(("127.0.0.1", proxy.p.port), timeout=3) as s:
        s.sendall(
            f"GET http://public.test:{port}/ws HTTP/1.1\r\nHost: public.test:{port}\r\nUpgrade: {upgrade}\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head and (chunk := s.recv(4096)):
            head += chunk
        follow = SMUGGLED.replace("{P}", str(port)).encode()
        for _ in range(2):
            try:
                s.sendall(follow)
            except OSError:
                break
            time.sleep(0.1)
    w = proxy.window(m)
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head[:80]
    _ok(b"blocked.test" not in w.arrived, f"bytes after the upgrade reached the upstream: {w.arrived!r}",
        ForbiddenArrival)
    assert [d["decision"] for d in w.decisions] == ["allow"] + ["deny"] * denied_after, w.decisions


# ---- inspected tunnels, HTTP/1 ---------------------------------------------------------------------------

HOST_API = "Host: api.public.test:{P}\r\n"
INSPECTED = [
    case("matching", "GET /ok/1 HTTP/1.1\r\nHost: api.public.test:{P}\r\n\r\n", "allow"),
    case("absolute-same", "GET https://api.public.test:{P}/ok/1 HTTP/1.1\r\n" + HOST_API + "\r\n",
         "deny:bad_request"),
    case("absolute-http-scheme-same", "GET http://api.public.test:{P}/ok/1 HTTP/1.1\r\n"
         "Host: api.public.test:{P}\r\n\r\n", "deny:bad_request"),
    case("other-host", "GET /ok/1 HTTP/1.1\r\nHost: blocked.test\r\n\r\n", "deny:host_mismatch"),
    case("allowed-other-host", "GET /ok/1 HTTP/1.1\r\nHost: public.test:{P}\r\n\r\n", "deny:host_mismatch"),
    case("other-port", "GET /ok/1 HTTP/1.1\r\nHost: api.public.test:1\r\n\r\n", "deny:host_mismatch"),
    case("absolute-other", "GET https://blocked.test:{P}/ok/1 HTTP/1.1\r\nHost: api.public.test:{P}\r\n\r\n",
         "deny:host_mismatch"),
    case("absolute-other-and-host", "GET https://blocked.test:{P}/ok/1 HTTP/1.1\r\nHost: blocked.test:{P}"
         "\r\n\r\n", "deny:host_mismatch"),
    case("duplicate-host", "GET /ok/1 HTTP/1.1\r\nHost: api.public.test:{P}\r\nHost: blocked.test\r\n\r\n",
         "deny:bad_request"),
    case("path-not-allowed", "GET /admin HTTP/1.1\r\nHost: api.public.test:{P}\r\n\r\n", "deny:default"),
    case("method-not-allowed", "DELETE /ok/1 HTTP/1.1\r\nHost: api.public.test:{P}\r\n\r\n", "deny:default"),
    case("obs-fold", "GET /ok/1 HTTP/1.1\r\n" + HOST_API + "X-N: a\r\n Host: blocked.test\r\n\r\n",
         "deny:bad_request:4xx"),
    case("bare-cr", "GET /ok/1 HTTP/1.1\r\n" + HOST_API + "X-A: 1\rHost: blocked.test\r\n\r\n",
         "deny:bad_request:4xx"),
    case("no-host", "GET /ok/1 HTTP/1.1\r\n\r\n", "deny:bad_request:400"),
    case("no-host-http10", "GET /ok/1 HTTP/1.0\r\n\r\n", "allow"),  # Host: the CONNECT authority
    case("invalid-header-name", "GET /ok/1 HTTP/1.1\r\nHost: api.public.test:{P}\r\nBad Header: x\r\n\r\n",
         "deny:bad_request:4xx"),
    case("cl-and-te", "POST /ok/1 HTTP/1.1\r\nHost: api.public.test:{P}\r\nContent-Length: 5\r\n"
         "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "deny:bad_request:4xx"),
    case("malformed-line", "GET /ok/1 HTTP/1.1 x\r\n" + HOST_API + "\r\n", "deny:bad_request:4xx"),
    case("connect-inside", "CONNECT blocked.test:443 HTTP/1.1\r\nHost: blocked.test:443\r\n\r\n",
         "deny:bad_request:4xx"),
    case("websocket-path-not-allowed", "GET /ws HTTP/1.1\r\n" + HOST_API + "Upgrade: websocket\r\n"
         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
         "\r\n\r\n", "deny:default"),
    case("h2c-upgrade-stripped", "GET /ok/1 HTTP/1.1\r\nHost: api.public.test:{P}\r\nConnection: Upgrade, "
         "HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", "allow"),
]


def _tls(adv: Adv, port: int, alpn: list[str] | None = None) -> ssl.SSLSocket:
    return adv.tls_tunnel(f"api.public.test:{port}", "api.public.test", alpn=alpn)


@pytest.mark.parametrize(("request_text", "expect"), INSPECTED)
def test_host_against_the_tunnel_in_inspected_http1(proxy, request_text, expect):
    port = proxy.rec.tls
    m = proxy.mark()
    with _tls(proxy, port) as t:
        out = proxy.exchange(t, request_text.replace("{P}", str(port)).encode("latin-1"))
    w = proxy.window(m)
    heads_name_only(w, f"api.public.test:{port}")
    if expect == "allow":
        _ok(out.status == 200, out.summary())
        got = [(d["decision"], d["layer"]) for d in w.decisions]
        _ok(got == [("allow", "connect"), ("allow", "inspected")], got)
        _ok(b"blocked.test" not in w.arrived, w.arrived, ForbiddenArrival)
    else:
        judge(w, out, expect)


# ---- inspected tunnels, HTTP/2 (the h2-only harness upstream records :authority and :path) -------------

def h2_headers(authority: str = "api.public.test:{P}", path: str = "/ok/1", method: str = "GET",
               scheme: str = "https", extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path), *extra]


H2_CASES = [
    case("matching", h2_headers(), "allow"),
    case("scheme-http", h2_headers(scheme="http"), "allow"),
    case("other-authority", h2_headers(authority="blocked.test:{P}"), "deny:host_mismatch:any"),
    case("allowed-other-authority", h2_headers(authority="public.test:{P}"), "deny:host_mismatch:any"),
    case("other-port", h2_headers(authority="api.public.test:1"), "deny:host_mismatch:any"),
    case("host-header-only", [(":method", "GET"), (":scheme", "https"), (":path", "/ok/1"),
                              ("host", "blocked.test:{P}")], "deny:host_mismatch:any"),
    case("path-star", h2_headers(path="*"), "deny:bad_request:any"),
    case("absolute-path-http", h2_headers(path="http://blocked.test:{P}/ok/1"), "deny:bad_request:any"),
    case("absolute-path-https", h2_headers(path="https://blocked.test:{P}/ok/1"), "deny:bad_request:any"),
    case("absolute-path-same-host", h2_headers(path="https://api.public.test:{P}/ok/1"),
         "deny:bad_request:any"),
    case("path-without-slash", h2_headers(path="ok/1"), "deny:bad_request:any"),
    case("host-differs-from-authority", h2_headers(extra=(("host", "blocked.test:{P}"),)),
         "deny:bad_request:any"),
    case("two-authorities", h2_headers(extra=((":authority", "blocked.test:{P}"),)), "deny:bad_request:any"),
    case("connect-method", [(":method", "CONNECT"), (":authority", "blocked.test:443")],
         "deny:bad_request:any"),
    case("path-not-allowed", h2_headers(path="/admin"), "deny:default:any"),
]


def _fmt(headers: list[tuple[str, str]], port: int) -> list[tuple[str, str]]:
    return [(k, v.replace("{P}", str(port))) for k, v in headers]


@pytest.mark.parametrize(("headers", "expect"), H2_CASES)
def test_host_against_the_tunnel_in_inspected_http2(proxy, headers, expect):
    port = proxy.u.h2_port
    m = proxy.mark()
    with _tls(proxy, port, alpn=["h2"]) as t:
        assert t.selected_alpn_protocol() == "h2"
        out = h2_request(t, _fmt(headers, port))
    w = proxy.window(m)
    for r in w.seen:  # what the HTTP/2 upstream received
        _ok(r["host"] == f"api.public.test:{port}" and str(r["path"]).startswith("/"),
            f"the upstream received :authority {r['host']} :path {r['path']}", ForbiddenArrival)
    if expect == "allow":
        _ok(out.status == 200 and len(w.seen) == 1, out.summary())
        _ok([d["decision"] for d in w.decisions] == ["allow", "allow"], w.decisions)
    else:
        judge(w, out, expect)


# ---- TLS (and HTTP/2) straight to the proxy port: mitmproxy accepts it ------------------------------------

def _direct(adv: Adv, alpn: list[str]) -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", adv.p.port), timeout=5)
    ctx = ssl.create_default_context(cafile=str(adv.p.trust_bundle()))
    ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(s, server_hostname="public.test")


DIRECT_H2 = [
    case("allowed", h2_headers(authority="public.test:{P}", path="/d"), "allow"),
    case("denied-authority", h2_headers(authority="blocked.test:{P}", path="/d"), "deny:rule:any"),
    case("absolute-path-denied", h2_headers(authority="public.test:{P}", path="https://blocked.test:{P}/d"),
         "deny:bad_request:any"),
    case("absolute-path-private", h2_headers(authority="public.test:{P}", path="http://127.0.0.1:{P}/d"),
         "deny:bad_request:any"),
]


@pytest.mark.parametrize(("headers", "expect"), DIRECT_H2)
def test_http2_over_tls_straight_to_the_proxy_port(proxy, headers, expect):
    port = proxy.u.h2_port
    m = proxy.mark()
    with _direct(proxy, ["h2"]) as t:
        assert t.selected_alpn_protocol() == "h2"
        out = h2_request(t, _fmt(headers, port))
    w = proxy.window(m)
    for r in w.seen:
        _ok(r["host"] == f"public.test:{port}" and str(r["path"]).startswith("/"),
            f"the upstream received :authority {r['host']} :path {r['path']}", ForbiddenArrival)
    if expect == "allow":
        _ok(out.status == 200 and len(w.seen) == 1, out.summary())
    else:
        judge(w, out, expect)


def test_http1_over_tls_straight_to_the_proxy_port_is_judged_on_its_host(proxy):
    port = proxy.rec.http
    m = proxy.mark()
    with _direct(proxy, ["http/1.1"]) as t:
        out = proxy.exchange(t, f"GET /d HTTP/1.1\r\nHost: blocked.test:{port}\r\n\r\n".encode())
    judge(proxy.window(m), out, "deny:rule")


# ---- keep-alive and pipelined host switching -----------------------------------------------------------

def _get(host: str, port: int, path: str, origin: bool = False) -> bytes:
    target = path if origin else f"http://{host}:{port}{path}"
    return f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def keepalive(adv: Adv, requests: list[bytes], pipelined: bool,
              s: socket.socket | ssl.SSLSocket | None = None) -> list[int | None]:
    """Requests on one connection, one at a time or all in one write; the statuses in order."""
    own = s is None
    sock = s or socket.create_connection(("127.0.0.1", adv.p.port), timeout=5)
    try:
        replies = Replies(sock)
        if pipelined:
            sock.sendall(b"".join(requests))
            return replies.statuses(len(requests))
        out: list[int | None] = []
        for r in requests:
            try:
                sock.sendall(r)
            except OSError:
                out.append(None)
                continue
            out.extend(replies.statuses(1))
        return out
    finally:
        if own:
            sock.close()


KEEPALIVE = [
    case("allow-deny-allow", [("public.test", "/1"), ("blocked.test", "/2"), ("public.test", "/3")],
         [200, 403, 200]),
    case("deny-then-allow", [("blocked.test", "/1"), ("public.test", "/2")], [403, 200]),
    case("origin-form-switch", [("public.test", "/1", True), ("blocked.test", "/2", True),
                                ("public.test", "/3", True)], [200, 403, 200]),
    case("to-loopback-after-allow", [("public.test", "/1"), ("127.0.0.1", "/2")], [200, 403]),
    case("to-the-proxy-after-allow", [("public.test", "/1"), ("localhost", "/2")], [200, 403]),
    case("many-switches", [("public.test" if i % 2 else "blocked.test", f"/{i}") for i in range(10)],
         [200 if i % 2 else 403 for i in range(10)]),
]


@pytest.mark.parametrize("pipelined", [False, True], ids=["keepalive", "pipelined"])
@pytest.mark.parametrize(("steps", "statuses"), KEEPALIVE)
def test_keepalive_and_pipelined_host_switching(proxy, steps, statuses, pipelined):
    port = proxy.rec.http
    reqs = [_get(st[0], port, st[1], origin=len(st) > 2) for st in steps]
    m = proxy.mark()
    got = keepalive(proxy, reqs, pipelined)
    w = proxy.window(m)
    _ok(b"blocked.test" not in w.arrived and b"localhost" not in w.arrived and b"127.0.0.1" not in w.arrived,
        f"a denied request reached the upstream: {w.arrived!r}", ForbiddenArrival)
    paths = [h["target"] for c in w.conns for h in c.heads]
    allowed = [st[1] for st in steps if st[0] == "public.test"]
    assert sorted(paths) == sorted(allowed), paths
    assert got == statuses
    assert [d["decision"] for d in w.decisions] == ["allow" if s == 200 else "deny" for s in statuses]


def test_a_denied_requests_body_is_not_read_as_the_next_request(proxy):
    """Denied on its headers: its body (which spells a request) must not become a second decision."""
    port = proxy.rec.http
    body = _get("public.test", port, "/from-body")
    head = (f"POST http://blocked.test:{port}/up HTTP/1.1\r\nHost: blocked.test:{port}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    m = proxy.mark()
    with socket.create_connection(("127.0.0.1", proxy.p.port), timeout=5) as s:
        s.sendall(head + body + _get("public.test", port, "/next"))
        got = Replies(s).statuses(2)
    w = proxy.window(m)
    paths = [h["target"] for c in w.conns for h in c.heads]
    assert "/from-body" not in paths, paths
    assert got[0] == 403
    assert [d["reason"] for d in w.decisions][:1] == ["rule"]
    assert all(d["request"]["path"] != "/from-body" for d in w.decisions), w.decisions


INSPECTED_KA = [
    case("allow-mismatch-allow", ["api.public.test", "blocked.test", "api.public.test"], [200, 403, 200]),
    case("mismatch-first", ["public.test", "api.public.test"], [403, 200]),
]


@pytest.mark.parametrize("pipelined", [False, True], ids=["keepalive", "pipelined"])
@pytest.mark.parametrize(("hosts", "statuses"), INSPECTED_KA)
def test_keepalive_host_switching_inside_an_inspected_tunnel(proxy, hosts, statuses, pipelined):
    port = proxy.rec.tls
    reqs = [f"GET /ok/{i} HTTP/1.1\r\nHost: {h}:{port}\r\n\r\n".encode() for i, h in enumerate(hosts)]
    m = proxy.mark()
    with _tls(proxy, port) as t:
        got = keepalive(proxy, reqs, pipelined, t)
    w = proxy.window(m)
    heads_name_only(w, f"api.public.test:{port}")
    _ok(b"blocked.test" not in w.arrived, w.arrived, ForbiddenArrival)
    assert got == statuses
    inner = [d["decision"] for d in w.decisions if d["layer"] == "inspected"]
    assert inner == ["allow" if s == 200 else "deny" for s in statuses]


def test_connect_after_a_plain_request_on_the_same_connection(proxy):
    port = proxy.rec.raw
    m = proxy.mark()
    with socket.create_connection(("127.0.0.1", proxy.p.port), timeout=5) as s:
        replies = Replies(s)
        s.sendall(_get("public.test", proxy.rec.http, "/first"))
        first = replies.statuses(1)
        s.sendall(f"CONNECT blocked.test:{port} HTTP/1.1\r\nHost: blocked.test:{port}\r\n\r\n".encode())
        second = replies.statuses(1)
    w = proxy.window(m)
    assert first == [200] and second == [403]
    assert [(d["decision"], d["reason"]) for d in w.decisions] == [("allow", "rule"), ("deny", "rule")]
    assert b"blocked" not in w.arrived


def test_connection_close_means_nothing_after_it_is_read(proxy):
    port = proxy.rec.http
    first = (f"GET http://public.test:{port}/last HTTP/1.1\r\nHost: public.test:{port}\r\n"
             "Connection: close\r\n\r\n").encode()
    m = proxy.mark()
    with socket.create_connection(("127.0.0.1", proxy.p.port), timeout=5) as s:
        s.sendall(first + _get("blocked.test", port, "/after-close"))
        got = Replies(s).statuses(2)
    w = proxy.window(m)
    assert got[0] == 200 and got[1] is None
    assert b"after-close" not in w.arrived
    assert [d["decision"] for d in w.decisions] in (["allow"], ["allow", "deny"])


def test_unknown_scheme_in_absolute_form(upstreams, recorders, tmp_path):
    """Its own proxy: this refusal once logged request.scheme 'ftp', which broke the schema audit at stop."""
    from tests.adversarial.adv import BARRIER_RULE, Adv, adv_config
    from tests.harness import PortcullisProc

    rules = [{"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]}, BARRIER_RULE]
    with PortcullisProc(tmp_path, upstreams, rules=rules, config=adv_config(upstreams, tmp_path)) as p:
        adv = Adv(p, recorders, upstreams)
        port = recorders.http
        m = adv.mark()
        req = f"GET ftp://blocked.test:{port}/ HTTP/1.1\r\nHost: blocked.test:{port}\r\n\r\n"
        out = adv.send(req.encode())
        judge(adv.window(m), out, "deny:bad_request:4xx")
        p.stop()  # the event audit runs here
