"""addons/approvals/service.py in-process: holding, coalescing, decisions, scopes, timeouts, hang-ups,
restarts, on a real SQLite file with real timers (the state machine alone: test_ledger.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from ruamel.yaml import YAML

from addons.approvals.model import Choice, DecideError, Scope, State
from addons.config.models import RuleFile
from addons.pipeline.decide import Settlement
from addons.policy.model import Reason
from addons.telemetry.validate import validate_event
from tests.approvals.approvals_support import alive, request, wait_until

ALLOW, DENY = Choice.ALLOW, Choice.DENY
ONCE, SESSION, ALWAYS = Scope.ONCE, Scope.SESSION, Scope.ALWAYS

WEBHOOK_SCHEMA = json.loads((Path(__file__).parents[2] / "addons/approvals/webhook.schema.json").read_text())

# The contract's keys, plus task_id (the agent task that asked: null without a task credential), its
# labels and expiry, and credential (the credential whose first use is asked about: null for a destination).
SPEC_PAYLOAD_KEYS = {"type", "id", "client", "task_id", "labels", "task_expires_at",
                     "host", "port", "scheme", "method", "path", "rule",
                     "credential", "created_at", "expires_at", "decide_url"}


def gauge(svc, name="portcullis_approvals_pending", **labels):
    return svc.telemetry.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def test_200_concurrent_requests_share_one_approval_and_one_webhook(make_service, receiver, events):
    """200 held requests for one client/host/port: one pending approval, one webhook, one event each."""
    svc = await make_service(timeout=10, webhooks=[receiver.url])
    tasks = [asyncio.create_task(svc.resolve(request(flow_id=f"f{i}"), alive)) for i in range(200)]
    async def cond() -> bool:
        pending = await svc.store.pending()
        return len(pending) == 1 and svc.waiters(pending[0]) == 200
    await wait_until(cond)
    approval = (await svc.store.pending())[0]
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    await wait_until(lambda: gauge(svc) == 1.0)  # recounted in the background
    await svc.decide(approval.id, ALLOW, ONCE, "alice", "build needs it")
    outcomes = await asyncio.gather(*tasks)
    assert all(isinstance(o, Settlement) for o in outcomes)
    assert {(o.allowed, o.reason, o.approval_id, o.retry_after) for o in outcomes} == {
        (True, Reason.APPROVED, approval.id, None)}
    assert all(o.waited_s > 0 for o in outcomes)
    stored = await svc.store.get(approval.id)
    assert (stored.state, stored.scope, stored.decided_by) == (State.ALLOWED, ONCE, "alice")
    assert len(receiver.deliveries()) == 1
    hook = receiver.deliveries()[0]
    assert hook["verified"]
    assert set(hook["body"]) == SPEC_PAYLOAD_KEYS
    Draft202012Validator(WEBHOOK_SCHEMA).validate(hook["body"])  # the schema we ship for receivers
    assert hook["body"]["id"] == approval.id and hook["body"]["host"] == "unknown.example"
    assert hook["body"]["decide_url"].endswith(f"/approvals/{approval.id}")
    assert len(events.of("approval.requested")) == 1
    decided = events.of("approval.decided")
    assert len(decided) == 1
    assert decided[0]["decision"] == "allow" and decided[0]["scope"] == "once" and decided[0]["by"] == "alice"
    assert decided[0]["destination"]["host"] == "unknown.example"
    for e in events.all():
        validate_event(e)
    await wait_until(lambda: gauge(svc) == 0.0)  # recounted in the background
    assert gauge(svc, "portcullis_approval_wait_seconds_count", outcome="approved") == 200


async def test_different_ports_and_clients_get_separate_approvals(make_service):
    svc = await make_service(hold=False)
    a = await svc.resolve(request(port=443), alive)
    b = await svc.resolve(request(port=8443), alive)
    c = await svc.resolve(request(client="10.0.0.6"), alive)
    d = await svc.resolve(request(port=443), alive)
    assert len({a.approval_id, b.approval_id, c.approval_id}) == 3
    assert d.approval_id == a.approval_id


async def test_deny_once_releases_waiters_and_the_next_request_asks_again(make_service):
    svc = await make_service(timeout=10)
    task = asyncio.create_task(svc.resolve(request(), alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    first = (await svc.store.pending())[0]
    await svc.decide(first.id, DENY, ONCE, "bob", None)
    out = await task
    assert (out.allowed, out.reason, out.approval_id) == (False, Reason.APPROVAL_DENIED, first.id)
    again = asyncio.create_task(svc.resolve(request(), alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    assert (await svc.store.pending())[0].id != first.id
    again.cancel()


async def test_timeout_denies_and_a_late_decision_gets_410(make_service, events):
    svc = await make_service(timeout=0.3)
    out = await svc.resolve(request(), alive)
    assert (out.allowed, out.reason) == (False, Reason.APPROVAL_TIMEOUT)
    assert (await svc.store.get(out.approval_id)).state is State.EXPIRED
    with pytest.raises(DecideError) as e:
        await svc.decide(out.approval_id, ALLOW, ONCE, "late", None)
    assert e.value.status == 410
    decided = events.of("approval.decided")
    assert len(decided) == 1 and decided[0]["outcome"] == "approval_timeout"
    assert (decided[0]["decision"], decided[0]["scope"], decided[0]["by"]) == ("deny", None, None)
    validate_event(decided[0])
    await wait_until(lambda: gauge(svc) == 0.0)  # recounted in the background
    assert gauge(svc, "portcullis_approval_requests_total", outcome="approval_timeout") == 1.0


async def test_expiry_without_waiters_is_swept(make_service, events):
    """hold: false leaves nobody waiting; the approval still expires on time and is logged once."""
    svc = await make_service(timeout=0.2, hold=False)
    out = await svc.resolve(request(), alive)
    async def cond() -> bool:
        return bool((await svc.store.get(out.approval_id)).state is State.EXPIRED)
    await wait_until(cond)
    assert len(events.of("approval.decided")) == 1


async def test_hold_false_answers_pending_then_an_approved_retry_passes_once(make_service):
    svc = await make_service(hold=False, timeout=60)
    first = await svc.resolve(request(), alive)
    assert (first.allowed, first.reason) == (False, Reason.APPROVAL_PENDING)
    assert first.retry_after == 10  # time left (60 s) clamped to 10 s
    again = await svc.resolve(request(), alive)
    assert again.approval_id == first.approval_id and again.reason == Reason.APPROVAL_PENDING
    await svc.decide(first.approval_id, ALLOW, ONCE, "carol", None)
    retry = await svc.resolve(request(), alive)
    assert (retry.allowed, retry.reason, retry.approval_id) == (True, Reason.APPROVED, first.approval_id)
    assert (await svc.store.get(retry.approval_id)).decided_by == "carol"
    after = await svc.resolve(request(), alive)  # `once` is used up
    assert after.reason == Reason.APPROVAL_PENDING and after.approval_id != first.approval_id


async def test_session_grant_covers_that_client_host_port_until_it_expires(make_service):
    svc = await make_service(hold=False, session_ttl=0.4)
    pend = await svc.resolve(request(), alive)
    await svc.decide(pend.approval_id, ALLOW, SESSION, "dan", "ok for now")
    for _ in range(3):
        out = await svc.resolve(request(), alive)
        assert (out.allowed, out.reason, out.approval_id) == (True, Reason.APPROVED, pend.approval_id)
    [grant] = await svc.store.grants(time.time())
    assert (grant.scope, grant.decision, grant.single_use) == (SESSION, ALLOW, False)
    assert (await svc.resolve(request(client="10.0.0.9"), alive)).reason == Reason.APPROVAL_PENDING
    assert (await svc.resolve(request(port=80), alive)).reason == Reason.APPROVAL_PENDING
    await asyncio.sleep(0.45)
    expired = await svc.resolve(request(), alive)
    assert expired.reason == Reason.APPROVAL_PENDING
    await svc.ledger.sweep()
    assert await svc.store.grants(0) == []  # the swept grant is gone from the file, not just ignored


async def test_deny_for_session_refuses_at_once(make_service):
    svc = await make_service(timeout=10)
    task = asyncio.create_task(svc.resolve(request(), alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    first = (await svc.store.pending())[0]
    await svc.decide(first.id, DENY, SESSION, "eve", None)
    assert (await task).reason == Reason.APPROVAL_DENIED
    out = await svc.resolve(request(), alive)
    assert (out.allowed, out.reason, out.approval_id) == (False, Reason.APPROVAL_DENIED, first.id)
    assert [g.scope for g in await svc.store.grants(time.time())] == [SESSION]
    assert await svc.store.pending() == []


async def test_client_hang_up_frees_the_waiter(make_service):
    """A client that goes away stops waiting within a poll or two, long before the timeout."""
    svc = await make_service(timeout=30, poll=0.05)
    state = {"alive": True}
    task = asyncio.create_task(svc.resolve(request(), lambda: state["alive"]))
    async def cond() -> bool:
        pending = await svc.store.pending()
        return bool(pending) and svc.waiters(pending[0]) == 1
    await wait_until(cond)
    state["alive"] = False
    out = await asyncio.wait_for(task, 5)  # bounded wait: without the hang-up check it would hold 30 s
    assert out.reason == Reason.CLIENT_CLOSED and not out.allowed
    a = (await svc.store.pending())[0]
    assert svc.waiters(a) == 0 and a.state is State.PENDING
    assert gauge(svc, "portcullis_approval_wait_seconds_count", outcome="client_closed") == 1
    # Nobody is held any more, so an `once` allow applies to the client's retry.
    await svc.decide(a.id, ALLOW, ONCE, "fay", None)
    assert (await svc.resolve(request(), alive)).allowed


async def test_restart_keeps_pending_approvals_and_grants(make_service, tmp_path):
    svc1 = await make_service(hold=False, timeout=60, session_ttl=600)
    pend = await svc1.resolve(request(host="pending.example"), alive)
    other = await svc1.resolve(request(host="session.example"), alive)
    await svc1.decide(other.approval_id, ALLOW, SESSION, "gus", None)
    await svc1.stop()

    svc2 = await make_service(hold=True, timeout=60, session_ttl=600)
    assert [a.id for a in await svc2.store.pending()] == [pend.approval_id]
    await wait_until(lambda: gauge(svc2) == 1.0)  # recounted in the background
    assert (await svc2.resolve(request(host="session.example"), alive)).allowed
    await svc2.decide(pend.approval_id, ALLOW, ONCE, "hal", None)
    retry = await svc2.resolve(request(host="pending.example"), alive)
    assert (retry.allowed, retry.approval_id) == (True, pend.approval_id)


async def test_restart_expires_approvals_that_ran_out_while_down(make_service, events):
    svc1 = await make_service(hold=False, timeout=0.2)
    pend = await svc1.resolve(request(), alive)
    await svc1.stop()
    await asyncio.sleep(0.25)
    svc2 = await make_service(hold=False, timeout=0.2)
    assert (await svc2.store.get(pend.approval_id)).state is State.EXPIRED
    with pytest.raises(DecideError) as e:
        await svc2.decide(pend.approval_id, ALLOW, ONCE, None, None)
    assert e.value.status == 410


async def test_first_decision_wins(make_service):
    svc = await make_service(hold=False)
    pend = await svc.resolve(request(), alive)
    results = await asyncio.gather(
        svc.decide(pend.approval_id, ALLOW, ONCE, "a", None),
        svc.decide(pend.approval_id, DENY, SESSION, "b", None), return_exceptions=True)
    assert not isinstance(results[0], Exception)
    assert isinstance(results[1], DecideError) and results[1].status == 409
    assert results[1].approval.decision is ALLOW and results[1].approval.decided_by == "a"
    assert (await svc.store.get(pend.approval_id)).state is State.ALLOWED


async def test_always_appends_a_valid_rule_with_who_when_why(make_service, tmp_path):
    svc = await make_service(timeout=10)
    task = asyncio.create_task(svc.resolve(request(host="api.example.org", port=8443, client_name="ci"),
                                           alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    a = (await svc.store.pending())[0]
    await svc.decide(a.id, ALLOW, ALWAYS, "ivy", "the build\nneeds it")
    assert (await task).allowed
    text = (tmp_path / "rules/approved.yaml").read_text()
    assert "# approved by ivy at " in text and ": the build needs it" in text
    doc = RuleFile.model_validate(YAML(typ="safe").load(text))
    [rule] = doc.rules
    assert (rule.action, rule.hosts, rule.ports) == ("allow", ["api.example.org"], [8443])
    assert rule.clients == ["ci"]
    assert a.id[4:12] in rule.name
    # Until the reload picks the rule up, the client's retry passes on a short bridging grant.
    assert (await svc.resolve(request(host="api.example.org", port=8443, client_name="ci"), alive)).allowed


async def test_always_refuses_to_clobber_a_broken_rule_file(make_service, tmp_path):
    svc = await make_service(hold=False)
    path = tmp_path / "rules/approved.yaml"
    path.parent.mkdir(parents=True)
    broken = "rules:\n  - name: x\n   bad: [\n"
    path.write_text(broken)
    pend = await svc.resolve(request(), alive)
    with pytest.raises(DecideError) as e:
        await svc.decide(pend.approval_id, ALLOW, ALWAYS, "jo", None)
    assert e.value.status == 500 and "not valid YAML" in e.value.message
    assert path.read_text() == broken
    assert (await svc.store.get(pend.approval_id)).state is State.PENDING  # nothing was decided


async def test_resolve_fails_closed_on_internal_error(make_service):
    svc = await make_service()
    # A broken store must deny, never allow or raise into the proxy (closed on the store's thread).
    await asyncio.get_running_loop().run_in_executor(svc.store._pool, svc.store._db.close)
    out = await svc.resolve(request(), alive)
    assert (out.allowed, out.reason) == (False, Reason.INTERNAL_ERROR)


async def test_resolve_before_start_fails_closed(tmp_path, events):
    from addons.approvals.service import ApprovalService
    from addons.config.models import ApprovalsConfig

    svc = ApprovalService(ApprovalsConfig(), tmp_path, events.telemetry)
    out = await svc.resolve(request(), alive)
    assert (out.allowed, out.reason, out.approval_id) == (False, Reason.INTERNAL_ERROR, None)


async def test_always_rule_is_accepted_by_the_real_loader_and_decides(make_service, tmp_path):
    """What the hot reload will see: the config loads and the new rule allows that host:port."""
    from addons.config.load import load_config
    from addons.policy.model import Action, Client, Request

    def ask(host, port=443, address=None):
        return Request(host, port, Client(address))

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules/base.yaml").write_text(
        "rules:\n  - name: base\n    action: deny\n    hosts: [bad.example]\n")
    cfg = tmp_path / "portcullis.yaml"
    cfg.write_text(
        "rules: [rules/]\ndefault_action: approval\nclients:\n  - name: ci\n    cidrs: [10.0.0.0/8]\n")
    assert load_config(cfg).policy.decide(ask("new.example")).action == Action.APPROVAL
    svc = await make_service(hold=False)
    for host, group in (("new.example", None), ("grp.example", "ci")):
        pend = await svc.resolve(request(host=host, client_name=group), alive)
        await svc.decide(pend.approval_id, ALLOW, ALWAYS, "ops", None)
    policy = load_config(cfg).policy
    d = policy.decide(ask("new.example", address="192.0.2.1"))
    assert d.action == Action.ALLOW and d.rule.name.startswith("approved-new.example-443-")
    assert d.rule.file.endswith("approved.yaml")
    assert policy.decide(ask("new.example", 8443)).action == Action.APPROVAL
    assert policy.decide(ask("grp.example", address="10.1.2.3")).action == Action.ALLOW
    assert policy.decide(ask("grp.example", address="192.0.2.1")).action == Action.APPROVAL


async def test_a_client_cannot_open_unbounded_approvals(make_service, receiver):
    """Past the per-client cap, requests are answered pending without a new approval or webhook."""
    svc = await make_service(hold=True, timeout=30, webhooks=[receiver.url])
    svc.ledger.max_pending_per_client = 3
    held = [asyncio.create_task(svc.resolve(request(host=f"h{i}.example"), alive)) for i in range(3)]
    async def cond() -> bool:
        return bool(len(await svc.store.pending()) == 3)
    await wait_until(cond)
    out = await svc.resolve(request(host="h4.example"), alive)
    assert (out.allowed, out.reason, out.approval_id, out.retry_after) == (False, Reason.APPROVAL_PENDING,
                                                                          None, 30)
    other = asyncio.create_task(svc.resolve(request(host="h4.example", client="10.9.9.9"), alive))
    async def cond() -> bool:
        return bool(len(await svc.store.pending()) == 4)
    await wait_until(cond)  # another client is not affected
    await wait_until(lambda: len(receiver.deliveries()) == 4)
    for t in [*held, other]:
        t.cancel()


async def test_expiry_while_the_always_rule_is_written_is_reported_as_410(make_service, monkeypatch):
    from addons.approvals import persist

    real = persist.append_rule

    def slow_append(*args, **kw):
        time.sleep(0.5)  # in the worker thread: the approval's timer fires meanwhile
        return real(*args, **kw)

    monkeypatch.setattr(persist, "append_rule", slow_append)
    svc = await make_service(hold=False, timeout=0.3)
    pend = await svc.resolve(request(), alive)
    with pytest.raises(DecideError) as e:
        await svc.decide(pend.approval_id, ALLOW, ALWAYS, "slow", None)
    assert e.value.status == 410 and "written to persist_to all the same" in e.value.message
    assert (await svc.store.get(pend.approval_id)).state is State.EXPIRED


async def test_decide_reads_plain_strings_as_the_enums(make_service, tmp_path):
    """A caller passing "allow"/"always" gets the same decision (an `always` writes its rule)."""
    svc = await make_service(hold=False)
    pend = await svc.resolve(request(host="plain.example"), alive)
    a = await svc.decide(pend.approval_id, "allow", "always", "str", None)
    assert (a.decision, a.scope) == (ALLOW, ALWAYS)
    assert "plain.example" in (tmp_path / "rules/approved.yaml").read_text()
    with pytest.raises(ValueError):
        await svc.decide(pend.approval_id, "maybe", "once", None, None)


async def test_a_remote_decision_found_on_arrival_ends_the_tracked_approval_and_the_request_asks_afresh(
        make_service):
    """The replica sync in resolve, with two services on one SQLite file (two processes' view)."""
    a = await make_service(hold=False, timeout=30, poll=0.0)
    b = await make_service(hold=False, timeout=30, poll=0.0)
    first = await a.resolve(request(), alive)
    await b.decide(first.approval_id, DENY, ONCE, "b", None)
    used = await a.resolve(request(), alive)  # nobody waited on B: its `once` is for the next retry, this one
    assert (used.allowed, used.reason, used.approval_id) == (False, Reason.APPROVAL_DENIED, first.approval_id)
    assert a.ledger.tracks(await a.store.get(first.approval_id))  # A has not looked at the store yet
    again = await a.resolve(request(), alive)
    assert again.reason == Reason.APPROVAL_PENDING and again.approval_id != first.approval_id
    assert not a.ledger.tracks(await a.store.get(first.approval_id))


async def test_a_request_that_joins_while_a_look_is_under_way_is_counted_when_the_decision_is_seen(
        make_service):
    """The look at the store that A starts when it opens the approval is slow; meanwhile the request
    begins to wait and B decides `once` (nobody waits on B: it leaves a single-use grant). When A's
    look comes back it must count the waiter it has now, so the waiter is that one use and the grant
    goes: no spare pass for the next request."""
    a = await make_service(timeout=30, poll=30.0)
    b = await make_service(timeout=30, poll=30.0)
    gate, real_get = asyncio.Event(), a.store.get
    stalled: list[str] = []

    async def slow_get(approval_id):
        if not gate.is_set():
            stalled.append(approval_id)
            await gate.wait()
        return await real_get(approval_id)

    a.store.get = slow_get  # the store itself is real; only this look is held up
    held = asyncio.create_task(a.resolve(request(), alive))
    key = ("10.0.0.5", "unknown.example", 443)
    await wait_until(lambda: bool(stalled) and a.waiters(a.ledger._open[key]) == 1)
    await b.decide(stalled[0], ALLOW, ONCE, "b", None)
    assert [g.single_use for g in await b.store.grants(time.time())] == [True]  # B found nobody waiting
    gate.set()
    out = await asyncio.wait_for(held, 5)
    assert (out.allowed, out.reason, out.approval_id) == (True, Reason.APPROVED, stalled[0])
    assert await b.store.grants(time.time()) == []  # the held request was the use


def _task(outcome, task_id: str = "t-9", credential: str | None = None):
    """The same request as asked by a task; with `credential`, the question about its first use."""
    from dataclasses import replace

    from addons.policy.model import Client

    req = replace(outcome.request, client=Client("10.0.0.5", 40000, task_id, "conn1", task_id=task_id))
    return replace(outcome, request=req, credential=credential)


async def test_a_credentials_first_use_is_its_own_question(make_service, events):
    """A grant for the host never answers whether its credential may be used, nor the other way round."""
    svc = await make_service(hold=False)
    host = await svc.resolve(_task(request()), alive)
    await svc.decide(host.approval_id, ALLOW, SESSION, "alice", None)
    assert (await svc.resolve(_task(request()), alive)).allowed  # the host's session grant
    first = await svc.resolve(_task(request(), credential="gh"), alive)
    assert not first.allowed and first.reason is Reason.APPROVAL_PENDING
    assert first.approval_id != host.approval_id
    a = await svc.get(first.approval_id)
    assert (a.credential, a.task_id, a.host) == ("gh", "t-9", "unknown.example")
    with pytest.raises(DecideError) as e:
        await svc.decide(a.id, ALLOW, ALWAYS, "alice", None)
    assert e.value.status == 422 and e.value.code == "credential_scope"
    await svc.decide(a.id, ALLOW, SESSION, "alice", None)
    assert (await svc.resolve(_task(request(), credential="gh"), alive)).allowed
    assert not (await svc.resolve(_task(request(), task_id="t-10", credential="gh"), alive)).allowed
    requested = [e for e in events.of("approval.requested") if e.get("credential") == "gh"]
    assert len(requested) == 2 and requested[0]["client"]["task_id"] == "t-9"
    decided = [e for e in events.of("approval.decided") if e.get("credential") == "gh"]
    assert decided and decided[0]["decision"] == "allow"
    for ev in events.of("approval.requested"):
        validate_event(ev)


async def test_a_credentials_first_use_decided_for_the_task_lasts_for_that_task_only(make_service):
    """Scope `task` on a first-use approval: that task may use the credential on that host:port until
    its credential expires; another task, or the same task without the credential, is asked again."""
    from dataclasses import replace

    svc = await make_service(hold=False)
    until = time.time() + 600

    def asked(task_id: str, credential: str | None) -> object:
        out = _task(request(), task_id=task_id, credential=credential)
        client = replace(out.request.client, task_until=until)
        return replace(out, request=replace(out.request, client=client))

    first = await svc.resolve(asked("t-9", "gh"), alive)
    await svc.decide(first.approval_id, ALLOW, Scope.TASK, "alice", None)
    again = await svc.resolve(asked("t-9", "gh"), alive)
    assert (again.allowed, again.approval_id) == (True, first.approval_id)
    other = await svc.resolve(asked("t-10", "gh"), alive)
    assert not other.allowed and other.reason is Reason.APPROVAL_PENDING
    host = await svc.resolve(asked("t-9", None), alive)  # the host itself is its own question
    assert not host.allowed and host.approval_id not in (first.approval_id, other.approval_id)
