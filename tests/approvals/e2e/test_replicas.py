"""Replicas for real: several `portcullis run` processes (and one with --workers 2) sharing one real
redis-server of the test's own, with a webhook receiver that verifies every signature and decisions
taken through each replica's admin API.

Every proxy runs with PORTCULLIS_APPROVAL_POLL_S=120: a held request that is released within the
tests' bounded waits (far below 120 s) was released by the notification on Redis pub/sub, not by
the poll of the store."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.approvals.approvals_support import SECRET_ENV, TOKEN
from tests.approvals.e2e_support import ENV, HookReceiver, decide, pending, wait_for
from tests.harness import PortcullisProc, assert_denied, base_config
from tests.redis_support import RedisServer, needs_redis

pytestmark = [pytest.mark.e2e, needs_redis]
RULES = [{"name": "open", "action": "allow", "hosts": ["public.test"]}]  # needs no shared state
HELD_S = 60  # how long a client waits for its answer (curl's timeout); the approvals live 90 s


@pytest.fixture
def hooks() -> Iterator[HookReceiver]:
    h = HookReceiver()
    yield h
    h.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as r:
        yield r


def replica(tmp_path: Path, name: str, upstreams, hooks: HookReceiver, redis: RedisServer,
            workers: int = 1) -> PortcullisProc:
    folder = tmp_path / name
    folder.mkdir()
    cfg = base_config(upstreams, folder, default_action="approval",
                      approvals={"timeout": "90s", "store": redis.url, "persist_to": None,
                                 "webhooks": [{"url": hooks.url, "secret_env": SECRET_ENV}]})
    env = {**ENV, "PORTCULLIS_APPROVAL_POLL_S": "120"}
    return PortcullisProc(folder, upstreams, rules=RULES, config=cfg, env=env, workers=workers)


def url(upstreams, path: str, host: str = "approve.test") -> str:
    return f"http://{host}:{upstreams.http_port}{path}"


def waiters_on(p: PortcullisProc, approval_id: str) -> int:
    """Requests held for `approval_id` on this replica (its own API counts its own waiters)."""
    return sum(a["waiters"] for a in pending(p) if a["id"] == approval_id)


def admin_get(p: PortcullisProc, path: str) -> httpx.Response:
    return httpx.get(f"{p.admin_url}{path}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
                     trust_env=False)


def test_a_request_held_on_one_replica_is_released_by_a_decision_on_another(tmp_path, upstreams, hooks,
                                                                            own_redis):
    with replica(tmp_path, "a", upstreams, hooks, own_redis) as a, \
            replica(tmp_path, "b", upstreams, hooks, own_redis) as b, \
            replica(tmp_path, "c", upstreams, hooks, own_redis) as c, ThreadPoolExecutor(4) as pool:
        on_a = [pool.submit(a.curl, url(upstreams, f"/a{i}"), timeout=HELD_S) for i in range(2)]
        [hook] = hooks.wait(1)
        approval_id = hook["body"]["id"]
        on_c = [pool.submit(c.curl, url(upstreams, f"/c{i}"), timeout=HELD_S) for i in range(2)]
        wait_for(lambda: waiters_on(a, approval_id) == 2 and waiters_on(c, approval_id) == 2)
        assert [x["id"] for x in pending(b)] == [approval_id]  # one approval across the replicas
        assert decide(b, approval_id, "allow").status_code == 200
        replies = [f.result(HELD_S) for f in (*on_a, *on_c)]
        assert [r.status for r in replies] == [200] * 4, replies
        for p, n in ((a, 2), (c, 2)):
            approved = p.wait_event("egress.decision", count=n, reason="approved") and p.decisions(
                reason="approved")
            assert {d["approval_id"] for d in approved} == {approval_id}
        assert len(hooks.got) == 1  # one webhook, from the replica that opened the approval
        assert [len(p.find("approval.requested")) for p in (a, b, c)] == [1, 0, 0]
        assert [len(p.find("approval.decided")) for p in (a, b, c)] == [0, 1, 0]
        # The `once` was used by the requests held on A and C: nothing is left for a retry.
        on_b = pool.submit(b.curl, url(upstreams, "/b-after"), timeout=HELD_S)
        hooks.wait(2)
        assert not on_b.done()
        assert decide(b, hooks.got[1]["body"]["id"], "deny").status_code == 200
        assert_denied(on_b.result(HELD_S), "approval_denied")


def test_a_replica_killed_mid_approval_loses_nothing(tmp_path, upstreams, hooks, own_redis):
    a = replica(tmp_path, "a", upstreams, hooks, own_redis)
    with a, replica(tmp_path, "b", upstreams, hooks, own_redis) as b, \
            replica(tmp_path, "c", upstreams, hooks, own_redis) as c, ThreadPoolExecutor(2) as pool:
        held = pool.submit(a.curl, url(upstreams, "/killed"), timeout=HELD_S)
        [hook] = hooks.wait(1)
        approval_id = hook["body"]["id"]
        wait_for(lambda: waiters_on(a, approval_id) == 1)
        a.stop(signal.SIGKILL)  # mid-approval: its held client loses its connection, nothing else
        assert held.result(HELD_S).status != 200
        assert [x["id"] for x in pending(b)] == [approval_id]  # still pending, in Redis
        assert decide(b, approval_id, "allow").status_code == 200  # nobody waits: a `once` for the retry
        retry = c.curl(url(upstreams, "/killed"))
        assert retry.status == 200
        assert c.wait_event("egress.decision", reason="approved")["approval_id"] == approval_id
        assert len(hooks.got) == 1 and pending(b) == []


def test_redis_restarted_mid_approval(tmp_path, upstreams, hooks, own_redis):
    """While Redis is down: what needs an approval or a grant is denied internal_error (saying the
    store is unreachable), traffic that needs no shared state flows, the admin API answers 503.
    After it is back (same port, its append-only file): the proxies reconnect by themselves, the
    pending approval is still there, and a decision releases the request held all along."""
    with replica(tmp_path, "a", upstreams, hooks, own_redis) as a, \
            replica(tmp_path, "b", upstreams, hooks, own_redis) as b, ThreadPoolExecutor(2) as pool:
        held = pool.submit(a.curl, url(upstreams, "/held"), timeout=HELD_S)
        [hook] = hooks.wait(1)
        approval_id = hook["body"]["id"]
        wait_for(lambda: waiters_on(a, approval_id) == 1)
        own_redis.stop()
        for p in (a, b):
            down = p.wait_event("store.unreachable", timeout=15)
            assert down["store"] == own_redis.url
        for p in (a, b):
            denied = assert_denied(p.curl(url(upstreams, f"/new-{p.folder.name}", host="other.test")),
                                   "internal_error")
            assert denied["approval_id"] is None
            ev = p.wait_event("egress.decision", reason="internal_error")
            assert ev["detail"].startswith(f"the approvals store {own_redis.url} is unreachable")
            assert p.curl(url(upstreams, "/flows", host="public.test")).status == 200  # no shared state
            r = admin_get(p, "/approvals")
            assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
            assert "is unreachable" in r.json()["message"]
        assert not held.done()  # the held request waits on; its approval is safe in Redis's file

        own_redis.start()
        for p in (a, b):
            assert p.wait_event("store.reconnected", timeout=20)["store"] == own_redis.url
        assert [x["id"] for x in pending(b)] == [approval_id]
        assert decide(b, approval_id, "allow").status_code == 200
        assert held.result(HELD_S).status == 200
        assert a.wait_event("egress.decision", reason="approved")["approval_id"] == approval_id
        assert [len(p.find("store.unreachable")) for p in (a, b)] == [1, 1]  # once per outage per process
        metrics = httpx.get(f"{a.admin_url}/metrics", timeout=10, trust_env=False).text
        assert "portcullis_store_up 1.0" in metrics


def held_get(p: PortcullisProc, upstreams, path: str) -> int:
    host = f"approve.test:{upstreams.http_port}"
    try:
        return p.raw(f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), HELD_S).status
    except OSError:
        return -1


def test_replicas_with_two_workers_each_share_one_approval_and_one_webhook(tmp_path, upstreams, hooks,
                                                                           own_redis):
    """Every worker of every replica subscribes: requests held on the workers of two replicas share one
    approval and one webhook, and one decision through one replica's API releases them all."""
    with replica(tmp_path, "a", upstreams, hooks, own_redis, workers=2) as a, \
            replica(tmp_path, "b", upstreams, hooks, own_redis, workers=2) as b, \
            ThreadPoolExecutor(10) as pool:
        replies = {f"/a{i}": pool.submit(held_get, a, upstreams, f"/a{i}") for i in range(6)}
        [hook] = hooks.wait(1)
        approval_id = hook["body"]["id"]
        replies |= {f"/b{i}": pool.submit(held_get, b, upstreams, f"/b{i}") for i in range(4)}
        wait_for(lambda: [x["id"] for x in pending(b)] == [approval_id])
        time.sleep(1.0)  # every request reaches its worker and joins (bounded; the oracle is the counts)
        assert not any(f.done() for f in replies.values())
        assert decide(b, approval_id, "allow").status_code == 200
        got = {path: f.result(HELD_S) for path, f in replies.items()}
        assert set(got.values()) == {200}, got
        approved = [d for p in (a, b) for d in p.decisions(reason="approved")]
        assert len(approved) == 10 and {d["approval_id"] for d in approved} == {approval_id}
        assert all(d["approval_wait_ms"] > 0 for d in approved)  # every one was held, then released
        assert len(hooks.got) == 1
        assert len(a.find("approval.requested")) + len(b.find("approval.requested")) == 1
        assert [len(p.find("approval.decided")) for p in (a, b)] == [0, 1]


