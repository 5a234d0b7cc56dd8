"""Approvals end-to-end through the real proxy (`portcullis run` subprocess), with a real webhook receiver
that verifies every signature, and decisions taken through the real admin API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from addons.telemetry.validate import validate_event
from tests.approvals.approvals_support import SECRET_ENV, TOKEN
from tests.approvals.e2e_support import ENV, HookReceiver, decide, pending, wait_for
from tests.harness import PortcullisProc, assert_denied, base_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def hooks() -> Iterator[HookReceiver]:
    h = HookReceiver()
    yield h
    h.close()


def proxy(tmp_path, upstreams, hooks, **approvals: Any) -> PortcullisProc:
    cfg = base_config(upstreams, tmp_path, default_action="approval",
                      approvals={"timeout": "20s", **approvals,
                                 "webhooks": [{"url": hooks.url, "secret_env": SECRET_ENV}]})
    return PortcullisProc(tmp_path, upstreams, rules=[], config=cfg, env=ENV)


def test_held_request_is_approved_through_the_webhooks_decide_url(tmp_path, upstreams, hooks):
    url = f"http://approve.test:{upstreams.http_port}/ok?q=secret"
    with proxy(tmp_path, upstreams, hooks) as p, ThreadPoolExecutor(1) as pool:
        held = pool.submit(p.curl, url)
        [hook] = hooks.wait(1)
        assert hook["verified"]
        body = hook["body"]
        assert (body["host"], body["port"], body["path"], body["method"]) == (
            "approve.test", upstreams.http_port, "/ok", "GET")
        assert "secret" not in json.dumps(body)  # no query strings in the webhook
        assert body["decide_url"] == f"{p.admin_url}/approvals/{body['id']}"
        assert not held.done()
        r = decide(p, body["id"], "allow", url=body["decide_url"])
        assert r.status_code == 200
        res = held.result(15)
        assert res.status == 200 and res.json()["path"] == "/ok?q=secret"
        ev = p.wait_event("egress.decision", approval_id=body["id"])
        assert (ev["decision"], ev["reason"]) == ("allow", "approved")
        assert len(p.find("approval.requested")) == 1
        assert p.wait_event("approval.decided")["by"] == "admin"  # the token's owner, not the body's "by"
        late = decide(p, body["id"], "deny")
        assert late.status_code == 409 and late.json()["approval"]["decision"] == "allow"
    for e in p.events:  # every event the run produced matches the shipped schemas
        validate_event(e)


def test_held_request_is_denied(tmp_path, upstreams, hooks):
    with proxy(tmp_path, upstreams, hooks) as p, ThreadPoolExecutor(1) as pool:
        held = pool.submit(p.curl, f"http://approve.test:{upstreams.http_port}/")
        [hook] = hooks.wait(1)
        assert hook["verified"]
        assert decide(p, hook["body"]["id"], "deny").status_code == 200
        body = assert_denied(held.result(15), "approval_denied")
        assert body["approval_id"] == hook["body"]["id"]


def test_held_request_times_out(tmp_path, upstreams, hooks):
    with proxy(tmp_path, upstreams, hooks, timeout="1s") as p:
        r = p.curl(f"http://approve.test:{upstreams.http_port}/")
        body = assert_denied(r, "approval_timeout")
        [hook] = hooks.wait(1)
        assert hook["verified"] and hook["body"]["id"] == body["approval_id"]
        assert decide(p, body["approval_id"], "allow").status_code == 410


def test_hold_false_answers_pending_and_the_approved_retry_passes(tmp_path, upstreams, hooks):
    url = f"http://approve.test:{upstreams.http_port}/retry"
    with proxy(tmp_path, upstreams, hooks, hold=False) as p:
        first = p.curl(url)
        body = assert_denied(first, "approval_pending")
        assert int(first.headers["retry-after"]) >= 1 and body["approval_id"]
        assert decide(p, body["approval_id"], "allow").status_code == 200
        assert p.curl(url).status == 200
        assert_denied(p.curl(url), "approval_pending")  # `once` was used by that retry


def test_client_hang_up_frees_the_waiter(tmp_path, upstreams, hooks):
    with proxy(tmp_path, upstreams, hooks, timeout="60s") as p:
        r = p.curl(f"http://approve.test:{upstreams.http_port}/", timeout=1)
        assert r.exit_code == 28  # curl gave up after 1 s
        wait_for(lambda: pending(p) and pending(p)[0]["waiters"] == 0, timeout=10)
        ev = p.wait_event("egress.decision", reason="client_closed")
        assert ev["decision"] == "deny"


def test_restart_keeps_the_pending_approval_then_the_retry_passes(tmp_path, upstreams, hooks):
    url = f"http://approve.test:{upstreams.http_port}/after-restart"
    p = proxy(tmp_path, upstreams, hooks, hold=False)
    with p:
        approval_id = assert_denied(p.curl(url), "approval_pending")["approval_id"]
    p2 = proxy(tmp_path, upstreams, hooks, hold=False)
    with p2:
        assert [a["id"] for a in pending(p2)] == [approval_id]
        assert decide(p2, approval_id, "allow").status_code == 200
        r = p2.curl(url)
        assert r.status == 200
        ev = p2.wait_event("egress.decision", reason="approved")
        assert ev["approval_id"] == approval_id


def test_always_is_written_reloaded_and_survives_a_restart(tmp_path, upstreams, hooks):
    url = f"http://approve.test:{upstreams.http_port}/always"
    with proxy(tmp_path, upstreams, hooks) as p, ThreadPoolExecutor(1) as pool:
        held = pool.submit(p.curl, url)
        [hook] = hooks.wait(1)
        assert decide(p, hook["body"]["id"], "allow", scope="always").status_code == 200
        assert held.result(15).status == 200
        text = (tmp_path / "rules/approved.yaml").read_text()
        assert "# approved by admin at" in text and "approve.test" in text
        p.wait_event("rules.reloaded")
    with proxy(tmp_path, upstreams, hooks) as p2:
        r = p2.curl(url)
        assert r.status == 200
        ev = p2.wait_event("egress.decision", **{"destination.host": "approve.test"})
        assert ev["reason"] == "rule" and ev["rule"].startswith("approved-approve.test-")
        assert p2.find("approval.requested") == []


def test_200_concurrent_requests_one_webhook_one_approval(tmp_path, upstreams, hooks):
    n = 200
    with proxy(tmp_path, upstreams, hooks) as p:
        async def one(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            writer.write(f"GET http://approve.test:{upstreams.http_port}/c{i} HTTP/1.1\r\n"
                         f"Host: approve.test:{upstreams.http_port}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            return data

        async def run() -> list[bytes]:
            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            await asyncio.to_thread(wait_for, lambda: bool(pending(p)) and pending(p)[0]["waiters"] == n, 20)
            [hook] = await asyncio.to_thread(hooks.wait, 1)
            r = await asyncio.to_thread(decide, p, hook["body"]["id"], "allow")
            assert r.status_code == 200
            return await asyncio.gather(*tasks)

        replies = asyncio.run(run())
        bad = [r[:60] for r in replies if not r.startswith(b"HTTP/1.1 200")]
        assert bad == []
        assert len(hooks.got) == 1 and len(p.find("approval.requested")) == 1
        assert len(p.find("egress.decision", reason="approved")) == n


def test_the_admin_api_is_not_reachable_through_the_proxy_port(tmp_path, upstreams, hooks):
    """Even with 127.0.0.1 allowed by allow_cidrs and a rule, an agent cannot approve itself via the proxy."""
    cfg = base_config(upstreams, tmp_path, default_action="approval",
                      approvals={"timeout": "20s", "hold": False,
                                 "webhooks": [{"url": hooks.url, "secret_env": SECRET_ENV}]})
    cfg["network"]["allow_cidrs"] = [*cfg["network"]["allow_cidrs"], "127.0.0.1/32"]
    rules = [{"name": "loopback", "action": "allow", "hosts": ["127.0.0.1"]}]
    with PortcullisProc(tmp_path, upstreams, rules=rules, config=cfg, env=ENV) as p:
        approval_id = assert_denied(p.curl(f"http://approve.test:{upstreams.http_port}/"),
                                    "approval_pending")["approval_id"]
        r = p.curl(f"{p.admin_url}/approvals/{approval_id}", "-X", "POST",
                   "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
                   "-d", '{"decision": "allow"}')
        assert_denied(r, "private_address")
        assert [a["id"] for a in pending(p)] == [approval_id]


def test_cli_allow_releases_a_request_held_by_the_real_proxy(tmp_path, upstreams, hooks):
    import subprocess
    import sys

    with proxy(tmp_path, upstreams, hooks) as p, ThreadPoolExecutor(1) as pool:
        held = pool.submit(p.curl, f"http://approve.test:{upstreams.http_port}/cli")
        [hook] = hooks.wait(1)
        env = {**ENV, "PORTCULLIS_TEST_ADMIN_TOKEN": TOKEN}
        cli = [sys.executable, "-m", "addons.cli", "approvals", "--config", str(p.config_path),
               "--admin", p.admin_url]
        opts = {"capture_output": True, "text": True, "env": env, "timeout": 60, "check": False}
        listed = subprocess.run([*cli, "list"], **opts)
        assert listed.returncode == 0 and hook["body"]["id"] in listed.stdout, listed.stderr
        done = subprocess.run([*cli, "allow", hook["body"]["id"], "--by", "cli"], **opts)
        assert done.returncode == 0, done.stderr
        assert held.result(15).status == 200


def test_a_held_https_connect_is_approved_and_the_tunnel_works(tmp_path, upstreams, hooks):
    """CONNECT is decided on its authority: the webhook says method CONNECT and no path; a session grant
    lets the next tunnel through at once."""
    url = f"https://api.public.test:{upstreams.tls_port}/tls"
    with proxy(tmp_path, upstreams, hooks) as p, ThreadPoolExecutor(1) as pool:
        held = pool.submit(p.curl, url)
        [hook] = hooks.wait(1)
        assert (hook["body"]["host"], hook["body"]["method"], hook["body"]["path"]) == (
            "api.public.test", "CONNECT", None)
        assert decide(p, hook["body"]["id"], "allow", scope="session").status_code == 200
        r = held.result(15)
        assert r.status == 200 and r.json()["path"] == "/tls", r
        again = p.curl(url)
        assert again.status == 200 and len(hooks.got) == 1


def test_two_proxies_sharing_redis_one_holds_the_other_decides(tmp_path, upstreams, hooks, redis_server):
    """Replicas behind one Redis: a request held by proxy A is released by a decision taken on proxy B."""
    import redis

    with redis.Redis.from_url(redis_server) as r:
        r.flushall()

    def replica(name: str) -> PortcullisProc:
        folder = tmp_path / name
        folder.mkdir()
        cfg = base_config(upstreams, folder, default_action="approval",
                          approvals={"timeout": "30s", "store": redis_server,
                                     "webhooks": [{"url": hooks.url, "secret_env": SECRET_ENV}]})
        return PortcullisProc(folder, upstreams, rules=[], config=cfg, env=ENV)

    url = f"http://approve.test:{upstreams.http_port}/replicas"
    with replica("a") as a, replica("b") as b, ThreadPoolExecutor(2) as pool:
        on_a = pool.submit(a.curl, url)
        [hook] = hooks.wait(1)
        on_b = pool.submit(b.curl, url)  # joins the same approval: no second webhook
        wait_for(lambda: bool(pending(b)) and pending(b)[0]["waiters"] == 1)
        assert [x["id"] for x in pending(b)] == [hook["body"]["id"]]
        assert decide(b, hook["body"]["id"], "allow").status_code == 200
        assert on_a.result(15).status == 200 and on_b.result(15).status == 200
        assert len(hooks.got) == 1
        assert a.wait_event("egress.decision", reason="approved")["approval_id"] == hook["body"]["id"]
