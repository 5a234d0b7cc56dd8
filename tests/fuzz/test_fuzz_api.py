"""Fuzzing the admin approvals API (addons/approvals/api.py) on a real loopback aiohttp server with a
real ApprovalService on SQLite: any body, header or id is answered with a contract status, never a
500, and only a body that is a valid decision (judged here independently) decides anything."""

from __future__ import annotations

import asyncio
import io
import json
import string
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiohttp import web
from fuzz_support import bounded
from hypothesis import assume, given
from hypothesis import strategies as st

from addons.approvals import api
from addons.approvals.auth import Principals
from addons.approvals.service import ApprovalService
from addons.config.models import ApprovalsConfig
from addons.pipeline.model import Outcome
from addons.policy.model import Action, Client, Layer, Reason, Request
from addons.telemetry.events import Telemetry

TOKEN = "fuzz-admin-token-0123456789abcdef"


class Server:
    """The API on 127.0.0.1 in a background event loop; `pending()` opens a fresh approval."""

    def __init__(self, folder: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.folder = folder
        self.url = self._run(self._start())
        self._n = 0

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    async def _start(self) -> str:
        cfg = ApprovalsConfig(store="sqlite:///state/a.db", persist_to="rules/approved.yaml", hold=False,
                              timeout="60s")
        (self.folder / "rules").mkdir(exist_ok=True)
        self.service = ApprovalService(cfg, self.folder, Telemetry(stream=io.StringIO()))
        await self.service.start()
        app = web.Application()
        api.add_routes(app, self.service, Principals(TOKEN), self.service.links)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def pending(self) -> str:
        self._n += 1
        # The provisional outcome the pipeline hands to approvals (a fresh client each: a new approval).
        client = Client(f"10.0.{self._n // 250}.{self._n % 250}", 40000, None, f"c{self._n}")
        port = 1 + self._n % 65000
        req = Request("fuzz.test", port, client, "https", None, None, Layer.HTTP, f"f{self._n}")
        pending = Outcome(req, Action.DENY, Reason.DEFAULT, status=403)
        out = self._run(self.service.resolve(pending, lambda: True))
        assert out.approval_id
        return str(out.approval_id)

    def state(self, approval_id: str) -> str:
        a = self._run(self.service.get(approval_id))
        assert a is not None
        return str(a.state)

    def close(self) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            await self.service.stop()

        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory() as d:
        s = Server(Path(d))
        yield s
        global _CLIENT
        if _CLIENT is not None:
            _CLIENT.close()
            _CLIENT = None
        s.close()


_CLIENT: httpx.Client | None = None


class _Shared:
    """One keep-alive client for every example (a context manager that does not close it)."""

    def __enter__(self) -> httpx.Client:
        global _CLIENT
        if _CLIENT is None:
            _CLIENT = httpx.Client(trust_env=False, timeout=10)
        return _CLIENT

    def __exit__(self, *exc: object) -> None:
        return None


def _client() -> _Shared:
    return _Shared()


def valid_body(raw: bytes) -> bool:
    """The contract, judged independently of pydantic: a JSON object with `decision` allow|deny, an
    optional `scope` once|session|always, optional string `by` (<= 200) and `reason` (<= 2000) or
    null, and no other key; no type coercion."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(doc, dict) or set(doc) - {"decision", "scope", "by", "reason"}:
        return False
    if doc.get("decision") not in ("allow", "deny") or not isinstance(doc.get("decision"), str):
        return False
    scope = doc.get("scope", "once")
    if not isinstance(scope, str) or scope not in ("once", "session", "always"):
        return False
    for k, n in (("by", 200), ("reason", 2000)):
        if k in doc and doc[k] is not None and (not isinstance(doc[k], str) or len(doc[k]) > n):
            return False
    return True


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10),
              st.sampled_from(["allow", "deny", "once", "session", "always", "ALLOW", "Allow", " allow"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
bodies = st.one_of(
    st.fixed_dictionaries(
        {"decision": st.sampled_from(["allow", "deny", "maybe", "ALLOW", 1, True, None])},
        optional={"scope": st.sampled_from(["once", "session", "always", "", "Once", 0, None]),
                  "by": st.one_of(st.none(), st.text(max_size=250), st.integers()),
                  "reason": st.one_of(st.none(), st.text(max_size=30), st.lists(st.text(max_size=3))),
                  "extra": json_values},
    ).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=60),
    st.sampled_from([b"", b"{", b'{"decision":"allow"', b'{"decision":"allow","decision":"deny"}',
                     b'{"decision":"\\u0061llow"}', b'\xef\xbb\xbf{"decision":"allow"}',
                     b"[" * 5000 + b"]" * 5000,
                     b'{"decision":"allow","by":"' + b"x" * 201 + b'"}', b"null", b'"allow"']),
)


@bounded(400)
@given(bodies)
def test_any_body_is_422_or_a_decision_and_never_500(server: Server, raw: bytes) -> None:
    approval_id = server.pending()
    with _client() as c:
        r = c.post(f"{server.url}/approvals/{approval_id}", content=raw,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status_code != 500, r.text
    r.json()  # every answer is JSON
    if valid_body(raw):
        if json.loads(raw).get("scope") == "always":
            assert r.status_code in (200, 500), r.text  # writes a rule file
        else:
            assert r.status_code == 200, (raw[:100], r.text[:200])
        assert server.state(approval_id) != "pending"
    else:
        assert r.status_code == 422, (raw[:100], r.status_code, r.text[:200])
        assert server.state(approval_id) == "pending"


auth_values = st.one_of(
    st.builds(lambda s, sp, t: f"{s}{sp}{t}",
              st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", ""]),
              st.sampled_from([" ", "  ", "\t", ""]),
              st.sampled_from([TOKEN, TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "", f"{TOKEN} {TOKEN}"])),
    st.text(st.sampled_from(string.printable), max_size=40),
)


def token_accepted(value: str) -> bool:
    scheme, _, given = value.strip().partition(" ")
    return scheme.lower() == "bearer" and given.strip() == TOKEN


@bounded(400)
@given(auth_values)
def test_only_the_bearer_token_decides(server: Server, value: str) -> None:
    approval_id = server.pending()
    try:
        with _client() as c:
            r = c.post(f"{server.url}/approvals/{approval_id}", json={"decision": "deny"},
                       headers={"Authorization": value})
    except httpx.LocalProtocolError:
        return  # not sendable as a header value
    sent = value.strip(" \t")  # HTTP strips the value's surrounding whitespace
    if token_accepted(sent):
        assert r.status_code == 200, (value, r.text)
    else:
        assert r.status_code == 401, (value, r.status_code)
        assert server.state(approval_id) == "pending"


@bounded(400)
@given(st.text(min_size=1, max_size=80))
def test_any_id_is_404_never_500(server: Server, approval_id: str) -> None:
    assume(approval_id not in (".", ".."))  # dot segments: the client resolves them (/approvals/ is the list)
    path = quote(approval_id, safe="")
    with _client() as c:
        for r in (c.get(f"{server.url}/approvals/{path}", headers={"Authorization": f"Bearer {TOKEN}"}),
                  c.post(f"{server.url}/approvals/{path}", json={"decision": "allow"},
                         headers={"Authorization": f"Bearer {TOKEN}"})):
            assert r.status_code in (404, 405), (approval_id, r.status_code, r.text[:200])
