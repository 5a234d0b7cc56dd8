"""Fault: 1,000 requests held for approval at once (1,000 distinct client/host/port keys, so no
coalescing) while allowed traffic goes on.

Documented behaviour (README, Approvals > Holding and coalescing): a held request costs a waiting
coroutine and a connection, nothing more; the event loop stays free, so allowed requests keep being
served during the hold. Each held request ends in exactly one decision (here: denied by a person
through the admin API, or expired), each approval in one `approval.requested` and one
`approval.decided`, and nothing held reaches an upstream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

from tests.approvals.approvals_support import TOKEN
from tests.approvals.e2e_support import ENV
from tests.faults.faults_b_support import admin_post, assert_each_decision_once, get, metric, raise_nofile
from tests.harness import (
    PortcullisProc,
    base_config,
    upstreams,  # noqa: F401  (session fixture; the folder has no conftest.py)
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

N = 1000
DENY = 100  # decided by a person; the rest expire
FIRST_PORT = 20000  # approve.test:20000..20099 — nothing listens there, nothing connects
# The approval key is (client, host, port) and a client may have 100 approvals open (the ledger's
# max_pending_per_client): ten clients, from ten loopback source addresses, a hundred ports each.
CLIENTS = [f"127.0.1.{i}" for i in range(1, 11)]
PER_CLIENT = N // len(CLIENTS)
ALLOWED_DURING_HOLD = 40
BOUND = 120.0  # every wait below is bounded by this many seconds


async def _held(source: str, port: int, proxy_port: int) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, local_addr=(source, 0))
    try:
        auth = f"approve.test:{port}"
        writer.write(f"GET http://{auth}/held HTTP/1.1\r\nHost: {auth}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), BOUND)
    finally:
        writer.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/") else 0
    reason = next((ln.split(":", 1)[1].strip() for ln in head.split("\r\n")
                   if ln.lower().startswith("x-portcullis-reason:")), "")
    return status, reason


def test_a_thousand_held_approvals_while_allowed_traffic_goes_on(tmp_path, upstreams):  # noqa: F811
    assert raise_nofile(4 * N) >= 2 * N + 100, "RLIMIT_NOFILE too low for 1,000 held connections"
    cfg = base_config(upstreams, tmp_path, default_action="deny",
                      approvals={"timeout": "30s", "hold": True})
    rules = [{"name": "public", "action": "allow", "hosts": ["public.test"]},
             {"name": "ask", "action": "approval", "hosts": ["approve.test"]}]
    with PortcullisProc(tmp_path, upstreams, rules=rules, config=cfg, env=ENV) as p:

        async def run() -> tuple[list[tuple[int, str]], list[int]]:
            held = [asyncio.create_task(_held(c, FIRST_PORT + i, p.port))
                    for c in CLIENTS for i in range(PER_CLIENT)]
            deadline = time.monotonic() + BOUND
            # Every request is held now. (The SQLite store commits on the event loop, fsync included, so
            # while a thousand approvals open the admin API answers late, not never.)
            while await asyncio.to_thread(metric, p, "portcullis_approvals_pending", BOUND) < N:
                assert time.monotonic() < deadline, metric(p, "portcullis_approvals_pending", BOUND)
                assert not any(t.done() for t in held), [t.result() for t in held if t.done()][:3]
                await asyncio.sleep(0.2)
            # Allowed traffic completes while all 1,000 are held.
            port = upstreams.http_port
            served = [(await asyncio.to_thread(get, p, "public.test", port, f"/during-{i}")).status
                      for i in range(ALLOWED_DURING_HOLD)]
            assert not any(t.done() for t in held)
            ids = [e["approval_id"] for e in p.find("approval.requested")]
            assert len(ids) == N
            for aid in ids[:DENY]:
                code = await asyncio.to_thread(
                    admin_post, p, f"/approvals/{aid}",
                    {"decision": "deny", "scope": "once", "by": "faults", "reason": "load"}, TOKEN)
                assert code == 200
            return list(await asyncio.wait_for(asyncio.gather(*held), BOUND)), served

        answers, served = asyncio.run(run())
        assert served == [200] * ALLOWED_DURING_HOLD
        p.wait_event("approval.decided", count=N, timeout=BOUND)
        p.wait_event("egress.decision", count=N + ALLOWED_DURING_HOLD, timeout=BOUND)
        assert metric(p, "portcullis_approvals_pending") == 0
    assert Counter(answers) == {(403, "approval_denied"): DENY, (403, "approval_timeout"): N - DENY}
    held = [e for e in p.decisions() if e["destination"]["host"] == "approve.test"]
    assert len(held) == N  # one each, per client and port:
    assert len({(e["client"]["address"], e["destination"]["port"]) for e in held}) == N
    assert Counter(e["reason"] for e in held) == {"approval_denied": DENY, "approval_timeout": N - DENY}
    assert all(e["decision"] == "deny" and e["approval_id"] for e in held)
    decided = p.find("approval.decided")
    assert len(decided) == N and len({e["approval_id"] for e in decided}) == N
    assert len(p.find("approval.requested")) == N
    assert len([e for e in p.decisions() if e["destination"]["host"] == "public.test"]) == ALLOWED_DURING_HOLD
    assert_each_decision_once(p)
    assert not upstreams.seen(lambda r: r["path"] == "/held")
    assert all(json.loads(line) for line in p.raw_lines)
