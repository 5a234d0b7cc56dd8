"""The harness itself: a real proxy subprocess, upstreams on loopback, events captured."""

import pytest

from tests.harness import PortcullisProc, assert_denied

pytestmark = pytest.mark.e2e

ALLOW_PUBLIC = [{"name": "public", "action": "allow", "hosts": ["public.test", "*.public.test"]}]


def test_allow_deny_default_http(upstreams, tmp_path):
    with PortcullisProc(tmp_path, upstreams, rules=ALLOW_PUBLIC) as p:
        r = p.curl(f"http://public.test:{upstreams.http_port}/hello?secret=1")
        assert r.status == 200, r
        assert r.json()["path"] == "/hello?secret=1"
        r2 = p.curl(f"http://nope.test:{upstreams.http_port}/")
        body = assert_denied(r2, "default")
        assert body["host"] == "nope.test" and body["port"] == upstreams.http_port
        ev = p.wait_event("egress.decision", **{"destination.host": "public.test"})
        assert ev["decision"] == "allow" and ev["rule"] == "public"
        assert ev["request"]["path"] == "/hello"
        assert ev["destination"]["ip"] == "127.0.0.2"
    assert p.exit_code == 0
    assert p.find("proxy.stopped")
