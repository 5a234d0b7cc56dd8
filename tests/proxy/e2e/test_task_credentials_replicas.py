"""Task credentials across replicas: two `portcullis run` processes sharing one real redis-server.
A credential minted through one replica works on the other, and a revocation through one is refused
by the other on its very next request (the Redis bus carries it; the other replica's cached copy is
dropped at once, not after its cache's life)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PortcullisProc, base_config
from tests.proxy.e2e.test_task_credentials import ENV, PROFILES, RULES, admin, get, mint
from tests.redis_support import RedisServer, needs_redis

pytestmark = [pytest.mark.e2e, needs_redis]


@pytest.fixture
def replicas(tmp_path: Path, upstreams) -> Iterator[tuple[PortcullisProc, PortcullisProc]]:
    with RedisServer(tmp_path / "redis") as redis:
        procs = []
        try:
            for name in ("a", "b"):
                folder = tmp_path / name
                folder.mkdir()
                cfg = base_config(
                    upstreams,
                    folder,
                    profiles=PROFILES,
                    approvals={"timeout": "30s", "store": redis.url, "persist_to": None},
                )
                procs.append(PortcullisProc(folder, upstreams, rules=RULES, config=cfg, env=ENV).__enter__())
            yield procs[0], procs[1]
        finally:
            for p in reversed(procs):
                p.__exit__(None, None, None)


def test_a_revocation_on_one_replica_is_refused_by_the_other_on_its_next_request(replicas, upstreams):
    a, b = replicas
    m = mint(a, "fleet-1", "frontend")
    for _ in range(3):  # B has read the credential from Redis and now answers from its cache
        assert get(b, "api.public.test", upstreams.http_port, "fleet-1", m["password"])[0] == 200
    assert get(b, "www.public.test", upstreams.http_port, "fleet-1", m["password"])[0] == 403  # its profile
    status, doc = admin(a, "DELETE", "/credentials/fleet-1")
    assert status == 200 and doc["state"] == "revoked"
    status, body = get(b, "api.public.test", upstreams.http_port, "fleet-1", m["password"])
    assert status == 407 and "revoked" in body["message"], body
    assert admin(b, "DELETE", "/credentials/fleet-1")[0] == 404  # one credential, one store
    refused = b.wait_event("egress.decision", reason="proxy_auth")  # one event for the refusal, on B
    assert refused["status"] == 407 and "revoked" in refused["detail"], refused
    # The credential listing is the store's, whichever replica is asked.
    status, listing = admin(b, "GET", "/credentials")
    assert status == 200 and [c["state"] for c in listing["credentials"] if c["task_id"] == "fleet-1"] == [
        "revoked"
    ]


def test_a_credential_minted_on_one_replica_is_refused_everywhere_after_it_expires(replicas, upstreams):
    a, b = replicas
    m = mint(b, "fleet-2", "release", ttl="2s")
    for p in (a, b):  # both replicas hold it in their caches
        assert get(p, "www.public.test", upstreams.http_port, "fleet-2", m["password"])[0] == 200
    time.sleep(2.5)  # past the credential's life (bounded; the assertion is the refusal, not a timing)
    for p in (a, b):
        status, body = get(p, "www.public.test", upstreams.http_port, "fleet-2", m["password"])
        assert status == 407 and "expired" in body["message"], body
