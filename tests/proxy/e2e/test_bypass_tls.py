"""Tunnel first bytes an attacker shapes so that the proxy and the upstream disagree about TLS:
server names mitmproxy's parser calls "absent", record-layer versions it calls "not TLS", hellos split
over records and TCP segments. Oracle: the bytes that reached the upstream (a raw byte-counting sink)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests.harness import PortcullisProc, base_config
from tests.tlsbytes import CCS, ECH, client_hello, ext, real_hello, reframe, server_hello

pytestmark = pytest.mark.e2e

RULES = [
    {"name": "public", "action": "allow", "hosts": ["public.test"]},
    {"name": "raw", "action": "allow", "hosts": ["www.public.test"], "raw_tcp": True},
    {"name": "by-ip", "action": "allow", "hosts": ["127.0.0.2/32"]},
]


@pytest.fixture(scope="module")
def proxy(upstreams, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bypass-tls")
    with PortcullisProc(folder, upstreams, rules=RULES, config=base_config(upstreams, folder)) as p:
        yield p


def _send(proxy, authority: str, pieces: list[bytes]) -> tuple[bool, int]:
    """CONNECT, then send `pieces` (separate TCP segments). (closed by the proxy?, bytes at the sink)."""
    c0, b0 = proxy.u.sink.snapshot()
    s, rep = proxy.connect_tunnel(authority)
    assert rep.status == 200, rep
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    closed = False
    try:
        for piece in pieces:
            s.sendall(piece)
            time.sleep(0.05)
        s.settimeout(3)
        try:
            closed = s.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
    finally:
        s.close()
    time.sleep(0.3)  # let any relayed bytes land before counting (bounded; the oracle is the count)
    return closed, proxy.u.sink.snapshot()[1] - b0


def _refused(proxy, authority: str, pieces: list[bytes], why: str) -> None:
    n = len(proxy.decisions(reason="sni_mismatch"))
    closed, arrived = _send(proxy, authority, pieces)
    assert arrived == 0, f"{arrived} bytes reached the upstream"
    assert closed
    ev = proxy.wait_event("egress.decision", reason="sni_mismatch", count=n + 1)
    ev = proxy.decisions(reason="sni_mismatch")[-1]
    assert ev["decision"] == "deny" and ev["enforced"] is True and ev["layer"] == "connect"
    assert why in (ev["detail"] or ""), ev["detail"]


LONG = b"a" * 64 + b".blocked.test"
INVALID_NAMES = [
    ("label-64", [LONG]),
    ("trailing-double-dot", [b"blocked.test.."]),
    ("empty-label", [b"blocked..test"]),
    ("underscore-space", [b"blocked test"]),
    ("two-names", [b"www.public.test", b"blocked.test"]),
    ("name-type-1", [(1, b"blocked.test")]),
]


@pytest.mark.parametrize("names", [c[1] for c in INVALID_NAMES], ids=[c[0] for c in INVALID_NAMES])
@pytest.mark.parametrize("where", ["ip-literal", "raw-tcp-name"])
def test_an_unreadable_server_name_is_refused_where_no_sni_would_pass(proxy, upstreams, names, where):
    authority = (
        f"127.0.0.2:{upstreams.sink_port}"
        if where == "ip-literal"
        else f"www.public.test:{upstreams.sink_port}"
    )
    _refused(proxy, authority, [client_hello(names)], "malformed TLS ClientHello")


def test_duplicate_server_name_extensions_and_ech_are_refused(proxy, upstreams):
    dup = client_hello([b"www.public.test"], extra=[ext(0, b"\x00\x0f\x00\x00\x0cblocked.test")])
    _refused(proxy, f"www.public.test:{upstreams.sink_port}", [dup], "appears twice")
    ech = client_hello([b"www.public.test"], extra=[ext(ECH, b"\x00" * 16)])
    _refused(proxy, f"www.public.test:{upstreams.sink_port}", [ech], "hides the real server name")


@pytest.mark.parametrize("version", [0x0304, 0x0300, 0x0302, 0x0100, 0x0000])
def test_a_hello_with_an_odd_record_version_is_tls_on_raw_tcp_tunnels(proxy, upstreams, version):
    hello = reframe(real_hello("blocked.test"), version)
    _refused(proxy, f"www.public.test:{upstreams.sink_port}", [hello], "differs from the CONNECT host")


@pytest.mark.parametrize("version", [0x0304, 0x0100])
def test_an_odd_record_version_naming_the_authority_still_passes_raw_tcp(proxy, upstreams, version):
    hello = reframe(real_hello("www.public.test"), version)
    closed, arrived = _send(proxy, f"www.public.test:{upstreams.sink_port}", [hello])
    assert arrived == len(hello)


@pytest.mark.parametrize(
    "split",
    [
        ("records", lambda h: [reframe(h, 0x0301, [3, 7, 50])]),
        ("segments", lambda h: [h[:3], h[3:9], h[9:100], h[100:]]),
        ("records-and-segments", lambda h: [(r := reframe(h, 0x0303, [2] * 30))[:4], r[4:61], r[61:]]),
    ],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("authority", ["ip", "name"])
def test_a_split_hello_is_reassembled_before_the_check(proxy, upstreams, split, authority):
    target = f"127.0.0.2:{upstreams.sink_port}" if authority == "ip" else f"public.test:{upstreams.sink_port}"
    _refused(proxy, target, split[1](real_hello("blocked.test")), "differs from the CONNECT host")


def test_a_split_hello_naming_the_authority_passes(proxy, upstreams):
    hello = real_hello("public.test")
    pieces = [reframe(hello, 0x0301, [5, 5])[:7], reframe(hello, 0x0301, [5, 5])[7:]]
    closed, arrived = _send(proxy, f"public.test:{upstreams.sink_port}", pieces)
    assert arrived == sum(map(len, pieces))


def test_tls_records_other_than_a_handshake_first_are_refused_on_raw_tcp(proxy, upstreams):
    alert_then_hello = b"\x15\x03\x01\x00\x02\x01\x00" + real_hello("blocked.test")
    _refused(proxy, f"www.public.test:{upstreams.sink_port}", [alert_then_hello], "other than a handshake")


def test_no_sni_on_an_ip_literal_and_non_tls_on_raw_tcp_still_pass(proxy, upstreams):
    hello = real_hello(None)
    _, arrived = _send(proxy, f"127.0.0.2:{upstreams.sink_port}", [hello])
    assert arrived == len(hello)
    _, arrived = _send(proxy, f"www.public.test:{upstreams.sink_port}", [b"SSH-2.0-x\r\n"])
    assert arrived == len(b"SSH-2.0-x\r\n")


class RetryServer:
    """A TLS-ish upstream on 127.0.0.2 that answers any first ClientHello with a HelloRetryRequest and
    records every byte that arrives after it (where a second ClientHello would come)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.2", 0))
        self.port = self.sock.getsockname()[1]
        self.after = b""
        self.first = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(10)
        with contextlib.suppress(OSError), self.sock.accept()[0] as c:
            c.settimeout(3)
            while len(self.first) < 5 or len(self.first) < 5 + int.from_bytes(self.first[3:5], "big"):
                chunk = c.recv(65536)
                if not chunk:
                    return
                self.first += chunk
            c.sendall(server_hello(retry=True))
            with contextlib.suppress(OSError):
                while chunk := c.recv(65536):
                    self.after += chunk

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


@pytest.mark.parametrize(("second_name", "passes"), [("blocked.test", False), ("public.test", True)])
def test_a_second_hello_after_a_retry_request_must_name_the_authority(proxy, second_name, passes):
    srv = RetryServer()
    try:
        n = len(proxy.decisions(reason="sni_mismatch"))
        s, rep = proxy.connect_tunnel(f"public.test:{srv.port}")
        assert rep.status == 200
        with s:
            s.sendall(real_hello("public.test"))
            s.settimeout(5)
            got = b""
            while len(got) < 5 or len(got) < 5 + int.from_bytes(got[3:5], "big"):
                got += s.recv(65536)
            assert got[:1] == b"\x16"  # the retry request came back through the tunnel
            second = CCS + client_hello([second_name.encode()])
            s.sendall(second)
            time.sleep(0.5)
        srv.close()
        if passes:
            assert srv.after == second
        else:
            assert srv.after == b"", srv.after
            ev = proxy.wait_event("egress.decision", reason="sni_mismatch", count=n + 1)
            assert "differs from the CONNECT host" in proxy.decisions(reason="sni_mismatch")[-1]["detail"]
            assert ev["layer"] == "connect"
    finally:
        srv.sock.close()
