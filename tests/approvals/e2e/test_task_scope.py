"""Scope `task` through the real proxy: an approval asked by a task credential can be granted for the rest
of that task's life on that host:port; no other task (and no anonymous client) inherits it; revoking the
task's credential takes its grants with it. The webhook, the events and the API name the task and its
labels."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.approvals.approvals_support import SECRET_ENV, TOKEN
from tests.approvals.e2e_support import ENV, HookReceiver, decide
from tests.harness import PortcullisProc, base_config

pytestmark = pytest.mark.e2e
RULES = [{"name": "ask", "action": "approval", "hosts": ["approve.test"]}]


@pytest.fixture
def hooks():
    h = HookReceiver()
    yield h
    h.close()


@pytest.fixture
def proxy(upstreams, tmp_path, hooks):
    cfg = base_config(upstreams, tmp_path, profiles=[{"name": "frontend"}], approvals={
        "timeout": "60s", "hold": False, "store": "sqlite:///state/portcullis.db",
        "persist_to": "rules/approved.yaml", "webhooks": [{"url": hooks.url, "secret_env": SECRET_ENV}]})
    with PortcullisProc(tmp_path, upstreams, rules=RULES, config=cfg, env=ENV) as p:
        yield p


def admin(p: PortcullisProc, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, f"{p.admin_url}{path}", json=body, timeout=10, trust_env=False,
                         headers={"Authorization": f"Bearer {TOKEN}"})


def mint(p: PortcullisProc, task: str, **labels: str) -> str:
    r = admin(p, "POST", "/credentials", {"task_id": task, "profile": "frontend", "labels": labels})
    assert r.status_code == 201, r.text
    return str(r.json()["password"])


def ask(p: PortcullisProc, port: int, task: str | None = None, secret: str | None = None) -> int:
    auth = ""
    if task is not None:
        auth = f"Proxy-Authorization: Basic {base64.b64encode(f'{task}:{secret}'.encode()).decode()}\r\n"
    host = f"approve.test:{port}"
    return p.raw(f"GET http://{host}/t HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode()).status


def test_a_task_grant_lasts_for_that_task_only_and_names_the_task(proxy, upstreams, hooks):
    port = upstreams.http_port
    a, b = mint(proxy, "task-a", repo="web", team="ui"), mint(proxy, "task-b")
    assert ask(proxy, port, "task-a", a) == 403  # approval_requested (hold: false)
    [hook] = hooks.wait(1)
    body = hook["body"]
    assert (body["task_id"], body["labels"]) == ("task-a", {"repo": "web", "team": "ui"})
    assert body["task_expires_at"].endswith("Z")
    requested = proxy.wait_event("approval.requested", approval_id=body["id"])
    assert requested["client"]["task_id"] == "task-a"
    assert requested["client"]["labels"] == {"repo": "web", "team": "ui"}
    listed = admin(proxy, "GET", f"/approvals/{body['id']}").json()
    assert (listed["task_id"], listed["labels"]) == ("task-a", {"repo": "web", "team": "ui"})

    r = decide(proxy, body["id"], "allow", scope="task")
    assert r.status_code == 200 and r.json()["scope"] == "task", r.text
    decided = proxy.wait_event("approval.decided", approval_id=body["id"])
    assert (decided["scope"], decided["by"], decided["client"]["task_id"]) == ("task", "admin", "task-a")
    for _ in range(3):  # the rest of the task: no new approval, every time
        assert ask(proxy, port, "task-a", a) == 200
    assert len(proxy.find("approval.requested")) == 1
    assert ask(proxy, port, "task-b", b) == 403  # another task asks for itself
    assert ask(proxy, port) == 403  # and so does an anonymous client
    assert len(proxy.find("approval.requested")) == 3
    allowed = proxy.decisions(**{"client.task_id": "task-a", "decision": "allow"})
    assert allowed and {e["reason"] for e in allowed} == {"approved"}


def test_scope_task_is_refused_for_an_approval_no_task_asked(proxy, upstreams, hooks):
    assert ask(proxy, upstreams.http_port) == 403
    [hook] = hooks.wait(1)
    r = decide(proxy, hook["body"]["id"], "allow", scope="task")
    assert r.status_code == 422 and r.json()["error"] == "not_a_task", r.text
    assert admin(proxy, "GET", f"/approvals/{hook['body']['id']}").json()["state"] == "pending"


def test_revoking_the_credential_takes_the_tasks_grants_with_it(proxy, upstreams, hooks):
    port = upstreams.http_port
    a = mint(proxy, "task-r")
    assert ask(proxy, port, "task-r", a) == 403
    [hook] = hooks.wait(1)
    assert decide(proxy, hook["body"]["id"], "allow", scope="task").status_code == 200
    assert ask(proxy, port, "task-r", a) == 200
    assert admin(proxy, "DELETE", "/credentials/task-r").status_code == 200
    assert ask(proxy, port, "task-r", a) == 407
    again = mint(proxy, "task-r")  # the same task id, minted anew: it starts with nothing granted
    assert ask(proxy, port, "task-r", again) == 403
    assert len(hooks.wait(2)) == 2
    assert proxy.find("approval.requested")[-1]["client"]["task_id"] == "task-r"
