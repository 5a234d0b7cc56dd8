"""Faults: the upstream refuses (nothing listens), resets (accepts, reads, RST), or stalls (accepts and
never answers), for plain HTTP and for CONNECT tunnels.

Documented behaviour (README, How the proxy decides > Decisions): the decision is taken and logged
once, before any upstream connection (allow: the rules allow the host); then
- refused: a 502 JSON `upstream_error` with `X-Portcullis-Decision: allow` (HTTP and CONNECT);
- reset: a 502 `upstream_error` for plain HTTP; a tunnel that was open (200) is closed;
- stalled: nothing moves, so the connection is closed after `network.idle_timeout` without an answer
  (no 200, nothing relayed), HTTP and tunnel alike.
Meanwhile the proxy serves everyone else, and every request is exactly one decision.
"""

from __future__ import annotations

import contextlib
import socket

import pytest

from tests.faults.faults_b_support import BadUpstream, assert_each_decision_once, free_port, get, get_request
from tests.harness import (
    PortcullisProc,
    base_config,
    read_reply,
    tls_client_hello,
    upstreams,  # noqa: F401  (session fixture; the folder has no conftest.py)
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

RULES = [{"name": "public", "action": "allow", "hosts": ["public.test"]}]
IDLE = 2  # network.idle_timeout in seconds: a stalled upstream is given up after this
SOCKET_BOUND = 30.0  # every client read is bounded by this, far above IDLE


@pytest.fixture(scope="module")
def proxy(upstreams, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("fault-upstream")
    cfg = base_config(upstreams, folder)
    cfg["network"] = {**cfg["network"], "idle_timeout": f"{IDLE}s"}
    with PortcullisProc(folder, upstreams, rules=RULES, config=cfg) as p:
        yield p
    assert_each_decision_once(p)


def _one_decision(p: PortcullisProc, port: int, layer: str, count: int = 1) -> dict:
    ev = p.wait_event("egress.decision", count=count, **{"destination.port": port, "layer": layer})
    found = p.decisions(**{"destination.port": port, "layer": layer})
    assert len(found) == count, found
    assert ev["decision"] == "allow" and ev["rule"] == "public"
    return ev


def _served(p: PortcullisProc, upstreams) -> None:  # noqa: F811
    """Someone else is still served, while the fault lasts."""
    r = get(p, "public.test", upstreams.http_port, "/others")
    assert r.status == 200


def _assert_upstream_error(r) -> None:
    assert r.status == 502, (r.status, r.body[:300])
    assert r.headers["x-portcullis-decision"] == "allow"
    assert r.headers["x-portcullis-reason"] == "upstream_error"


def test_http_to_a_refusing_upstream_is_a_502_after_one_allow(proxy, upstreams):  # noqa: F811
    port = free_port()
    _assert_upstream_error(get(proxy, "public.test", port, "/refused"))
    _one_decision(proxy, port, "http")
    _served(proxy, upstreams)


def test_http_to_a_resetting_upstream_is_a_502_after_one_allow(proxy, upstreams):  # noqa: F811
    with BadUpstream("reset") as bad:
        _assert_upstream_error(get(proxy, "public.test", bad.port, "/reset"))
        assert bad.accepted == 1 and b"GET /reset" in bad.received
    _one_decision(proxy, bad.port, "http")
    _served(proxy, upstreams)


def test_http_to_a_stalling_upstream_is_closed_after_the_idle_timeout(proxy, upstreams):  # noqa: F811
    with BadUpstream("stall") as bad:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_BOUND) as s:
            s.sendall(get_request("public.test", bad.port, "/stall"))
            _served(proxy, upstreams)  # while that one waits, others are served
            assert s.recv(65536) == b""  # closed, no answer, before the socket's bound
        assert bad.accepted == 1 and b"GET /stall" in bad.received
    _one_decision(proxy, bad.port, "http")


def _connect(p: PortcullisProc, port: int) -> tuple[socket.socket, int]:
    s = socket.create_connection(("127.0.0.1", p.port), timeout=SOCKET_BOUND)
    s.sendall(f"CONNECT public.test:{port} HTTP/1.1\r\nHost: public.test:{port}\r\n\r\n".encode())
    return s, read_reply(s, head_only_2xx=True).status


def test_connect_to_a_refusing_upstream_is_a_502_after_one_allow(proxy, upstreams):  # noqa: F811
    port = free_port()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_BOUND) as s:
        s.sendall(f"CONNECT public.test:{port} HTTP/1.1\r\nHost: public.test:{port}\r\n\r\n".encode())
        _assert_upstream_error(read_reply(s))
    _one_decision(proxy, port, "connect")
    _served(proxy, upstreams)


def test_a_tunnel_to_a_resetting_upstream_is_closed(proxy, upstreams):  # noqa: F811
    with BadUpstream("reset") as bad:
        s, status = _connect(proxy, bad.port)
        with s:
            assert status == 200  # the eager TCP connect succeeded
            s.sendall(tls_client_hello("public.test"))
            with contextlib.suppress(ConnectionResetError):  # a reset passed on is a close too
                assert s.recv(65536) == b""
        assert bad.accepted == 1
    ev = _one_decision(proxy, bad.port, "connect")
    closed = proxy.wait_event("tunnel.closed", flow_id=ev["flow_id"])
    assert closed["bytes_down"] == 0
    _served(proxy, upstreams)


def test_a_tunnel_to_a_stalling_upstream_is_closed_after_the_idle_timeout(proxy, upstreams):  # noqa: F811
    with BadUpstream("stall") as bad:
        s, status = _connect(proxy, bad.port)
        with s:
            assert status == 200
            s.sendall(tls_client_hello("public.test"))
            _served(proxy, upstreams)
            assert s.recv(65536) == b""  # closed by the idle timeout, nothing relayed back
        assert bad.accepted == 1 and bad.received.startswith(b"\x16\x03")  # the hello went through
    ev = _one_decision(proxy, bad.port, "connect")
    closed = proxy.wait_event("tunnel.closed", flow_id=ev["flow_id"], timeout=SOCKET_BOUND)
    assert closed["bytes_down"] == 0
