"""Private destinations: every IP spelling and class, mixed DNS answers, rebinding, the proxy itself."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.harness import PortcullisProc, base_config

pytestmark = pytest.mark.e2e

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",
    "0x7f.1",
    "0177.0.0.1",
    "127.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "localhost",
    "LOCALHOST.",
    "127.0.0.1.",
    "0x7f000001",
    "sub.localhost",
]
# Not loopback: asked only from inside a network namespace with nothing but lo.
OTHER_PRIVATE = [
    "169.254.169.254",
    "10.0.0.1",
    "100.64.0.1",
    "[fd00::1]",
    "192.168.1.1",
    "0.0.0.0",
    "172.16.0.1",
    "100.100.100.200",
    "168.63.129.16",
    "[fd00:ec2::254]",
    "metadata.google.internal",
    "[64:ff9b::a9fe:a9fe]",
    "[2002:a9fe:a9fe::1]",
    "224.0.0.1",
    "255.255.255.255",
    "198.18.0.1",
    "240.0.0.1",
    "[fe80::1]",
    "[2001:0:4136:e378:8000:63bf:f5ff:fffe]",  # Teredo embedding 10.0.0.1
    "[::127.0.0.1]",  # IPv4-compatible (deprecated) form
    "mixed.test",
    "all-private.test",
]
# Everything is allowed by rules, so any refusal here is the private-address check.
ALLOW_ALL = [
    {
        "name": "everything-by-name",
        "action": "allow",
        "hosts": ["**.test", "**.localhost", "metadata.google.internal", "localhost"],
    },
    {"name": "everything-by-ip", "action": "allow", "hosts": ["0.0.0.0/0", "::/0"]},
]


def assert_private(reply) -> None:
    assert reply.status == 403, (reply.status, reply.body[:300])
    assert reply.headers["x-portcullis-decision"] == "deny"
    assert reply.headers["x-portcullis-reason"] == "private_address"
    assert reply.json()["reason"] == "private_address"


@pytest.fixture(scope="module")
def proxy(upstreams, tmp_path_factory):
    folder = tmp_path_factory.mktemp("private")
    with PortcullisProc(folder, upstreams, rules=ALLOW_ALL) as p:
        yield p


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_spellings_plain_http(proxy, host):
    before = len(proxy.decisions(reason="private_address"))
    r = proxy.raw(f"GET http://{host}:{proxy.port}/ HTTP/1.1\r\nHost: {host}:{proxy.port}\r\n\r\n".encode())
    assert_private(r)
    ev = proxy.wait_event("egress.decision", reason="private_address", count=before + 1)
    assert ev["decision"] == "deny" and ev["rule"] is None


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_spellings_connect(proxy, host):
    s, r = proxy.connect_tunnel(f"{host}:443")
    s.close()
    assert_private(r)


@pytest.fixture(scope="module")
def ns_proxy(upstreams, tmp_path_factory):
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here (needs root): {probe.stderr.decode().strip()}")
    folder = tmp_path_factory.mktemp("netns")
    cfg = base_config(upstreams, folder)
    cfg["network"]["resolve"]["mixed.test"] = ["127.0.0.2", "10.0.0.1"]
    cfg["network"]["resolve"]["all-private.test"] = ["192.168.0.10"]
    with PortcullisProc(folder, upstreams, rules=ALLOW_ALL, config=cfg, netns=True) as p:
        yield p


@pytest.mark.netns
@pytest.mark.parametrize("kind", ["http", "connect"])
def test_private_classes_in_netns(ns_proxy, kind):
    if kind == "http":
        reqs = [f"GET http://{h}/latest/meta-data/ HTTP/1.1\r\nHost: {h}\r\n\r\n" for h in OTHER_PRIVATE]
    else:
        reqs = [f"CONNECT {h}:443 HTTP/1.1\r\nHost: {h}:443\r\n\r\n" for h in OTHER_PRIVATE]
    replies = ns_proxy.raw_many([r.encode() for r in reqs])
    for host, reply in zip(OTHER_PRIVATE, replies, strict=True):
        try:
            assert_private(reply)
        except AssertionError as e:
            raise AssertionError(f"{kind} {host}: {e}") from e


@pytest.mark.netns
def test_curl_is_refused_in_netns(ns_proxy):
    r = ns_proxy.curl("http://169.254.169.254/latest/meta-data/iam/")
    assert r.status == 403 and r.headers["x-portcullis-reason"] == "private_address"
    assert r.json()["reason"] == "private_address"
    ev = ns_proxy.wait_event("egress.decision", **{"destination.host": "169.254.169.254"})
    assert ev["decision"] == "deny" and ev["reason"] == "private_address"


def test_the_proxy_itself_is_refused_even_when_loopback_is_allowed(upstreams, tmp_path):
    cfg = base_config(upstreams, tmp_path)
    cfg["network"]["allow_cidrs"] = ["127.0.0.0/8"]
    cfg["network"]["resolve"]["self.test"] = "127.0.0.1"
    with PortcullisProc(tmp_path, upstreams, rules=ALLOW_ALL, config=cfg) as p:
        for host in ("127.0.0.9", "self.test"):  # any 127/8 address reaches a loopback listener; a name too
            r = p.raw(f"GET http://{host}:{p.port}/ HTTP/1.1\r\nHost: {host}:{p.port}\r\n\r\n".encode())
            assert_private(r)
        r = p.raw(f"GET http://127.0.0.1:{p.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n\r\n".encode())
        assert_private(r)
        r = p.raw(
            f"GET http://127.0.0.1:{p.admin_port}/healthz HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{p.admin_port}\r\n\r\n".encode()
        )
        assert_private(r)
        # ... while an allowed loopback upstream that is not the proxy works
        r = p.raw(
            f"GET http://127.0.0.2:{upstreams.http_port}/ HTTP/1.1\r\n"
            f"Host: 127.0.0.2:{upstreams.http_port}\r\n\r\n".encode()
        )
        assert r.status == 200
