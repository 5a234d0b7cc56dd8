"""Webhook receiver faults through a real proxy: refused, slower than its timeout, answering bytes that
are not HTTP, a 500, and a 500 whose body never ends. In every case the approval stays pending and
decidable through the admin API, the held request is released (or refused) by that decision, the
failure is logged at once (`webhook.failed`, `final: false`) and counted, retries go on, nothing
reaches the upstream before the decision, and the proxy keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.faults_support import (
    Background,
    BadReceiver,
    approval_proxy,
    audit,
    decide,
    metric,
    pending_ids,
    send,
    still_answers,
    upstream_paths,
    wait_for,
)
from tests.harness import assert_denied

MODES = {  # mode -> what the first webhook.failed says
    "refuse": "ConnectError",
    "slow": "no answer within 1 s",
    "garbage": "RemoteProtocolError",
    "status500": "HTTP 500",
    "endless": "HTTP 500",
}


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[BadReceiver]:
    r = BadReceiver(request.param, slow_s=4.0)
    yield r
    r.close()


CASES = [*((m, "allow") for m in MODES), ("refuse", "deny"), ("garbage", "deny")]


@pytest.mark.parametrize(("receiver", "decision"), CASES, indirect=["receiver"])
def test_a_failing_webhook_receiver_leaves_the_approval_pending_and_decidable(tmp_path, upstreams, receiver,
                                                                             decision):
    with approval_proxy(tmp_path, upstreams, receiver.url) as p:
        held = Background(lambda: send(p, upstreams, "approve.test", "/held"))
        requested = p.wait_event("approval.requested")
        approval_id = requested["approval_id"]
        failed = p.wait_event("webhook.failed", timeout=15)  # the first failure, at once
        assert (failed["approval_id"], failed["attempt"], failed["final"], failed["result"]) == (
            approval_id, 1, False, "retry")
        assert MODES[receiver.mode] in failed["error"], failed
        assert failed["url"] == receiver.url
        if receiver.mode != "refuse":
            assert receiver.wait(1)[0]["verified"]  # what did arrive was signed
            # Retries go on (an endless body or a slow answer does not stall delivery): a 2nd attempt.
            assert receiver.wait(2, timeout=20)[1]["id"] == f"msg_{approval_id}_0"
        wait_for(lambda: metric(p, "portcullis_webhook_deliveries_total", result="retry") >= 1)
        assert len(p.find("webhook.failed", final=False)) == 1  # once per delivery, not per retry

        assert not held.done() and upstream_paths(upstreams) == []  # held: nothing went upstream
        still_answers(p, upstreams, "/while-held")  # the proxy serves other traffic meanwhile
        assert pending_ids(p) == [approval_id]
        assert decide(p, approval_id, decision).status_code == 200
        reply = held.result()
        if decision == "allow":
            assert reply.status == 200
            assert upstream_paths(upstreams) == ["/held", "/while-held"]
            assert p.wait_event("egress.decision", reason="approved")["approval_id"] == approval_id
        else:
            assert_denied(reply, "approval_denied")
            assert upstream_paths(upstreams) == ["/while-held"]
        assert pending_ids(p) == []
        n = len(receiver.attempts)
        still_answers(p, upstreams, "/after")
        assert p.find("webhook.failed", final=True) == []  # decided before expiry: no final failure
    assert p.exit_code == 0
    assert len(receiver.attempts) <= n + 1  # retries stopped with the decision (one may be in flight)
    audit(p, sent=3)


def test_a_webhook_that_never_succeeds_is_reported_final_at_expiry_and_the_request_times_out(
        tmp_path, upstreams):
    r = BadReceiver("status500")
    try:
        with approval_proxy(tmp_path, upstreams, r.url, timeout="3s") as p:
            reply = send(p, upstreams, "approve.test", "/never")
            assert_denied(reply, "approval_timeout")
            final = p.wait_event("webhook.failed", final=True, timeout=10)
            assert final["result"] == "expired" and final["status"] == 500
            assert len(p.find("webhook.failed")) == 2  # the first failure, then the last
            assert upstream_paths(upstreams) == []
            assert metric(p, "portcullis_webhook_deliveries_total", result="failed") == 1
            still_answers(p, upstreams)
        audit(p, sent=2)
    finally:
        r.close()
