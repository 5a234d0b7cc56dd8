"""Fault: `kill -9` of the proxy while requests are held for approval (SQLite store), then a restart on
the same store.

Documented behaviour (README, Approvals > Store): every new approval is on disk (synchronous=FULL)
before the request is held, so pending approvals survive a crash; those that expired while the proxy
was down are expired at start. The held clients lose their connection (a close, never an allow: the
proxy that held them is gone). After the restart the approvals are listed, a decision works, a retry
is answered by it, and nothing that nobody allowed reaches an upstream.

The existing restart test (tests/approvals/e2e/test_approvals.py) stops the proxy cleanly with
`hold: false`; this one kills it with requests held, for the pending and the expired cases.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time

import pytest

from tests.approvals.e2e_support import ENV, decide, pending, wait_for
from tests.faults.faults_b_support import assert_each_decision_once, get_request
from tests.harness import (
    PortcullisProc,
    base_config,
    read_reply,
    upstreams,  # noqa: F401  (session fixture; the folder has no conftest.py)
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

HOSTS = ["approve.test", "other.test", "www.public.test"]  # three approvals: distinct hosts, no coalescing
BOUND = 30.0


def _proxy(tmp_path, upstreams, timeout: str) -> PortcullisProc:  # noqa: F811
    cfg = base_config(upstreams, tmp_path, default_action="approval",
                      approvals={"timeout": timeout, "hold": True})
    return PortcullisProc(tmp_path, upstreams, rules=[], config=cfg, env=ENV)


def _hold(p: PortcullisProc, upstreams) -> list[socket.socket]:  # noqa: F811
    socks = []
    for h in HOSTS:
        s = socket.create_connection(("127.0.0.1", p.port), timeout=BOUND)
        s.sendall(get_request(h, upstreams.http_port, f"/held-{h}"))
        socks.append(s)
    wait_for(lambda: len(pending(p)) == len(HOSTS) and all(a["waiters"] == 1 for a in pending(p)), BOUND)
    return socks


def _closed_without_an_answer(s: socket.socket) -> None:
    with s:
        data = b""
        with contextlib.suppress(ConnectionResetError):
            data = s.recv(65536)
        assert data == b"", data[:200]  # a close (or reset), never a response


def _reached(upstreams, host: str) -> list:  # noqa: F811
    return upstreams.seen(lambda r: r["path"] == f"/held-{host}")


def test_kill_9_with_held_requests_then_a_restart_keeps_the_approvals_and_decides_them(tmp_path, upstreams):  # noqa: F811
    a = _proxy(tmp_path, upstreams, "60s").start()
    try:
        socks = _hold(a, upstreams)
        ids = {x["host"]: x["id"] for x in pending(a)}
        a.wait_event("approval.requested", count=len(HOSTS))
    finally:
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    for s in socks:
        _closed_without_an_answer(s)
    assert not a.decisions()  # nothing was decided before the crash: nothing to log, nothing allowed
    b = _proxy(tmp_path, upstreams, "60s")
    with b:
        assert sorted(x["id"] for x in pending(b)) == sorted(ids.values())  # the crash lost none
        # Decisions after the restart: allow once, deny for the session, and the third on a held retry.
        assert decide(b, ids["approve.test"], "allow").status_code == 200
        assert decide(b, ids["other.test"], "deny", scope="session").status_code == 200
        with socket.create_connection(("127.0.0.1", b.port), timeout=BOUND) as s:
            s.sendall(get_request("approve.test", upstreams.http_port, "/held-approve.test", close=True))
            assert read_reply(s).status == 200  # the once grant the decision left
        r = b.raw(get_request("other.test", upstreams.http_port, "/held-other.test", close=True))
        assert r.status == 403 and r.headers["x-portcullis-reason"] == "approval_denied"
        with socket.create_connection(("127.0.0.1", b.port), timeout=BOUND) as s:
            www = "www.public.test"
            s.sendall(get_request(www, upstreams.http_port, f"/held-{www}", close=True))
            wait_for(lambda: pending(b) and pending(b)[0]["waiters"] == 1, BOUND)  # joined the old approval
            assert [x["id"] for x in pending(b)] == [ids["www.public.test"]]
            assert decide(b, ids["www.public.test"], "deny").status_code == 200
            r = read_reply(s)
            assert r.status == 403 and r.headers["x-portcullis-reason"] == "approval_denied"
        assert decide(b, ids["approve.test"], "deny").status_code == 409  # the first decision stands
        b.wait_event("egress.decision", count=3)
    got = {e["destination"]["host"]: e for e in b.decisions()}
    assert len(b.decisions()) == 3 and set(got) == set(HOSTS)
    allowed = got["approve.test"]
    assert (allowed["reason"], allowed["approval_id"]) == ("approved", ids["approve.test"])
    assert got["other.test"]["reason"] == "approval_denied"
    assert got["www.public.test"]["reason"] == "approval_denied"
    assert got["www.public.test"]["approval_id"] == ids["www.public.test"]
    assert_each_decision_once(b)
    # Only the one request a person allowed reached an upstream, once.
    assert len(_reached(upstreams, "approve.test")) == 1
    assert not _reached(upstreams, "other.test") and not _reached(upstreams, "www.public.test")


def test_approvals_that_expired_while_the_proxy_was_dead_are_expired_at_restart(tmp_path, upstreams):  # noqa: F811
    a = _proxy(tmp_path, upstreams, "2s").start()
    try:
        socks = _hold(a, upstreams)
        ids = {x["id"] for x in pending(a)}
    finally:
        a.stop(signal.SIGKILL)
    for s in socks:
        _closed_without_an_answer(s)
    time.sleep(2.5)  # past the approvals' expiry while nothing runs
    b = _proxy(tmp_path, upstreams, "2s")
    with b:
        decided = [b.wait_event("approval.decided", count=i + 1) for i in range(len(ids))]
        assert {d["approval_id"] for d in decided} == ids
        assert all(d["decision"] == "deny" and d["outcome"] == "approval_timeout" for d in decided)
        assert pending(b) == []
        assert decide(b, sorted(ids)[0], "allow").status_code == 410  # expired: no late allow
        assert not b.decisions()
    for h in HOSTS:
        assert not _reached(upstreams, h)
