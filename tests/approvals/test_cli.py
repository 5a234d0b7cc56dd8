"""addons/approvals/cli.py: `portcullis approvals` against a real admin server, `portcullis webhook-verify`,
as subprocesses; and the admin token file `./dev run` makes (`state/admin-token` next to the config), with
the real `./dev run` in a copy of the checkout (sharing this .venv)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from addons.approvals.model import Choice, Scope
from addons.approvals.webhook import parse_secret, sign
from addons.policy.model import Reason
from tests.approvals.approvals_support import SECRET, TOKEN, alive, request, wait_until

REPO = Path(__file__).resolve().parents[2]


async def run(*args: str, env: dict[str, str] | None = None,
              stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "addons.cli", *args, env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_list_allow_and_refusals(make_service, admin_server, tmp_path):
    svc = await make_service(timeout=60)
    admin = await admin_server(svc)
    held = asyncio.create_task(svc.resolve(request(host="cli.example", method="GET", path="/x"), alive))
    async def cond() -> bool:
        return bool(await svc.store.pending())
    await wait_until(cond)
    a = (await svc.store.pending())[0]
    env = {"PORTCULLIS_ADMIN_TOKEN": TOKEN}

    code, out, _ = await run("approvals", "--admin", admin.url, "list", env=env)
    assert code == 0 and a.id in out and "cli.example:443/x" in out and "1 waiting" in out
    code, out, _ = await run("approvals", "--admin", admin.url, "--json", "list", env=env)
    assert code == 0 and json.loads(out)["approvals"][0]["id"] == a.id

    bad = {"PORTCULLIS_ADMIN_TOKEN": "nope"}
    code, _, err = await run("approvals", "--admin", admin.url, "list", env=bad)
    assert code == 1 and "401" in err and "PORTCULLIS_ADMIN_TOKEN" in err
    code, _, err = await run("approvals", "--admin", admin.url, "allow", "apr_missing", env=env)
    assert code == 1 and "404" in err

    # The config's admin.listen and admin.token_env are used when --admin is not given.
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"admin:\n  listen: {admin.url.removeprefix('http://')}\n  token_env: MY_TOKEN\n")
    code, out, _ = await run("approvals", "--config", str(cfg), "allow", a.id, "--scope", "session",
                             "--by", "cli-user", "--reason", "tested", env={"MY_TOKEN": TOKEN})
    assert code == 0 and "allowed (session)" in out
    outcome = await held
    assert (outcome.allowed, outcome.reason, outcome.approval_id) == (True, Reason.APPROVED, a.id)
    stored = await svc.store.get(a.id)
    assert (stored.decision, stored.scope, stored.decided_by, stored.reason) == (
        Choice.ALLOW, Scope.SESSION, "admin", "tested")  # the token's owner, not --by
    code, _, err = await run("approvals", "--admin", admin.url, "deny", a.id, env=env)
    assert code == 1 and "409" in err and "already decided" in err


async def test_unreachable_admin_is_a_refusal_not_a_crash():
    code, _, err = await run("approvals", "--admin", "http://127.0.0.1:9", "list")
    assert code == 1 and "cannot reach" in err


async def test_webhook_verify_command(tmp_path):
    body = b'{"type":"approval.requested","id":"apr_1"}'
    ts = int(time.time())
    sig = sign(parse_secret(SECRET), "msg_1", ts, body)
    f = tmp_path / "body.json"
    f.write_bytes(body)
    env = {"PORTCULLIS_WEBHOOK_SECRET": SECRET}
    base = ["webhook-verify", "--id", "msg_1", "--timestamp", str(ts), "--signature", sig]
    assert (await run(*base, str(f), env=env))[0] == 0
    assert (await run(*base, env=env, stdin=body))[0] == 0
    code, _, err = await run(*base, env=env, stdin=body + b" ")
    assert code == 1 and "no webhook-signature matches" in err
    stale = ["webhook-verify", "--id", "msg_1", "--timestamp", str(ts - 3600),
             "--signature", sign(parse_secret(SECRET), "msg_1", ts - 3600, body)]
    assert (await run(*stale, str(f), env=env))[0] == 1
    assert (await run(*base, str(f), env={"PORTCULLIS_WEBHOOK_SECRET": ""}))[0] == 1
    rotating = {"PORTCULLIS_WEBHOOK_SECRET": "whsec_" + "b2xkLXNlY3JldC1vbGQtc2VjcmV0LW9sZA==" + " " + SECRET}
    assert (await run(*base, str(f), env=rotating))[0] == 0


# The token file `./dev run` makes


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k != "PORTCULLIS_ADMIN_TOKEN" and not k.lower().endswith("_proxy")}
    return {**env, **extra}


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "addons.cli", "approvals", *args], cwd=cwd,
                          env={**_env(**env), "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def dev_run(tmp_path: Path) -> Iterator[tuple[Path, str, subprocess.Popen[bytes]]]:
    """`./dev run` in a copy of the checkout: its own state/, certs/ and rules/, this .venv."""
    venv = REPO / ".venv"
    if not (venv / ".portcullis-installed").exists():
        pytest.skip("needs an installed .venv (./dev setup)")
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copy2(REPO / "dev", root / "dev")
    shutil.copy2(REPO / "portcullis.yaml", root / "portcullis.yaml")
    shutil.copytree(REPO / "rules", root / "rules")
    (root / ".venv").symlink_to(venv)   # no pyproject.toml here: `./dev` sees the install as current
    proc = subprocess.Popen([str(root / "dev"), "run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
                            cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    started: dict[str, Any] = {}
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b'"proxy.started"' in line:
                started.update(json.loads(line))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(60) and started, (proc.stderr.read().decode() if proc.poll() is not None else "")
        yield root, f"http://{started['admin']}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.mark.e2e
def test_cli_uses_the_token_dev_run_made(dev_run: tuple[Path, str, subprocess.Popen[bytes]],
                                         tmp_path: Path) -> None:
    root, admin, _ = dev_run
    token_file = root / "state" / "admin-token"
    assert token_file.stat().st_mode & 0o777 == 0o600

    # In the checkout: the default --config portcullis.yaml, its folder's state/admin-token.
    r = cli("--admin", admin, "list", cwd=root)
    assert r.returncode == 0 and "no approvals" in r.stdout, r.stderr
    # From elsewhere, with --config.
    r = cli("--admin", admin, "--config", str(root / "portcullis.yaml"), "--json", "list", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["approvals"] == [], r.stderr
    # Without a config (none here, none given) there is no token file to find: 401, with a hint.
    r = cli("--admin", admin, "list", cwd=tmp_path)
    assert r.returncode == 1 and "401" in r.stderr and "PORTCULLIS_ADMIN_TOKEN" in r.stderr
    # The variable, when set, wins over the file.
    r = cli("--admin", admin, "list", cwd=root, PORTCULLIS_ADMIN_TOKEN="wrong")
    assert r.returncode == 1 and "401" in r.stderr

    # A token file other users can read is refused, not used.
    token_file.chmod(0o644)
    r = cli("--admin", admin, "list", cwd=root)
    assert r.returncode == 1 and "open to other users" in r.stderr and "chmod 600" in r.stderr
    token_file.chmod(0o600)


@pytest.mark.e2e
def test_dev_run_refuses_a_token_file_open_to_others(tmp_path: Path) -> None:
    venv = REPO / ".venv"
    if not (venv / ".portcullis-installed").exists():
        pytest.skip("needs an installed .venv (./dev setup)")
    root = tmp_path / "checkout"
    (root / "state").mkdir(parents=True)
    shutil.copy2(REPO / "dev", root / "dev")
    shutil.copy2(REPO / "portcullis.yaml", root / "portcullis.yaml")
    (root / ".venv").symlink_to(venv)
    (root / "state" / "admin-token").write_text("t0ken\n")
    (root / "state" / "admin-token").chmod(0o644)
    r = subprocess.run([str(root / "dev"), "run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
                       cwd=root, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "open to other users" in r.stderr and r.stdout == ""
