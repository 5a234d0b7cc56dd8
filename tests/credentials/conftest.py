"""Fixtures for the credentials tests: a real redis-server on a free loopback port, a clock, and a real
loopback admin server (the credentials API over a CredentialService on SQLite)."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from addons.approvals.auth import Principals
from addons.config.models import ApproverConfig, CredentialsConfig
from addons.credentials import api
from addons.credentials.service import CredentialService
from addons.credentials.stores import SqliteCredentialStore
from addons.telemetry.events import Telemetry


class Clock:
    """The services' injected clock: time moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port (skips the test when it is not installed)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server missing: apt-get install -y redis-server (./dev test installs it)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    try:
        for _ in range(400):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {proc.returncode}") from None
                time.sleep(0.025)
        else:
            raise RuntimeError("redis-server did not answer in 10 s")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's redis-server, emptied for this test."""
    import redis

    with redis.Redis.from_url(redis_server) as r:
        r.flushall()
    return redis_server


TOKEN = "cred-api-admin-token-0123456789"
ALICE = "alice-approver-token-0123456789"
BOSS = "boss-admin-token-0123456789"
PROXY_URL = "http://portcullis.internal:3128"


@dataclass
class Admin:
    url: str
    client: httpx.AsyncClient
    svc: CredentialService
    stream: io.StringIO


@pytest.fixture
async def admin(tmp_path: Path, clock: Clock) -> AsyncIterator[Admin]:
    stream = io.StringIO()
    svc = CredentialService(
        CredentialsConfig(default_ttl=3600, max_ttl=86400),
        lambda: SqliteCredentialStore(tmp_path / "state" / "approvals.db"),
        Telemetry(stream=stream),
        profiles=lambda: frozenset({"frontend"}),
        reserved_users=frozenset({"ci-user"}),
        clock=clock,
        sweep_interval=3600,
    )
    await svc.start()
    approvers = [
        ApproverConfig(name="alice", token_env="ALICE_T"),
        ApproverConfig(name="boss", token_env="BOSS_T", role="admin"),
    ]
    app = web.Application()
    api.add_routes(app, svc, Principals(TOKEN, approvers, {"ALICE_T": ALICE, "BOSS_T": BOSS}), PROXY_URL)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False
    ) as client:
        yield Admin(base, client, svc, stream)
    await runner.cleanup()
    await svc.stop()
