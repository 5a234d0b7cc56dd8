"""Private and metadata destinations that are not loopback, by literal (every spelling, IPv6
embeddings, zone ids) and by name (built-in metadata names, names resolving to them, mixed
answers), asked of a proxy inside a fresh network namespace.

The namespace has only lo, and lo carries the metadata, RFC 1918, CGNAT, ULA and NAT64 addresses
themselves, with a catch-all recorder on ports 80 and 443 of every address: a request that got
through would connect to it and be recorded (a TCP connect alone counts). Every rule allows
everything, so each refusal is the private-address check. One batch per module (a namespace client
costs a process); each case is then judged on its own answer and its own logged decision.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.adversarial.adv import BARRIER_RULE, case
from tests.harness import REPO, PortcullisProc, base_config

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

LO_ADDRESSES = ["169.254.169.254/32", "169.254.170.2/32", "10.0.0.1/32", "100.64.0.1/32",
                "192.168.1.1/32", "172.16.0.1/32", "100.100.100.200/32", "168.63.129.16/32",
                "198.18.0.1/32", "240.0.0.1/32", "192.0.2.1/32", "fd00::1/128", "fd00:ec2::254/128",
                "64:ff9b::a9fe:a9fe/128", "2002:a9fe:a9fe::1/128"]
STATIC = {
    "meta.test": "169.254.169.254",
    "ten.test": "10.0.0.1",
    "mixed-ten.test": ["127.0.0.2", "10.0.0.1"],
    "mixed-meta-last.test": ["127.0.0.2", "127.0.0.3", "169.254.169.254"],
    "ula.test": ["fd00::1"],
    "mapped-meta.test": ["::ffff:169.254.169.254"],
    "nat64-meta.test": ["64:ff9b::a9fe:a9fe"],
    "zero.test": "0.0.0.0",
    "cgnat.test": "100.64.0.1",
}
ALLOW_ALL = [
    {"name": "every-name", "action": "allow",
     "hosts": ["**.test", "metadata.google.internal", "metadata.goog", "metadata", "instance-data"]},
    {"name": "every-ip", "action": "allow", "hosts": ["0.0.0.0/0", "::/0"]},
]

DESTINATIONS = [
    case("aws-metadata", "169.254.169.254"),
    case("ecs-metadata", "169.254.170.2"),
    case("metadata-decimal", "2852039166"),
    case("metadata-hex", "0xa9fea9fe"),
    case("metadata-hex-dotted", "0xa9.0xfe.0xa9.0xfe"),
    case("metadata-octal", "0251.0376.0251.0376"),
    case("metadata-two-parts", "169.254.43518"),
    case("metadata-trailing-dot", "169.254.169.254."),
    case("metadata-v6-mapped", "[::ffff:169.254.169.254]"),
    case("metadata-v6-mapped-hex", "[::ffff:a9fe:a9fe]"),
    case("metadata-v4-compatible", "[::169.254.169.254]"),
    case("metadata-nat64", "[64:ff9b::a9fe:a9fe]"),
    case("metadata-nat64-dotted", "[64:ff9b::169.254.169.254]"),
    case("metadata-6to4", "[2002:a9fe:a9fe::1]"),
    case("teredo-private-client", "[2001:0:4136:e378:8000:63bf:f5ff:fffe]"),
    case("aws-metadata-v6", "[fd00:ec2::254]"),
    case("alibaba-metadata", "100.100.100.200"),
    case("azure-wireserver", "168.63.129.16"),
    case("rfc1918-10", "10.0.0.1"),
    case("rfc1918-10-decimal", "167772161"),
    case("rfc1918-172", "172.16.0.1"),
    case("rfc1918-192", "192.168.1.1"),
    case("cgnat", "100.64.0.1"),
    case("benchmarking", "198.18.0.1"),
    case("class-e", "240.0.0.1"),
    case("test-net", "192.0.2.1"),
    case("multicast", "224.0.0.1"),
    case("broadcast", "255.255.255.255"),
    case("unspecified", "0.0.0.0"),
    case("unspecified-short", "0"),
    case("unspecified-v6", "[::]"),
    case("ula", "[fd00::1]"),
    case("link-local-v6-zone", "[fe80::1%25lo]"),
    case("name-gcp-metadata", "metadata.google.internal"),
    case("name-gcp-metadata-upper-dot", "METADATA.GOOGLE.INTERNAL."),
    case("name-metadata-goog", "metadata.goog"),
    case("name-instance-data", "instance-data"),
    case("name-to-metadata", "meta.test"),
    case("name-to-10", "ten.test"),
    case("name-public-then-private", "mixed-ten.test"),
    case("name-private-answer-last", "mixed-meta-last.test"),
    case("name-to-ula", "ula.test"),
    case("name-to-mapped-metadata", "mapped-meta.test"),
    case("name-to-nat64-metadata", "nat64-meta.test"),
    case("name-to-unspecified", "zero.test"),
    case("name-to-cgnat", "cgnat.test"),
]
HOSTS = [p.values[0] for p in DESTINATIONS]


class NetnsProc(PortcullisProc):
    """The proxy in a fresh network namespace whose lo also carries LO_ADDRESSES."""

    def command(self) -> list[str]:
        base = super().command()
        assert base[:4] == ["unshare", "-n", "sh", "-c"] and base[5] == "sh", base[:6]
        inner = base[6:]  # the proxy command after: unshare -n sh -c SCRIPT sh
        adds = " ; ".join(f"ip addr add {a} dev lo 2>/dev/null" for a in LO_ADDRESSES)
        script = f'ip link set lo up && {{ {adds} ; true; }} && exec "$@"'
        return ["unshare", "-n", "sh", "-c", script, "sh", *inner]


@pytest.fixture(scope="module")
def batch(upstreams, tmp_path_factory) -> dict[str, Any]:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here (needs root): {probe.stderr.decode().strip()}")
    folder = tmp_path_factory.mktemp("netns-adv")
    cfg = base_config(upstreams, folder)
    cfg["network"]["resolve"].update(STATIC)
    cfg["network"]["resolve"]["barrier.test"] = "127.0.0.2"
    rec_file = folder / "recorded.txt"
    with NetnsProc(folder, upstreams, rules=[*ALLOW_ALL, BARRIER_RULE], config=cfg, netns=True) as p:
        rec = subprocess.Popen(
            p.wrap([sys.executable, "-m", "tests.adversarial.nsrecorder", str(rec_file)]),
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_ready(rec_file)
            # The control: a direct connection inside the namespace is recorded (the oracle can fail).
            direct = "import socket; socket.create_connection(('169.254.169.254', 80), 3).sendall(b'x')"
            subprocess.run(p.wrap([sys.executable, "-c", direct]), check=True, timeout=10)
            time.sleep(0.2)
            control = [ln for ln in rec_file.read_text().splitlines() if not ln.startswith("ready")]
            rec_file.write_text("ready 0 0\n")
            http = [f"GET http://{h}/c/{i} HTTP/1.1\r\nHost: {h}\r\n\r\n".encode()
                    for i, h in enumerate(HOSTS)]
            conn = [f"CONNECT {h}:443 HTTP/1.1\r\nHost: {h}:443\r\n\r\n".encode() for h in HOSTS]
            n0 = len(p.events)
            barrier = b"GET http://barrier.test:1/b/netns HTTP/1.1\r\nHost: barrier.test:1\r\n\r\n"
            replies = p.raw_many([*http, *conn, barrier], timeout=120)
            p.wait_event("egress.decision", **{"request.path": "/b/netns"})
            time.sleep(0.2)  # let any connect that slipped through land in the recorder's file
            events = [e for e in p.events[n0:] if e.get("event") == "egress.decision"][:-1]
            recorded = [ln for ln in rec_file.read_text().splitlines() if not ln.startswith("ready")]
        finally:
            rec.terminate()
            rec.wait(5)
    return {"http": replies[: len(HOSTS)], "connect": replies[len(HOSTS) : 2 * len(HOSTS)],
            "events": events, "recorded": recorded, "control": control}


def _wait_ready(path: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists() and "ready" in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError("the namespace recorder did not start")


def test_the_recorder_sees_a_direct_connection(batch):
    assert any(ln.startswith("169.254.169.254 80 ") for ln in batch["control"]), batch["control"]


def test_nothing_reached_any_private_address(batch):
    """The oracle for the whole table: not one connection reached the namespace's addresses."""
    assert batch["recorded"] == []


@pytest.mark.parametrize("via", ["http", "connect"])
@pytest.mark.parametrize("host", DESTINATIONS)
def test_private_and_metadata_destinations(batch, host, via):
    i = HOSTS.index(host)
    reply = batch[via][i]
    assert batch["recorded"] == [], batch["recorded"][:5]
    h = reply.headers
    got = (reply.status, h.get("x-portcullis-decision"), h.get("x-portcullis-reason"))
    assert got == (403, "deny", "private_address"), (reply.status, h, reply.body[:200])
    if via == "http":
        mine = [e for e in batch["events"] if (e.get("request") or {}).get("path") == f"/c/{i}"]
    else:
        connects = [e for e in batch["events"] if e["layer"] == "connect"]
        assert len(connects) == len(HOSTS), f"{len(connects)} CONNECT decisions for {len(HOSTS)} CONNECTs"
        mine = [connects[i]]
    assert len(mine) == 1, mine
    assert (mine[0]["decision"], mine[0]["reason"]) == ("deny", "private_address")
