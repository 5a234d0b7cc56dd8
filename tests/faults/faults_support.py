"""Shared by the fault tests: a webhook receiver that misbehaves on demand, tmpfs mounts that are always
unmounted, and the checks every fault test ends with (the proxy still answers; every request sent is
exactly one logged decision; nothing forbidden reached an upstream)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from addons.approvals.webhook import VerifyError, verify
from addons.telemetry.validate import audit_events
from tests.approvals.approvals_support import SECRET, SECRET_ENV, TOKEN
from tests.harness import PortcullisProc, Reply, Upstreams, base_config

TOKEN_ENV = "PORTCULLIS_TEST_ADMIN_TOKEN"
ENV = {TOKEN_ENV: TOKEN, SECRET_ENV: SECRET}
RULES = [
    {"name": "open", "action": "allow", "hosts": ["public.test"]},
    {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
    {"name": "ask", "action": "approval", "hosts": ["approve.test"]},
    {"name": "ask-api", "action": "approval", "hosts": ["api.public.test"]},
]


# ------------------------------------------------------------------------------------------ clients


def get(host: str, port: int, path: str) -> bytes:
    return f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def send(p: PortcullisProc, u: Upstreams, host: str, path: str, timeout: float = 30.0) -> Reply:
    """One plain HTTP request through the proxy (a fresh connection)."""
    return p.raw(get(host, u.http_port, path), timeout)


class Background:
    """A request sent in a thread (a held one): `result()` waits for its reply (or the error)."""

    def __init__(self, fn: Callable[[], Reply]) -> None:
        self._out: list[Any] = []
        self._t = threading.Thread(target=lambda: self._out.append(_call(fn)), daemon=True)
        self._t.start()

    def done(self) -> bool:
        return not self._t.is_alive()

    def result(self, timeout: float = 30.0) -> Reply:
        self._t.join(timeout)
        assert not self._t.is_alive(), "the held request got no answer in time"
        got = self._out[0]
        if isinstance(got, BaseException):
            raise got
        return got  # type: ignore[no-any-return]


def _call(fn: Callable[[], Reply]) -> Any:
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - handed to result()
        return e


def admin(p: PortcullisProc, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.request(method, f"{p.admin_url}{path}", json=body, timeout=10, trust_env=False,
                         headers={"Authorization": f"Bearer {TOKEN}"})


def decide(p: PortcullisProc, approval_id: str, decision: str) -> httpx.Response:
    return admin(p, "POST", f"/approvals/{approval_id}", {"decision": decision, "scope": "once",
                                                          "reason": "fault test"})


def pending_ids(p: PortcullisProc) -> list[str]:
    r = admin(p, "GET", "/approvals")
    assert r.status_code == 200, r.text
    return [a["id"] for a in r.json()["approvals"] if a["state"] == "pending"]


def metric(p: PortcullisProc, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{p.admin_url}/metrics", timeout=10, trust_env=False).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.05)
    return got


# ------------------------------------------------------------------------------------------- checks


def still_answers(p: PortcullisProc, u: Upstreams, path: str = "/still-alive") -> None:
    """No crash: the proxy process is alive and an allowed request passes."""
    assert p.proc is not None and p.proc.poll() is None, "the proxy died:\n" + p.stderr_text()[-3000:]
    r = send(p, u, "public.test", path)
    assert r.status == 200, (r.status, r.body[:300])


def upstream_paths(u: Upstreams) -> list[str]:
    return sorted(str(r["path"]) for r in u.seen())


def audit(p: PortcullisProc, sent: int) -> list[dict[str, Any]]:
    """After stop: every line a valid event and exactly one egress.decision per request sent."""
    return audit_events(list(p.raw_lines), expected_decisions=sent)


def approval_proxy(folder: Path, u: Upstreams, hook_url: str | None, *, hook_timeout: str = "1s",
                   timeout: str = "30s", store: str = "sqlite:///state/portcullis.db",
                   env: dict[str, str] | None = None, **over: Any) -> PortcullisProc:
    approvals: dict[str, Any] = {"timeout": timeout, "hold": True, "store": store, "persist_to": None,
                                 "webhooks": [] if hook_url is None else
                                 [{"url": hook_url, "secret_env": SECRET_ENV, "timeout": hook_timeout}]}
    cfg = base_config(u, folder, approvals=approvals, **over)
    return PortcullisProc(folder, u, rules=RULES, config=cfg, env={**ENV, **(env or {})})


# -------------------------------------------------------------------------------- webhook receiver


class BadReceiver:
    """A loopback webhook endpoint whose behaviour the test sets (`mode`), recording every attempt:
    `ok` (200), `status500`, `garbage` (bytes that are not HTTP), `slow` (answers 200 after
    `slow_s`), `endless` (a 500 whose body never ends, one byte a second), `refuse` (closed: the
    connection is refused)."""

    def __init__(self, mode: str = "ok", slow_s: float = 3.0) -> None:
        self.mode = mode
        self.slow_s = slow_s
        self.attempts: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._threads: list[threading.Thread] = []
        if mode != "refuse":
            self._listen()

    def _listen(self) -> None:
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (ln.partition(":") for ln in head.decode("latin-1").split("\r\n")[1:])}
            while len(body) < int(headers.get("content-length", "0")):
                body += conn.recv(65536)
            try:
                verify(SECRET, headers, body)
                verified = True
            except VerifyError:
                verified = False
            with self._cond:
                self.attempts.append({"body": json.loads(body), "verified": verified, "mode": self.mode,
                                      "id": headers.get("webhook-id")})
                self._cond.notify_all()
            mode = self.mode
            if mode == "ok":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            elif mode == "status500":
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n"
                             b"Connection: close\r\n\r\noops!")
            elif mode == "garbage":
                conn.sendall(b"\x16\x03\x01\x00\xffnot http at all\r\n\x00\xff\r\n\r\n")
            elif mode == "slow":
                self._stop.wait(self.slow_s)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            elif mode == "endless":
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100000000000\r\n\r\n")
                while not self._stop.wait(1.0):
                    conn.sendall(b"x")

    def wait(self, n: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.attempts) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.attempts)} webhook attempts within {timeout}s"
                self._cond.wait(left)
            return list(self.attempts)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for t in self._threads:
            t.join(3)


# ------------------------------------------------------------------------------------------ mounts


def needs_root_mounts() -> None:
    if shutil.which("mount") is None or subprocess.run(["id", "-u"], capture_output=True,
                                                        text=True).stdout.strip() != "0":
        pytest.skip("needs root and mount(8) for a tmpfs")


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "256k") -> Iterator[Path]:
    """A small tmpfs mounted on `folder` (created), unmounted (lazily if busy) whatever happens."""
    needs_root_mounts()
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, mode: str) -> None:
    """`ro` or `rw` for a tmpfs mounted by `tmpfs()`."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True, capture_output=True)


def fill(folder: Path, name: str = "filler") -> Path:
    """Write into `folder` until its filesystem is full (ENOSPC); returns the filler file."""
    path = folder / name
    with open(path, "ab", buffering=0) as fh, contextlib.suppress(OSError):  # noqa: PTH123
        while True:
            fh.write(b"\0" * 4096)
    return path
