"""The TLS ClientHello of a tunnel against its CONNECT authority, and non-TLS bytes in tunnels.

The upstream is a raw recording sink: for a refused tunnel not one byte may arrive; for an allowed
one, every server name in what arrived (read by our own ClientHello reader, tolerant like a server)
must be the authority. Three kinds of tunnel: a name (`public.test`, TLS required, SNI must match),
an IP literal allowed by an IP rule (`127.0.0.2`, SNI may be absent), and a `raw_tcp` rule
(`www.public.test`, non-TLS allowed, but anything a server reads as TLS must carry the right SNI).
"""

from __future__ import annotations

import contextlib
import time

import pytest

from tests.adversarial.adv import (
    Adv,
    ForbiddenArrival,
    Outcome,
    _ok,
    case,
    expect_refused,
    proxy_fixture,
)
from tests.recording import client_hello as hello
from tests.recording import server_names, sni_extension

pytestmark = pytest.mark.e2e

proxy = proxy_fixture(
    "sni",
    [
        {"name": "public", "action": "allow", "hosts": ["public.test", "xn--bcher-kva.test"]},
        {"name": "by-ip", "action": "allow", "hosts": ["127.0.0.2"]},
        {"name": "raw", "action": "allow", "hosts": ["www.public.test"], "raw_tcp": True},
        {"name": "api-reads", "action": "allow", "hosts": ["api.public.test"], "methods": ["GET"],
         "paths": ["/ok/*"]},
        {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
    ],
)



def split_tcp(data: bytes, *at: int) -> list[bytes]:
    cuts = [0, *at, len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def through_tunnel(adv: Adv, authority: str, segments: list[bytes]) -> Outcome:
    """CONNECT, then the segments (a pause between them, so they are separate TCP segments); the
    outcome says whether the proxy closed the tunnel."""
    s, rep = adv.tunnel(authority)
    try:
        if rep.status != 200:
            return Outcome(reply=rep)
        for i, seg in enumerate(segments):
            if i:
                time.sleep(0.05)
            try:
                s.sendall(seg)
            except OSError:
                return Outcome(closed=True, extra={"connect": rep})
        s.settimeout(0.4)  # a refusal closes at once; an open tunnel just stays silent
        try:
            got = s.recv(100)
        except TimeoutError:
            return Outcome(extra={"open": True, "connect": rep})
        except OSError:
            got = b""
        return Outcome(closed=got == b"", extra={"open": got != b"", "connect": rep})
    finally:
        s.close()


def judge_tunnel(adv: Adv, authority: str, segments: list[bytes], expect: str) -> None:
    host = authority.rsplit(":", 1)[0]
    m = adv.mark()
    out = through_tunnel(adv, authority, segments)
    w = adv.window(m)
    if expect == "relay":
        _ok(w.decisions and [d["decision"] for d in w.decisions] == ["allow"],
            f"expected one allow, got {[(d['decision'], d['reason']) for d in w.decisions]}")
        data, want = w.arrived, b"".join(segments)
        deadline = time.monotonic() + 3  # under load relayed bytes may land after the barrier
        while len(data) < len(want) and time.monotonic() < deadline:
            time.sleep(0.05)
            data = adv.rec.arrived(m[1])
        _ok(data == want, f"expected the tunnel bytes to be relayed, got {len(data)} bytes")
        names = server_names(data)
        if names is not None:  # TLS as a server reads it: every name must be the authority
            _ok(all(n.lower().rstrip(b".") == host.encode() for n in names),
                f"a ClientHello naming {names} reached the upstream of {authority}", ForbiddenArrival)
    elif expect == "refuse":
        expect_refused(w, out, "sni_mismatch", status=None, layer="connect")
        _ok(out.closed, "the tunnel should have been closed")
    else:
        raise ValueError(expect)


H_OK = hello("public.test")
TRAILING_SNI = [(0, sni_extension(["public.test"]))]  # not counted in the extensions block's length
# (first bytes, expectation) on a tunnel to a *name* that needs TLS: public.test.
NAME_CASES = [
    case("matching", [H_OK], "relay"),
    case("matching-upper", [hello("PUBLIC.TEST")], "relay"),
    case("matching-trailing-dot", [hello("public.test.")], "relay"),
    case("other-name", [hello("blocked.test")], "refuse"),
    case("subdomain", [hello("x.public.test")], "refuse"),
    case("suffix-glued", [hello("evilpublic.test")], "refuse"),
    case("no-sni", [hello(None)], "refuse"),
    case("ip-as-sni", [hello("127.0.0.2")], "refuse"),
    case("two-names", [hello(["public.test", "blocked.test"])], "refuse"),
    case("two-names-reversed", [hello(["blocked.test", "public.test"])], "refuse"),
    case("label-64", [hello("a" * 64 + ".test")], "refuse"),
    case("empty-label", [hello("public..test")], "refuse"),
    case("oversized-name", [hello(".".join(["a" * 63] * 4) + ".test")], "refuse"),
    case("garbage-bytes", [hello(b"\xff\xfe\x00\x01")], "refuse"),
    case("nul-inside", [hello(b"public.test\x00.blocked.test")], "refuse"),
    case("utf8-name", [hello("bücher.test".encode())], "refuse"),
    case("name-type-1", [hello(None, sni_body=sni_extension(["public.test"], name_type=1))], "refuse"),
    case("empty-name-list", [hello(None, sni_body=b"\x00\x00")], "refuse"),
    case("truncated-extension", [hello(None, sni_body=b"\x00\x20\x00\x00\x05abc")], "refuse"),
    case("dup-extension-good-first", [hello("public.test", duplicate_sni="blocked.test")], "refuse"),
    case("dup-extension-bad-first", [hello("blocked.test", duplicate_sni="public.test")], "refuse"),
    case("sni-after-the-extensions-block", [hello("a" * 64 + ".blocked.test", after_block=TRAILING_SNI)],
         "refuse"),
    case("only-sni-after-the-extensions-block", [hello(None, after_block=TRAILING_SNI)], "refuse"),
    case("split-tcp-matching", split_tcp(H_OK, 30), "relay"),
    case("split-tcp-other", split_tcp(hello("blocked.test"), 30), "refuse"),
    case("split-tcp-1-byte", split_tcp(hello("blocked.test"), 1), "refuse"),
    case("split-tcp-3-bytes", split_tcp(hello("blocked.test"), 3), "refuse"),
    case("split-tcp-5-bytes", split_tcp(hello("blocked.test"), 5, 9), "refuse"),
    case("split-records-matching", [hello("public.test", record_sizes=[40])], "relay"),
    case("split-records-other", [hello("blocked.test", record_sizes=[40])], "refuse"),
    case("split-records-many", [hello("blocked.test", record_sizes=[10] * 30)], "refuse"),
    case("split-records-and-tcp", split_tcp(hello("blocked.test", record_sizes=[7, 7, 7]), 12, 20), "refuse"),
    case("record-version-0304", [hello("blocked.test", record_version=0x0304)], "refuse"),
    case("record-version-0300", [hello("blocked.test", record_version=0x0300)], "refuse"),
    case("big-hello-other", [hello("blocked.test", padding=20000)], "refuse"),
    case("big-hello-matching", [hello("public.test", padding=20000)], "relay"),
    case("not-a-clienthello", [hello("blocked.test", handshake_type=2)], "refuse"),
    case("alert-record", [b"\x15\x03\x03\x00\x02\x02\x28"], "refuse"),
]


@pytest.mark.parametrize(("segments", "expect"), NAME_CASES)
def test_sni_against_a_named_authority(proxy, segments, expect):
    judge_tunnel(proxy, f"public.test:{proxy.rec.raw}", segments, expect)


# On an IP-literal authority a missing SNI is accepted; a present one must still be right.
IP_CASES = [
    case("no-sni", [hello(None)], "relay"),
    case("same-ip", [hello("127.0.0.2")], "relay"),
    case("a-name", [hello("blocked.test")], "refuse"),
    case("allowed-name", [hello("public.test")], "refuse"),
    case("two-names", [hello(["127.0.0.2", "blocked.test"])], "refuse"),
    case("label-64", [hello("a" * 64 + ".blocked.test")], "refuse"),
    case("empty-label", [hello("blocked..test")], "refuse"),
    case("trailing-double-dot", [hello("blocked.test..")], "refuse"),
    case("garbage-bytes", [hello(b"bl\xffocked.test")], "refuse"),
    case("nul-inside", [hello(b"blocked.test\x00")], "refuse"),
    case("name-type-1", [hello(None, sni_body=sni_extension(["blocked.test"], name_type=1))], "refuse"),
    case("empty-name-list", [hello(None, sni_body=b"\x00\x00")], "refuse"),
    case("dup-extension", [hello("127.0.0.2", duplicate_sni="blocked.test")], "refuse"),
    case("split-tcp-other", split_tcp(hello("blocked.test"), 2), "refuse"),
    case("plain-http", [b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n"], "refuse"),
]


@pytest.mark.parametrize(("segments", "expect"), IP_CASES)
def test_sni_against_an_ip_authority(proxy, segments, expect):
    judge_tunnel(proxy, f"127.0.0.2:{proxy.rec.raw}", segments, expect)


# raw_tcp: non-TLS bytes are the rule's point; but anything a server reads as TLS is TLS.
RAW_CASES = [
    case("matching-sni", [hello("www.public.test")], "relay"),
    case("no-sni", [hello(None)], "relay"),
    case("other-sni", [hello("blocked.test")], "refuse"),
    case("ssh-banner", [b"SSH-2.0-OpenSSH_9.6\r\n"], "relay"),
    case("plain-bytes", [b"x" * 1000], "relay"),
    case("two-names", [hello(["www.public.test", "blocked.test"])], "refuse"),
    case("label-64", [hello("a" * 64 + ".blocked.test")], "refuse"),
    case("empty-label", [hello("blocked..test")], "refuse"),
    case("record-version-0304", [hello("blocked.test", record_version=0x0304)], "refuse"),
    case("record-version-0305", [hello("blocked.test", record_version=0x0305)], "refuse"),
    case("record-version-0200", [hello("blocked.test", record_version=0x0200)], "refuse"),
    case("record-version-0302", [hello("blocked.test", record_version=0x0302)], "refuse"),
    case("record-0304-split", split_tcp(hello("blocked.test", record_version=0x0304), 3), "refuse"),
    case("split-tcp-other", split_tcp(hello("blocked.test"), 1), "refuse"),
    case("split-records-other", [hello("blocked.test", record_sizes=[20])], "refuse"),
]


@pytest.mark.parametrize(("segments", "expect"), RAW_CASES)
def test_sni_on_a_raw_tcp_tunnel(proxy, segments, expect):
    judge_tunnel(proxy, f"www.public.test:{proxy.rec.raw}", segments, expect)


# Non-TLS first bytes on tunnels that need TLS (a name, and an inspected host).
NOT_TLS = [
    case("plain-http", b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n"),
    case("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    case("ssh-banner", b"SSH-2.0-x\r\n"),
    case("proxy-protocol", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    case("tls-app-data-first", b"\x17\x03\x03\x00\x05hello"),
    case("sslv2-hello", b"\x80\x2e\x01\x03\x01" + b"\x00" * 0x2B),
    case("random", bytes(range(256))),
    case("socks5", b"\x05\x01\x00"),
]


@pytest.mark.parametrize("kind", ["name", "inspected"])
@pytest.mark.parametrize("data", NOT_TLS)
def test_non_tls_bytes_in_tunnels_that_need_tls(proxy, data, kind):
    host = "public.test" if kind == "name" else "api.public.test"
    judge_tunnel(proxy, f"{host}:{proxy.rec.raw}", [data], "refuse")


def test_server_speaking_first_on_a_tls_tunnel_is_refused(proxy):
    """The greeting server speaks first: only raw_tcp tunnels carry that; nothing reaches it."""
    m = proxy.mark()
    s, rep = proxy.tunnel(f"public.test:{proxy.u.greet_port}")
    assert rep.status == 200
    s.settimeout(5)
    try:
        closed = s.recv(100) == b""
    except TimeoutError:
        closed = False
    except OSError:
        closed = True
    s.close()
    w = proxy.window(m)
    assert closed
    expect_refused(w, Outcome(closed=True), "sni_mismatch", status=None)


def test_a_hello_sent_after_the_tunnel_was_refused_never_arrives(proxy):
    """A refused tunnel stays refused: bytes written after the refusal go nowhere."""
    m = proxy.mark()
    s, rep = proxy.tunnel(f"public.test:{proxy.rec.raw}")
    assert rep.status == 200
    s.sendall(hello("blocked.test"))
    time.sleep(0.2)
    with contextlib.suppress(OSError):
        s.sendall(H_OK)
    s.settimeout(2)
    with contextlib.suppress(ConnectionResetError):  # a reset is closed as well
        assert s.recv(10) == b""
    s.close()
    w = proxy.window(m)
    expect_refused(w, Outcome(closed=True), "sni_mismatch", status=None)
