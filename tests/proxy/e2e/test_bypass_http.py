"""Requests shaped so that the proxy and a lenient upstream read them differently: obsolete line
folding and bare CR in headers, absolute-form targets inside tunnels and in HTTP/2 `:path`, bad
`:scheme`/method/target bytes, and requests mitmproxy refuses by itself. Every refusal is one logged
`bad_request` decision; the oracle is what reached the upstreams (raw recorders, no parser between)."""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.h2client import h2_request, h2_tls
from tests.harness import PortcullisProc, base_config, read_reply

pytestmark = pytest.mark.e2e

RULES = [
    {"name": "public", "action": "allow", "hosts": ["public.test"]},
    {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
    {
        "name": "api",
        "action": "allow",
        "hosts": ["api.public.test"],
        "methods": ["GET", "POST"],
        "paths": ["/*"],
    },
]


@pytest.fixture(scope="module")
def proxy(upstreams, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bypass-http")
    with PortcullisProc(folder, upstreams, rules=RULES, config=base_config(upstreams, folder)) as p:
        yield p


@pytest.fixture
def clean(upstreams):
    upstreams.clear()
    return upstreams


def _bad_request_logged(proxy, n_before: int, **match) -> dict:
    ev = proxy.wait_event("egress.decision", reason="bad_request", count=n_before + 1, **match)
    evs = proxy.decisions(reason="bad_request")
    assert len(evs) == n_before + 1, evs[n_before:]
    ev = evs[-1]
    assert ev["decision"] == "deny" and ev["enforced"] is True
    assert ev["client"]["address"] == "127.0.0.1" and isinstance(ev["client"]["port"], int)
    return ev


def _nothing_arrived(u) -> None:
    # An inspected tunnel connects (and handshakes) eagerly: an empty connection carries nothing.
    assert [b for b in u.recorded_bytes() if b] == [] and u.seen() == [], (u.recorded_bytes(), u.seen())


def _inspected(proxy, port: int) -> ssl.SSLSocket:
    s, rep = proxy.connect_tunnel(f"api.public.test:{port}")
    assert rep.status == 200, rep
    ctx = ssl.create_default_context(cafile=str(proxy.trust_bundle()))
    return ctx.wrap_socket(s, server_hostname="api.public.test")


# ---------------------------------------------------------------------------- header framing


def _plain(u, headers: bytes) -> bytes:
    return (
        f"GET http://public.test:{u.record_port}/x HTTP/1.1\r\nHost: public.test:{u.record_port}\r\n".encode()
        + headers
        + b"\r\n"
    )


FRAMING = [
    ("obs-fold", b"X-Note: a\r\n Host: blocked.test\r\n"),
    ("obs-fold-tab", b"X-Note: a\r\n\tHost: blocked.test\r\n"),
    ("bare-cr", b"X-A: 1\rHost: blocked.test\r\n"),
    ("nul", b"X-A: 1\x00Host: blocked.test\r\n"),
    ("vertical-tab", b"X-A: 1\x0bHost: blocked.test\r\n"),
    ("del", b"X-A: 1\x7f\r\n"),
    ("space-before-colon", b"Host : blocked.test\r\n"),
    ("tab-in-name", b"Ho\tst: blocked.test\r\n"),
    ("cl-and-te", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
    ("two-cl", b"Content-Length: 0\r\nContent-Length: 5\r\n"),
    ("bad-cl", b"Content-Length: 5x\r\n"),
    ("te-obfuscated", b"Transfer-Encoding: xchunked\r\n"),
    ("te-twice", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
]


@pytest.mark.parametrize("extra", [c[1] for c in FRAMING], ids=[c[0] for c in FRAMING])
def test_header_framing_a_lenient_upstream_reads_differently_is_400_and_logged(proxy, clean, extra):
    n = len(proxy.decisions(reason="bad_request"))
    reply = proxy.raw(_plain(clean, extra))
    assert reply.status == 400, (reply.status, reply.body[:200])
    assert reply.headers["x-portcullis-reason"] == "bad_request"
    _bad_request_logged(proxy, n)
    _nothing_arrived(clean)


@pytest.mark.parametrize("extra", [c[1] for c in FRAMING[:6]], ids=[c[0] for c in FRAMING[:6]])
def test_header_framing_inside_an_inspected_tunnel(proxy, clean, extra):
    n = len(proxy.decisions(reason="bad_request"))
    with _inspected(proxy, clean.record_tls_port) as tls:
        tls.sendall(b"GET /x HTTP/1.1\r\nHost: api.public.test:%d\r\n%s\r\n" % (clean.record_tls_port, extra))
        reply = read_reply(tls)
    assert reply.status == 400
    ev = _bad_request_logged(proxy, n)
    assert ev["layer"] == "inspected"
    _nothing_arrived(clean)


def test_a_clean_request_still_reaches_the_recorder(proxy, clean):
    reply = proxy.raw(_plain(clean, b"X-Note: a b\tc\r\n"))
    assert reply.status == 200
    sent = [b for b in clean.recorded_bytes() if b]
    assert len(sent) == 1 and b"X-Note: a b\tc\r\n" in sent[0]


def test_a_cr_just_before_the_line_end_is_stripped_not_forwarded(proxy, clean):
    # mitmproxy trims each header value: "X-A: 1\r\r\n" reaches the upstream as "X-A: 1\r\n".
    reply = proxy.raw(_plain(clean, b"X-A: 1\r\r\n"))
    assert reply.status == 200
    (sent,) = [b for b in clean.recorded_bytes() if b]
    assert b"X-A: 1\r\n" in sent and b"\r\r" not in sent and sent.count(b"\r") == sent.count(b"\r\n")


# ------------------------------------------------------------------- request lines mitmproxy refuses

MALFORMED = [
    ("garbage", b"GARBAGE\r\n\r\n"),
    ("bad-version", b"GET http://public.test/ HTTP/1.x\r\n\r\n"),
    ("bad-authority", b"GET http://public.test:99999/ HTTP/1.1\r\n\r\n"),
    ("userinfo", b"GET http://public.test@blocked.test/ HTTP/1.1\r\n\r\n"),
    ("header-no-colon", b"GET http://public.test/ HTTP/1.1\r\nHost public.test\r\n\r\n"),
    ("leading-space-header", b"GET http://public.test/ HTTP/1.1\r\n Host: blocked.test\r\n\r\n"),
    ("bad-chunked-te", b"GET http://public.test/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("connect-no-port", b"CONNECT public.test HTTP/1.1\r\n\r\n"),
]


@pytest.mark.parametrize("data", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_requests_mitmproxy_refuses_itself_are_one_bad_request_decision(proxy, clean, data):
    n = len(proxy.decisions(reason="bad_request"))
    reply = proxy.raw(data)
    assert reply.status == 400 and reply.headers["x-portcullis-reason"] == "bad_request"
    _bad_request_logged(proxy, n)
    _nothing_arrived(clean)


def test_a_malformed_request_inside_an_inspected_tunnel_is_logged(proxy, clean):
    n = len(proxy.decisions(reason="bad_request"))
    with _inspected(proxy, clean.record_tls_port) as tls:
        tls.sendall(b"GARBAGE\r\n\r\n")
        reply = read_reply(tls)
    assert reply.status == 400
    assert _bad_request_logged(proxy, n)["layer"] == "inspected"
    _nothing_arrived(clean)


@pytest.mark.parametrize(
    "target", ["http://api.public.test:{port}/x", "https://api.public.test:{port}/x", "*"]
)
def test_inside_an_inspected_tunnel_only_origin_form_targets_pass(proxy, clean, target):
    # An absolute-form target naming another host is host_mismatch (tests/proxy/e2e/test_connect.py).
    n = len(proxy.decisions(reason="bad_request"))
    t = target.format(port=clean.record_tls_port)
    with _inspected(proxy, clean.record_tls_port) as tls:
        tls.sendall(f"GET {t} HTTP/1.1\r\nHost: api.public.test:{clean.record_tls_port}\r\n\r\n".encode())
        reply = read_reply(tls)
    assert reply.status == 400
    assert _bad_request_logged(proxy, n)["layer"] == "inspected"
    _nothing_arrived(clean)


def test_a_connect_inside_an_inspected_tunnel_is_answered_and_logged_alike(proxy, clean):
    inner = {"request.method": "CONNECT", "layer": "inspected"}
    n = len(proxy.decisions(**inner))
    with _inspected(proxy, clean.record_tls_port) as tls:
        tls.sendall(b"CONNECT blocked.test:443 HTTP/1.1\r\nHost: blocked.test:443\r\n\r\n")
        reply = read_reply(tls)
    # stdout is written by its own thread: the answer may arrive a moment before its event does
    ev = proxy.wait_event("egress.decision", count=n + 1, **inner)
    assert reply.status in (400, 403)
    assert reply.headers["x-portcullis-reason"] == ev["reason"] == "bad_request"
    _nothing_arrived(clean)


# ------------------------------------------------------------------------------------------ HTTP/2


def _h2_headers(
    authority: str, path: str, scheme: str = "https", method: str = "GET"
) -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path)]


H2_BAD = [
    ("absolute-path", "GET", "https", "http://blocked.test:{port}/x"),
    ("absolute-same-host", "GET", "https", "https://api.public.test:{port}/x"),
    ("no-slash", "GET", "https", "x"),
    ("space-in-path", "GET", "https", "/x HTTP/1.1"),
    ("crlf-in-path", "GET", "https", "/x\r\nHost: blocked.test"),
    ("method-with-space", "GET http://blocked.test/", "https", "/x"),
    ("asterisk-get", "GET", "https", "*"),
]


@pytest.mark.parametrize(("method", "scheme", "path"), [c[1:] for c in H2_BAD], ids=[c[0] for c in H2_BAD])
def test_h2_request_inside_an_inspected_tunnel_must_be_origin_form(proxy, clean, method, scheme, path):
    n = len(proxy.decisions(reason="bad_request"))
    port = clean.h2_port
    s, rep = proxy.connect_tunnel(f"api.public.test:{port}")
    with h2_tls(s, "api.public.test", str(proxy.trust_bundle())) as tls:
        reply = h2_request(
            tls, _h2_headers(f"api.public.test:{port}", path.format(port=port), scheme, method)
        )
    assert reply.status in (400, None), reply
    _bad_request_logged(proxy, n)
    _nothing_arrived(clean)


def test_h2_origin_form_inside_an_inspected_tunnel_passes(proxy, clean):
    port = clean.h2_port
    s, rep = proxy.connect_tunnel(f"api.public.test:{port}")
    with h2_tls(s, "api.public.test", str(proxy.trust_bundle())) as tls:
        reply = h2_request(tls, _h2_headers(f"api.public.test:{port}", "/ok"))
    assert reply.status == 200, reply
    assert [r["path"] for r in clean.seen()] == ["/ok"]


@pytest.mark.parametrize(
    ("scheme", "path"),
    [
        ("http", "http://blocked.test:{port}/x"),
        ("http", "/x\r\nX: y"),
        ("gopher", "/x"),
        ("http://blocked.test/", "/x"),
    ],
    ids=["absolute-path", "crlf-path", "odd-scheme", "scheme-injection"],
)
def test_h2_over_tls_straight_to_the_proxy_port(proxy, clean, scheme, path):
    n = len(proxy.decisions(reason="bad_request"))
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with h2_tls(s, "public.test") as tls:
        reply = h2_request(
            tls, _h2_headers(f"public.test:{clean.record_port}", path.format(port=clean.record_port), scheme)
        )
    assert reply.status in (400, None), reply
    _bad_request_logged(proxy, n)
    _nothing_arrived(clean)


def test_a_malformed_h2_request_is_logged(proxy, clean):
    n = len(proxy.decisions(reason="bad_request"))
    port = clean.h2_port
    s, rep = proxy.connect_tunnel(f"api.public.test:{port}")
    with h2_tls(s, "api.public.test", str(proxy.trust_bundle())) as tls:
        reply = h2_request(tls, [(":method", "GET"), (":scheme", "https"), (":authority", "api.public.test")])
    assert reply.goaway or reply.closed or reply.status == 400, reply
    _bad_request_logged(proxy, n)
    _nothing_arrived(clean)
