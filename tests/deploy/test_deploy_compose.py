"""deploy/compose.yaml brought up with podman-compose: from inside the agent container, an allowed
host is reached through the proxy, a denied one gets the 403, and a connection that skips the
proxy goes nowhere.

tests/deploy/compose.test.yaml makes it offline: locally built images, and the proxy's egress
network internal too, with an upstream container on it (nothing leaves the machine).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from addons.telemetry.validate import audit_events, validate_event
from tests.deploy import podman_support as ps
from tests.deploy.toolserver import make_pki

pytestmark = [pytest.mark.container, pytest.mark.e2e]

DEPLOY = ps.REPO / "deploy"
HERE = Path(__file__).resolve().parent
TOKEN = "compose-test-admin-token-0123456789"


def compose_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "podman-compose"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("podman-compose")
    if found is None:
        pytest.skip("podman-compose is not installed (pip install podman-compose; ./dev setup does)")
    return [found]


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    files: list[str]
    upstream_ip: str

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = [*compose_cmd(), "-p", self.project]
        for f in self.files:
            cmd += ["-f", f]
        return subprocess.run(
            [*cmd, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def name(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def agent(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command inside the agent container, as its unprivileged user, with its environment."""
        return ps.podman("exec", "--user", "agent", self.name("agent"), *cmd, check=False, timeout=timeout)


def _test_config(upstream_ip: str) -> dict[str, object]:
    return {
        "listen": "0.0.0.0:8080",
        "admin": {"listen": "0.0.0.0:9090", "token_env": "PORTCULLIS_ADMIN_TOKEN"},
        "rules": ["rules/"],
        "default_action": "deny",
        "approvals": {
            "timeout": "30s",
            "hold": False,
            "store": "redis://valkey:6379/0",
            "persist_to": "state/approved.yaml",
        },
        "network": {
            "block_private": True,
            "allow_cidrs": [f"{upstream_ip}/32"],
            "resolve": dict.fromkeys(
                ("public.test", "other.test", "blocked.test", "approve.test"), upstream_ip
            ),
        },
        "tls": {"inspect": "auto", "ca_dir": "certs/", "upstream_ca": "/app/upstream-ca.pem"},
        "telemetry": {"log": {"format": "json"}, "metrics": True, "otlp": False},
    }


