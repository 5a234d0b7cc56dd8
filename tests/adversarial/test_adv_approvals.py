"""Approval races and forgeries against the real admin API: decide twice (also concurrently), after
expiry, an unknown id, forged / query-string / cookie tokens, decisions by GET or other methods, and
grants that must not widen (another port, another decision). `hold: false`, so a request answers at
once with its approval id and a retry shows what the decision let through.

Oracles: the status the API answers, the approval's state read back, exactly one approval.decided
event per approval, and what reached the upstream on the retry (at most what the decision allows).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.adversarial.adv import Adv, adv_config, case, proxy_fixture

pytestmark = pytest.mark.e2e

TOKEN = "adv-admin-token-0123456789abcdef"
EXPIRY_S = 2


def _config(u, folder):
    cfg = adv_config(u, folder)
    cfg["approvals"] = {**cfg["approvals"], "hold": False, "timeout": f"{EXPIRY_S}s"}
    return cfg


proxy = proxy_fixture(
    "approvals",
    [{"name": "ask", "action": "approval", "hosts": ["approve.test"]}],
    _config,
    env={"PORTCULLIS_TEST_ADMIN_TOKEN": TOKEN},
)


def client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10)


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


_port_seq = iter(range(1, 10_000))


def _req(port: int, path: str) -> bytes:
    return f"GET http://approve.test:{port}{path} HTTP/1.1\r\nHost: approve.test:{port}\r\n\r\n".encode()


def new_approval(adv: Adv, port: int | None = None) -> tuple[str, int]:
    """A fresh pending approval (a new destination port each time, so approvals never coalesce)."""
    port = port or 20_000 + next(_port_seq)
    out = adv.send(_req(port, "/ask"))
    assert out.reply is not None, out.summary()
    assert out.reply.headers["x-portcullis-reason"] == "approval_pending", out.summary()
    approval_id = out.reply.json()["approval_id"]
    assert approval_id
    return str(approval_id), port


def retry(adv: Adv, port: int) -> tuple[int | None, str | None]:
    out = adv.send(_req(port, "/retry"))
    assert out.reply is not None
    return out.reply.status, out.reply.headers.get("x-portcullis-reason")


def state(adv: Adv, approval_id: str) -> dict[str, Any]:
    with client() as c:
        r = c.get(f"{adv.p.admin_url}/approvals/{approval_id}", headers=auth())
    assert r.status_code == 200, r.text
    return dict(r.json())


def decided_events(adv: Adv, approval_id: str) -> list[dict[str, Any]]:
    return [e for e in adv.p.find("approval.decided") if e.get("approval_id") == approval_id]


def post(adv: Adv, approval_id: str, body: Any, headers: dict[str, str] | None = None,
         **kw: Any) -> httpx.Response:
    with client() as c:
        return c.post(f"{adv.p.admin_url}/approvals/{approval_id}", json=body,
                      headers=auth() if headers is None else headers, **kw)


def test_concurrent_decisions_one_wins(proxy):
    approval_id, port = new_approval(proxy)
    bodies = [{"decision": "allow" if i % 2 else "deny", "by": f"racer-{i}"} for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda b: post(proxy, approval_id, b), bodies))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [409] * 11, codes
    winner = next(r.json() for r in answers if r.status_code == 200)
    for r in answers:
        if r.status_code == 409:  # every loser is told the standing decision
            assert r.json()["approval"]["decision"] == winner["decision"]
    st = state(proxy, approval_id)
    assert (st["state"], st["decision"], st["by"]) == (winner["state"], winner["decision"], winner["by"])
    assert st["state"] in ("allowed", "denied")
    proxy.p.wait_event("approval.decided", approval_id=approval_id)
    assert len(decided_events(proxy, approval_id)) == 1
    m = proxy.mark()
    status, reason = retry(proxy, port)
    if winner["decision"] == "allow":
        assert status == 502  # allowed (nothing listens on that port): the grant was used, once
    else:
        assert (status, reason) == (403, "approval_denied")
    w = proxy.window(m)
    assert len(w.decisions) == 1


def test_a_second_decision_is_409_and_changes_nothing(proxy):
    approval_id, port = new_approval(proxy)
    assert post(proxy, approval_id, {"decision": "deny", "reason": "first"}).status_code == 200
    r = post(proxy, approval_id, {"decision": "allow", "scope": "session", "reason": "second"})
    assert r.status_code == 409 and r.json()["approval"]["decision"] == "deny"
    # `by` is the authenticated approver (the admin token's principal), never what the body says.
    first = state(proxy, approval_id)
    got = (first["decision"], first["scope"], first["by"], first["reason"])
    assert got == ("deny", "once", "admin", "first")
    assert retry(proxy, port) == (403, "approval_denied")


def test_a_decision_after_expiry_is_410_and_grants_nothing(proxy):
    approval_id, port = new_approval(proxy)
    time.sleep(EXPIRY_S + 0.5)
    r = post(proxy, approval_id, {"decision": "allow", "scope": "session"})
    assert r.status_code == 410, r.text
    st = state(proxy, approval_id)
    assert st["decision"] is None and st["state"] not in ("allowed", "denied")
    status, reason = retry(proxy, port)
    assert (status, reason) == (403, "approval_pending")  # a new approval, not a grant


def test_a_once_grant_is_used_once(proxy):
    approval_id, port = new_approval(proxy)
    assert post(proxy, approval_id, {"decision": "allow"}).status_code == 200
    assert retry(proxy, port)[0] == 502  # allowed; nothing listens there
    assert retry(proxy, port) == (403, "approval_pending")


def test_a_session_grant_does_not_cover_another_port(proxy):
    approval_id, port = new_approval(proxy)
    assert post(proxy, approval_id, {"decision": "allow", "scope": "session"}).status_code == 200
    assert retry(proxy, port)[0] == 502
    assert retry(proxy, port)[0] == 502  # session: again
    assert retry(proxy, port + 1) == (403, "approval_pending")


UNKNOWN = [
    case("random", "0123456789abcdef"),
    case("traversal", "..%2F..%2Fapprovals"),
    case("sql", "1' OR '1'='1"),
    case("long", "a" * 5000),
    case("unicode", "\u0430pproval"),
]


@pytest.mark.parametrize("approval_id", UNKNOWN)
def test_unknown_ids_are_404(proxy, approval_id):
    r = post(proxy, approval_id, {"decision": "allow"})
    assert r.status_code == 404, (r.status_code, r.text[:200])


FORGED = [
    case("no-header", {}),
    case("wrong-token", auth("wrong-token-0123456789abcdef0000")),
    case("token-prefix", auth(TOKEN[:-1])),
    case("token-suffix", auth(TOKEN + "x")),
    case("basic-scheme", {"Authorization": f"Basic {TOKEN}"}),
    case("token-scheme", {"Authorization": f"Token {TOKEN}"}),
    case("no-scheme", {"Authorization": TOKEN}),
    case("x-header", {"X-Admin-Token": TOKEN}),
    case("cookie", {"Cookie": f"portcullis_session={TOKEN}"}),
    case("bare-bearer", {"Authorization": "Bearer"}),
]


@pytest.mark.parametrize("headers", FORGED)
def test_forged_tokens_decide_nothing(proxy, headers):
    approval_id, port = new_approval(proxy)
    r = post(proxy, approval_id, {"decision": "allow", "scope": "session"}, headers=headers)
    assert r.status_code == 401, (r.status_code, r.text[:200])
    assert state(proxy, approval_id)["state"] == "pending"
    assert retry(proxy, port) == (403, "approval_pending")
    assert decided_events(proxy, approval_id) == []


def test_a_token_in_the_query_string_decides_nothing(proxy):
    approval_id, port = new_approval(proxy)
    r = post(proxy, approval_id, {"decision": "allow"}, headers={}, params={"token": TOKEN,
                                                                           "access_token": TOKEN})
    assert r.status_code == 401
    assert state(proxy, approval_id)["state"] == "pending"


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_decisions_by_other_methods_decide_nothing(proxy, method):
    approval_id, port = new_approval(proxy)
    with client() as c:
        r = c.request(method, f"{proxy.p.admin_url}/approvals/{approval_id}",
                      params={"decision": "allow", "scope": "session"}, headers=auth())
    assert r.status_code in (200, 405), r.status_code  # GET reads, the others are not routes
    assert state(proxy, approval_id)["state"] == "pending"
    assert retry(proxy, port) == (403, "approval_pending")


def test_decide_by_get_on_a_decision_looking_path(proxy):
    approval_id, _ = new_approval(proxy)
    with client() as c:
        for path in (f"/approvals/{approval_id}/allow", f"/approvals/{approval_id}?decision=allow",
                     f"/ui/approvals/{approval_id}?decision=allow"):
            r = c.get(proxy.p.admin_url + path, headers=auth())
            assert r.status_code in (200, 404, 405), (path, r.status_code)
    assert state(proxy, approval_id)["state"] == "pending"


def test_the_approval_page_refuses_a_decision_without_a_session(proxy):
    approval_id, port = new_approval(proxy)
    with client() as c:
        r = c.post(f"{proxy.p.admin_url}/ui/approvals/{approval_id}",
                   data={"decision": "allow", "scope": "session", "csrf": "x"}, headers=auth())
    assert r.status_code in (401, 403), r.status_code
    assert state(proxy, approval_id)["state"] == "pending"
    assert retry(proxy, port) == (403, "approval_pending")


BODIES = [
    case("uppercase-decision", {"decision": "ALLOW"}),
    case("unknown-scope", {"decision": "allow", "scope": "forever"}),
    case("bool-decision", {"decision": True}),
    case("list-body", [{"decision": "allow"}]),
    case("extra-key", {"decision": "allow", "host": "blocked.test"}),
    case("null-decision", {"decision": None}),
    case("nested", {"decision": {"decision": "allow"}}),
]


@pytest.mark.parametrize("body", BODIES)
def test_bad_bodies_are_422_and_decide_nothing(proxy, body):
    approval_id, port = new_approval(proxy)
    r = post(proxy, approval_id, body)
    assert r.status_code == 422, (r.status_code, r.text[:200])
    assert state(proxy, approval_id)["state"] == "pending"
    assert retry(proxy, port) == (403, "approval_pending")
