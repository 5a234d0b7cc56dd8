"""Fixtures for the approvals tests: telemetry capture, a real signature-checking webhook receiver,
a real ApprovalService on a real SQLite file, and a real loopback admin server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from addons.approvals import api
from addons.approvals.auth import Principals
from addons.approvals.service import ApprovalService
from addons.approvals.webhook import VerifyError, verify
from addons.config.models import ApprovalsConfig, WebhookConfig
from tests.approvals.approvals_support import SECRET, SECRET_ENV, TOKEN, Events
from tests.harness import upstreams  # noqa: F401 (session fixture for the e2e tests)


@pytest.fixture
def events() -> Events:
    return Events()


@dataclass
class Receiver:
    """A real aiohttp webhook receiver on loopback that verifies every signature it gets."""

    url: str = ""
    replies: list[int] = field(default_factory=list)  # statuses to answer in order; then 200
    redirect_to: str | None = None
    got: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            verify(SECRET, dict(request.headers), body)
            ok = True
        except VerifyError:
            ok = False
        self.got.append({"headers": dict(request.headers), "body": json.loads(body), "verified": ok,
                         "path": request.path})
        self.arrived.set()
        if request.path == "/moved":
            return web.Response(status=200)
        if self.redirect_to:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        status = self.replies.pop(0) if self.replies else 200
        return web.Response(status=status, text="ok")

    def deliveries(self, path: str = "/hook") -> list[dict[str, Any]]:
        return [g for g in self.got if g["path"] == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    app.router.add_post("/moved", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    rec.redirect_to = None
    yield rec
    await runner.cleanup()


@pytest.fixture
def secret_env() -> Iterator[None]:
    os.environ[SECRET_ENV] = SECRET
    yield
    os.environ.pop(SECRET_ENV, None)


ServiceFactory = Callable[..., Any]


@pytest.fixture
async def make_service(tmp_path: Path, events: Events, secret_env: None) -> AsyncIterator[ServiceFactory]:
    """`await make_service(timeout=..., hold=..., webhooks=[url])` -> a started service (stopped after)."""
    started: list[ApprovalService] = []

    async def factory(*, webhooks: list[str] | None = None, poll: float = 0.05,
                      **cfg: Any) -> ApprovalService:
        cfg.setdefault("store", "sqlite:///state/approvals.db")
        cfg.setdefault("persist_to", "rules/approved.yaml")
        config = ApprovalsConfig(
            **cfg, webhooks=[WebhookConfig(url=u, secret_env=SECRET_ENV) for u in webhooks or []])
        svc = ApprovalService(config, tmp_path, events.telemetry, webhook_backoff=0.05)
        svc.poll_interval = poll
        await svc.start()
        started.append(svc)
        return svc

    yield factory
    for svc in started:
        await svc.stop()


@dataclass
class Admin:
    url: str
    service: ApprovalService


@pytest.fixture
async def admin_server() -> AsyncIterator[Callable[..., Any]]:
    """`await admin_server(service, token=TOKEN)` -> a real loopback aiohttp admin server."""
    runners: list[web.AppRunner] = []

    async def start(service: ApprovalService, token: str | None = TOKEN, approvers: list[Any] | None = None,
                    environ: dict[str, str] | None = None) -> Admin:
        app = web.Application()
        api.add_routes(app, service, Principals(token, approvers or [], environ), service.links)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return Admin(f"http://127.0.0.1:{runner.addresses[0][1]}", service)

    yield start
    for r in runners:
        await r.cleanup()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port (skips the test when it is not installed)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server missing: apt-get install -y redis-server (./dev test installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.025)
    else:
        proc.kill()
        raise RuntimeError("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    client.close()
    proc.terminate()
    proc.wait(10)
