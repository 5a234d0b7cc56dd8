"""Real tools through the proxy with the agent holding no token: `git ls-remote` / `git clone` against a
loopback smart-HTTP forge (`git http-backend`) and `pip download` from a loopback simple index, both of
which answer 401 without the right Basic token. The proxy holds the token and injects it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PortcullisProc, base_config
from tests.proxy.e2e.inject_support import Recorder, make_repo

pytestmark = pytest.mark.e2e
GIT_TOKEN = "ghs_" + secrets.token_hex(18)
PYPI_TOKEN = "pypi-" + secrets.token_hex(24)
PW = "tools-pw-" + secrets.token_hex(8)
NAMES = {"git.public.test": "127.0.0.2", "pypi.public.test": "127.0.0.2"}


@pytest.fixture(scope="module")
def forge(upstreams: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorder]:
    if (
        shutil.which("git") is None
        or not Path("/usr/lib/git-core/git-http-backend").exists()
        and subprocess.run(
            ["git", "http-backend"], capture_output=True, check=False, env={"REQUEST_METHOD": "GET"}
        ).returncode
        == 127
    ):
        pytest.skip("git with git-http-backend is not installed (apt-get install git)")
    folder = tmp_path_factory.mktemp("forge")
    rec = Recorder(upstreams, folder).start()
    make_repo(folder / "repos")
    rec.start_git(folder / "repos", GIT_TOKEN)
    rec.start_pypi(PYPI_TOKEN)
    yield rec
    rec.stop()


def rule_file(forge: Recorder, with_credentials: bool = True) -> str:
    doc: dict[str, Any] = {
        "rules": [{"name": "forge", "action": "allow", "hosts": ["git.public.test", "pypi.public.test"]}]
    }
    if with_credentials:
        doc["credentials"] = [
            {
                "name": "forge-token",
                "secret": {"env": "FORGE_TOKEN"},
                "hosts": ["git.public.test"],
                "ports": [forge.git_port],
                "methods": ["GET", "POST"],
                "paths": ["/acme/*"],
                "apply": {"basic": {"username": "x-access-token"}},
                "clients": ["agents"],
            },
            {
                "name": "index",
                "secret": {"file": "secrets/pypi"},
                "hosts": ["pypi.public.test"],
                "ports": [forge.pypi_port],
                "methods": ["GET"],
                "apply": {"basic": {"username": "__token__"}},
                "clients": ["agents"],
            },
        ]
    return json.dumps(doc)


def start(upstreams: Any, folder: Path, forge: Recorder, with_credentials: bool = True) -> PortcullisProc:
    (folder / "secrets").mkdir(parents=True, exist_ok=True)
    (folder / "secrets" / "pypi").write_text(PYPI_TOKEN)
    # The agents' network is named on the proxy_auth group, so an agent that authenticates only when
    # challenged (git: http.proxyAuthMethod=anyauth) gets a 407 instead of going anonymous.
    agents = {
        "name": "agents",
        "cidrs": ["127.0.0.0/8"],
        "proxy_auth": {"user": "agent", "password_env": "AGENT_PW"},
    }
    cfg = base_config(upstreams, folder, clients=[agents])
    cfg["network"]["resolve"].update(NAMES)
    return PortcullisProc(
        folder,
        upstreams,
        config=cfg,
        env={"FORGE_TOKEN": GIT_TOKEN, "AGENT_PW": PW},
        extra_rule_files={"forge.yaml": rule_file(forge, with_credentials)},
    ).start()


def agent_env(p: PortcullisProc, home: Path) -> dict[str, str]:
    """What an agent container gets: the proxy (with its proxy credentials) and the CA, no token."""
    home.mkdir(parents=True, exist_ok=True)
    proxy = f"http://agent:{PW}@127.0.0.1:{p.port}"
    drop = ("_PROXY", "_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith(drop) and not k.startswith("PIP_")}
    bundle = str(p.trust_bundle())
    env.update(
        {
            "SSL_CERT_FILE": bundle,
            "REQUESTS_CA_BUNDLE": bundle,
            "HOME": str(home),
            "HTTPS_PROXY": proxy,
            "https_proxy": proxy,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_SSL_CAINFO": str(p.trust_bundle()),
            "PIP_CERT": str(p.trust_bundle()),
            "PIP_NO_INPUT": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_CACHE_DIR": "1",
            "PIP_CONFIG_FILE": os.devnull,
        }
    )
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_git_over_https_with_the_token_injected(upstreams: Any, forge: Recorder, tmp_path: Path) -> None:
    p = start(upstreams, tmp_path / "proxy", forge)
    try:
        env = agent_env(p, tmp_path / "home")
        url = f"https://git.public.test:{forge.git_port}/acme/tools.git"
        ls = run(["git", "ls-remote", url], env, tmp_path)
        assert ls.returncode == 0 and "refs/heads/main" in ls.stdout, ls.stderr
        clone = run(["git", "clone", "-q", url, str(tmp_path / "tools")], env, tmp_path)
        assert clone.returncode == 0, clone.stderr
        assert (tmp_path / "tools" / "README").read_text() == "hello from the loopback forge\n"
        seen = forge.requests(lambda r: r["server"] == "git")
        assert seen and all(r["headers"].get("Authorization", "").startswith("Basic ") for r in seen)
        assert GIT_TOKEN not in json.dumps(env) + ls.stdout + ls.stderr + clone.stderr
        assert any(e["credential"] == "forge-token" for e in p.decisions())
        # The agent's git config holds no credential at all: nothing to exfiltrate.
        assert not (tmp_path / "home" / ".git-credentials").exists()
    finally:
        p.stop()


def test_without_the_credential_rule_git_is_refused_by_the_forge(
    upstreams: Any, forge: Recorder, tmp_path: Path
) -> None:
    p = start(upstreams, tmp_path / "proxy", forge, with_credentials=False)
    try:
        ls = run(
            ["git", "ls-remote", f"https://git.public.test:{forge.git_port}/acme/tools.git"],
            agent_env(p, tmp_path / "home"),
            tmp_path,
        )
        assert ls.returncode != 0 and (
            "401" in ls.stderr
            or "Authentication failed" in ls.stderr
            or "could not read Username" in ls.stderr
        ), ls.stderr
    finally:
        p.stop()


def test_pip_from_a_private_index_with_the_token_injected(
    upstreams: Any, forge: Recorder, tmp_path: Path
) -> None:
    p = start(upstreams, tmp_path / "proxy", forge)
    try:
        env = agent_env(p, tmp_path / "home")
        index = f"https://pypi.public.test:{forge.pypi_port}/simple/"
        out = run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--index-url",
                index,
                "-d",
                str(tmp_path / "dl"),
                "injtest",
            ],
            env,
            tmp_path,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert (tmp_path / "dl" / "injtest-1.0-py3-none-any.whl").exists()
        seen = forge.requests(lambda r: r["server"] == "pypi")
        assert {r["path"].split("#")[0] for r in seen} >= {
            "/simple/injtest/",
            "/files/injtest-1.0-py3-none-any.whl",
        }
        assert PYPI_TOKEN not in out.stdout + out.stderr
        assert {e["credential"] for e in p.decisions(layer="inspected")} == {"index"}
    finally:
        p.stop()


def test_pip_with_a_placeholder_index_password_pointed_elsewhere_is_refused(
    upstreams: Any, forge: Recorder, tmp_path: Path
) -> None:
    """An agent tricked into using its placeholder against another host gets a refusal, not a token."""
    p = start(upstreams, tmp_path / "proxy", forge)
    try:
        env = agent_env(p, tmp_path / "home")
        index = f"https://__token__:portcullis-credential-index@git.public.test:{forge.git_port}/simple/"
        out = run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--index-url",
                index,
                "-d",
                str(tmp_path / "dl"),
                "injtest",
            ],
            env,
            tmp_path,
        )
        assert out.returncode != 0
        refused = p.decisions(reason="credential_leak")
        assert refused and refused[0]["credential"] == "index"
    finally:
        p.stop()
