"""addons/credentials/cli.py: `portcullis credentials mint|list|revoke` as subprocesses against a real
loopback admin server: what it sends, what it prints, and its exit codes (0 ok, 1 refused, 2 bad usage)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from addons.credentials.model import Check
from tests.credentials.conftest import ALICE, TOKEN, free_port

ENV = {"PORTCULLIS_ADMIN_TOKEN": TOKEN}


async def run(*args: str, env: dict[str, str] | None = None, cwd: Path) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if k != "PORTCULLIS_ADMIN_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "addons.cli",
        "credentials",
        *args,
        env={**base, **(env or {})},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_mint_list_revoke(admin, tmp_path):
    code, out, err = await run(
        "--admin",
        admin.url,
        "mint",
        "--task",
        "build-9",
        "--profile",
        "frontend",
        "--ttl",
        "30m",
        "--label",
        "repo=web",
        "--label",
        "q=a=b",
        "--label",
        "empty=",
        env=ENV,
        cwd=tmp_path,
    )
    assert code == 0, err
    doc = json.loads(out)  # the whole answer, secret included: shown this once
    assert doc["user"] == "build-9" and doc["labels"] == {"repo": "web", "q": "a=b", "empty": ""}
    assert (await admin.svc.verify("build-9", doc["password"]))[0] is Check.OK
    c = await admin.svc.store.get("build-9")
    assert c is not None and c.profile == "frontend" and c.expires_at - c.created_at == 1800

    code, out, _ = await run("--admin", admin.url, "list", env=ENV, cwd=tmp_path)
    assert code == 0
    line = out.strip()
    assert line.split()[:3] == ["build-9", "live", "frontend"] and "empty=,q=a=b,repo=web" in line
    assert doc["password"] not in out

    code, out, _ = await run("--admin", admin.url, "revoke", "build-9", env=ENV, cwd=tmp_path)
    assert (code, out.strip()) == (0, "build-9: revoked")
    code, out, _ = await run("--admin", admin.url, "--json", "list", env=ENV, cwd=tmp_path)
    assert code == 0 and [x["state"] for x in json.loads(out)["credentials"]] == ["revoked"]

    code, _, err = await run("--admin", admin.url, "revoke", "build-9", env=ENV, cwd=tmp_path)
    assert code == 1 and "HTTP 404" in err and "no live credential" in err


async def test_empty_list_and_refusals(admin, tmp_path):
    code, out, _ = await run("--admin", admin.url, "list", env=ENV, cwd=tmp_path)
    assert (code, out.strip()) == (0, "no credentials")
    code, _, err = await run("--admin", admin.url, "mint", "--task", "a b", env=ENV, cwd=tmp_path)
    assert code == 1 and "HTTP 422" in err and "task_id" in err
    code, _, err = await run(
        "--admin", admin.url, "list", env={"PORTCULLIS_ADMIN_TOKEN": "wrong"}, cwd=tmp_path
    )
    assert code == 1 and "HTTP 401" in err and "check the token in $PORTCULLIS_ADMIN_TOKEN" in err
    code, _, err = await run(
        "--admin", admin.url, "list", env={"PORTCULLIS_ADMIN_TOKEN": ALICE}, cwd=tmp_path
    )
    assert code == 1 and "HTTP 403" in err and "alice" in err
    assert await admin.svc.listing() == []


async def test_bad_labels_are_usage_errors_and_nothing_is_sent(admin, tmp_path):
    for bad in ("novalue", "=v"):
        code, _, err = await run(
            "--admin", admin.url, "mint", "--task", "t", "--label", bad, env=ENV, cwd=tmp_path
        )
        assert code == 2 and f"bad --label {bad!r}" in err
    assert await admin.svc.listing() == []


async def test_the_config_names_the_admin_and_its_token_variable(admin, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"admin:\n  listen: {admin.url.removeprefix('http://')}\n  token_env: MY_ADMIN_TOKEN\n")
    code, out, err = await run(
        "--config", str(cfg), "mint", "--task", "cfg-1", env={"MY_ADMIN_TOKEN": TOKEN}, cwd=tmp_path
    )
    assert code == 0, err
    assert json.loads(out)["task_id"] == "cfg-1" and await admin.svc.store.get("cfg-1") is not None


async def test_an_unreachable_admin_api_is_exit_1(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, _, err = await run("--admin", url, "list", env=ENV, cwd=tmp_path)
    assert code == 1 and f"cannot reach the admin API at {url}" in err