RULES = [
    {"name": "inspected", "action": "allow", "hosts": ["public.test"], "paths": ["/*"]},
    {"name": "passthrough", "action": "allow", "hosts": ["other.test"]},
    {"name": "blocked", "action": "deny", "hosts": ["blocked.test"]},
    {"name": "ask", "action": "approval", "hosts": ["approve.test"]},
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ps.skip_if_unusable()
    compose_cmd()
    base = ps.ensure_base_image()
    images = {
        "TEST_PORTCULLIS_IMAGE": ps.portcullis_image(),
        "TEST_AGENT_IMAGE": ps.build_image(
            "portcullis-test-agent",
            DEPLOY / "agent" / "Containerfile",
            DEPLOY / "agent",
            [DEPLOY / "agent"],
            host_ca=False,
        ),
        "TEST_VALKEY_IMAGE": ps.build_image(
            "portcullis-test-valkey", HERE / "valkey.Containerfile", HERE, [], host_ca=False
        ),
    }
    folder = tmp_path_factory.mktemp("compose")
    net = random.randint(100, 250)  # noqa: S311 - a subnet unlikely to clash with a parallel run
    upstream_ip = f"10.231.{net}.10"
    pki = make_pki(folder / "pki", {"upstream": ["public.test", "other.test", "blocked.test"]})
    shutil.copy(pki["ca"], folder / "upstream-ca.pem")
    shutil.copy(HERE / "compose_upstream.py", folder / "upstream.py")
    (folder / "portcullis.yaml").write_text(json.dumps(_test_config(upstream_ip)))
    (folder / "rules").mkdir()
    (folder / "rules" / "main.yaml").write_text(json.dumps({"rules": RULES}))
    for p in (folder, folder / "pki", folder / "rules"):
        p.chmod(0o755)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # the containers' users read them (keys of a throwaway test CA only)
    env = {
        **ps.podman_env(),
        **images,
        "TEST_BASE_IMAGE": base,
        "TEST_DIR": str(folder),
        "TEST_UPSTREAM_IP": upstream_ip,
        "TEST_EGRESS_SUBNET": f"10.231.{net}.0/24",
        "PORTCULLIS_ADMIN_TOKEN": TOKEN,
        "PORTCULLIS_CONFIG": str(folder / "portcullis.yaml"),
        "PORTCULLIS_RULES": str(folder / "rules"),
        "PORTCULLIS_ADMIN_BIND": f"127.0.0.1:{ps.free_port()}",
    }
    s = Stack(
        f"pctest{uuid.uuid4().hex[:6]}",
        env,
        [str(DEPLOY / "compose.yaml"), str(HERE / "compose.test.yaml")],
        upstream_ip,
    )
    try:
        up = s.compose("up", "-d", "--no-build")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        _wait_ready(s)
        yield s
    finally:
        logs = ps.podman("logs", s.name("portcullis"), check=False)
        s.compose("down", "-v", "-t", "5")
        (folder / "portcullis.stdout").write_text(logs.stdout)
        (folder / "portcullis.stderr").write_text(logs.stderr)


def _wait_ready(s: Stack) -> None:
    deadline = time.monotonic() + 90
    while True:
        proxy = ps.podman("exec", s.name("portcullis"), "portcullis", "healthcheck", "--ready", check=False)
        agent = ps.podman("exec", s.name("agent"), "sh", "-c", "cat /proc/[0-9]*/comm", check=False)
        if proxy.returncode == 0 and "sleep" in agent.stdout.split():
            return
        if time.monotonic() > deadline:
            logs = "\n".join(
                ps.podman("logs", s.name(n), check=False).stderr[-1500:] for n in ("portcullis", "agent")
            )
            raise AssertionError(f"the stack did not come up within 90 s:\n{proxy.stderr}\n{logs}")
        time.sleep(0.5)


def _curl(s: Stack, *args: str) -> tuple[int, dict[str, str], str, str]:
    """curl in the agent: (exit code, headers of the last response, body, stderr)."""
    p = s.agent("curl", "-sS", "--max-time", "15", "-D", "/tmp/headers", "-o", "/tmp/body", *args)
    out = s.agent("sh", "-c", "cat /tmp/headers; echo; echo ---body---; cat /tmp/body").stdout
    head, _, body = out.partition("---body---\n")
    headers = {}
    for line in head.splitlines():
        if ":" in line and not line.startswith("HTTP/"):
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        elif line.startswith("HTTP/"):
            headers = {":status": line.split()[1]}
    return p.returncode, headers, body, p.stderr


def test_allowed_hosts_are_reached_through_the_proxy(stack: Stack) -> None:
    code, headers, body, err = _curl(stack, "http://public.test/plain")
    assert (code, headers.get(":status")) == (0, "200"), err
    assert json.loads(body) == {"host": "public.test", "path": "/plain"}
    # HTTPS that the proxy decrypts: the agent trusts the Portcullis CA through its system store.
    code, headers, body, err = _curl(stack, "https://public.test/inspected")
    assert (code, headers.get(":status")) == (0, "200"), err
    assert json.loads(body)["path"] == "/inspected"
    # HTTPS passed through: the upstream's own certificate, checked by the agent.
    code, headers, body, err = _curl(stack, "https://other.test/passthrough")
    assert (code, headers.get(":status")) == (0, "200"), err


def test_denied_host_gets_the_403(stack: Stack) -> None:
    code, headers, body, _ = _curl(stack, "http://blocked.test/secret")
    assert code == 0 and headers[":status"] == "403"
    assert (headers["x-portcullis-decision"], headers["x-portcullis-reason"]) == ("deny", "rule")
    assert json.loads(body)["rule"] == "blocked"
    code, headers, _, err = _curl(stack, "https://blocked.test/secret")
    assert code != 0 and "403" in err  # the CONNECT itself is refused


def test_skipping_the_proxy_goes_nowhere(stack: Stack) -> None:
    """The upstream the proxy reaches is not reachable from the agent directly, by address or name,
    and the agent cannot reach the Valkey behind the proxy either."""
    for target in (f"http://{stack.upstream_ip}/direct", "http://public.test/direct", "http://valkey:6379/"):
        code, _, _, err = _curl(stack, "--noproxy", "*", "--connect-timeout", "5", target)
        assert code in (6, 7, 28), f"{target}: curl exit {code} ({err.strip()})"  # no name, no route, timeout
    # The only network the agent is on is the internal one.
    nets = ps.podman("inspect", "--format", "{{json .NetworkSettings.Networks}}", stack.name("agent")).stdout
    assert list(json.loads(nets)) == [f"{stack.project}_agents"]


def test_the_proxy_logged_every_decision_and_used_valkey(stack: Stack) -> None:
    _curl(stack, "http://public.test/logged")
    lines = ps.podman("logs", stack.name("portcullis")).stdout
    events = audit_events([line + "\n" for line in lines.splitlines() if line.strip()])
    for e in events:
        validate_event(e)
    decisions = [e for e in events if e["event"] == "egress.decision"]
    assert any(e["request"]["path"] == "/logged" and e["decision"] == "allow" for e in decisions)
    agent_ip = json.loads(
        ps.podman("inspect", "--format", "{{json .NetworkSettings.Networks}}", stack.name("agent")).stdout
    )[f"{stack.project}_agents"]["IPAddress"]
    assert {e["client"]["address"] for e in decisions} == {agent_ip}
    # The store is Valkey: the pending approval is there (and no SQLite file in the state volume).
    code, headers, body, _ = _curl(stack, "http://approve.test/ask")
    assert headers[":status"] == "403" and headers["x-portcullis-reason"] == "approval_pending"
    approval = json.loads(body)["approval_id"]
    keys = ps.podman("exec", stack.name("valkey"), "valkey-cli", "--scan", "--pattern", "portcullis:*").stdout
    assert any(approval in k for k in keys.split()), keys
    state = ps.podman("exec", stack.name("portcullis"), "ls", "/app/state").stdout.split()
    assert state == ["approved.yaml"], state
    # The agent sees the public certificate and nothing else of the CA.
    assert stack.agent("ls", "-A", "/portcullis-ca").stdout.split() == ["portcullis-ca.pem"]
    assert stack.agent("cat", "/portcullis-ca/portcullis-ca.pem").stdout.startswith("-----BEGIN CERTIFICATE")
