"""addons/approvals/page.py over HTTP: login cookie flags, CSRF, no side-effecting GET, security headers."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from addons.approvals.model import Approval, Choice, Scope, State
from addons.policy.model import Reason
from tests.approvals.approvals_support import TOKEN, alive, request, wait_until


def hidden(html: str, name: str = "csrf") -> str:
    m = re.search(rf"name='{name}' value='([^']+)'", html)
    assert m, html
    return m.group(1)


async def login(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    page = await client.get("/")
    return await client.post("/login", data={"token": token, "csrf": hidden(page.text)})


@pytest.fixture
async def page_setup(make_service, admin_server):
    svc = await make_service(timeout=30)
    admin = await admin_server(svc)
    async with httpx.AsyncClient(base_url=admin.url, trust_env=False) as client:
        yield svc, client


async def test_login_sets_an_httponly_samesite_strict_cookie(page_setup):
    _, client = page_setup
    first = await client.get("/")
    assert first.status_code == 200 and "name='token'" in first.text and "Pending" not in first.text
    assert first.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in first.headers["Content-Security-Policy"]
    assert first.headers["Cache-Control"] == "no-store"
    r = await login(client)
    assert r.status_code == 303
    cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith("portcullis_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie  # the cookie carries a MAC'd session, never the admin token itself
    listing = await client.get("/")
    assert "<h2>Pending</h2>" in listing.text


async def test_wrong_token_and_missing_login_csrf_are_refused(page_setup):
    _, client = page_setup
    assert (await login(client, token="wrong")).status_code == 401
    client.cookies.clear()
    r = await client.post("/login", data={"token": TOKEN, "csrf": "forged"})
    assert r.status_code == 403 and "portcullis_session" not in r.headers.get("set-cookie", "")


async def test_forged_session_cookie_is_not_a_login(page_setup):
    _, client = page_setup
    client.cookies.set("portcullis_session", "9999999999.abcd.0000")
    assert "name='token'" in (await client.get("/")).text


async def test_decide_needs_the_csrf_token_and_same_origin(page_setup):
    svc, client = page_setup
    held = asyncio.create_task(svc.resolve(request(host="page.example"), alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    a = (await svc.store.pending())[0]
    await login(client)
    page = await client.get("/")
    assert "page.example" in page.text and a.id in page.text
    csrf = hidden(page.text)
    url = f"/ui/approvals/{a.id}"
    assert (await client.post(url, data={"action": "allow:once"})).status_code == 403
    assert (await client.post(url, data={"action": "allow:once", "csrf": "0" * 64})).status_code == 403
    cross = await client.post(url, data={"action": "allow:once", "csrf": csrf},
                              headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    assert (await client.get(url)).status_code == 405  # no side-effecting GET
    assert (await svc.store.get(a.id)).state is State.PENDING and not held.done()
    ok = await client.post(url, data={"action": "allow:session", "csrf": csrf, "by": "pat", "reason": "r"},
                           headers={"Origin": str(client.base_url).rstrip("/")})
    assert ok.status_code == 200 and "Allowed (session)" in ok.text
    out = await held
    assert (out.allowed, out.reason, out.approval_id) == (True, Reason.APPROVED, a.id)
    stored = await svc.store.get(a.id)
    assert (stored.decision, stored.scope, stored.decided_by, stored.reason) == (Choice.ALLOW, Scope.SESSION,
                                                                                 "admin", "r")
    again = await client.post(url, data={"action": "deny:once", "csrf": csrf})
    assert again.status_code == 409 and "already decided" in again.text


async def test_decide_without_login_is_refused(page_setup):
    svc, client = page_setup
    pend = asyncio.create_task(svc.resolve(request(), alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    r = await client.post(f"/ui/approvals/{(await svc.store.pending())[0].id}", data={"action": "allow:once"})
    assert r.status_code == 401
    assert await svc.store.pending()
    pend.cancel()


async def test_page_escapes_what_the_agent_controls(page_setup):
    svc, client = page_setup
    evil = request(host="x.example", path="/<script>alert(1)</script>")
    held = asyncio.create_task(svc.resolve(evil, alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    await login(client)
    text = (await client.get("/")).text
    assert "<script>" not in text and "&lt;script&gt;" in text
    held.cancel()


async def test_page_without_a_token_configured_says_how_to_set_it(make_service, admin_server):
    svc = await make_service()
    admin = await admin_server(svc, token=None)
    async with httpx.AsyncClient(base_url=admin.url, trust_env=False) as client:
        r = await client.get("/")
        assert r.status_code == 401 and "PORTCULLIS_ADMIN_TOKEN" in r.text
        assert (await client.post("/login", data={"token": "", "csrf": ""})).status_code in (401, 403)


async def test_repeated_wrong_tokens_are_throttled(page_setup):
    _, client = page_setup
    for _ in range(10):
        assert (await login(client, token="guess")).status_code == 401
    assert (await login(client, token="guess")).status_code == 429
    assert (await login(client)).status_code == 429  # even the right token waits out the window


@pytest.mark.parametrize(
    ("method", "scheme", "port", "path", "shown"),
    [
        ("GET", "http", 80, "/some/path", "GET http://x.example:80/some/path"),
        ("CONNECT", None, 443, None, "CONNECT x.example:443"),
        (None, None, 22, None, "x.example:22"),
    ],
    ids=["http", "tunnel", "bare"],
)
def test_destination_column(method: str | None, scheme: str | None, port: int, path: str | None,
                            shown: str) -> None:
    from addons.approvals.page import _dest

    a = Approval(id="a1", client_key="c", client_address=None, client_name=None, host="x.example", port=port,
                 scheme=scheme, method=method, path=path, rule=None, created_at=0.0, expires_at=1.0)
    assert _dest(a) == shown


async def test_every_button_decides_what_it_says_and_unknown_actions_are_refused(make_service, admin_server):
    svc = await make_service(hold=False, timeout=30)
    admin = await admin_server(svc)
    async with httpx.AsyncClient(base_url=admin.url, trust_env=False) as client:
        await login(client)
        pend = await svc.resolve(request(host="b0.example"), alive)
        page = await client.get("/")
        values = re.findall(r"name='action' value='([^']+)'", page.text)
        assert values == ["allow:once", "allow:session", "allow:always", "deny:once", "deny:session",
                          "deny:always"]
        csrf = hidden(page.text)
        for bad in ("allow", "allow:forever", "maybe:once", ""):
            r = await client.post(f"/ui/approvals/{pend.approval_id}", data={"action": bad, "csrf": csrf})
            assert r.status_code == 422 and "Unknown action" in r.text
        assert (await svc.store.get(pend.approval_id)).state is State.PENDING
        for i, value in enumerate(values):
            out = await svc.resolve(request(host=f"b{i + 1}.example"), alive)
            r = await client.post(f"/ui/approvals/{out.approval_id}", data={"action": value, "csrf": csrf})
            assert r.status_code == 200, r.text
            decision, scope = value.split(":")
            stored = await svc.store.get(out.approval_id)
            assert (stored.decision, stored.scope) == (Choice(decision), Scope(scope))
            verb = "Allowed" if decision == "allow" else "Denied"
            assert f"{verb} ({scope}): b{i + 1}.example:443" in r.text
        recent = (await client.get("/")).text.split("<h2>Recent</h2>", 1)[1]
        assert "<td>denied</td><td>always</td>" in recent and "<td>allowed</td><td>session</td>" in recent


async def test_the_page_names_the_credential_whose_first_use_is_asked(page_setup):
    import dataclasses

    svc, client = page_setup
    task = asyncio.create_task(svc.resolve(dataclasses.replace(request(method="GET", path="/repos/x"),
                                                               credential="gh"), alive))

    async def held() -> bool:
        return bool(await svc.store.pending())

    await wait_until(held)
    await login(client)
    listing = await client.get("/")
    assert "GET https://unknown.example:443/repos/x using credential gh" in listing.text
    task.cancel()