def worker_pids(p: PortcullisProc) -> list[int]:
    assert p.proc is not None
    out = subprocess.run(["pgrep", "-P", str(p.proc.pid)], capture_output=True, text=True, check=False).stdout
    return [int(x) for x in out.split()]


def ready(p: PortcullisProc) -> bool:
    return httpx.get(f"{p.admin_url}/readyz", timeout=5, trust_env=False).status_code == 200


def test_a_worker_started_again_while_redis_is_down_serves_and_catches_up(tmp_path, upstreams, hooks,
                                                                          own_redis):
    """The supervisor checked Redis at start; a worker it starts again during an outage comes up all
    the same (failing closed for what needs Redis) instead of dying until the proxy gives up."""
    with replica(tmp_path, "a", upstreams, hooks, own_redis, workers=2) as a, ThreadPoolExecutor(4) as pool:
        own_redis.stop()
        a.wait_event("store.unreachable", timeout=15)
        victim = worker_pids(a)[0]
        os.kill(victim, signal.SIGKILL)
        assert a.wait_event("worker.exited", timeout=15)["restarted"] is True
        wait_for(lambda: len(worker_pids(a)) == 2 and victim not in worker_pids(a) and ready(a), timeout=30)
        assert a.find("worker.exited") and len(a.find("worker.exited")) == 1  # started once, and stays up
        for i in range(6):  # both workers serve what needs no shared state
            assert a.curl(url(upstreams, f"/open{i}", host="public.test")).status == 200
        assert_denied(a.curl(url(upstreams, "/needs-redis")), "internal_error")
        own_redis.start()
        wait_for(lambda: len(a.find("store.reconnected")) >= 3, timeout=30)  # supervisor and both workers
        replies = [pool.submit(held_get, a, upstreams, f"/later{i}") for i in range(4)]
        [hook] = hooks.wait(1)
        time.sleep(1.0)  # every request reaches its worker and joins (bounded; the oracle is the counts)
        assert decide(a, hook["body"]["id"], "allow").status_code == 200
        assert [f.result(HELD_S) for f in replies] == [200] * 4
        assert len(a.find("worker.exited")) == 1
