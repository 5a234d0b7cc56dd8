"""Deployment helpers outside a container: the Redis-extra message, `portcullis healthcheck`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from addons.healthcheck import admin_address
from tests.harness import REPO, PortcullisProc, Upstreams

CLI = [sys.executable, "-m", "addons.cli"]
LOOPBACK_ANY = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]


def _minimal_config(folder: Path, store: str) -> Path:
    (folder / "rules").mkdir(exist_ok=True)
    (folder / "rules" / "main.yaml").write_text("rules: []\n")
    cfg = {"listen": "127.0.0.1:8080",
           "admin": {"listen": "127.0.0.1:9090", "token_env": "NO_SUCH_TOKEN_VAR"},
           "rules": ["rules/"], "default_action": "deny", "approvals": {"store": store, "persist_to": None},
           "tls": {"ca_dir": "certs/"}}
    path = folder / "portcullis.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_redis_store_without_the_redis_package_names_the_extra(tmp_path: Path) -> None:
    """`store: redis://` where the redis package is missing: exit 2 and the pip line to fix it."""
    cfg = _minimal_config(tmp_path, "redis://127.0.0.1:1/0")
    code = ("import sys; sys.modules['redis'] = None  # as if not installed\n"
            "from addons.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "run", "--config", str(cfg), *LOOPBACK_ANY],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2, p.stderr
    assert "needs the Redis client: pip install 'portcullis[redis]'" in p.stderr
    assert "Traceback" not in p.stderr and "No module named" not in p.stderr


def test_redis_store_with_the_package_goes_on_to_connect(tmp_path: Path) -> None:
    """The control: with redis importable the same config fails later, on the connection itself."""
    cfg = _minimal_config(tmp_path, "redis://127.0.0.1:1/0")
    p = subprocess.run([*CLI, "run", "--config", str(cfg), *LOOPBACK_ANY],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2
    assert "cannot use the approvals store redis://127.0.0.1:1/0" in p.stderr
    assert "portcullis[redis]" not in p.stderr


@pytest.mark.parametrize(("listen", "expected"), [
    ("0.0.0.0:9090", "127.0.0.1:9090"),
    ("[::]:9091", "[::1]:9091"),
    ("127.0.0.5:9092", "127.0.0.5:9092"),
    ("[::1]:9093", "[::1]:9093"),
])
def test_healthcheck_reads_the_admin_address(tmp_path: Path, listen: str, expected: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"listen: 0.0.0.0:8080\nadmin:\n  listen: '{listen}'\n")
    assert admin_address(cfg) == expected


def test_healthcheck_defaults_without_an_admin_section(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: 0.0.0.0:8080\n")
    assert admin_address(cfg) == "127.0.0.1:9090"


@pytest.mark.e2e
def test_healthcheck_against_a_running_proxy(upstreams: Upstreams, tmp_path: Path) -> None:
    proxy = PortcullisProc(tmp_path, upstreams, env={"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy":
                                                     "http://127.0.0.1:9"})
    with proxy as p:
        base = p.admin_url
        for extra in ([], ["--ready"]):
            r = subprocess.run([*CLI, "healthcheck", "--url", base, *extra], cwd=REPO, capture_output=True,
                               text=True, timeout=30, check=False, env=p.env)
            assert r.returncode == 0, r.stderr  # the proxy variables of its own environment are ignored
        # The config form: the admin address is read from the file.
        cfg = tmp_path / "hc.yaml"
        cfg.write_text(f"admin:\n  listen: 127.0.0.1:{p.admin_port}\n")
        r = subprocess.run([*CLI, "healthcheck", "--config", str(cfg)], cwd=REPO, capture_output=True,
                           text=True, timeout=30, check=False)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([*CLI, "healthcheck", "--url", base], cwd=REPO, capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 1 and base in r.stderr
    r = subprocess.run([*CLI, "healthcheck", "--config", str(tmp_path / "missing.yaml")], cwd=REPO,
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1 and "cannot read" in r.stderr and "Traceback" not in r.stderr
