"""Shared by the group-B fault tests (tests/faults/test_fault_b_*.py): a proxy whose stdout reader can
be paused, misbehaving upstreams (refusing, resetting, stalling), raw clients and metric reads.

Everything here is bounded: every loop has a count and a deadline, every server and socket is closed.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from tests.harness import PUBLIC_IP, PortcullisProc, Reply, read_reply

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class GatedProc(PortcullisProc):
    """A PortcullisProc whose stdout reader can stop reading (`pause()`) and start again (`resume()`).

    While paused nobody reads the proxy's stdout pipe: it fills, as with a log shipper that hangs.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._gate = threading.Event()
        self._gate.set()

    def pause(self) -> None:
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        while True:
            while not self._gate.wait(0.2):
                if self.proc is None or self.proc.poll() is not None:
                    break
            line = out.readline()
            if not line:
                break
            self._take(line)
        with self._cond:
            self._cond.notify_all()

    def stop(self, *a: Any, **kw: Any) -> int:
        self.resume()  # never stop a proxy whose stdout nobody reads: its last events would be lost
        return super().stop(*a, **kw)


# ------------------------------------------------------------------------------------------ admin side
def admin_get(p: PortcullisProc, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with NO_PROXY.open(f"http://127.0.0.1:{p.admin_port}{path}", timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def metric(p: PortcullisProc, prefix: str, timeout: float = 5.0) -> float:
    """The sum of every /metrics sample whose line starts with `prefix`."""
    status, body = admin_get(p, "/metrics", timeout)
    assert status == 200
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in body.decode().splitlines() if ln.startswith(prefix))


def admin_post(p: PortcullisProc, path: str, doc: dict[str, Any], token: str, timeout: float = 10.0) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{p.admin_port}{path}", data=json.dumps(doc).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with NO_PROXY.open(req, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


# ------------------------------------------------------------------------------------------ clients
def get_request(host: str, port: int, path: str = "/", close: bool = False) -> bytes:
    auth = f"{host}:{port}"
    extra = "Connection: close\r\n" if close else ""
    return f"GET http://{auth}{path} HTTP/1.1\r\nHost: {auth}\r\n{extra}\r\n".encode()


def get(p: PortcullisProc, host: str, port: int, path: str = "/", timeout: float = 10.0) -> Reply:
    return p.raw(get_request(host, port, path, close=True), timeout=timeout)


def decisions_by_flow(p: PortcullisProc) -> Counter[str]:
    return Counter(str(e.get("flow_id")) for e in p.decisions())


def assert_each_decision_once(p: PortcullisProc) -> None:
    """No flow has two decisions, except a tunnel refused after its first bytes (allow, then deny)."""
    per_flow: dict[str, list[str]] = {}
    for e in p.decisions():
        per_flow.setdefault(str(e.get("flow_id")), []).append(str(e.get("reason")))
    twice = {f: r for f, r in per_flow.items() if len(r) > 1 and r[-1] != "sni_mismatch"}
    assert not twice, f"flows decided more than once: {list(twice.items())[:5]}"


def raise_nofile(want: int) -> int:
    """Raises this process's RLIMIT_NOFILE soft limit towards `want` (children inherit it).

    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            with contextlib.suppress(ValueError, OSError):  # root may raise the hard limit too
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    return 0


# ------------------------------------------------------------------------------------------ bad upstreams
class BadUpstream:
    """A TCP server on 127.0.0.2 that misbehaves: `reset` (accept, read, RST via SO_LINGER 0) or
    `stall` (accept, read, never answer). `accepted` counts connections; `stop()` closes everything."""

    def __init__(self, mode: str, host: str = PUBLIC_IP) -> None:
        assert mode in ("reset", "stall")
        self.mode = mode
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.received = b""
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"bad-upstream-{mode}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.accepted += 1
            conn.settimeout(0.5)
            with contextlib.suppress(OSError):
                data = conn.recv(65536)
                with self._lock:
                    self.received += data
            if self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # RST, not FIN
            else:
                with self._lock:
                    self._held.append(conn)  # never answered; closed in stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        with self._lock:
            for c in self._held:
                with contextlib.suppress(OSError):
                    c.close()
            self._held.clear()

    def __enter__(self) -> BadUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = PUBLIC_IP) -> int:
    """A port nothing listens on (connect is refused)."""
    s = socket.socket()
    s.bind((host, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def read_reply_or_close(s: socket.socket) -> Reply | None:
    """One reply, or None when the proxy closed the connection without one."""
    try:
        return read_reply(s)
    except (ConnectionError, OSError):
        return None


def wait_until(pred: Any, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())
