"""addons/approvals/notify.py: the approval.* events and metric, the webhook payload, what is sent when
(and not re-sent), and the endpoints' secrets, with a real service and a real loopback receiver."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from addons.approvals.errors import ApprovalError
from addons.approvals.model import Approval, Choice, Scope
from addons.approvals.notify import Notifier, endpoints, event_fields, payload
from addons.approvals.webhook import parse_secret
from addons.config.models import WebhookConfig
from addons.policy.model import Reason
from addons.telemetry.events import Telemetry
from addons.telemetry.validate import validate_event
from tests.approvals.approvals_support import SECRET, SECRET_ENV, alive, request, wait_until

WEBHOOK_SCHEMA = json.loads((Path(__file__).parents[2] / "addons/approvals/webhook.schema.json").read_text())


AID = "apr_" + "0123456789abcdef" * 2


def approval(**kw) -> Approval:
    a = Approval.opened(AID, request(client_name="ci", method="GET", path="/p", rule="ask", **kw),
                        now=1700000000.0, timeout=120.0)
    return a


def test_endpoints_read_their_secrets_from_the_environment(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    [ep] = endpoints([WebhookConfig(url="https://hooks.example/x", secret_env=SECRET_ENV)])
    assert (ep.url, ep.key) == ("https://hooks.example/x", parse_secret(SECRET))
    assert endpoints([]) == []


async def test_service_refuses_to_start_with_a_bad_or_missing_secret(make_service, receiver, monkeypatch):
    monkeypatch.setenv("PORTCULLIS_TEST_WEBHOOK_SECRET", "not-a-secret")
    with pytest.raises(ApprovalError, match="PORTCULLIS_TEST_WEBHOOK_SECRET"):
        await make_service(webhooks=[receiver.url])
    monkeypatch.delenv("PORTCULLIS_TEST_WEBHOOK_SECRET")
    with pytest.raises(ApprovalError, match="is not set"):
        await make_service(webhooks=[receiver.url])


def test_payload_and_event_fields_carry_the_approval_and_no_more():
    a = approval()
    body = payload(a, "http://127.0.0.1:9090")
    Draft202012Validator(WEBHOOK_SCHEMA).validate(body)
    assert body == {"type": "approval.requested", "id": AID, "client": "ci", "task_id": None, "labels": {},
                    "task_expires_at": None, "host": "unknown.example",
                    "port": 443, "scheme": "https", "method": "GET", "path": "/p", "rule": "ask",
                    "credential": None,
                    "created_at": "2023-11-14T22:13:20Z", "expires_at": "2023-11-14T22:15:20Z",
                    "decide_url": f"http://127.0.0.1:9090/approvals/{AID}"}
    assert event_fields(a)["client.address"] == "10.0.0.5" and event_fields(a)["destination.port"] == 443
    task = dataclasses.replace(a, client_key="task:build-42")
    assert payload(task, "http://x")["task_id"] == "build-42"
    assert event_fields(task)["client.task_id"] == "build-42"
    Draft202012Validator(WEBHOOK_SCHEMA).validate(payload(task, "http://x"))
    unnamed = Approval.opened("apr_n2", request(), now=0.0, timeout=1.0)
    assert payload(unnamed, "http://x")["client"] == "10.0.0.5"  # no group: the address


def test_the_events_match_the_shipped_schemas_and_are_counted():
    stream = io.StringIO()
    tel = Telemetry(stream=stream)
    n = Notifier(tel, clock=lambda: 1700000030.5, admin_url="http://127.0.0.1:9191/")
    a = approval()
    n.requested(a, "flow-1")  # not started: the event, and no webhook
    n.decided(a.decided(Choice.ALLOW, Scope.SESSION, "ann", "fine", 1700000030.0), Reason.APPROVED)
    n.decided(a.expired(1700000120.0), Reason.APPROVAL_TIMEOUT)
    req, allowed, expired = (json.loads(line) for line in stream.getvalue().splitlines())
    for e in (req, allowed, expired):
        validate_event(e)
    assert (req["event"], req["flow_id"], req["decide_url"]) == (
        "approval.requested", "flow-1", f"http://127.0.0.1:9191/approvals/{AID}")
    assert req["destination"] == {"host": "unknown.example", "port": 443}
    assert (allowed["decision"], allowed["scope"], allowed["by"], allowed["reason"], allowed["outcome"],
            allowed["wait_s"]) == ("allow", "session", "ann", "fine", "approved", 30.5)
    assert (expired["decision"], expired["scope"], expired["by"], expired["outcome"]) == (
        "deny", None, None, "approval_timeout")
    m = tel.metrics.registry.get_sample_value
    assert m("portcullis_approval_requests_total", {"outcome": "approved"}) == 1.0
    assert m("portcullis_approval_requests_total", {"outcome": "approval_timeout"}) == 1.0


async def test_payload_for_a_tunnel_matches_the_shipped_schema(make_service):
    svc = await make_service(hold=False)
    out = await svc.resolve(request(method="CONNECT", path=None, scheme=None, client_name="ci"), alive)
    body = svc.notifier.payload(await svc.store.get(out.approval_id))
    Draft202012Validator(WEBHOOK_SCHEMA).validate(body)
    assert (body["client"], body["method"], body["path"]) == ("ci", "CONNECT", None)


async def test_a_joined_approval_sends_no_second_webhook(make_service, receiver, events):
    svc = await make_service(hold=False, webhooks=[receiver.url])
    first = await svc.resolve(request(flow_id="a"), alive)
    async def cond() -> bool:
        return bool((await svc.store.get(first.approval_id)).notified)
    await wait_until(cond)
    again = await svc.resolve(request(flow_id="b"), alive)
    assert again.approval_id == first.approval_id
    assert not svc.notifier.sender._tasks  # nothing is being sent
    assert len(receiver.deliveries()) == 1 and len(events.of("approval.requested")) == 1


async def test_retries_stop_once_the_approval_is_decided(make_service, receiver):
    receiver.replies = [500] * 1000
    svc = await make_service(hold=False, timeout=30, webhooks=[receiver.url])
    svc.notifier.sender.backoff_base = 0.2
    pend = await svc.resolve(request(), alive)
    await wait_until(lambda: len(receiver.deliveries()) >= 1)
    await svc.decide(pend.approval_id, Choice.DENY, Scope.ONCE, None, None)
    # Without the check, delivery would go on retrying until the expiry, 30 s away.
    await asyncio.wait_for(asyncio.gather(*svc.notifier.sender._tasks), 5)
    n = len(receiver.deliveries())
    assert n < 10


async def test_a_webhook_cut_short_by_shutdown_is_sent_again_after_restart(make_service, receiver):
    """Same webhook-id (receivers dedupe); an approval whose webhook got through is not re-sent."""
    receiver.replies = [500] * 1000
    svc1 = await make_service(hold=False, timeout=60, webhooks=[receiver.url])
    svc1.notifier.sender.backoff_base = 5.0
    cut = await svc1.resolve(request(host="cut.example"), alive)
    await wait_until(lambda: len(receiver.deliveries()) >= 1)
    await svc1.stop()
    first_id = receiver.deliveries()[0]["headers"]["webhook-id"]
    receiver.replies = []
    svc2 = await make_service(hold=False, timeout=60, webhooks=[receiver.url])
    assert not svc2.notifier.sender._tasks  # waits for the decide_url (or the grace period)
    svc2.admin_url = "http://127.0.0.1:19090"  # as the launcher does once the admin port is bound
    async def cond() -> bool:
        return bool((await svc2.store.get(cut.approval_id)).notified)
    await wait_until(cond)
    resent = receiver.deliveries()[-1]
    assert resent["verified"] and resent["headers"]["webhook-id"] == first_id
    assert resent["body"]["decide_url"] == f"http://127.0.0.1:19090/approvals/{cut.approval_id}"
    n = len(receiver.deliveries())
    await svc2.stop()
    svc3 = await make_service(hold=False, timeout=60, webhooks=[receiver.url])
    svc3.admin_url = "http://127.0.0.1:19091"
    assert not svc3.notifier.sender._tasks  # a re-send would have started its delivery task right here
    await asyncio.sleep(0.1)
    assert len(receiver.deliveries()) == n


async def test_without_an_admin_url_the_resend_waits_for_the_grace_period(make_service, receiver,
                                                                         monkeypatch):
    from addons.approvals import notify

    monkeypatch.setattr(notify, "RESEND_GRACE_S", 0.05)
    receiver.replies = [500] * 1000
    svc1 = await make_service(hold=False, timeout=60, webhooks=[receiver.url])
    svc1.notifier.sender.backoff_base = 5.0
    cut = await svc1.resolve(request(), alive)
    await wait_until(lambda: len(receiver.deliveries()) >= 1)
    await svc1.stop()
    receiver.replies = []
    svc2 = await make_service(hold=False, timeout=60, webhooks=[receiver.url])
    async def cond() -> bool:
        return bool((await svc2.store.get(cut.approval_id)).notified)
    await wait_until(cond)
    assert receiver.deliveries()[-1]["body"]["decide_url"].startswith("http://127.0.0.1:9090/")


def test_a_credentials_first_use_is_named_in_the_webhook_and_the_events():
    asked = request(client_name="ci", method="GET", path="/p", rule="ask")
    pending = dataclasses.replace(asked, credential="gh")
    a = Approval.opened(AID, pending, now=1700000000.0, timeout=120.0)
    body = payload(a, "http://127.0.0.1:9090")
    Draft202012Validator(WEBHOOK_SCHEMA).validate(body)
    assert body["credential"] == "gh" and body["host"] == "unknown.example" and body["task_id"] is None
    assert event_fields(a)["credential"] == "gh"
    assert a.client_key == "10.0.0.5|credential:gh" and a.credential == "gh"
