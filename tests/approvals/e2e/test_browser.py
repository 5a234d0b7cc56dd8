"""The approval page in a real headless Chromium: log in, see the held request, click Allow, released."""

from __future__ import annotations

import asyncio
import os

import pytest

from addons.config.models import ApproverConfig
from addons.policy.model import Reason
from tests.approvals.approvals_support import TOKEN, alive, request, wait_until

CHROMIUM = "/usr/lib/chromium/chromium"
APPROVER_TOKEN = "browser-user-token-0123456789"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"Chromium missing at {CHROMIUM}: apt-get install -y chromium "
                              "(./dev test installs it)"),
]


@pytest.fixture
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        await b.close()


async def test_clicking_allow_releases_the_held_request(make_service, admin_server, browser, tmp_path):
    svc = await make_service(timeout=60)
    approver = ApproverConfig(name="browser-user", token_env="BROWSER_USER_TOKEN")
    admin = await admin_server(svc, approvers=[approver], environ={"BROWSER_USER_TOKEN": APPROVER_TOKEN})
    held = asyncio.create_task(svc.resolve(
        request(host="held.example", method="POST", path="/upload", client_name="ci-agents"), alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    approval = (await svc.store.pending())[0]

    page = await browser.new_page()
    await page.goto(admin.url + "/")
    await page.fill("input[name=token]", APPROVER_TOKEN)
    await page.click("button[type=submit]")
    row = page.locator(f"tr[data-id='{approval.id}']")
    await row.wait_for()
    text = await row.inner_text()
    assert "held.example:443/upload" in text and "ci-agents" in text and "10.0.0.5" in text
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert cookies["portcullis_session"]["httpOnly"] and cookies["portcullis_session"]["sameSite"] == "Strict"
    assert await page.evaluate("document.cookie") == ""  # invisible to scripts

    assert await page.locator("#approver").inner_text() == "browser-user"  # the login names the approver
    assert await row.locator("input[name=by]").count() == 0  # nobody types a name to be recorded
    await row.locator("input[name=reason]").fill("needed for the upload")
    await row.locator("button[value='allow:once']").click()
    await page.locator("p.msg").wait_for()
    assert "Allowed (once)" in await page.locator("p.msg").inner_text()
    out = await asyncio.wait_for(held, 10)
    assert (out.allowed, out.reason, out.approval_id) == (True, Reason.APPROVED, approval.id)
    decided = await svc.store.get(approval.id)
    # `by` is the logged-in principal, never a form field.
    assert (decided.decided_by, decided.reason) == ("browser-user", "needed for the upload")
    assert "Nothing is waiting" in await page.locator("#pending").inner_text()
    await page.screenshot(path=str(tmp_path / "approved.png"))


@pytest.mark.e2e
async def test_through_the_real_proxy_clicking_allow_releases_the_held_curl(browser, tmp_path, upstreams):
    """The whole loop: curl held by `portcullis run`, a person logs in to the page and clicks Allow."""
    from tests.harness import PortcullisProc, base_config

    cfg = base_config(upstreams, tmp_path, default_action="approval", approvals={"timeout": "30s"})
    p = PortcullisProc(tmp_path, upstreams, rules=[], config=cfg, env={"PORTCULLIS_TEST_ADMIN_TOKEN": TOKEN})
    await asyncio.to_thread(p.start)
    try:
        held = asyncio.create_task(asyncio.to_thread(p.curl, f"http://approve.test:{upstreams.http_port}/page"))
        ev = await asyncio.to_thread(p.wait_event, "approval.requested")
        page = await browser.new_page()
        await page.goto(p.admin_url + "/")
        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
        row = page.locator(f"tr[data-id='{ev['approval_id']}']")
        await row.wait_for()
        assert "approve.test" in await row.inner_text()
        await row.locator("button[value='allow:once']").click()
        await page.locator("p.msg").wait_for()
        res = await asyncio.wait_for(held, 20)
        assert res.status == 200 and res.json()["path"] == "/page"
    finally:
        await asyncio.to_thread(p.stop)
