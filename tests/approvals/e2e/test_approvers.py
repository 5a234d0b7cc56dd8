"""Named approvers and decision links through a real proxy: the authenticated name is the one
recorded (API, page, always-rule comment), approvers cannot mint credentials, and a decision link
decides its one approval once, never after expiry, never another one, never when tampered."""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.parse
import urllib.request

import pytest

from tests.approvals.approvals_support import SECRET, SECRET_ENV
from tests.approvals.e2e.test_approvals import HookReceiver
from tests.harness import PortcullisProc, base_config

pytestmark = pytest.mark.e2e
ADMIN, ALICE, CAROL = "admin-token-e2e", "alice-token-e2e", "carol-token-e2e"
ENV = {"PORTCULLIS_TEST_ADMIN_TOKEN": ADMIN, "ALICE_TOKEN": ALICE, "LINK_KEY": "k" * 32, SECRET_ENV: SECRET}
RULES = [{"name": "ask", "action": "approval", "hosts": ["approve.test"]}]


def call(
    p,
    method: str,
    path: str,
    token: str | None,
    body: dict | None = None,
    form: dict | None = None,
    headers: dict | None = None,
) -> tuple[int, str]:
    data = (
        json.dumps(body).encode()
        if body is not None
        else (urllib.parse.urlencode(form).encode() if form is not None else None)
    )
    h = {"Content-Type": "application/json" if form is None else "application/x-www-form-urlencoded"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    req = urllib.request.Request(
        f"http://127.0.0.1:{p.admin_port}{path}", method=method, data=data, headers=h
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def hooks():
    h = HookReceiver()
    yield h
    h.close()


@pytest.fixture
def proxy(upstreams, tmp_path, hooks):
    cfg = base_config(
        upstreams,
        tmp_path,
        approvals={
            "timeout": "60s",
            "hold": False,
            "store": "sqlite:///state/portcullis.db",
            "persist_to": "rules/approved.yaml",
            "webhooks": [{"url": hooks.url, "secret_env": SECRET_ENV}],
            "links": {"secret_env": "LINK_KEY", "ttl": "3s"},
        },
        admin={
            "listen": "127.0.0.1:9090",
            "token_env": "PORTCULLIS_TEST_ADMIN_TOKEN",
            "approvers": [
                {"name": "alice", "token_env": "ALICE_TOKEN"},
                {
                    "name": "carol",
                    "token_sha256": hashlib.sha256(CAROL.encode()).hexdigest(),
                    "role": "admin",
                },
            ],
        },
    )
    with PortcullisProc(tmp_path, upstreams, rules=RULES, config=cfg, env=ENV) as p:
        yield p


def ask(p, u, path: str) -> str:
    """One held-at-once request (hold: false): the approval id it opened."""
    host = f"approve.test:{u.http_port}"
    r = p.raw(f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert r.status == 403
    return json.loads(r.body)["approval_id"]


def test_the_authenticated_approver_is_recorded_whatever_the_body_says(proxy, upstreams):
    aid = ask(proxy, upstreams, "/a")
    status, body = call(
        proxy,
        "POST",
        f"/approvals/{aid}",
        ALICE,
        {"decision": "allow", "scope": "always", "by": "the-ceo", "reason": "needed"},
    )
    assert status == 200 and json.loads(body)["by"] == "alice"
    ev = proxy.wait_event("approval.decided", approval_id=aid)
    assert ev["by"] == "alice"
    assert "# approved by alice at" in (proxy.folder / "rules" / "approved.yaml").read_text()


def test_approvers_decide_but_only_admins_mint(proxy):
    assert call(proxy, "GET", "/approvals", ALICE)[0] == 200
    status, body = call(proxy, "POST", "/credentials", ALICE, {"task_id": "t1"})
    assert status == 403 and "approver" in json.loads(body)["message"]
    assert call(proxy, "POST", "/credentials", CAROL, {"task_id": "t1"})[0] == 201
    assert call(proxy, "POST", "/credentials", ADMIN, {"task_id": "t2"})[0] == 201
    assert call(proxy, "GET", "/credentials", "nobody")[0] == 401


def _link(hooks, aid: str) -> str:
    deliveries = hooks.wait(1)
    (hook,) = [d for d in deliveries if d["body"]["id"] == aid]
    assert hook["verified"]
    return hook["body"]["decide_link"]


def test_a_decision_link_decides_its_approval_once(proxy, upstreams, hooks):
    aid = ask(proxy, upstreams, "/link")
    link = _link(hooks, aid)
    path = link.split(f":{proxy.admin_port}", 1)[1]
    status, page = call(proxy, "GET", path, None)
    assert status == 200 and "approve.test" in page and "Allow once" in page
    cap = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["cap"][0]
    status, _ = call(proxy, "POST", f"/approvals/{aid}/link", None, form={"cap": cap, "action": "allow"})
    assert status == 200
    ev = proxy.wait_event("approval.decided", approval_id=aid)
    assert ev["by"] == "decision link" and ev["decision"] == "allow"
    again, _ = call(proxy, "POST", f"/approvals/{aid}/link", None, form={"cap": cap, "action": "deny"})
    assert again == 409  # used once: the approval is decided
    # The link can do nothing else: no listing, no credentials with it as a bearer token.
    assert call(proxy, "GET", "/approvals", cap)[0] == 401
    assert call(proxy, "POST", "/credentials", cap, {"task_id": "x"})[0] == 401


def test_a_decision_link_for_another_approval_tampered_or_expired_is_refused(proxy, upstreams, hooks):
    first = ask(proxy, upstreams, "/one")
    link = _link(hooks, first)
    cap = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["cap"][0]
    other = "apr_" + "0" * 32
    status, _ = call(proxy, "POST", f"/approvals/{other}/link", None, form={"cap": cap, "action": "allow"})
    assert status == 404
    tampered = cap[:-1] + ("a" if cap[-1] != "a" else "b")
    status, body = call(
        proxy, "POST", f"/approvals/{first}/link", None, form={"cap": tampered, "action": "allow"}
    )
    assert status == 403 and "not valid" in body
    time.sleep(3.2)  # past the link's 3 s (bounded; the assertion is the refusal)
    status, body = call(proxy, "POST", f"/approvals/{first}/link", None, form={"cap": cap, "action": "allow"})
    assert status == 403 and "expired" in body
    status, body = call(proxy, "GET", f"/approvals/{first}", ADMIN)
    assert json.loads(body)["state"] == "pending"  # none of these decided anything


def test_the_page_login_names_the_approver(proxy, upstreams):
    aid = ask(proxy, upstreams, "/page")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    base = f"http://127.0.0.1:{proxy.admin_port}"
    login = opener.open(base + "/", timeout=10).read().decode()
    csrf = re.search(r"name='csrf' value='([^']+)'", login).group(1)
    page = (
        opener.open(
            urllib.request.Request(
                base + "/login",
                data=urllib.parse.urlencode({"token": ALICE, "csrf": csrf}).encode(),
                headers={"Origin": base},
            ),
            timeout=10,
        )
        .read()
        .decode()
    )
    assert "Logged in as <b id='approver'>alice</b>" in page
    csrf2 = re.search(r"name='csrf' value='([^']+)'", page).group(1)
    done = (
        opener.open(
            urllib.request.Request(
                base + f"/ui/approvals/{aid}",
                data=urllib.parse.urlencode({"csrf": csrf2, "action": "deny:once", "reason": "no"}).encode(),
                headers={"Origin": base},
            ),
            timeout=10,
        )
        .read()
        .decode()
    )
    assert "Denied" in done
    assert proxy.wait_event("approval.decided", approval_id=aid)["by"] == "alice"
