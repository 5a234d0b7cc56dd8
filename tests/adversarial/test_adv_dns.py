"""Changing and mixed DNS answers, end to end: the proxy runs in its own mount namespace whose
/etc/resolv.conf points at a scripted DNS server (tests/recording.py ScriptedDNS) on a loopback
address. Answers are 127.0.0.2 ("public") and loopback (private); the `loop` recorder listens on the
same port on 127.0.0.2, 127.0.0.1 and ::1, so a connection to a private answer would be recorded.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.adversarial.adv import BARRIER_RULE, Adv, Replies, Window, adv_config
from tests.approvals.approvals_support import TOKEN
from tests.approvals.e2e_support import decide
from tests.harness import PortcullisProc
from tests.recording import ScriptedDNS

pytestmark = pytest.mark.e2e

PUBLIC, PRIVATE = "127.0.0.2", "127.0.0.1"


def _v4(*answers: str):  # the n-th A query gets answers[n-1] (the last one repeats); AAAA: none
    def fn(qtype: int, n: int) -> list[str]:
        if qtype != ScriptedDNS.A:
            return []
        return [a for a in answers[min(n, len(answers)) - 1].split(",") if a]
    return fn


def _both(v4: list[str], v6: list[str]):
    return lambda qtype, n: v4 if qtype == ScriptedDNS.A else v6


SCRIPT = {
    "rebind.dyn.test": _v4(PUBLIC, PRIVATE),
    "rebind-connect.dyn.test": _v4(PUBLIC, PRIVATE),
    "flip.dyn.test": _v4(PRIVATE, PUBLIC, PRIVATE, PUBLIC),
    "mixed.dyn.test": _v4(f"{PUBLIC},{PRIVATE}"),
    "mixed-reversed.dyn.test": _v4(f"{PRIVATE},{PUBLIC}"),
    "many.dyn.test": _v4(",".join([PUBLIC] * 20 + ["127.5.5.5"])),
    "v6-loopback.dyn.test": _both([PUBLIC], ["::1"]),
    "v6-mapped.dyn.test": _both([], ["::ffff:127.0.0.1"]),
    "empty.dyn.test": _both([], []),
    "blocked.dyn.test": _v4(PUBLIC),
    "public.dyn.test": _v4(PUBLIC),
    "c2vjcmv0.ask.dyn.test": _v4(PUBLIC),
}


class MountNsProc(PortcullisProc):
    """The proxy with its own /etc/resolv.conf (a private mount namespace), same network."""

    resolv: str = ""

    def command(self) -> list[str]:
        resolv = self.folder / "resolv.conf"
        resolv.write_text(self.resolv)
        script = f'mount --bind {resolv} /etc/resolv.conf && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, "sh", *super().command()]


@pytest.fixture(scope="module")
def dns() -> Iterator[ScriptedDNS]:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here (needs root): {probe.stderr.decode().strip()}")
    d = ScriptedDNS(SCRIPT)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def proxy(dns, upstreams, recorders, tmp_path_factory) -> Iterator[Adv]:
    folder = tmp_path_factory.mktemp("dns")
    cfg = adv_config(upstreams, folder)
    rules = [
        {"name": "dyn", "action": "allow", "hosts": ["**.dyn.test"]},
        {"name": "no-blocked", "action": "deny", "hosts": ["blocked.dyn.test"]},
        {"name": "ask", "action": "approval", "hosts": ["**.ask.dyn.test"]},
        BARRIER_RULE,
    ]
    p = MountNsProc(folder, upstreams, rules=rules, config=cfg, env={"PORTCULLIS_TEST_ADMIN_TOKEN": TOKEN})
    p.resolv = f"nameserver {dns.address}\noptions timeout:1 attempts:1\n"
    with p:
        yield Adv(p, recorders, upstreams)


def _get(host: str, port: int, path: str) -> bytes:
    return f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def _arrived_paths(w: Window) -> list[str]:
    return [h["target"] for c in w.conns for h in c.heads]


def _on_one_connection(adv: Adv, reqs: list[bytes]) -> list[int | None]:
    with socket.create_connection(("127.0.0.1", adv.p.port), timeout=10) as s:
        r = Replies(s)
        out = []
        for q in reqs:
            s.sendall(q)
            out.extend(r.statuses(1))
        return out


def test_a_name_that_rebinds_stays_on_its_checked_answer_for_the_connection(proxy, dns):
    port = proxy.rec.loop
    m = proxy.mark()
    got = _on_one_connection(proxy, [_get("rebind.dyn.test", port, f"/ka/{i}") for i in range(3)])
    w = proxy.window(m)
    assert got == [200, 200, 200]
    assert dns.count("rebind.dyn.test", ScriptedDNS.A) == 1  # resolved once for the connection
    assert all(d["destination"]["ip"] == PUBLIC for d in w.decisions), w.decisions
    # The next connection resolves again, gets the private answer, and is refused.
    m = proxy.mark()
    got = _on_one_connection(proxy, [_get("rebind.dyn.test", port, "/after")])
    w = proxy.window(m)
    assert got == [403] and _arrived_paths(w) == []
    assert [(d["decision"], d["reason"]) for d in w.decisions] == [("deny", "private_address")]


def test_a_tunnel_to_a_rebinding_name(proxy, dns):
    port = proxy.rec.loop
    m = proxy.mark()
    s, rep = proxy.tunnel(f"rebind-connect.dyn.test:{port}")
    s.close()
    s2, rep2 = proxy.tunnel(f"rebind-connect.dyn.test:{port}")
    s2.close()
    w = proxy.window(m)
    assert rep.status == 200 and rep2.status == 403, (rep.status, rep2.status)
    assert [d["reason"] for d in w.decisions] == ["rule", "private_address"]
    assert w.decisions[0]["destination"]["ip"] == PUBLIC


def test_answers_that_flip_every_query_never_reach_the_private_one(proxy, dns):
    port = proxy.rec.loop
    m = proxy.mark()
    got = [_on_one_connection(proxy, [_get("flip.dyn.test", port, f"/flip/{i}")])[0] for i in range(4)]
    w = proxy.window(m)
    assert got == [403, 200, 403, 200]
    assert sorted(_arrived_paths(w)) == ["/flip/1", "/flip/3"]
    assert [d["reason"] for d in w.decisions] == ["private_address", "rule", "private_address", "rule"]


@pytest.mark.parametrize("name", ["mixed.dyn.test", "mixed-reversed.dyn.test", "many.dyn.test",
                                  "v6-loopback.dyn.test", "v6-mapped.dyn.test"])
@pytest.mark.parametrize("via", ["http", "connect"])
def test_any_private_answer_refuses_the_name(proxy, dns, name, via):
    port = proxy.rec.loop
    m = proxy.mark()
    if via == "http":
        status = _on_one_connection(proxy, [_get(name, port, "/mixed")])[0]
    else:
        s, rep = proxy.tunnel(f"{name}:{port}")
        s.close()
        status = rep.status
    w = proxy.window(m)
    assert status == 403 and w.nothing_arrived()
    assert [(d["decision"], d["reason"]) for d in w.decisions] == [("deny", "private_address")]


@pytest.mark.parametrize("name", ["nxdomain.dyn.test", "empty.dyn.test"])
def test_an_allowed_name_without_an_answer_is_an_upstream_error(proxy, dns, name):
    m = proxy.mark()
    out = proxy.send(_get(name, proxy.rec.loop, "/nx"), timeout=10)
    w = proxy.window(m)
    assert out.status == 502 and out.reply.headers["x-portcullis-decision"] == "allow"
    assert w.nothing_arrived()
    assert [d["decision"] for d in w.decisions] == ["allow"]


@pytest.mark.parametrize("via", ["http", "connect"])
def test_a_denied_name_is_never_resolved(proxy, dns, via):
    before = dns.count("blocked.dyn.test")
    m = proxy.mark()
    if via == "http":
        out = proxy.send(_get("blocked.dyn.test", proxy.rec.loop, "/no-dns"))
        status = out.status
    else:
        s, rep = proxy.tunnel(f"blocked.dyn.test:{proxy.rec.loop}")
        s.close()
        status = rep.status
    w = proxy.window(m)
    assert status == 403 and w.nothing_arrived()
    assert dns.count("blocked.dyn.test") == before  # no DNS query leaked the denied name
    assert [d["reason"] for d in w.decisions] == ["rule"]


def test_the_scripted_resolver_is_really_used(proxy, dns):
    """The control: an allowed name resolved only by the scripted server reaches 127.0.0.2."""
    before = dns.count("public.dyn.test", ScriptedDNS.A)
    m = proxy.mark()
    out = proxy.send(_get("public.dyn.test", proxy.rec.loop, "/control"))
    w = proxy.window(m)
    assert out.status == 200 and _arrived_paths(w) == ["/control"]
    assert dns.count("public.dyn.test", ScriptedDNS.A) == before + 1


def test_a_name_waiting_for_a_person_goes_to_no_dns_server_until_approved(proxy, dns):
    """The proxy's resolver is no channel out: a name under an approval rule (here one that spells
    data, as an exfiltrating agent would) is looked up only once a person allows it."""
    name = "c2vjcmv0.ask.dyn.test"
    m = proxy.mark()
    answer: list[object] = []
    request = _get(name, proxy.rec.loop, "/asked")
    held = threading.Thread(target=lambda: answer.append(proxy.send(request, 20)))
    held.start()
    try:
        asked = proxy.p.wait_event("approval.requested", **{"destination.host": name})
        assert dns.count(name) == 0  # held for a person: nothing went to DNS
        assert decide(proxy.p, asked["approval_id"], "allow").status_code == 200
    finally:
        held.join(25)
    w = proxy.window(m)
    assert [o.status for o in answer] == [200] and _arrived_paths(w) == ["/asked"]
    assert dns.count(name, ScriptedDNS.A) == 1  # looked up once, after the approval
    assert [(d["decision"], d["reason"]) for d in w.decisions] == [("allow", "approved")]
