"""Plain HTTP through a real proxy: allow/deny/default, Host checks, keep-alive, auth, websockets, 502."""

from __future__ import annotations

import base64
import os

import pytest

from tests.harness import PortcullisProc, base_config, read_reply

pytestmark = pytest.mark.e2e

RULES = [
    {"name": "public", "action": "allow", "hosts": ["public.test"]},
    {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
    {"name": "reviewer-only", "action": "allow", "hosts": ["www.public.test"], "clients": ["reviewer"]},
    {"name": "local-only", "action": "allow", "hosts": ["deep.api.public.test"], "clients": ["loopback"]},
    {"name": "ci-only", "action": "allow", "hosts": ["api.public.test"], "clients": ["ci"]},
]
CLIENTS = [
    {"name": "reviewer", "proxy_auth": {"user": "reviewer", "password_env": "REV_PW"}},
    {"name": "loopback", "cidrs": ["127.0.0.1/32"]},
    {"name": "ci", "cidrs": ["10.1.0.0/16"]},
]
PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def proxy(upstreams, tmp_path_factory):
    folder = tmp_path_factory.mktemp("http")
    cfg = base_config(upstreams, folder, clients=CLIENTS)
    with PortcullisProc(folder, upstreams, rules=RULES, config=cfg, env={"REV_PW": PASSWORD}) as p:
        yield p


def get(host: str, port: int, path: str = "/", headers: str = "", host_header: str | None = None) -> bytes:
    hh = host_header if host_header is not None else f"{host}:{port}"
    return f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {hh}\r\n{headers}\r\n".encode()


def assert_denied(reply, reason: str, rule: str | None = None, status: int = 403) -> dict:
    assert reply.status == status, (reply.status, reply.body[:200])
    assert reply.headers["x-portcullis-decision"] == "deny"
    assert reply.headers["x-portcullis-reason"] == reason
    body = reply.json()
    assert body["error"] == "egress_denied" and body["reason"] == reason and body["rule"] == rule
    assert body["message"]
    assert reply.reason == f"Blocked by Portcullis: {reason} ({rule or 'none'})"
    return body


def test_allow_by_rule(proxy, upstreams):
    r = proxy.raw(get("public.test", upstreams.http_port, "/a/b?token=SECRET"))
    assert r.status == 200 and r.json()["path"] == "/a/b?token=SECRET"
    ev = proxy.wait_event("egress.decision", **{"destination.host": "public.test", "request.path": "/a/b"})
    assert (ev["decision"], ev["reason"], ev["rule"], ev["enforced"]) == ("allow", "rule", "public", True)
    assert ev["destination"]["ip"] == "127.0.0.2" and ev["rule_file"] == "rules/main.yaml"
    assert "SECRET" not in str(ev)


def test_deny_by_rule(proxy, upstreams):
    body = assert_denied(proxy.raw(get("blocked.test", upstreams.http_port)), "rule", "no-blocked")
    assert body["host"] == "blocked.test" and body["port"] == upstreams.http_port
    ev = proxy.wait_event("egress.decision", **{"destination.host": "blocked.test"})
    assert ev["decision"] == "deny" and ev["rule"] == "no-blocked"
    assert not upstreams.seen(lambda r: r["host"].startswith("blocked.test"))


def test_default_deny(proxy, upstreams):
    assert_denied(proxy.raw(get("unknown.test", upstreams.http_port)), "default")


@pytest.mark.parametrize(
    "host_header", ["blocked.test", "blocked.test:{port}", "public.test:1", "public.test.evil"]
)
def test_host_header_must_match_target(proxy, upstreams, host_header):
    hh = host_header.format(port=upstreams.http_port)
    before = len(upstreams.seen())
    assert_denied(proxy.raw(get("public.test", upstreams.http_port, host_header=hh)), "host_mismatch")
    assert len(upstreams.seen()) == before


def test_host_header_case_and_trailing_dot_are_the_same_host(proxy, upstreams):
    r = proxy.raw(get("public.test", upstreams.http_port, host_header=f"PUBLIC.test.:{upstreams.http_port}"))
    assert r.status == 200


def test_keepalive_connection_naming_a_new_host_is_judged_again(proxy, upstreams):
    with proxy.connect() as s:
        s.sendall(get("public.test", upstreams.http_port, "/one"))
        assert read_reply(s).status == 200
        s.sendall(get("blocked.test", upstreams.http_port, "/two"))
        assert_denied(read_reply(s), "rule", "no-blocked")
        s.sendall(get("public.test", upstreams.http_port, "/three"))
        assert read_reply(s).status == 200
    assert not upstreams.seen(lambda r: r["path"] == "/two")


def test_25_keepalive_requests_through_a_pinned_name_reuse_one_upstream_connection(proxy, upstreams):
    with proxy.connect() as s:
        ports = set()
        for i in range(25):
            s.sendall(get("public.test", upstreams.http_port, f"/ka/{i}"))
            r = read_reply(s)
            assert r.status == 200, i
            ports.add(r.json()["peer_port"])
    assert len(ports) == 1  # the hostname was restored after pinning, so mitmproxy reuses the connection


def test_upstream_failure_after_allow_is_502_with_decision_allow(proxy, upstreams):
    r = proxy.raw(get("public.test", upstreams.closed_port))
    assert r.status == 502
    assert r.headers["x-portcullis-decision"] == "allow"
    assert r.json()["reason"] == "upstream_error"
    ev = proxy.wait_event("egress.decision", **{"destination.port": upstreams.closed_port})
    assert ev["decision"] == "allow"


def _basic(user: str, pw: str) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode() + "\r\n"


def test_proxy_auth_identifies_the_client_and_is_not_forwarded(proxy, upstreams):
    r = proxy.raw(get("www.public.test", upstreams.http_port, "/auth", headers=_basic("reviewer", PASSWORD)))
    assert r.status == 200
    assert "Proxy-Authorization" not in r.json()["headers"]
    ev = proxy.wait_event("egress.decision", **{"request.path": "/auth"})
    assert ev["client"]["user"] == "reviewer" and ev["client"]["name"] == "reviewer"
    assert PASSWORD not in str(proxy.events)


@pytest.mark.parametrize("cred", [("reviewer", "wrong"), ("nobody", PASSWORD), None])
def test_bad_proxy_credentials_get_407(proxy, upstreams, cred):
    hdr = _basic(*cred) if cred else "Proxy-Authorization: Bearer abc\r\n"
    r = proxy.raw(get("www.public.test", upstreams.http_port, headers=hdr))
    assert_denied(r, "proxy_auth", status=407)
    assert r.headers["proxy-authenticate"].startswith("Basic")


def test_without_credentials_the_client_is_anonymous(proxy, upstreams):
    assert_denied(proxy.raw(get("www.public.test", upstreams.http_port)), "default")


def test_proxy_auth_on_connect(proxy, upstreams):
    s, rep = proxy.connect_tunnel(f"www.public.test:{upstreams.tls_port}", headers=_basic("reviewer", "bad"))
    s.close()
    assert_denied(rep, "proxy_auth", status=407)


def _ws_handshake(host: str, port: int) -> bytes:
    return (
        f"GET http://{host}:{port}/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _ws_text_frame(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def test_websocket_through_an_allowed_host(proxy, upstreams):
    with proxy.connect() as s:
        s.sendall(_ws_handshake("public.test", upstreams.http_port))
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        rest = head.split(b"\r\n\r\n", 1)[1]
        s.sendall(_ws_text_frame("hi"))
        while len(rest) < 2 + len("echo:hi"):
            rest += s.recv(4096)
        assert rest[2 : 2 + 7] == b"echo:hi"
    ev = proxy.wait_event("egress.decision", **{"request.path": "/ws", "destination.host": "public.test"})
    assert ev["request"]["scheme"] == "ws"


def test_websocket_to_a_denied_host(proxy, upstreams):
    assert_denied(proxy.raw(_ws_handshake("blocked.test", upstreams.http_port)), "rule", "no-blocked")


def test_unusable_host_is_bad_request(proxy, upstreams):
    r = proxy.raw(get("a..b.test", upstreams.http_port, host_header=""))
    assert r.status in (400, 403)
    assert r.headers["x-portcullis-decision"] == "deny"
    assert r.headers["x-portcullis-reason"] == "bad_request"
    assert r.json()["reason"] == "bad_request"


def test_malformed_request_line_gets_our_400(proxy):
    with proxy.connect() as s:
        s.sendall(b"GET http://exa mple.test/ HTTP/1.1 extra\r\n\r\n")
        r = read_reply(s)
    assert r.status == 400
    assert r.headers["x-portcullis-decision"] == "deny"
    assert r.headers["x-portcullis-reason"] == "bad_request"
    assert r.json()["reason"] == "bad_request"


def test_origin_form_request_is_judged_on_its_host_header(proxy, upstreams):
    r = proxy.raw(f"GET /origin HTTP/1.1\r\nHost: blocked.test:{upstreams.http_port}\r\n\r\n".encode())
    assert_denied(r, "rule", "no-blocked")


def test_h2c_upgrade_is_stripped(proxy, upstreams):
    r = proxy.raw(
        get(
            "public.test",
            upstreams.http_port,
            "/h2c",
            headers="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            "HTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        )
    )
    assert r.status == 200
    seen = r.json()["headers"]
    assert "Upgrade" not in seen and "HTTP2-Settings" not in seen


def test_audit_mode_lets_denied_traffic_through_and_marks_it(upstreams, tmp_path):
    cfg = base_config(upstreams, tmp_path, mode="audit")
    with PortcullisProc(tmp_path, upstreams, rules=RULES[:2], config=cfg) as p:
        r = p.raw(get("blocked.test", upstreams.http_port, "/audited"))
        assert r.status == 200
        ev = p.wait_event("egress.decision", **{"request.path": "/audited"})
        assert (ev["decision"], ev["reason"], ev["rule"], ev["enforced"]) == (
            "deny",
            "rule",
            "no-blocked",
            False,
        )
        r = p.raw(get("public.test", upstreams.http_port, "/ok"))
        assert r.status == 200
        ev = p.wait_event("egress.decision", **{"request.path": "/ok"})
        assert ev["decision"] == "allow" and ev["enforced"] is True
        # Audit audits the rules only: safety checks still hold.
        r = p.raw(get("127.0.0.1", p.port, "/self"))
        assert_denied(r, "private_address")
        assert_denied(
            p.raw(get("public.test", upstreams.http_port, host_header="blocked.test")), "host_mismatch"
        )


def test_a_20mb_upload_streams_through_an_allowed_host(proxy, upstreams):
    size = 20 * 1024 * 1024
    with proxy.connect(timeout=30) as s:
        port = upstreams.http_port
        s.sendall(
            f"POST http://public.test:{port}/upload HTTP/1.1\r\nHost: public.test:{port}\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        chunk = b"x" * (1024 * 1024)
        for _ in range(20):
            s.sendall(chunk)
        r = read_reply(s)
    assert r.status == 200 and r.json()["body_len"] == size


def test_a_denied_upload_is_refused_on_its_headers(proxy, upstreams):
    port = upstreams.http_port
    with proxy.connect() as s:
        s.sendall(
            f"POST http://blocked.test:{port}/up HTTP/1.1\r\nHost: blocked.test:{port}\r\n"
            f"Content-Length: 10\r\n\r\n0123456789".encode()
        )
        assert_denied(read_reply(s), "rule", "no-blocked")


def test_fail_closed_when_events_cannot_be_written(upstreams, tmp_path):
    cfg = base_config(upstreams, tmp_path)
    cfg["telemetry"] = {"log": {"format": "json", "file": "/dev/full", "on_write_error": "closed"}}
    with PortcullisProc(tmp_path, upstreams, rules=RULES[:2], config=cfg) as p:
        r = p.raw(get("public.test", upstreams.http_port, "/closed"))
        assert_denied(r, "internal_error")
        assert not upstreams.seen(lambda q: q["path"] == "/closed")


def test_clients_are_identified_by_source_cidr(proxy, upstreams):
    r = proxy.raw(get("deep.api.public.test", upstreams.http_port, "/cidr"))
    assert r.status == 200
    ev = proxy.wait_event("egress.decision", **{"request.path": "/cidr"})
    assert ev["client"]["name"] == "loopback" and ev["rule"] == "local-only"
    assert_denied(proxy.raw(get("api.public.test", upstreams.http_port)), "default")


def test_http2_prior_knowledge_on_the_proxy_port_is_refused(proxy, upstreams):
    with proxy.connect() as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        r = read_reply(s)
    assert r.status in (400, 403)
    assert r.headers["x-portcullis-decision"] == "deny" and r.headers["x-portcullis-reason"] == "bad_request"
    assert r.json()["reason"] == "bad_request"


def test_server_sent_events_are_streamed_not_buffered(proxy, upstreams):
    port = upstreams.http_port
    with proxy.connect(timeout=10) as s:
        s.sendall(get("public.test", port, "/sse"))
        data = b""
        while b"data: first" not in data:  # arrives while the upstream still holds the second event
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        assert b"data: second" not in data
        upstreams.release_sse()
        while b"data: second" not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
