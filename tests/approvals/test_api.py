"""addons/approvals/api.py over a real loopback aiohttp server: every status the contract names."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from addons.approvals.model import State
from addons.policy.model import Reason
from tests.approvals.approvals_support import TOKEN, alive, request, wait_until

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def setup(make_service, admin_server):
    svc = await make_service(hold=False, timeout=30)
    admin = await admin_server(svc)
    async with httpx.AsyncClient(base_url=admin.url, headers=AUTH, trust_env=False) as client:
        yield svc, client


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}])
async def test_401_without_the_right_bearer_token(setup, headers):
    svc, client = setup
    pend = await svc.resolve(request(), alive)
    for method, path in [("GET", "/approvals"), ("GET", f"/approvals/{pend.approval_id}"),
                         ("POST", f"/approvals/{pend.approval_id}")]:
        r = await client.request(method, path, headers={"Authorization": "", **headers},
                                 json={"decision": "allow"})
        assert r.status_code == 401, (method, path)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["error"] == "unauthorized"
    assert (await svc.store.get(pend.approval_id)).state is State.PENDING


async def test_no_token_configured_refuses_every_call_and_says_how_to_fix_it(make_service, admin_server):
    svc = await make_service(hold=False)
    admin = await admin_server(svc, token=None)
    async with httpx.AsyncClient(base_url=admin.url, trust_env=False) as client:
        for auth in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer None"}):
            r = await client.get("/approvals", headers=auth)
            assert r.status_code == 401 and "PORTCULLIS_ADMIN_TOKEN" in r.json()["message"]


async def test_404_for_an_unknown_id(setup):
    _, client = setup
    assert (await client.get("/approvals/apr_nope")).status_code == 404
    r = await client.post("/approvals/apr_nope", json={"decision": "allow", "scope": "once"})
    assert r.status_code == 404 and r.json()["error"] == "not_found"


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"decision": "maybe"}', b'{"scope": "once"}',
    b'{"decision": "allow", "scope": "forever"}',
    b'{"decision": "allow", "extra": 1}', b'{"decision": "allow", "by": 7}', b'{"decision": true}',
    "{\"decision\": \"allow\", \"reason\": \"\xff\"}".encode("latin-1"),
])
async def test_422_for_a_bad_body_with_a_clear_message(setup, body):
    svc, client = setup
    pend = await svc.resolve(request(), alive)
    r = await client.post(f"/approvals/{pend.approval_id}", content=body,
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_body" and r.json()["message"]
    assert (await svc.store.get(pend.approval_id)).state is State.PENDING


async def test_200_then_409_with_the_standing_decision(setup):
    svc, client = setup
    pend = await svc.resolve(request(host="a.example", method="POST", path="/x"), alive)
    r = await client.post(f"/approvals/{pend.approval_id}",
                          json={"decision": "allow", "scope": "session", "by": "kim", "reason": "ok"})
    assert r.status_code == 200
    doc = r.json()
    # `by` is whoever the bearer token belongs to (the admin token here), never what the body claims.
    assert (doc["state"], doc["decision"], doc["scope"], doc["by"], doc["reason"]) == (
        "allowed", "allow", "session", "admin", "ok")
    late = await client.post(f"/approvals/{pend.approval_id}", json={"decision": "deny", "by": "lee"})
    assert late.status_code == 409
    body = late.json()
    assert body["error"] == "already_decided" and "nothing changed" in body["message"]
    assert (body["approval"]["decision"], body["approval"]["by"]) == ("allow", "admin")
    same = await client.post(f"/approvals/{pend.approval_id}", json={"decision": "allow", "scope": "session"})
    assert same.status_code == 409
    assert (await svc.resolve(request(host="a.example"), alive)).allowed


async def test_410_after_expiry(make_service, admin_server):
    svc = await make_service(hold=False, timeout=0.2)
    admin = await admin_server(svc)
    pend = await svc.resolve(request(), alive)
    await asyncio.sleep(0.25)
    async with httpx.AsyncClient(base_url=admin.url, headers=AUTH, trust_env=False) as client:
        r = await client.post(f"/approvals/{pend.approval_id}", json={"decision": "allow"})
        assert r.status_code == 410 and r.json()["approval"]["state"] == "expired"
        assert (await client.get(f"/approvals/{pend.approval_id}")).json()["state"] == "expired"


async def test_500_when_the_always_rule_cannot_be_written(setup, tmp_path):
    svc, client = setup
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules/approved.yaml").write_text("rules: [\n")
    pend = await svc.resolve(request(), alive)
    r = await client.post(f"/approvals/{pend.approval_id}", json={"decision": "allow", "scope": "always"})
    assert r.status_code == 500 and r.json()["error"] == "persist_failed"
    assert (await svc.store.get(pend.approval_id)).state is State.PENDING


async def test_list_shows_pending_with_waiters_and_recent_decisions(make_service, admin_server):
    svc = await make_service(hold=True, timeout=30)
    admin = await admin_server(svc)
    held = asyncio.create_task(svc.resolve(request(host="held.example"), alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    async with httpx.AsyncClient(base_url=admin.url, headers=AUTH, trust_env=False) as client:
        items = (await client.get("/approvals")).json()["approvals"]
        assert [(a["host"], a["state"], a["waiters"]) for a in items] == [("held.example", "pending", 1)]
        r = await client.post(f"/approvals/{items[0]['id']}", json={"decision": "deny"})
        assert r.status_code == 200
        assert (await held).reason == Reason.APPROVAL_DENIED
        items = (await client.get("/approvals")).json()["approvals"]
        assert [(a["host"], a["state"], a["decision"]) for a in items] == [("held.example", "denied", "deny")]


async def test_422_for_always_without_persist_to(make_service, admin_server):
    svc = await make_service(hold=False, persist_to=None)
    admin = await admin_server(svc)
    pend = await svc.resolve(request(), alive)
    async with httpx.AsyncClient(base_url=admin.url, headers=AUTH, trust_env=False) as client:
        r = await client.post(f"/approvals/{pend.approval_id}", json={"decision": "allow", "scope": "always"})
        assert r.status_code == 422 and r.json()["error"] == "no_persist_to"
        assert (await svc.store.get(pend.approval_id)).state is State.PENDING
        session = {"decision": "allow", "scope": "session"}
        ok = await client.post(f"/approvals/{pend.approval_id}", json=session)
        assert ok.status_code == 200


async def test_a_broken_store_is_a_json_500_not_a_crash(setup):
    svc, client = setup
    pend = await svc.resolve(request(), alive)
    # The disk went away under the service: the connection is closed on the store's own thread (its
    # calls run there one at a time; closing it from another thread mid-call would crash SQLite).
    await asyncio.get_running_loop().run_in_executor(svc.store._pool, svc.store._db.close)
    r = await client.post(f"/approvals/{pend.approval_id}", json={"decision": "allow"})
    assert r.status_code == 500 and r.json()["error"] == "internal_error"
    assert (await client.get("/approvals")).status_code == 500


async def test_the_json_carries_the_contract_strings(setup):
    """Exactly the keys and string values of the contract (SPEC.md), pending then decided."""
    svc, client = setup
    pend = await svc.resolve(request(host="j.example", method="GET", path="/p", client_name="ci", rule="ask"),
                             alive)
    doc = (await client.get(f"/approvals/{pend.approval_id}")).json()
    assert set(doc) == {"id", "state", "client", "client_name", "host", "port", "scheme", "method", "path",
                        "rule", "credential", "created_at", "expires_at", "decision", "scope", "by", "reason",
                        "decided_at", "waiters", "task_id", "labels", "task_expires_at"}
    assert (doc["state"], doc["client"], doc["client_name"], doc["rule"], doc["decision"], doc["scope"],
            doc["decided_at"], doc["waiters"]) == ("pending", "10.0.0.5", "ci", "ask", None, None, None, 0)
    r = await client.post(f"/approvals/{pend.approval_id}", json={"decision": "deny", "scope": "always"})
    assert r.status_code == 200
    doc = r.json()
    assert (doc["state"], doc["decision"], doc["scope"]) == ("denied", "deny", "always")
    assert doc["decided_at"].endswith("Z")
    assert "denied-j.example-443-" in (svc.persister.path.read_text())
