"""The aiohttp admin server on mitmproxy's loop: /healthz, /readyz, /metrics, and routes other parts add."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

TOKEN_KEY: web.AppKey[str | None] = web.AppKey("portcullis.token", str)
RouteAdder = Callable[[web.Application], None]


class AdminConfigError(Exception):
    """The admin listener would be unsafe (non-loopback without a token)."""


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token_policy(host: str, token: str | None, token_env: str) -> None:
    """Refuse a non-loopback admin listener without a bearer token (it can approve egress)."""
    if not token and not is_loopback_host(host):
        raise AdminConfigError(
            f"admin listens on {host}, which is not loopback, and ${token_env} is empty: "
            f"set a token in {token_env} or listen on 127.0.0.1"
        )


def token_ok(request: web.Request) -> bool:
    """Constant-time bearer check. No token configured means nobody passes (as for the approvals API):
    an admin route must never be open just because the operator forgot to set the variable."""
    token = request.app.get(TOKEN_KEY)
    if not token:
        return False
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def require_token(request: web.Request) -> None:
    """For route handlers: raise 401 unless the request carries the admin bearer token."""
    if not token_ok(request):
        raise web.HTTPUnauthorized(
            text='{"error": "unauthorized", "message": "a valid bearer token is required"}',
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="portcullis-admin"'},
        )


class AdminServer:
    """Owns the aiohttp app and its listener. `ready()` says whether the proxy can serve."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None,
        render_metrics: Callable[[], bytes],
        ready: Callable[[], bool],
        route_adders: list[RouteAdder] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.app = web.Application()
        self.app[TOKEN_KEY] = token
        self._render = render_metrics
        self._ready = ready
        self.app.add_routes(
            [
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/metrics", self._metrics),
            ]
        )
        for add in route_adders or []:
            add(self.app)
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server: Any = site._server  # aiohttp exposes the bound port only through the server sockets
        sock = server.sockets[0]
        addr = sock.getsockname()
        self.address = (str(addr[0]), int(addr[1]))
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self._ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = self._render()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp
