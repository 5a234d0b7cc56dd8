"""addons/policy/addresses.py: the private class of every address range, in every spelling the host
parser accepts (IPv6 forms embedding an IPv4 address are judged by it)."""

from __future__ import annotations

import pytest

from addons.policy.addresses import classify_address
from addons.policy.hosts import HostError

CLASSES = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("0.1.2.3", "reserved"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("172.32.0.1", None),
    ("172.15.255.255", None),
    ("169.254.1.1", "link_local"),
    ("fe80::1", "link_local"),
    ("febf::1", "link_local"),
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("::ffff:169.254.169.254", "metadata"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.255", "cgnat"),
    ("100.128.0.1", None),
    ("100.63.255.255", None),
    ("fc00::1", "ula"),
    ("fd12:3456::1", "ula"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("198.18.0.1", "reserved"),
    ("198.19.255.255", "reserved"),
    ("192.0.2.1", "reserved"),
    ("198.51.100.1", "reserved"),
    ("203.0.113.1", "reserved"),
    ("192.0.0.8", "reserved"),
    ("2001:db8::1", "reserved"),
    ("fec0::1", "reserved"),
    ("100::1", "reserved"),
    # IPv6 forms that embed an IPv4 address are judged by it
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::7f00:1", "loopback"),
    ("64:ff9b::10.0.0.1", "private"),
    ("64:ff9b::a9fe:a9fe", "metadata"),
    ("64:ff9b::8.8.8.8", None),
    ("2002:7f00:1::", "loopback"),
    ("2002:a00:1::1", "private"),
    ("2002:a9fe:a9fe::", "metadata"),
    ("2002:808:808::", None),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "reserved"),  # Teredo, client 192.0.2.45
    ("2001:0:808:808:0:0:f5ff:fffe", "private"),  # Teredo, client 10.0.0.1
    ("2001:0:808:808:0:0:f7f7:f7f7", None),  # Teredo, client 8.8.8.8
    ("::127.0.0.1", "reserved"),  # deprecated IPv4-compatible
    # public
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("93.184.216.34", None),
    ("2606:4700::1111", None),
    ("2a00:1450:4001::200e", None),
    ("11.0.0.1", None),
    ("192.169.0.1", None),
    # any spelling is accepted
    ("2130706433", "loopback"),
    ("0xa9fea9fe", "metadata"),
    ("[::1]", "loopback"),
    ("10.1", "private"),
]


@pytest.mark.parametrize(("ip", "want"), CLASSES, ids=[c[0] for c in CLASSES])
def test_classify_address(ip: str, want: str | None) -> None:
    assert classify_address(ip) == want


def test_classify_address_rejects_names() -> None:
    with pytest.raises(HostError):
        classify_address("example.com")
