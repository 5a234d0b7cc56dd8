"""addons/credentials/api.py over a real loopback aiohttp admin server and a real CredentialService on
SQLite: the mint answer, listing without secrets, revocation, and every refusal's status and code."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from addons.credentials import api
from addons.credentials.model import Check, hash_secret
from tests.credentials.conftest import ALICE, BOSS, TOKEN


async def test_mint_answers_the_secret_once_and_a_proxy_url(admin, clock):
    r = await admin.client.post(
        "/credentials",
        json={"task_id": "build-42", "profile": "frontend", "ttl": "2h", "labels": {"repo": "web"}},
    )
    assert r.status_code == 201 and r.headers["Cache-Control"] == "no-store"
    doc = r.json()
    assert set(doc) == {"task_id", "user", "password", "proxy_url", "expires_at", "profile", "labels"}
    assert doc["task_id"] == doc["user"] == "build-42" and doc["profile"] == "frontend"
    assert doc["labels"] == {"repo": "web"}
    assert doc["proxy_url"] == f"http://build-42:{doc['password']}@portcullis.internal:3128"
    assert doc["expires_at"] == "1970-01-12T15:46:40Z"  # the test clock (1,000,000 s) + 2 h
    check, c = await admin.svc.verify("build-42", doc["password"])
    assert check is Check.OK and c is not None and c.minted_by == "admin"
    assert c.secret_hash == hash_secret(doc["password"])
    minted = [json.loads(x) for x in admin.stream.getvalue().splitlines()]
    assert [e["event"] for e in minted] == ["credential.minted"] and minted[0]["by"] == "admin"


async def test_ttl_forms(admin, clock):
    for task, ttl, seconds in [("a", 90, 90), ("b", 1.5, 1.5), ("c", "30m", 1800), ("d", None, 3600)]:
        body: dict[str, Any] = {"task_id": task} | ({} if ttl is None else {"ttl": ttl})
        assert (await admin.client.post("/credentials", json=body)).status_code == 201
        assert (await admin.svc.store.get(task)).expires_at == clock.now + seconds  # type: ignore[union-attr]


async def test_list_shows_states_and_never_a_secret_or_its_hash(admin, clock):
    secrets = []
    for task in ("one", "two", "three"):
        r = await admin.client.post("/credentials", json={"task_id": task, "ttl": 60})
        secrets.append(r.json()["password"])
    assert (await admin.client.delete("/credentials/two")).status_code == 200
    clock.advance(61)
    r = await admin.client.get("/credentials")
    assert r.status_code == 200
    items = r.json()["credentials"]
    assert [(c["task_id"], c["state"]) for c in items] == [
        ("one", "expired"),
        ("two", "revoked"),
        ("three", "expired"),
    ]
    assert items[1]["revoked_at"] == "1970-01-12T13:46:40Z" and items[0]["revoked_at"] is None
    assert items[0]["created_at"] == "1970-01-12T13:46:40Z" and items[0]["minted_by"] == "admin"
    text = r.text
    assert not any(s in text or hash_secret(s) in text for s in secrets) and "hash" not in text


async def test_revoke(admin):
    pw = (await admin.client.post("/credentials", json={"task_id": "t"})).json()["password"]
    r = await admin.client.delete("/credentials/t")
    assert r.status_code == 200 and r.json()["state"] == "revoked" and r.json()["task_id"] == "t"
    assert pw not in r.text and "hash" not in r.text
    assert (await admin.svc.verify("t", pw))[0] is Check.REVOKED
    r = await admin.client.delete("/credentials/t")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert (await admin.client.delete("/credentials/never")).status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 422, "invalid_body"),
        (b"not json", 422, "invalid_body"),
        (b"\xff\xfe", 422, "invalid_body"),
        (b"[]", 422, "invalid_body"),
        (b"null", 422, "invalid_body"),
        (b'{"profile": "frontend"}', 422, "invalid_body"),  # no task_id
        (b'{"task_id": 42}', 422, "invalid_body"),
        (b'{"task_id": "t", "secret": "mine"}', 422, "invalid_body"),  # nobody chooses the secret
        (b'{"task_id": "t", "labels": {"k": 1}}', 422, "invalid_body"),
        (b'{"task_id": "t", "labels": ["k"]}', 422, "invalid_body"),
        (b'{"task_id": "t", "ttl": true}', 422, "invalid_body"),
        (b'{"task_id": "t", "ttl": "soon"}', 422, "invalid_body"),
        (b'{"task_id": "t", "ttl": "-5m"}', 422, "invalid_body"),
        (b'{"task_id": "t", "ttl": 0}', 422, "invalid_body"),
        (b'{"task_id": "t", "ttl": NaN}', 422, "bad_ttl"),
        (b'{"task_id": "t", "ttl": Infinity}', 422, "bad_ttl"),
        (b'{"task_id": "t", "ttl": "25h"}', 422, "bad_ttl"),
        (b'{"task_id": "' + b"a" * 65 + b'"}', 422, "invalid_body"),
        (b'{"task_id": "a b"}', 422, "bad_task_id"),
        (b'{"task_id": "ci-user"}', 422, "bad_task_id"),
        (b'{"task_id": "t", "profile": "backend"}', 422, "unknown_profile"),
        (b'{"task_id": "t", "labels": {"bad key": "v"}}', 422, "bad_labels"),
    ],
)
async def test_bad_bodies(admin, body, status, code):
    r = await admin.client.post("/credentials", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status and r.json()["error"] == code, r.text
    assert r.json()["message"]
    assert await admin.svc.listing() == []


async def test_a_live_task_is_409(admin):
    assert (await admin.client.post("/credentials", json={"task_id": "t"})).status_code == 201
    r = await admin.client.post("/credentials", json={"task_id": "t"})
    assert r.status_code == 409 and r.json()["error"] == "already_live" and "revoke" in r.json()["message"]


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN, "Bearer"])
async def test_401_without_an_admin_token(admin, auth):
    await admin.client.post("/credentials", json={"task_id": "keep"})
    headers = {"Authorization": auth} if auth else {}
    client = httpx.AsyncClient(base_url=str(admin.client.base_url), headers=headers, trust_env=False)
    async with client:
        for method, path in [
            ("POST", "/credentials"),
            ("GET", "/credentials"),
            ("DELETE", "/credentials/keep"),
        ]:
            r = await client.request(method, path, json={"task_id": "x"})
            assert r.status_code == 401, (method, path)
            assert r.json()["error"] == "unauthorized" and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert [c.task_id for c in await admin.svc.listing()] == ["keep"]
    assert (await admin.svc.store.get("keep")).revoked_at is None  # type: ignore[union-attr]


async def test_an_approver_is_403_and_another_admin_is_named(admin):
    await admin.client.post("/credentials", json={"task_id": "keep"})
    alice = {"Authorization": f"Bearer {ALICE}"}
    for method, path in [("POST", "/credentials"), ("GET", "/credentials"), ("DELETE", "/credentials/keep")]:
        r = await admin.client.request(method, path, json={"task_id": "x"}, headers=alice)
        assert r.status_code == 403 and r.json()["error"] == "forbidden" and "alice" in r.json()["message"]
    r = await admin.client.post(
        "/credentials", json={"task_id": "b"}, headers={"Authorization": f"Bearer {BOSS}"}
    )
    assert r.status_code == 201
    assert (await admin.svc.store.get("b")).minted_by == "boss"  # type: ignore[union-attr]
    r = await admin.client.delete("/credentials/keep", headers={"Authorization": f"Bearer {BOSS}"})
    assert r.status_code == 200
    revoked = [json.loads(x) for x in admin.stream.getvalue().splitlines() if "credential.revoked" in x]
    assert revoked[0]["by"] == "boss"


async def test_a_store_failure_is_a_json_503(admin):
    await admin.svc.store.close()
    for method, path in [("POST", "/credentials"), ("GET", "/credentials"), ("DELETE", "/credentials/t")]:
        r = await admin.client.request(method, path, json={"task_id": "t"})
        assert r.status_code == 503, (method, path)
        assert r.json()["error"] == "store_unavailable" and "credentials store" in r.json()["message"]


@pytest.mark.parametrize(
    ("proxy_url", "user", "secret", "want"),
    [
        ("http://portcullis:8080", "t1", "abc", "http://t1:abc@portcullis:8080"),
        ("portcullis:8080", "t1", "abc", "http://t1:abc@portcullis:8080"),
        ("https://proxy.example:443/ignored/path", "t1", "abc", "https://t1:abc@proxy.example:443"),
        ("http://[::1]:3128", "t1", "a-b_c", "http://t1:a-b_c@[::1]:3128"),
        ("http://p:1", "t.1", "a/b:c@d", "http://t.1:a%2Fb%3Ac%40d@p:1"),
    ],
)
def test_with_userinfo(proxy_url, user, secret, want):
    assert api.with_userinfo(proxy_url, user, secret) == want
