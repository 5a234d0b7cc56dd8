"""`portcullis approvals` against a real admin server, and `portcullis webhook-verify`, as subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from approvals_support import SECRET, TOKEN, alive, request, wait_until

from addons.approvals.webhook import parse_secret, sign
from addons.policy.model import Reason


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
    await wait_until(lambda: bool(svc.store.pending()))
    a = svc.store.pending()[0]
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
    assert (outcome.allowed, outcome.reason, outcome.decided_by) == (True, Reason.APPROVED, "cli-user")
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
