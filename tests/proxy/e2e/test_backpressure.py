"""A held client is not read past a bound (addons/proxy/mitm_compat/backpressure.py), through the real proxy:
a 200 MiB upload held for an approval blocks its sender while the proxy's memory stays flat, then arrives
upstream intact once allowed (or not at all once denied); bytes pipelined behind a held GET likewise;
other connections flow meanwhile. Run with -s to see the measured RSS."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.approvals.e2e_support import ENV, decide, pending, wait_for
from tests.harness import PUBLIC_IP, PortcullisProc, base_config, read_reply

pytestmark = pytest.mark.e2e

MIB = 1 << 20
BODY_MIB = 200
BLOCK = os.urandom(MIB - 8)


def chunks(n_mib: int) -> Iterator[bytes]:
    for i in range(n_mib):
        yield struct.pack(">Q", i) + BLOCK  # every MiB differs: order and content are checked


class CountingUpstream:
    """An HTTP/1 upstream on 127.0.0.2 that reads a Content-Length body and answers its length and hash."""

    def __init__(self) -> None:
        self.srv = socket.create_server((PUBLIC_IP, 0))
        self.port = self.srv.getsockname()[1]
        self.got: list[tuple[int, str]] = []
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length"))
            h, n = hashlib.sha256(rest), len(rest)
            while n < length and (chunk := conn.recv(1 << 20)):
                h.update(chunk)
                n += len(chunk)
            self.got.append((n, h.hexdigest()))
            body = f"{n} {h.hexdigest()}".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (a close alone does not)
        self.srv.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


class Sender(threading.Thread):
    """Sends `head` then the body on `sock`, counting what the kernel accepted (bounded send timeout)."""

    def __init__(self, sock: socket.socket, head: bytes, body: Iterator[bytes]) -> None:
        super().__init__(daemon=True)
        self.sock, self.head, self.body = sock, head, body
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.sock.sendall(self.head)
            for chunk in self.body:
                view = memoryview(chunk)
                while view:
                    n = self.sock.send(view)
                    self.sent += n
                    view = view[n:]
        except OSError as e:
            self.error = e

    def wait_blocked(self) -> None:
        """Until the kernel stops accepting bytes (4 polls without progress), bounded to 60 s."""
        last, still, deadline = -1, 0, time.monotonic() + 60
        while still < 4 and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
            still = still + 1 if self.sent == last else 0
            last = self.sent


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture
def up() -> Iterator[CountingUpstream]:
    u = CountingUpstream()
    yield u
    u.close()


@pytest.fixture
def proxy(tmp_path, upstreams) -> Iterator[PortcullisProc]:
    cfg = base_config(upstreams, tmp_path, default_action="approval",
                      approvals={"timeout": "300s", "hold": True})
    rules = [{"name": "public", "action": "allow", "hosts": ["public.test"]}]
    with PortcullisProc(tmp_path, upstreams, rules=rules, config=cfg, env=ENV) as p:
        yield p


def held_upload(
    p: PortcullisProc, port: int, head: bytes, body: Iterator[bytes]
) -> tuple[socket.socket, Sender, str, float]:
    """Start the upload, wait for its approval and for its sender to block; return the approval id and
    how much the proxy's RSS grew (MiB)."""
    assert p.proc is not None
    wait_for(lambda: p.curl(f"http://public.test:{p.u.http_port}/warm").status == 200)  # type: ignore[union-attr]
    before = rss_mib(p.proc.pid)
    s = p.connect()
    s.settimeout(120)
    sender = Sender(s, head, body)
    sender.start()
    wait_for(lambda: pending(p), timeout=20)
    [approval] = pending(p)
    sender.wait_blocked()
    grown = rss_mib(p.proc.pid) - before
    print(f"\nheld: sent {sender.sent / MIB:.1f} MiB of {BODY_MIB} MiB; "
          f"proxy RSS {before:.0f} -> {before + grown:.0f} MiB")
    assert sender.is_alive() and sender.sent < 64 * MIB  # the proxy stopped reading: the sender blocks
    assert grown < 64  # far less than the body
    return s, sender, approval["id"], grown


def upload_head(port: int) -> bytes:
    return (f"POST http://approve.test:{port}/upload HTTP/1.1\r\nHost: approve.test:{port}\r\n"
            f"Content-Length: {BODY_MIB * MIB}\r\nContent-Type: application/octet-stream\r\n\r\n").encode()


def expected_hash() -> str:
    h = hashlib.sha256()
    for c in chunks(BODY_MIB):
        h.update(c)
    return h.hexdigest()


def test_a_held_upload_is_not_buffered_and_arrives_whole_once_allowed(proxy, up):
    s, sender, approval_id, _ = held_upload(proxy, up.port, upload_head(up.port), chunks(BODY_MIB))
    with s:
        other = proxy.curl(f"http://public.test:{proxy.u.http_port}/meanwhile")  # type: ignore[union-attr]
        assert other.status == 200  # other connections flow while this one is held
        assert up.connections == 0  # nothing went upstream while held
        assert decide(proxy, approval_id, "allow").status_code == 200
        sender.join(120)
        assert not sender.is_alive() and sender.error is None and sender.sent == BODY_MIB * MIB
        reply = read_reply(s)
        assert reply.status == 200
    assert up.got == [(BODY_MIB * MIB, expected_hash())]


def test_a_denied_held_upload_sends_nothing_upstream_and_answers_403(proxy, up):
    s, sender, approval_id, _ = held_upload(proxy, up.port, upload_head(up.port), chunks(BODY_MIB))
    with s:
        assert decide(proxy, approval_id, "deny").status_code == 200
        reply = read_reply(s)
        assert reply.status == 403
    sender.join(60)
    ev = proxy.wait_event("egress.decision", approval_id=approval_id)
    assert (ev["decision"], ev["reason"]) == ("deny", "approval_denied")
    assert up.connections == 0 and up.got == []


def test_bytes_pipelined_behind_a_held_get_are_bounded(proxy, up):
    head = f"GET http://approve.test:{up.port}/held HTTP/1.1\r\nHost: approve.test:{up.port}\r\n\r\n".encode()
    s, sender, approval_id, _ = held_upload(proxy, up.port, head, chunks(BODY_MIB))
    with s:
        assert decide(proxy, approval_id, "deny").status_code == 200
        assert read_reply(s).status == 403
        # What follows the GET is read only now, and it is no request: refused and the connection
        # closed, which stops the sender (a close of our own would not wake its blocked send).
        s.settimeout(20)
        with contextlib.suppress(ConnectionResetError):
            while s.recv(65536):
                pass
        sender.join(20)
    assert not sender.is_alive() and isinstance(sender.error, OSError), sender.error
    assert sender.sent < BODY_MIB * MIB
    ev = proxy.wait_event("egress.decision", reason="bad_request")
    assert ev["decision"] == "deny"
    assert up.connections == 0  # nothing of it went anywhere




def test_a_held_client_that_resets_is_seen_while_its_reads_are_paused(proxy, up):
    s, sender, approval_id, _ = held_upload(proxy, up.port, upload_head(up.port), chunks(BODY_MIB))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.shutdown(socket.SHUT_RDWR)  # wakes the blocked sender (a close alone waits for its send)
    sender.join(10)
    s.close()  # RST: the paused reader's TCP_INFO probe sees it, mitmproxy then sees the close
    ev = proxy.wait_event("egress.decision", approval_id=approval_id, timeout=20)
    assert (ev["decision"], ev["reason"]) == ("deny", "client_closed")
    assert up.connections == 0
