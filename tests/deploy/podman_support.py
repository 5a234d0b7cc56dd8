"""Podman for the deployment tests: skip reasons, the quirk-fixing config, images built once.

Images are tagged by a hash of what goes into them, so an unchanged tree reuses the image of an
earlier session (one build per change, not per session); the base image is made once per machine by
deploy/base-image.sh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "deploy" / "containers.conf"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "container tests need root (rootful podman; the base image needs debootstrap and chroot)"
    if shutil.which("podman") is None:
        return "podman is not installed (./dev test installs podman, runc, debootstrap as root)"
    if shutil.which("runc") is None:
        return "runc is not installed (deploy/containers.conf selects it; ./dev test installs it)"
    return None


def podman(*args: str, timeout: float = 120, check: bool = True, input: bytes | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                       env=env or podman_env(), input=input.decode() if input else None, check=False)
    if check and p.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def build_flags(host_ca: bool = True) -> list[str]:
    """The build flags these machines need: no pull, host network for pip/apt, the docker format (keeps
    HEALTHCHECK) and, for builds that run pip, the host's CA bundle (outbound TLS may be re-signed by a
    local CA; a build that runs update-ca-certificates must not have it, as the mount is read-only)."""
    flags = ["--pull=never", "--format", "docker", "--network", "host"]
    if host_ca and HOST_CA_BUNDLE.exists():
        flags += ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    return flags


def ensure_base_image() -> str:
    p = subprocess.run([str(REPO / "deploy" / "base-image.sh")], capture_output=True, text=True, timeout=600,
                       env=podman_env(), check=False)
    if p.returncode != 0:
        raise AssertionError(f"deploy/base-image.sh failed:\n{p.stderr[-3000:]}")
    return p.stdout.strip()


def tree_hash(paths: Iterable[Path], extra: str = "") -> str:
    """Content hash of files and folders (names and bytes; caches and bytecode skipped)."""
    h = hashlib.sha256(extra.encode())
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        elif p.is_file():
            files.append(p)
    for f in sorted(files):
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_image(repo_name: str, containerfile: Path, context: Path, inputs: Iterable[Path],
                host_ca: bool = True) -> str:
    """Build `localhost/<repo_name>:<content hash>` unless it exists; drop stale tags of the same name."""
    tag = f"localhost/{repo_name}:{tree_hash([containerfile, *inputs])}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    ensure_base_image()
    podman("build", *build_flags(host_ca), "-t", tag, "-f", str(containerfile), str(context), timeout=900)
    # The Containerfile's first stage stays behind untagged after every build: drop it.
    podman("image", "prune", "-f", "--filter", "label=io.portcullis.build-stage=wheel", check=False)
    listing = podman("images", "--format", "{{.Repository}}:{{.Tag}}", f"localhost/{repo_name}", check=False)
    for old in listing.stdout.split():
        if old != tag and old.startswith(f"localhost/{repo_name}:"):
            podman("rmi", old, check=False)
    return tag


def portcullis_image() -> str:
    inputs = [REPO / n for n in ("pyproject.toml", "README.md", "addons", "rules", "deploy/image",
                                 ".containerignore")]
    return build_image("portcullis-test", REPO / "Containerfile", REPO, inputs)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET without any proxy (the test's own environment may name one)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def wait_http(url: str, timeout: float = 60.0, container: str | None = None) -> None:
    """Poll until `url` answers 200 (bounded); fail early with the logs if the container died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            if http_get(url, timeout=2)[0] == 200:
                return
        except OSError as e:
            last = e
        if container is not None:
            state = podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
            if state in ("exited", "stopped", ""):
                logs = podman("logs", container, check=False)
                raise AssertionError(
                    f"{container} {state or 'gone'}:\n{logs.stdout[-2000:]}\n{logs.stderr[-2000:]}")
        time.sleep(0.25)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s ({last})")


def event_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{")]


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in event_lines(text)]


def skip_if_unusable() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
