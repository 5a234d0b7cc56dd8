"""Fixtures for the deployment tests: podman images built once per change, a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.deploy import podman_support as ps
from tests.harness import upstreams  # noqa: F401  (session fixture)


@pytest.fixture(scope="session")
def portcullis_image() -> str:
    """The image built from the working tree (`localhost/portcullis-test:<content hash>`)."""
    ps.skip_if_unusable()
    return ps.portcullis_image()


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server missing: apt-get install -y redis-server (./dev test installs it)")
    port = ps.free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
