"""Task credentials end to end: minted through the admin API (and the CLI), presented by agents,
judged by their profile, refused with a readable 407 when unknown, wrong, expired or revoked —
revocation taking effect on the next request, on every worker."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from addons.credentials.model import Check
from tests.harness import REPO, PortcullisProc, base_config

pytestmark = pytest.mark.e2e
TOKEN = "cred-admin-token"
ENV = {"PORTCULLIS_TEST_ADMIN_TOKEN": TOKEN}
PROFILES = [{"name": "frontend"}, {"name": "release"}]
RULES = [
    {"name": "everyone", "action": "allow", "hosts": ["public.test"]},
    {"name": "fe-api", "action": "allow", "hosts": ["api.public.test"], "profiles": ["frontend"]},
    {"name": "rel-www", "action": "allow", "hosts": ["www.public.test"], "profiles": ["release"]},
    {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
    {"name": "blocked-for-fe", "action": "allow", "hosts": ["blocked.test"], "profiles": ["frontend"]},
]


def admin(p: PortcullisProc, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{p.admin_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def mint(
    p: PortcullisProc, task: str, profile: str | None = None, ttl: str | None = None, **labels: str
) -> dict:
    body: dict = {"task_id": task, "labels": labels}
    if profile:
        body["profile"] = profile
    if ttl:
        body["ttl"] = ttl
    status, doc = admin(p, "POST", "/credentials", body)
    assert status == 201, doc
    return doc


def get(
    p: PortcullisProc, host: str, port: int, user: str | None = None, secret: str | None = None
) -> tuple[int, dict]:
    auth = ""
    if user is not None:
        auth = "Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode() + "\r\n"
    r = p.raw(f"GET http://{host}:{port}/x HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n".encode())
    try:
        body = json.loads(r.body) if r.status != 200 else {}
    except ValueError:
        body = {}
    return r.status, body


@pytest.fixture(scope="module")
def proxy(upstreams, tmp_path_factory):
    folder = tmp_path_factory.mktemp("creds")
    cfg = base_config(upstreams, folder, profiles=PROFILES)
    with PortcullisProc(folder, upstreams, rules=RULES, config=cfg, env=ENV) as p:
        yield p


def test_mint_use_and_the_task_in_every_event(proxy, upstreams):
    m = mint(proxy, "build-1", "frontend", repo="web", team="ui")
    assert m["user"] == "build-1" and len(m["password"]) >= 40 and m["profile"] == "frontend"
    assert m["proxy_url"].startswith("http://build-1:") and m["password"] in m["proxy_url"]
    status, _ = get(proxy, "api.public.test", upstreams.http_port, m["user"], m["password"])
    assert status == 200
    ev = proxy.wait_event("egress.decision", **{"client.task_id": "build-1"})  # stdout has its own thread
    assert ev["client"]["profile"] == "frontend" and ev["client"]["labels"] == {"repo": "web", "team": "ui"}
    assert ev["rule"] == "fe-api"
    minted = proxy.wait_event("credential.minted", task_id="build-1")
    assert minted["labels"] == {"repo": "web", "team": "ui"} and "password" not in json.dumps(minted)
    # Listed, never with a secret or its hash.
    status, doc = admin(proxy, "GET", "/credentials")
    listed = [c for c in doc["credentials"] if c["task_id"] == "build-1"]
    assert listed and listed[0]["state"] == "live" and m["password"] not in json.dumps(doc)
    assert "secret_hash" not in json.dumps(doc)


def test_profile_isolation_and_a_global_deny_beats_a_profile_allow(proxy, upstreams):
    fe = mint(proxy, "fe-2", "frontend")
    rel = mint(proxy, "rel-2", "release")
    assert get(proxy, "api.public.test", upstreams.http_port, "fe-2", fe["password"])[0] == 200
    assert get(proxy, "api.public.test", upstreams.http_port, "rel-2", rel["password"])[0] == 403  # no leak
    assert get(proxy, "www.public.test", upstreams.http_port, "rel-2", rel["password"])[0] == 200
    assert get(proxy, "www.public.test", upstreams.http_port, "fe-2", fe["password"])[0] == 403
    assert get(proxy, "api.public.test", upstreams.http_port)[0] == 403  # anonymous: untagged rules only
    status, body = get(proxy, "blocked.test", upstreams.http_port, "fe-2", fe["password"])
    assert status == 403 and body["rule"] == "no-blocked"


@pytest.mark.parametrize(
    ("user", "secret", "detail"),
    [
        ("nobody-3", "x" * 43, "unknown task credential"),
        ("bad-3", "wrong", "wrong secret"),
        ("no:colon", "x", "Basic"),
    ],
    ids=["unknown", "wrong-secret", "malformed"],
)
def test_bad_credentials_get_a_readable_407(proxy, upstreams, user, secret, detail):
    if user == "bad-3":
        mint(proxy, "bad-3", "frontend")
    if user == "no:colon":
        r = proxy.raw(
            f"GET http://public.test:{upstreams.http_port}/ HTTP/1.1\r\nHost: public.test\r\n"
            "Proxy-Authorization: Basic not-base64!\r\n\r\n".encode()
        )
        assert r.status == 407 and detail in json.loads(r.body)["message"]
        return
    status, body = get(proxy, "public.test", upstreams.http_port, user, secret)
    assert status == 407 and body["reason"] == "proxy_auth" and detail in body["message"], body


def test_revocation_takes_effect_on_the_next_request(proxy, upstreams):
    m = mint(proxy, "rev-4", "frontend")
    assert get(proxy, "api.public.test", upstreams.http_port, "rev-4", m["password"])[0] == 200
    status, doc = admin(proxy, "DELETE", "/credentials/rev-4")
    assert status == 200 and doc["state"] == "revoked"
    status, body = get(proxy, "api.public.test", upstreams.http_port, "rev-4", m["password"])
    assert status == 407 and "revoked" in body["message"]
    # The refusal's event names the task that tried (its secret matched); a wrong secret is not named.
    proxy.wait_event("egress.decision", reason="proxy_auth", **{"client.user": "rev-4",
                                                                 "client.task_id": "rev-4"})
    wrong_secret = {"reason": "proxy_auth", "detail": Check.WRONG_SECRET.value}
    before = len(proxy.find("egress.decision", **wrong_secret))
    assert get(proxy, "api.public.test", upstreams.http_port, "rev-4", "guess")[0] == 407
    wrong = proxy.wait_event("egress.decision", count=before + 1, **wrong_secret)
    assert wrong["client"].get("user") is None and wrong["client"].get("task_id") is None
    assert admin(proxy, "DELETE", "/credentials/rev-4")[0] == 404
    proxy.wait_event("credential.revoked", task_id="rev-4")
    # A new credential for the same task is a new secret: the old one stays refused.
    m2 = mint(proxy, "rev-4", "frontend")
    assert get(proxy, "api.public.test", upstreams.http_port, "rev-4", m["password"])[0] == 407
    assert get(proxy, "api.public.test", upstreams.http_port, "rev-4", m2["password"])[0] == 200


def test_expiry(proxy, upstreams):
    m = mint(proxy, "short-5", "frontend", ttl="1s")
    assert get(proxy, "api.public.test", upstreams.http_port, "short-5", m["password"])[0] == 200
    time.sleep(1.3)  # past the credential's 1 s life (bounded; the assertion is the refusal)
    status, body = get(proxy, "api.public.test", upstreams.http_port, "short-5", m["password"])
    assert status == 407 and "expired" in body["message"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"task_id": "ok-6", "profile": "ops"}, 422, "unknown_profile"),
        ({"task_id": "bad id"}, 422, "bad_task_id"),
        ({"task_id": "ok-6", "ttl": "90h"}, 422, "bad_ttl"),
        ({"task_id": "ok-6", "labels": {"bad key": "v"}}, 422, "bad_labels"),
        ({"task_id": "ok-6", "extra": 1}, 422, "invalid_body"),
        ({"profile": "frontend"}, 422, "invalid_body"),
    ],
)
def test_bad_mint_bodies_are_422(proxy, body, status, code):
    got, doc = admin(proxy, "POST", "/credentials", body)
    assert (got, doc["error"]) == (status, code), doc


def test_a_live_task_cannot_be_minted_twice_and_the_api_needs_the_token(proxy):
    mint(proxy, "twice-7")
    assert admin(proxy, "POST", "/credentials", {"task_id": "twice-7"})[0] == 409
    req = urllib.request.Request(f"http://127.0.0.1:{proxy.admin_port}/credentials", method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)  # noqa: S310
    assert e.value.code == 401


def test_100_tasks_mint_and_use_credentials_at_once(proxy, upstreams):
    results: dict[int, int] = {}

    def one(i: int) -> None:
        m = mint(proxy, f"many-{i}", "frontend")
        results[i] = get(proxy, "api.public.test", upstreams.http_port, f"many-{i}", m["password"])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == dict.fromkeys(range(100), 200)


def test_the_cli_mints_lists_and_revokes(proxy, tmp_path):
    env = {**os.environ, "PORTCULLIS_ADMIN_TOKEN": TOKEN}
    base = ["--admin", f"http://127.0.0.1:{proxy.admin_port}"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "addons.cli", "credentials", *base, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    r = cli("mint", "--task", "cli-8", "--profile", "release", "--ttl", "30m", "--label", "repo=api")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["task_id"] == "cli-8" and doc["password"] and doc["labels"] == {"repo": "api"}
    listing = cli("list")
    assert listing.returncode == 0 and "cli-8" in listing.stdout and doc["password"] not in listing.stdout
    assert cli("revoke", "cli-8").returncode == 0
    assert cli("revoke", "cli-8").returncode == 1
    assert cli("mint", "--task", "cli-9", "--label", "novalue").returncode == 2


def test_required_credentials_leave_no_anonymous_egress(upstreams, tmp_path):
    cfg = base_config(upstreams, tmp_path, profiles=PROFILES, credentials={"required": True})
    with PortcullisProc(tmp_path, upstreams, rules=RULES, config=cfg, env=ENV) as p:
        status, body = get(p, "public.test", upstreams.http_port)
        assert status == 407 and "a task credential is required" in body["message"]
        m = mint(p, "req-10")
        assert get(p, "public.test", upstreams.http_port, "req-10", m["password"])[0] == 200


def test_revocation_reaches_every_worker_and_credentials_survive_a_restart(upstreams, tmp_path):
    cfg = base_config(upstreams, tmp_path, profiles=PROFILES)
    with PortcullisProc(tmp_path, upstreams, rules=RULES, config=cfg, env=ENV, workers=2) as p:
        m = mint(p, "w-11", "frontend")
        for _ in range(8):  # both workers now hold the credential in their caches
            assert get(p, "api.public.test", upstreams.http_port, "w-11", m["password"])[0] == 200
        assert {d["worker"] for d in p.decisions(**{"client.task_id": "w-11"})} == {0, 1}
        assert admin(p, "DELETE", "/credentials/w-11")[0] == 200
        refused = [get(p, "api.public.test", upstreams.http_port, "w-11", m["password"])[0] for _ in range(8)]
        assert refused == [407] * 8
        later = mint(p, "w-12", "release")
    with PortcullisProc(tmp_path, upstreams, rules=RULES, config=cfg, env=ENV) as p2:
        assert get(p2, "www.public.test", upstreams.http_port, "w-12", later["password"])[0] == 200
        assert get(p2, "api.public.test", upstreams.http_port, "w-11", m["password"])[0] == 407
