"""No secret in any byte the proxy wrote: a whole scenario (injection, leak attempts in every place,
a first-use approval with its webhook, page and API, metrics, rotation, a failed reload, check and
validate), then stdout, stderr, the event file, every file under the proxy's folder, the approval
page, the webhook bodies, /metrics, the admin API and every answer the proxy wrote itself are searched
for each secret in every form (as is, %-encoded, base64 at any alignment). And rotation on every worker
of `--workers 2`."""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from addons.policy.credentials import Secret, needles
from tests.approvals.approvals_support import SECRET as HOOK_SECRET
from tests.approvals.approvals_support import SECRET_ENV as HOOK_ENV
from tests.approvals.e2e.test_approvals import HookReceiver
from tests.harness import REPO, PortcullisProc, base_config
from tests.proxy.e2e.inject_support import Recorder

pytestmark = pytest.mark.e2e
GH = "ghp_" + secrets.token_hex(18)
KEY1 = "key-one-" + secrets.token_hex(16)
KEY2 = "key-two-" + secrets.token_hex(16)
FIRST = "first-" + secrets.token_hex(16)
PW = "pw-" + secrets.token_hex(8)
ADMIN = "admin-" + secrets.token_hex(8)
SECRETS = (GH, KEY1, KEY2, FIRST)
ENV = {
    "GH_TOKEN": GH,
    "FIRST_TOKEN": FIRST,
    "AGENT_PW": PW,
    "PORTCULLIS_TEST_ADMIN_TOKEN": ADMIN,
    HOOK_ENV: HOOK_SECRET,
}
AGENT = ("--proxy-user", f"agent:{PW}")


@pytest.fixture(scope="module")
def rec(upstreams: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorder]:
    r = Recorder(upstreams, tmp_path_factory.mktemp("rec")).start()
    yield r
    r.stop()


def creds(rec: Recorder) -> str:
    return json.dumps(
        {
            "rules": [
                {
                    "name": "hosts",
                    "action": "allow",
                    "hosts": ["api.public.test", "www.public.test", "public.test", "other.test"],
                }
            ],
            "credentials": [
                {
                    "name": "gh",
                    "secret": {"env": "GH_TOKEN"},
                    "hosts": ["api.public.test"],
                    "ports": [rec.tls_port],
                    "apply": {"basic": {"username": "x-access-token"}},
                    "clients": ["agents"],
                },
                {
                    "name": "key",
                    "secret": {"file": "secrets/key"},
                    "hosts": ["public.test"],
                    "ports": [rec.tls_port],
                    "apply": {"header": "X-Api-Key", "template": "Key {secret}"},
                    "clients": ["agents"],
                },
                {
                    "name": "first",
                    "secret": {"env": "FIRST_TOKEN"},
                    "hosts": ["www.public.test"],
                    "ports": [rec.tls_port],
                    "paths": ["/first/*"],
                    "apply": {"header": "X-First"},
                    "approval": "first_use",
                    "clients": ["agents"],
                },
            ],
        }
    )


def start(
    upstreams: Any, rec: Recorder, folder: Path, hooks: HookReceiver | None = None, workers: int = 1
) -> PortcullisProc:
    (folder / "secrets").mkdir(parents=True, exist_ok=True)
    (folder / "secrets" / "key").write_text(KEY1 + "\n")
    webhooks = [{"url": hooks.url, "secret_env": HOOK_ENV}] if hooks else []
    cfg = base_config(
        upstreams,
        folder,
        clients=[{"name": "agents", "proxy_auth": {"user": "agent", "password_env": "AGENT_PW"}}],
        approvals={"timeout": "20s", "webhooks": webhooks},
        telemetry={"log": {"format": "json", "file": "events.jsonl"}, "metrics": True, "otlp": False},
    )
    return PortcullisProc(
        folder, upstreams, config=cfg, env=ENV, workers=workers, extra_rule_files={"creds.yaml": creds(rec)}
    ).start()


