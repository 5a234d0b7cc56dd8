"""Resolve-once and pinning, in process: rebinding, mixed answers, and the server_connect hook."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from pathlib import Path

import pytest
from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow

from addons.approvals.service import ApprovalService
from addons.config.load import load_config
from addons.pipeline.decide import Pipeline
from addons.pipeline.dns import PinStore, ResolveError, canonical_ip, resolve, system_lookup
from addons.pipeline.identity import ProxyAuth
from addons.pipeline.model import Incoming
from addons.policy.model import Layer
from addons.proxy.addon import Portcullis
from addons.proxy.approvals_bridge import ApprovalsBridge
from addons.proxy.reload import PolicyHolder
from addons.telemetry.events import Telemetry

PUBLIC_A, PUBLIC_B = "8.8.8.8", "1.1.1.1"


def make(tmp_path: Path, answers: list[list[str]]):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(
        json.dumps({"rules": [{"name": "ex", "action": "allow", "hosts": ["**.example.com"]}]})
    )
    (tmp_path / "c.yaml").write_text(json.dumps({"rules": ["rules/"], "default_action": "deny"}))
    loaded = load_config(tmp_path / "c.yaml")
    tel = Telemetry(loaded.config.telemetry, tmp_path, stream=io.StringIO())
    holder = PolicyHolder(loaded, tel)
    calls: list[str] = []

    async def lookup(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    pins = PinStore()
    pipeline = Pipeline(
        holder,
        auth=ProxyAuth(loaded.config, environ={}),
        approvals=ApprovalsBridge(ApprovalService(loaded.config.approvals, tmp_path, tel)),
        pins=pins,
        lookup=lookup,
        healthy=tel.healthy,
    )
    addon = Portcullis(pipeline, tel)
    return pipeline, addon, pins, calls


def req(client_id: str = "c1", host: str = "api.example.com") -> Incoming:
    return Incoming(
        Layer.HTTP,
        host,
        443,
        conn_id=client_id,
        flow_id="f",
        peer=("10.9.9.9", 1234),
        scheme="https",
        method="GET",
        path="/",
    )


async def test_a_name_whose_second_resolution_changes_stays_on_the_first_checked_address(tmp_path):
    pipeline, addon, pins, calls = make(tmp_path, [[PUBLIC_A], ["127.0.0.1"]])
    v1 = await pipeline.decide(req())
    assert v1.passes and v1.ip == PUBLIC_A
    # Same client connection: no second DNS query; the pinned, checked answer is reused.
    v2 = await pipeline.decide(req())
    assert v2.passes and v2.ip == PUBLIC_A and calls == ["api.example.com"]
    # The connect goes to the checked address, with SNI/verification on the name.
    client = tflow.tclient_conn()
    client.id = "c1"
    data = server_hooks.ServerConnectionHookData(
        server=connection.Server(address=("api.example.com", 443)), client=client
    )
    addon.server_connect(data)
    assert data.server.address == (PUBLIC_A, 443) and data.server.sni == "api.example.com"
    assert data.server.error is None
    addon.server_connected(data)
    assert data.server.address == ("api.example.com", 443)  # restored for connection reuse
    # A new client connection resolves again and sees the rebinding: refused.
    v3 = await pipeline.decide(req("c2"))
    assert not v3.passes and v3.reason == "private_address"
    assert pins.get("c2", "api.example.com", 443) is None


@pytest.mark.parametrize(
    "answers",
    [
        [PUBLIC_A, "10.0.0.5"],
        ["127.0.0.1", PUBLIC_A],
        [PUBLIC_B, "::ffff:169.254.169.254"],
        [PUBLIC_A, "fd00::1"],
        [PUBLIC_A, "100.64.1.1"],
    ],
)
async def test_any_private_answer_refuses_the_name(tmp_path, answers):
    pipeline, _, pins, _ = make(tmp_path, [answers])
    v = await pipeline.decide(req())
    assert not v.passes and v.status == 403 and v.reason == "private_address"
    assert len(pins) == 0


async def test_real_resolver_path_with_mixed_answers(tmp_path, monkeypatch):
    pipeline, _, _, _ = make(tmp_path, [[PUBLIC_A]])
    pipeline.lookup = system_lookup
    loop = asyncio.get_running_loop()

    async def fake_getaddrinfo(host, port, **kw):
        assert host == "api.example.com"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_A, port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    system_lookup.clear()  # the process-wide answer cache must not serve (or keep) this fake answer
    try:
        v = await pipeline.decide(req())
    finally:
        system_lookup.clear()
    assert not v.passes and v.reason == "private_address"


async def test_a_denied_name_is_never_resolved(tmp_path):
    pipeline, _, _, calls = make(tmp_path, [[PUBLIC_A]])
    v = await pipeline.decide(req(host="pastebin.test"))
    assert not v.passes and v.reason == "default" and calls == []


async def test_unresolvable_allowed_name_is_502_allow(tmp_path):
    pipeline, _, _, _ = make(tmp_path, [[PUBLIC_A]])

    async def nx(host: str, port: int) -> list[str]:
        raise ResolveError("cannot resolve api.example.com: NXDOMAIN")

    pipeline.lookup = nx
    v = await pipeline.decide(req())
    assert not v.passes and v.action == "allow" and v.status == 502


def test_server_connect_without_a_decision_is_refused(tmp_path):
    _, addon, _, _ = asyncio.run(_make_async(tmp_path))
    data = server_hooks.ServerConnectionHookData(
        server=connection.Server(address=("other.example.com", 443)), client=tflow.tclient_conn()
    )
    addon.server_connect(data)
    assert data.server.error and data.server.address == ("other.example.com", 443)


async def _make_async(tmp_path):
    return make(tmp_path, [[PUBLIC_A]])


@pytest.mark.parametrize(
    ("raw", "canon"),
    [("::ffff:8.8.8.8", "8.8.8.8"), ("fe80::1%eth0", "fe80::1"), ("2001:DB8::1", "2001:db8::1")],
)
def test_canonical_ip(raw, canon):
    assert canonical_ip(raw) == canon


async def test_resolve_prefers_literal_then_static():
    async def boom(host: str, port: int) -> list[str]:
        raise AssertionError("no DNS for literals or static answers")

    assert await resolve("8.8.8.8", 80, True, None, boom) == ("8.8.8.8",)
    assert await resolve("a.example.com", 80, False, ("1.1.1.1", "1.1.1.1"), boom) == ("1.1.1.1",)


@pytest.mark.parametrize(
    ("peer", "cidrs", "refused"),
    [
        ("8.8.8.8", [], True),
        ("2001:4860::8888", [], True),
        ("::ffff:8.8.8.8", [], True),
        ("8.8.8.8", ["8.8.8.0/24"], False),
        ("10.1.2.3", [], False),
        ("127.0.0.1", [], False),
        ("172.17.0.2", [], False),
        ("fd00::5", [], False),
    ],
)
def test_clients_on_public_addresses_are_refused_unless_configured(tmp_path, peer, cidrs, refused):
    import ipaddress

    _, addon, _, _ = asyncio.run(_make_async(tmp_path))
    addon.client_cidrs = tuple(ipaddress.ip_network(c) for c in cidrs)
    client = tflow.tclient_conn()
    client.peername = (peer, 40000)
    client.error = None
    addon.client_connected(client)
    assert bool(client.error) is refused


def test_an_error_while_pinning_refuses_the_connection(tmp_path):
    _, addon, _, _ = asyncio.run(_make_async(tmp_path))

    class Broken:
        def get(self, *a):
            raise RuntimeError("boom")

    addon.pinner.pins = Broken()
    data = server_hooks.ServerConnectionHookData(
        server=connection.Server(address=("api.example.com", 443)), client=tflow.tclient_conn()
    )
    addon.server_connect(data)
    assert data.server.error and data.server.address == ("api.example.com", 443)


async def test_an_error_outside_the_decision_kills_the_flow(tmp_path):
    _, addon, _, _ = make(tmp_path, [[PUBLIC_A]])

    def boom(*a, **k):
        raise RuntimeError("boom")

    addon.pipeline.decide = boom
    f = tflow.tflow()
    await addon.requestheaders(f)
    assert f.error is not None and f.error.msg  # killed: never forwarded undecided
    c = tflow.tflow()
    c.request.method = "CONNECT"
    await addon.http_connect(c)
    assert c.error is not None
