"""The SQLite approvals store under faults, through a real proxy: locked by another process (`BEGIN
EXCLUSIVE`), on a full disk (a 256 KiB tmpfs filled up), and read-only (immutable file, read-only file
system). Fail closed: a request that needs an approval the store cannot record is denied
`internal_error` with the reason as `detail`, the admin API answers 503 and changes nothing, traffic
allowed by a rule keeps flowing (the store's calls never run on the event loop), `store.unreachable`
/ `store.reconnected` say when, and the proxy recovers by itself when the fault clears. A store that
cannot be written at start stops the start (exit 2, saying why), like an unreachable Redis."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.faults_support import (
    Background,
    admin,
    approval_proxy,
    audit,
    decide,
    fill,
    metric,
    pending_ids,
    send,
    still_answers,
    tmpfs,
    upstream_paths,
)
from tests.harness import PortcullisProc, assert_denied


def denied_for_the_store(p: PortcullisProc, upstreams, path: str, why: str) -> None:
    reply = send(p, upstreams, "api.public.test", path)
    body = assert_denied(reply, "internal_error")
    assert body["approval_id"] is None
    ev = p.wait_event("egress.decision", **{"request.path": path})
    assert ev["decision"] == "deny" and ev["reason"] == "internal_error"
    assert ev["detail"].startswith("the approvals store ") and why in ev["detail"], ev["detail"]


def test_a_locked_store_denies_what_needs_an_approval_and_recovers(tmp_path, upstreams):
    with approval_proxy(tmp_path, upstreams, None) as p:
        db = tmp_path / "state" / "portcullis.db"
        lock = sqlite3.connect(db, isolation_level=None, timeout=0)
        lock.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        try:
            # Not the event loop's business: while a request waits for the lock (2 s, then denied),
            # allowed traffic is answered.
            waiting = Background(lambda: send(p, upstreams, "api.public.test", "/locked-1"))
            time.sleep(0.3)  # let it reach the store (if it has not, the check below proves nothing new)
            answered_meanwhile = 0
            while not waiting.done() and answered_meanwhile < 10:  # bounded
                r = send(p, upstreams, "public.test", f"/flowing-{answered_meanwhile}")
                assert r.status == 200
                answered_meanwhile += not waiting.done()
            assert answered_meanwhile >= 1, "allowed traffic waited for the locked store"
            body = assert_denied(waiting.result(), "internal_error")
            assert body["approval_id"] is None
            down = p.wait_event("store.unreachable")
            assert down["store"] == "sqlite:///state/portcullis.db" and "database is locked" in down["error"]
            denied_for_the_store(p, upstreams, "/locked-2", "database is locked")
            assert admin(p, "GET", "/approvals").status_code == 200  # reading needs no write lock
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert [r for r in upstream_paths(upstreams) if r.startswith("/locked")] == []
        # The lock is gone: the next request opens its approval, which decides it.
        held = Background(lambda: send(p, upstreams, "api.public.test", "/after"))
        approval_id = p.wait_event("approval.requested")["approval_id"]
        assert p.wait_event("store.reconnected")["store"] == "sqlite:///state/portcullis.db"
        assert decide(p, approval_id, "allow").status_code == 200
        assert held.result().status == 200
        assert len(p.find("store.unreachable")) == 1  # once per outage
        assert metric(p, "portcullis_store_up") == 1
        still_answers(p, upstreams)
        flowing = [r for r in upstream_paths(upstreams) if r.startswith("/flowing")]
    assert p.exit_code == 0
    audit(p, sent=len(flowing) + 4)  # /locked-1, /locked-2, /after, /still-alive and the flowing ones


def test_a_full_disk_fails_closed_and_recovers_when_space_is_freed(tmp_path, upstreams):
    with tmpfs(tmp_path / "disk", "256k") as disk:
        store = f"sqlite:///{disk}/portcullis.db"
        with approval_proxy(tmp_path, upstreams, None, store=store) as p:
            held = Background(lambda: send(p, upstreams, "approve.test", "/held"))
            approval_id = p.wait_event("approval.requested")["approval_id"]
            filler = fill(disk)  # the disk is full now
            try:
                denied_for_the_store(p, upstreams, "/full", "database or disk is full")
                assert "database or disk is full" in p.wait_event("store.unreachable")["error"]
                still_answers(p, upstreams, "/flowing")
                # A decision that cannot be recorded is refused (503) and changes nothing.
                r = decide(p, approval_id, "allow")
                assert r.status_code == 503 and r.json()["error"] == "store_unavailable", r.text
                assert pending_ids(p) == [approval_id]
                assert not held.done()  # the held request waits on
            finally:
                filler.unlink()
            assert decide(p, approval_id, "allow").status_code == 200
            assert held.result().status == 200
            p.wait_event("store.reconnected")
            later = Background(lambda: send(p, upstreams, "api.public.test", "/later"))
            later_id = p.wait_event("approval.requested", count=2)["approval_id"]
            assert decide(p, later_id, "deny").status_code == 200
            assert_denied(later.result(), "approval_denied")
            still_answers(p, upstreams)
        assert p.exit_code == 0
        assert upstream_paths(upstreams) == ["/flowing", "/held", "/still-alive"]
        audit(p, sent=5)


def chattr(flag: str, path: Path) -> None:
    r = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"chattr {flag} does not work here: {r.stderr.strip()}")


def refused_start(p: PortcullisProc) -> str:
    p.start(wait=False)
    assert p.proc is not None
    code = p.proc.wait(30)
    err = p.stderr_text()
    p.stop()
    assert code == 2, err
    assert p.find("proxy.started") == [] and "Traceback" not in err
    return err


def test_a_read_only_store_stops_the_start_and_says_why(tmp_path, upstreams):
    """A running store cannot be made read-only under SQLite (the kernel checks at open: chmod,
    chattr +i and a read-only remount all leave an open file writable, or refuse while it is open);
    where it bites is the next start, which must not bring up a proxy that silently cannot record an
    approval."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        db = disk / "portcullis.db"
        store = f"sqlite:///{disk}/portcullis.db"
        with approval_proxy(tmp_path / "first", upstreams, None, store=store) as p:
            still_answers(p, upstreams)  # creates the store
        chattr("+i", db)
        try:
            err = refused_start(approval_proxy(tmp_path / "immutable", upstreams, None, store=store))
            assert f"cannot open the approvals store {db} for writing: attempt to write a readonly" in err
            assert "not writable" in err
        finally:
            chattr("-i", db)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        try:
            err = refused_start(approval_proxy(tmp_path / "ro-fs", upstreams, None, store=store))
            assert f"cannot open the approvals store {db} for writing" in err
            assert "read-only file system" in err
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        with approval_proxy(tmp_path / "fixed", upstreams, None, store=store) as p:  # fixed: it starts
            held = Background(lambda: send(p, upstreams, "approve.test", "/fixed"))
            assert decide(p, p.wait_event("approval.requested")["approval_id"], "allow").status_code == 200
            assert held.result().status == 200
        audit(p, sent=1)