def get(url: str, token: str | None = ADMIN, data: bytes | None = None, opener: Any = None) -> bytes:
    req = urllib.request.Request(
        url, data=data, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    o = opener or urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with o.open(req, timeout=10) as resp:
            return bytes(resp.read())
    except urllib.error.HTTPError as e:
        return bytes(e.read())


def page_html(p: PortcullisProc) -> bytes:
    """The approval page as an approver sees it (logged in)."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor()
    )
    login = get(p.admin_url + "/", None, opener=opener).decode()
    csrf = re.search(r"name='csrf' value='([^']+)'", login)
    assert csrf, login
    form = urllib.parse.urlencode({"token": ADMIN, "csrf": csrf.group(1)}).encode()
    req = urllib.request.Request(p.admin_url + "/login", data=form, headers={"Origin": p.admin_url})
    with opener.open(req, timeout=10) as resp:
        return bytes(resp.read())


def forms(value: str) -> list[bytes]:
    """Every way a secret could be written: as is, %-encoded, base64 at any alignment."""
    return [n.encode() for n in needles(Secret(value), ())]


def test_no_secret_in_any_byte_the_proxy_wrote(upstreams: Any, rec: Recorder, tmp_path: Path) -> None:
    hooks = HookReceiver()
    folder = tmp_path / "proxy"
    p = start(upstreams, rec, folder, hooks)
    written: list[bytes] = []  # what the proxy wrote to its clients and admin callers
    try:
        tls = rec.tls_port
        # Injection, both credentials, repeatedly.
        for _ in range(3):
            assert p.curl(f"https://api.public.test:{tls}/x", *AGENT).status == 200
            assert p.curl(f"https://public.test:{tls}/x", *AGENT).status == 200
        assert any(r["headers"].get("Authorization", "").startswith("Basic ") for r in rec.requests())
        # Leak attempts in every place, each answered by the proxy itself.
        basic = base64.b64encode(f"u:{GH}".encode()).decode()
        for url, extra in [
            (f"https://www.public.test:{tls}/x", ("-H", f"Authorization: Bearer {GH}")),
            (f"https://www.public.test:{tls}/x?t={GH}", ()),
            (f"https://www.public.test:{tls}/x", ("-H", f"Authorization: Basic {basic}")),
            (f"https://www.public.test:{tls}/x", ("-d", f"k={KEY1}")),
            (f"https://www.public.test:{tls}/{GH}/x", ()),
            (f"http://public.test:{rec.http_port}/x?t={KEY1}", ()),
            (f"https://{GH.lower()}.public.test:{tls}/", ()),
        ]:
            res = p.curl(url, *AGENT, *extra)
            written += [res.body, json.dumps(res.headers).encode(), res.stderr.encode()]
            assert res.status == 403, (url, res.status)
        # A first use held for a person: webhook, page, API, then allowed.
        out: dict[str, Any] = {}
        th = threading.Thread(
            target=lambda: out.setdefault("r", p.curl(f"https://www.public.test:{tls}/first/a", *AGENT))
        )
        th.start()
        asked = p.wait_event("approval.requested", credential="first")
        hooks.wait(1)
        written.append(page_html(p))
        written.append(get(p.admin_url + "/approvals"))
        written.append(get(p.admin_url + f"/approvals/{asked['approval_id']}"))
        written.append(
            get(
                p.admin_url + f"/approvals/{asked['approval_id']}",
                data=json.dumps({"decision": "allow", "scope": "session"}).encode(),
            )
        )
        th.join(20)
        assert out["r"].status == 200
        assert rec.requests()[-1]["headers"]["X-First"] == FIRST
        # Rotation, then a reload that fails (emptied file).
        reloads = len(p.find("rules.reloaded"))
        (folder / "secrets" / "key").write_text(KEY2 + "\n")
        p.wait_event("rules.reloaded", count=reloads + 1, timeout=15)
        assert p.curl(f"https://public.test:{tls}/x", *AGENT).status == 200
        assert rec.requests()[-1]["headers"]["X-Api-Key"] == f"Key {KEY2}"
        (folder / "secrets" / "key").write_text("")
        p.wait_event("rules.reload_failed", timeout=15)
        written.append(get(p.admin_url + "/metrics", None))
        written.append(get(p.admin_url + "/credentials"))
        # The tools print no secret either.
        for cmd in (
            [
                "check",
                "--config",
                str(p.config_path),
                f"https://api.public.test:{tls}/x",
                "--client",
                "agents",
            ],
            ["validate", "--config", str(p.config_path)],
        ):
            (folder / "secrets" / "key").write_text(KEY2 + "\n")
            cli = subprocess.run(
                [sys.executable, "-m", "addons.cli", *cmd],
                cwd=REPO,
                env={**p.env},
                capture_output=True,
                timeout=60,
                check=False,
            )
            written += [cli.stdout, cli.stderr]
    finally:
        p.stop()
        hooks.close()
    written += [h["raw"] if "raw" in h else json.dumps(h["body"]).encode() for h in hooks.got]
    assert len(hooks.got) >= 1 and hooks.got[0]["body"]["credential"] == "first"
    written += [line.encode() for line in p.raw_lines]
    files = [f for f in folder.rglob("*") if f.is_file() and f.parent != folder / "secrets"]
    assert folder / "events.jsonl" in files and folder / "stderr.log" in files
    assert any(f.suffix == ".db" for f in files)  # the approvals store
    written += [f.read_bytes() for f in files]
    assert any(b'"credential":"gh"' in w for w in written)  # the events do name the credentials
    for value in SECRETS:
        for form in forms(value):
            hits = [w[:200] for w in written if form in w]
            assert not hits, f"a secret ({form[:6]!r}...) was written: {hits[:2]}"


def test_rotation_reaches_every_worker(upstreams: Any, rec: Recorder, tmp_path: Path) -> None:
    folder = tmp_path / "workers"
    p = start(upstreams, rec, folder, workers=2)
    try:
        rec.clear()
        for _ in range(4):
            assert p.curl(f"https://public.test:{rec.tls_port}/before", *AGENT).status == 200
        assert {r["headers"]["X-Api-Key"] for r in rec.requests()} == {f"Key {KEY1}"}
        (folder / "secrets" / "key").write_text(KEY2 + "\n")
        deadline = time.monotonic() + 20
        while {e.get("worker") for e in p.find("rules.reloaded")} != {0, 1}:
            assert time.monotonic() < deadline, p.find("rules.reloaded")
            time.sleep(0.1)
        rec.clear()
        for _ in range(8):  # new connections: the kernel hands them to either worker
            assert p.curl(f"https://public.test:{rec.tls_port}/after", *AGENT).status == 200
        assert {r["headers"]["X-Api-Key"] for r in rec.requests()} == {f"Key {KEY2}"}
        served = {e.get("worker") for e in p.decisions(**{"request.path": "/after"})}
        assert served <= {0, 1} and served
    finally:
        p.stop()
