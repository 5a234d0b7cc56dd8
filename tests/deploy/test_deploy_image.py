"""The container image, built from the working tree and run with podman (root; skipped otherwise).

The container shares the host's network (`--network host`), so that it reaches the loopback
upstreams of tests/harness.py (127.0.0.2/3) and the test reaches its listeners on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from addons.telemetry.validate import audit_events, validate_event
from tests.deploy import podman_support as ps
from tests.harness import Upstreams, base_config
from tests.telemetry import audit_plugin

pytestmark = [pytest.mark.container, pytest.mark.e2e]

TOKEN = "image-test-admin-token-0123456789"
UID = 10001


@dataclass
class Box:
    name: str
    image: str
    port: int
    admin_port: int
    volume: str
    folder: Path

    @property
    def volume_dir(self) -> Path:
        out = ps.podman("volume", "inspect", "--format", "{{.Mountpoint}}", self.volume).stdout.strip()
        return Path(out)

    def curl(self, url: str, cacert: Path | None = None) -> tuple[int | None, dict[str, str], bytes]:
        body = self.folder / f"body-{uuid.uuid4().hex}"
        cmd = ["curl", "-sS", "--noproxy", "", "-x", f"http://127.0.0.1:{self.port}", "-D", "-",
               "-o", str(body), "--max-time", "15"]
        if cacert is not None:
            cmd += ["--cacert", str(cacert)]
        p = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=30, check=False,
                           env={"PATH": os.environ["PATH"]})
        status, headers = None, {}
        for line in p.stdout.splitlines():
            if line.startswith("HTTP/"):
                status, headers = int(line.split()[1]), {}
            elif ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        data = body.read_bytes() if body.exists() else b""
        return status, headers, data

    def stdout(self) -> str:
        return ps.podman("logs", self.name).stdout


def _audit(text: str, upstreams: Upstreams) -> list[dict[str, Any]]:
    """The suite-wide audit of tests/telemetry/audit_plugin.py, applied to the container's stdout: every
    line an event, every decision once, and the upstream requests covered by logged decisions."""
    events = audit_events([line + "\n" for line in text.splitlines() if line.strip()])
    audit_plugin.DECISIONS.extend(e for e in events if e["event"] == "egress.decision")
    upstreams.clear()  # hands what the upstreams saw to the session-end check
    for e in events:
        validate_event(e)
    return events


@pytest.fixture
def box(portcullis_image: str, upstreams: Upstreams, redis_url: str, tmp_path: Path) -> Iterator[Box]:
    name = f"portcullis-test-{uuid.uuid4().hex[:8]}"
    b = Box(name, portcullis_image, ps.free_port(), ps.free_port(), f"{name}-certs", tmp_path)
    cfg = base_config(
        upstreams, tmp_path,
        listen=f"127.0.0.1:{b.port}",
        admin={"listen": f"127.0.0.1:{b.admin_port}", "token_env": "PORTCULLIS_ADMIN_TOKEN"},
        approvals={"store": redis_url},  # the image carries the redis extra
        tls={"inspect": "auto", "ca_dir": "certs/", "upstream_ca": "/app/upstream-ca.pem"},
    )
    (tmp_path / "portcullis.yaml").write_text(json.dumps(cfg))
    (tmp_path / "rules").mkdir()
    rules = [{"name": "public", "action": "allow", "hosts": ["public.test"], "paths": ["/*"]},
             {"name": "blocked", "action": "deny", "hosts": ["blocked.test"]}]
    (tmp_path / "rules" / "main.yaml").write_text(json.dumps({"rules": rules}))
    upstreams.clear()
    ps.podman("volume", "create", b.volume)
    try:
        ps.podman("run", "-d", "--name", name, "--network", "host", "-e", f"PORTCULLIS_ADMIN_TOKEN={TOKEN}",
                  "-v", f"{tmp_path / 'portcullis.yaml'}:/app/portcullis.yaml:ro",
                  "-v", f"{tmp_path / 'rules'}:/app/rules:ro",
                  "-v", f"{upstreams.ca_pem}:/app/upstream-ca.pem:ro",
                  "-v", f"{b.volume}:/app/certs", portcullis_image)
        ps.wait_http(f"http://127.0.0.1:{b.admin_port}/healthz", container=name)
        yield b
    finally:
        ps.podman("rm", "-f", "-v", "-t", "0", name, check=False)
        ps.podman("volume", "rm", "-f", b.volume, check=False)


def test_image_serves_filters_and_stops_cleanly(box: Box, upstreams: Upstreams) -> None:
    # Alive and ready, and the image's own HEALTHCHECK agrees.
    assert ps.http_get(f"http://127.0.0.1:{box.admin_port}/healthz")[0] == 200
    ps.wait_http(f"http://127.0.0.1:{box.admin_port}/readyz", container=box.name)
    assert ps.podman("healthcheck", "run", box.name, check=False).returncode == 0

    # Runs as the image's non-root user.
    assert ps.podman("exec", box.name, "id", "-u").stdout.strip() == str(UID)
    assert ps.podman("inspect", "--format", "{{.Config.User}}", box.name).stdout.strip() == f"{UID}:{UID}"

    # The CA was created on the volume: folder 700, key files 600, owned by the container's user.
    ca = box.volume_dir
    assert stat.S_IMODE(ca.stat().st_mode) == 0o700
    for key in ("mitmproxy-ca.pem", "mitmproxy-ca.p12"):
        st = (ca / key).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, UID), key
    bundle = box.folder / "trust.pem"
    bundle.write_text(upstreams.ca_pem.read_text() + (ca / "mitmproxy-ca-cert.pem").read_text())

    # Allowed: plain HTTP, and HTTPS inspected with the CA from the volume.
    status, _, body = box.curl(f"http://public.test:{upstreams.http_port}/plain")
    assert status == 200 and json.loads(body)["path"] == "/plain"
    status, _, body = box.curl(f"https://public.test:{upstreams.tls_port}/inspected", cacert=bundle)
    assert status == 200 and json.loads(body)["path"] == "/inspected"
    # Denied, with the verdict in the headers and the body.
    status, headers, body = box.curl(f"http://blocked.test:{upstreams.http_port}/nope")
    verdict = (status, headers.get("x-portcullis-decision"), headers.get("x-portcullis-reason"))
    assert verdict == (403, "deny", "rule")
    assert json.loads(body)["rule"] == "blocked"
    assert not upstreams.seen(lambda r: r["path"] == "/nope")

    # podman stop sends SIGTERM: a clean exit 0 and a proxy.stopped event, well before the kill timeout.
    ps.podman("stop", "-t", "20", box.name, timeout=60)
    assert ps.podman("inspect", "--format", "{{.State.ExitCode}}", box.name).stdout.strip() == "0"
    events = _audit(box.stdout(), upstreams)
    assert events[-1]["event"] == "proxy.stopped" and events[-1]["exit_code"] == 0
    started = [e for e in events if e["event"] == "proxy.started"]
    assert started and started[0]["listen"] == [f"127.0.0.1:{box.port}"]
    layers = {(e["destination"]["host"], e["request"]["path"]): (e["decision"], e["layer"])
              for e in events if e["event"] == "egress.decision" and e["request"]["path"]}
    assert layers[("public.test", "/plain")] == ("allow", "http")
    assert layers[("public.test", "/inspected")] == ("allow", "inspected")
    assert layers[("blocked.test", "/nope")] == ("deny", "http")


def test_image_has_no_ca_key_and_a_valid_config(portcullis_image: str) -> None:
    """The CA key is never in the image; the baked config validates; the Redis client is installed."""
    script = ("find / -xdev \\( -name 'mitmproxy-ca*' -o -name '*.p12' \\) -print; "
              "find /app/certs /app/state -mindepth 1; python -c 'import redis' && echo redis-ok")
    p = ps.podman("run", "--rm", "--network", "none", "--entrypoint", "sh", portcullis_image, "-c", script)
    assert p.stdout.split() == ["redis-ok"], p.stdout
    p = ps.podman("run", "--rm", "--network", "none", "--entrypoint", "portcullis", portcullis_image,
                  "validate", "--config", "/app/portcullis.yaml", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    for var in ("PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"):
        assert var in ps.podman("inspect", "--format", "{{json .Config.Env}}", portcullis_image).stdout


def test_certs_folder_of_another_owner_says_what_to_do(portcullis_image: str, tmp_path: Path) -> None:
    """A host folder owned by root on /app/certs: exit 2 with a message naming the two fixes; after
    the first fix (chown to the container's uid) the same folder works, and the HEALTHCHECK passes."""
    certs = tmp_path / "certs"
    certs.mkdir(mode=0o755)
    name = f"portcullis-test-{uuid.uuid4().hex[:8]}"
    run = ["run", "--name", name, "--network", "none", "-e", f"PORTCULLIS_ADMIN_TOKEN={TOKEN}",
           "-v", f"{certs}:/app/certs", portcullis_image]
    try:
        p = ps.podman(*run, check=False, timeout=60)
        assert p.returncode == 2
        assert "cannot create the CA in /app/certs" in p.stderr
        assert f"belongs to uid 0, this process runs as uid {UID}" in p.stderr
        assert f"chown -R {UID}" in p.stderr and "named volume" in p.stderr
        ps.podman("rm", "-f", "-v", name)

        os.chown(certs, UID, UID)
        ps.podman(*run[:1], "-d", *run[1:])
        deadline = time.monotonic() + 30
        while ps.podman("healthcheck", "run", name, check=False).returncode != 0:
            assert time.monotonic() < deadline, ps.podman("logs", name, check=False).stderr[-2000:]
            time.sleep(0.25)
        assert stat.S_IMODE((certs / "mitmproxy-ca.pem").stat().st_mode) == 0o600
        ps.podman("stop", "-t", "20", name, timeout=60)
        assert ps.podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        ps.podman("rm", "-f", "-v", "-t", "0", name, check=False)
