"""The admin server base in process: health, readiness, metrics, bearer token helper, route adders."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from addons.admin.server import AdminConfigError, AdminServer, check_token_policy, require_token
from addons.telemetry.metrics import Metrics


def adder(app: web.Application) -> None:
    async def secret(request: web.Request) -> web.Response:
        require_token(request)
        return web.json_response({"ok": True})

    app.router.add_get("/secret", secret)


async def serve(token: str | None, ready: bool):
    srv = AdminServer("127.0.0.1", 0, token, Metrics().render, lambda: ready, [adder])
    host, port = await srv.start()
    return srv, f"http://{host}:{port}"


async def test_health_ready_metrics_and_token():
    srv, base = await serve("tok", ready=False)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/healthz") as r:
                assert r.status == 200
            async with s.get(base + "/readyz") as r:
                assert r.status == 503
            async with s.get(base + "/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                assert "portcullis_rules_loaded" in await r.text()
            async with s.get(base + "/secret") as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
            async with s.get(base + "/secret", headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == 401
            async with s.get(base + "/secret", headers={"Authorization": "Bearer tok"}) as r:
                assert r.status == 200
    finally:
        await srv.stop()


async def test_ready_and_no_token_on_loopback():
    """Without a token the server still starts on loopback (health, readiness, metrics), but a
    token-protected route refuses everyone."""
    srv, base = await serve(None, ready=True)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/readyz") as r:
                assert r.status == 200
            async with s.get(base + "/secret") as r:
                assert r.status == 401
            async with s.get(base + "/secret", headers={"Authorization": "Bearer "}) as r:
                assert r.status == 401
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    ("host", "token", "ok"),
    [
        ("127.0.0.1", None, True),
        ("::1", None, True),
        ("localhost", None, True),
        ("0.0.0.0", None, False),
        ("10.0.0.5", "", False),
        ("0.0.0.0", "t", True),
    ],
)
def test_token_policy(host, token, ok):
    if ok:
        check_token_policy(host, token, "ENV")
    else:
        with pytest.raises(AdminConfigError, match="ENV"):
            check_token_policy(host, token, "ENV")
