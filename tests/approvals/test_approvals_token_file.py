"""`./dev run` and `portcullis approvals` agree on one token file: `state/admin-token` next to the
config. The real `./dev run` in a copy of the checkout (sharing this .venv), then the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


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
