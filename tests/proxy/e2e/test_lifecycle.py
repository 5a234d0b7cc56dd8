"""`portcullis run` as a process: bad configs, admin endpoints, signals, CA files, hot reload, approvals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.harness import REPO, PortcullisProc, base_config

pytestmark = pytest.mark.e2e

ALLOW_PUBLIC = [{"name": "public", "action": "allow", "hosts": ["public.test"]}]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "addons.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback test URL
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def http_get(p: PortcullisProc, host: str, port: int, path: str = "/") -> int:
    return p.raw(f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()).status


@pytest.mark.parametrize(
    ("config_text", "rules_text", "where"),
    [
        ("listen: 127.0.0.1:8080\nbogus_key: 1\n", "rules: []\n", "portcullis.yaml:2:1:"),
        (
            "rules: [rules/]\n",
            "rules:\n  - name: x\n    action: maybe\n    hosts: [a.test]\n",
            "main.yaml:3:13:",
        ),
        (
            "rules: [rules/]\n",
            "rules:\n  - name: x\n    action: allow\n    hosts: ['*.com']\n",
            "main.yaml:4:",
        ),
        ("rules: [rules/]\n", "rules: [\n", "main.yaml:"),
    ],
)
def test_bad_config_exits_2_with_path_line_col_and_never_listens(tmp_path, config_text, rules_text, where):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "main.yaml").write_text(rules_text)
    (tmp_path / "portcullis.yaml").write_text(config_text)
    p = run_cli(
        "run",
        "--config",
        str(tmp_path / "portcullis.yaml"),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    )
    assert p.returncode == 2, p.stderr
    assert where in p.stderr
    assert re.search(r"\S+:\d+:\d+: ", p.stderr), p.stderr
    assert "Traceback" not in p.stderr
    assert "proxy.started" not in p.stdout


def test_non_loopback_admin_without_token_refuses_to_start(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "portcullis.yaml").write_text("rules: [rules/]\nadmin: {token_env: PC_TEST_NO_TOKEN}\n")
    p = run_cli(
        "run",
        "--config",
        str(tmp_path / "portcullis.yaml"),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "0.0.0.0:0",
        env={"PC_TEST_NO_TOKEN": ""},
    )
    assert p.returncode == 2
    assert "PC_TEST_NO_TOKEN" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_missing_proxy_auth_password_refuses_to_start(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "portcullis.yaml").write_text(
        "rules: [rules/]\nclients:\n  - name: r\n    proxy_auth: {user: r, password_env: PC_TEST_NO_PW}\n"
    )
    p = run_cli(
        "run",
        "--config",
        str(tmp_path / "portcullis.yaml"),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        env={"PC_TEST_NO_PW": ""},
    )
    assert p.returncode == 2 and "PC_TEST_NO_PW" in p.stderr


def test_admin_endpoints_signals_and_ca_files(upstreams, tmp_path):
    p = PortcullisProc(tmp_path, upstreams, rules=ALLOW_PUBLIC).start()
    try:
        status, _, body = get(p.admin_url + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert get(p.admin_url + "/readyz")[0] == 200
        assert http_get(p, "public.test", upstreams.http_port) == 200
        status, headers, body = get(p.admin_url + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        assert "portcullis_rules_loaded 1.0" in text
        assert 'portcullis_requests_total{decision="allow",enforced="true",reason="rule"}' in text
        if shutil.which("ss"):  # the accept queue was raised from asyncio's 100
            out = subprocess.run(["ss", "-ltnH", f"sport = :{p.port}"], capture_output=True, text=True).stdout
            somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
            assert int(out.split()[2]) == min(1024, somaxconn), out
        certs = tmp_path / "certs"
        assert stat.S_IMODE(certs.stat().st_mode) == 0o700
        assert stat.S_IMODE((certs / "mitmproxy-ca.pem").stat().st_mode) == 0o600
        assert (certs / "mitmproxy-ca-cert.pem").exists()
    finally:
        assert p.stop(signal.SIGINT) == 0
    assert p.find("proxy.stopped")
    out = run_cli("ca", "--dir", str(tmp_path / "certs"))
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "certs" / "mitmproxy-ca-cert.pem")


def test_hot_reload_on_file_change_and_sighup_and_a_broken_file_keeps_the_old_policy(upstreams, tmp_path):
    with PortcullisProc(tmp_path, upstreams, rules=ALLOW_PUBLIC) as p:
        assert http_get(p, "www.public.test", upstreams.http_port) == 403
        p.write_rules(ALLOW_PUBLIC + [{"name": "www", "action": "allow", "hosts": ["www.public.test"]}])
        ev = p.wait_event("rules.reloaded", timeout=10)
        assert ev["rule_count"] == 2
        assert http_get(p, "www.public.test", upstreams.http_port) == 200

        p.rules_path.write_text(
            "rules:\n  - name: www\n    action: allow\n    hosts: ['*.com']\n    bogus: 1\n"
        )
        failed = p.wait_event("rules.reload_failed", timeout=10)
        assert failed["errors"] and all(re.match(r".+main\.yaml:\d+:\d+: ", e) for e in failed["errors"])
        # The old policy (2 rules) is still in force.
        assert http_get(p, "www.public.test", upstreams.http_port) == 200
        metrics = get(p.admin_url + "/metrics")[2].decode()
        assert 'portcullis_rule_reloads_total{result="failure"} 1.0' in metrics
        assert "portcullis_rules_loaded 2.0" in metrics

        # SIGHUP reloads too (the file is fixed back to one rule first, which the watcher may also see).
        n = len(p.find("rules.reloaded"))
        p.write_rules(ALLOW_PUBLIC)
        p.wait_event("rules.reloaded", count=n + 1, timeout=10)
        p.proc.send_signal(signal.SIGHUP)
        ev = p.wait_event("rules.reloaded", trigger="sighup", timeout=10)
        assert ev["rule_count"] == 1
        assert http_get(p, "www.public.test", upstreams.http_port) == 403


def test_approval_rule_hold_false_answers_pending_at_once(upstreams, tmp_path):
    cfg = base_config(
        upstreams,
        tmp_path,
        approvals={
            "timeout": "5s",
            "hold": False,
            "store": "sqlite:///state/portcullis.db",
            "persist_to": "rules/approved.yaml",
        },
    )
    rules = [{"name": "ask", "action": "approval", "hosts": ["approve.test"]}]
    with PortcullisProc(tmp_path, upstreams, rules=rules, config=cfg) as p:
        port = upstreams.http_port
        r = p.raw(f"GET http://approve.test:{port}/x HTTP/1.1\r\nHost: approve.test:{port}\r\n\r\n".encode())
        assert r.status == 403
        assert r.headers["x-portcullis-decision"] == "deny"
        assert r.headers["x-portcullis-reason"] == "approval_pending"
        assert int(r.headers["retry-after"]) > 0
        body = r.json()
        assert body["reason"] == "approval_pending" and body["approval_id"] and body["rule"] == "ask"


def test_held_request_is_released_by_an_admin_decision(upstreams, tmp_path):
    rules = [{"name": "ask", "action": "approval", "hosts": ["approve.test"]}]
    token = "test-admin-token"
    with PortcullisProc(tmp_path, upstreams, rules=rules, env={"PORTCULLIS_TEST_ADMIN_TOKEN": token}) as p:
        port = upstreams.http_port
        result: dict[str, int] = {}

        def held() -> None:
            result["status"] = http_get(p, "approve.test", port, "/held")

        t = threading.Thread(target=held)
        t.start()
        ev = p.wait_event("approval.requested", timeout=10)
        approval_id = ev.get("approval_id") or ev.get("id")
        assert get(p.admin_url + "/approvals")[0] == 401  # the token is required
        req = urllib.request.Request(
            f"{p.admin_url}/approvals/{approval_id}",
            method="POST",
            data=json.dumps({"decision": "allow", "scope": "once", "by": "test"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback test URL
            assert resp.status == 200
        t.join(10)
        assert result["status"] == 200
        dec = p.wait_event("egress.decision", **{"request.path": "/held"})
        assert (
            dec["decision"] == "allow" and dec["reason"] == "approved" and dec["approval_id"] == approval_id
        )


def test_run_refuses_to_start_on_an_unsupported_mitmproxy(tmp_path):
    # A sitecustomize makes the installed mitmproxy claim another version before the CLI starts.
    (tmp_path / "sitecustomize.py").write_text("import mitmproxy.version as v\nv.VERSION = '13.0.0'\n")
    (tmp_path / "portcullis.yaml").write_text("rules: []\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    p = subprocess.run(
        [sys.executable, "-m", "addons.cli", "run", "--config", str(tmp_path / "portcullis.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert p.returncode == 2, p.stderr
    assert "mitmproxy 13.0.0 is not supported" in p.stderr and "mitmproxy>=12.2,<12.3" in p.stderr
