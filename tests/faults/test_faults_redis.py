"""Redis store faults through a real proxy and a real redis-server of the test's own. What
tests/approvals/e2e/test_replicas.py already proves (Redis stopped and restarted with its data
mid-approval, a worker restarted during an outage) is not repeated here; this adds: Redis slow
(`CLIENT PAUSE`: every call hits its 2 s deadline) while allowed traffic is proven not to wait for it,
Redis unreachable at start (exit 2, saying why), and Redis restarted without its data mid-approval."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.faults_support import (
    Background,
    admin,
    approval_proxy,
    audit,
    decide,
    metric,
    pending_ids,
    send,
    still_answers,
    upstream_paths,
)
from tests.harness import assert_denied
from tests.redis_support import RedisServer, free_port, needs_redis

pytestmark = needs_redis


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as r:
        yield r


def test_a_paused_redis_stalls_nothing_but_what_needs_it_and_recovers(tmp_path, upstreams, own_redis):
    with approval_proxy(tmp_path, upstreams, None, store=own_redis.url) as p:
        held = Background(lambda: send(p, upstreams, "approve.test", "/held", timeout=60))
        approval_id = p.wait_event("approval.requested")["approval_id"]
        with own_redis.client() as r:
            r.execute_command("CLIENT", "PAUSE", "8000", "ALL")  # every command waits 8 s
        try:
            # A request that needs Redis waits for it (its 2 s deadline) ...
            waiting = Background(lambda: send(p, upstreams, "api.public.test", "/paused"))
            time.sleep(0.3)  # let it reach the store (if it has not, the check below proves nothing new)
            answered_meanwhile = 0
            while not waiting.done() and answered_meanwhile < 10:  # bounded
                # ... and traffic that needs no approval is answered meanwhile: the loop is not blocked.
                assert send(p, upstreams, "public.test", f"/flowing-{answered_meanwhile}").status == 200
                answered_meanwhile += not waiting.done()
            assert answered_meanwhile >= 1, "allowed traffic waited for the paused Redis"
            body = assert_denied(waiting.result(), "internal_error")
            assert body["approval_id"] is None
            ev = p.wait_event("egress.decision", **{"request.path": "/paused"})
            said = f"the approvals store {own_redis.url} is unreachable (TimeoutError"
            assert ev["detail"].startswith(said), ev["detail"]
            down = p.wait_event("store.unreachable")
            assert down["store"] == own_redis.url
            r503 = admin(p, "GET", "/approvals")
            assert r503.status_code == 503 and r503.json()["error"] == "store_unavailable"
            assert metric(p, "portcullis_store_up") == 0
            assert not held.done()  # the request held before the pause waits on
        finally:
            with own_redis.client() as r:
                r.execute_command("CLIENT", "UNPAUSE")
        assert p.wait_event("store.reconnected", timeout=15)["store"] == own_redis.url
        assert pending_ids(p) == [approval_id]
        assert decide(p, approval_id, "allow").status_code == 200
        assert held.result(60).status == 200
        still_answers(p, upstreams)
        flowing = [x for x in upstream_paths(upstreams) if x.startswith("/flowing")]
        assert upstream_paths(upstreams) == sorted(["/held", "/still-alive", *flowing])
    assert p.exit_code == 0
    audit(p, sent=len(flowing) + 3)


def test_an_unreachable_redis_at_start_stops_the_start_and_says_why(tmp_path, upstreams):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    p = approval_proxy(tmp_path, upstreams, None, store=url)
    p.start(wait=False)
    assert p.proc is not None
    code = p.proc.wait(30)
    p.stop()
    err = p.stderr_text()
    assert code == 2, err
    assert f"cannot use the approvals store {url}: ConnectionError" in err and "Traceback" not in err
    assert p.find("proxy.started") == []


def test_redis_restarted_without_its_data_mid_approval_lets_nothing_through(tmp_path, upstreams, own_redis):
    """Redis without persistence forgets the pending approval. Fail closed: nobody can list or decide
    it any more, so the request held on it is refused at its expiry (approval_timeout) and nothing
    reaches the upstream; once it has expired, the client's retry asks afresh, and that works."""
    with approval_proxy(tmp_path, upstreams, None, store=own_redis.url, timeout="6s") as p:
        held = Background(lambda: send(p, upstreams, "approve.test", "/forgotten"))
        approval_id = p.wait_event("approval.requested")["approval_id"]
        own_redis.stop()
        shutil.rmtree(own_redis.folder)  # its append-only file: gone
        own_redis.folder.mkdir()
        own_redis.start()
        p.wait_event("store.reconnected", timeout=20)
        assert pending_ids(p) == []  # forgotten: nothing to decide
        assert admin(p, "POST", f"/approvals/{approval_id}", {"decision": "allow"}).status_code == 404
        reply = held.result()
        assert_denied(reply, "approval_timeout")
        assert upstream_paths(upstreams) == []
        retry = Background(lambda: send(p, upstreams, "approve.test", "/forgotten"))
        fresh = p.wait_event("approval.requested", count=2)["approval_id"]
        assert fresh != approval_id and pending_ids(p) == [fresh]
        assert decide(p, fresh, "allow").status_code == 200
        assert retry.result().status == 200
        assert upstream_paths(upstreams) == ["/forgotten"]
        still_answers(p, upstreams)
    audit(p, sent=3)
