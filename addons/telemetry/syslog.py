"""Syslog sink: each event as one RFC 5424 message over UDP (RFC 5426), TCP with octet-counting
framing (RFC 6587) or TLS (RFC 5425).

The proxy never waits for the receiver. `write()` formats the message and appends it to a bounded
buffer (microseconds, under a lock held by nobody for long); one sender thread connects, sends and
reconnects with backoff. While the receiver is away the buffer holds up to `buffer` messages; when
it is full, new events are dropped and counted (`events_dropped{sink="syslog"}`). A syslog outage
never denies traffic: the JSON lines on stdout (and the file sink) stay the audit trail.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import random
import re
import select
import socket
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from addons.policy.authority import split_authority
from addons.policy.config import SyslogConfig

log = logging.getLogger("portcullis.syslog")

DEFAULT_PORTS = {"udp": 514, "tcp": 514, "tls": 6514}
SEVERITY = {"error": 3, "warning": 4, "info": 6}  # err, warning, informational
CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 5.0       # a receiver that stops reading for this long counts as gone
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
BATCH_BYTES = 64 * 1024    # TCP/TLS: messages joined into one send
UDP_PROBE_S = 0.1          # UDP, after a refusal: how long to listen for the next ICMP "port unreachable"
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)$")
_NOT_PRINT = re.compile(r"[^\x21-\x7e]")


class SyslogConfigError(ValueError):
    """A syslog setting that cannot be used (unreadable CA or certificate): a startup error."""


def header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII, no spaces, at most `limit` characters; "-" if empty."""
    return _NOT_PRINT.sub("_", value)[:limit] or "-"


def format_message(pri: int, timestamp: str, hostname: str, app_name: str, procid: str, msgid: str,
                   msg: str) -> bytes:
    """`<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG` (no structured data: MSG is the event)."""
    if not _TIMESTAMP.match(timestamp):
        timestamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return (f"<{pri}>1 {timestamp} {hostname} {app_name} {procid} {header_field(msgid, 32)} - {msg}"
            .encode("utf-8", "backslashreplace"))


def tls_context(cfg: SyslogConfig, base_dir: Path) -> ssl.SSLContext:
    """Verifying client context (TLS >= 1.2, RFC 5425): the configured CA or the system store."""
    t = cfg.tls
    ca = _path(t.ca, base_dir) if t and t.ca else None
    try:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if t and t.cert:
            ctx.load_cert_chain(_path(t.cert, base_dir), _path(t.key, base_dir) if t.key else None)
    except (OSError, ssl.SSLError) as e:
        raise SyslogConfigError(f"telemetry.syslog.tls: cannot load the CA or certificate: {e}") from e
    return ctx


def _path(p: str, base_dir: Path) -> str:
    path = Path(p)
    return str(path if path.is_absolute() else base_dir / path)


class SyslogSink:
    """Bounded buffer + one sender thread. `on_drop(n)` is called for every event that is lost."""

    name = "syslog"

    def __init__(self, cfg: SyslogConfig, base_dir: Path, on_drop: Callable[[int], None]) -> None:
        host, port = split_authority(cfg.address)
        self.host = host.strip("[]")
        self.port = port if port is not None else DEFAULT_PORTS[cfg.transport]
        self.transport = cfg.transport
        self.capacity = cfg.buffer
        self.where = f"{cfg.transport}://{host}:{self.port}"
        self._server_name = (cfg.tls.server_name if cfg.tls and cfg.tls.server_name else self.host)
        self._ctx = tls_context(cfg, base_dir) if cfg.transport == "tls" else None
        self._facility = cfg.facility
        self._app = cfg.app_name
        self._hostname = cfg.hostname or header_field(socket.gethostname(), 255)
        self._on_drop = on_drop
        self.delivered = 0          # messages handed to the receiver (diagnostics and tests)
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=functools.partial(_reset_after_fork, weakref.ref(self)))

    def _reset(self) -> None:
        """Fresh state (also in a forked child, where the sender thread does not exist)."""
        self._buf: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._closing = False
        self._abandoned = False
        self._deadline = 0.0
        self._down: str | None = None      # why the receiver is away (None: all is well)
        self._lost_while_down = 0
        self._probe = False                # UDP: the last datagram was refused; confirm the next one
        self._last_udp: bytes | None = None  # UDP: the last datagram sent and not confirmed

    # ---- called by Telemetry (any thread, the event loop included) ------------------------------

    def write(self, line: str, level: str, event: str, timestamp: str) -> None:
        """Queue one event; never blocks on the network."""
        pri = self._facility * 8 + SEVERITY.get(level, 6)
        msg = format_message(pri, timestamp, self._hostname, self._app, str(os.getpid()), event, line)
        with self._cond:
            if self._closing or len(self._buf) >= self.capacity:
                full = True
                self._lost_while_down += 1
            else:
                full = False
                self._buf.append(msg)
                self._cond.notify()
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name="portcullis-syslog", daemon=True)
                self._thread.start()
        if full:
            self._on_drop(1)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def begin_close(self, deadline: float) -> None:
        """Stop taking events; the sender keeps delivering what is buffered until `deadline`."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = deadline
                self._cond.notify_all()

    def close(self, deadline: float) -> int:
        """Deliver what is buffered until `deadline` (time.monotonic()); returns how many were not."""
        self.begin_close(deadline)
        with self._cond:
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._abandoned = True
            lost = len(self._buf)
            self._buf.clear()
            self._cond.notify_all()
        if lost:
            self._on_drop(lost)
            log.warning("syslog %s: %d events not delivered at shutdown (%s)", self.where, lost,
                        self._down or "receiver too slow")
        return lost

    # ---- the sender thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug here must not silently stop delivery: the next write starts a new thread
            log.exception("syslog %s: the sender failed; restarting it with the next event", self.where)
            self._disconnect(graceful=False)
            with self._cond:
                self._thread = None

    def _loop(self) -> None:
        backoff = RETRY_MIN_S
        while True:
            with self._cond:
                while not self._buf and not self._closing:
                    self._cond.wait()
                if self._abandoned or not self._buf:
                    break
                batch = self._take()
            if self._closing and time.monotonic() >= self._deadline:
                break
            done, error = self._attempt(batch)
            with self._cond:
                if self._abandoned:
                    break
                for _ in range(done):
                    self._buf.popleft()
                self.delivered += done
            if error is None:
                if self._down is not None:
                    log.warning("syslog %s: delivering again (%d events dropped while it was away)",
                                self.where, self._lost_while_down)
                    self._down, self._lost_while_down = None, 0
                backoff = RETRY_MIN_S
                continue
            self._disconnect(graceful=False)
            if self._down is None:
                self._lost_while_down = 0
                log.warning("syslog %s: %s; holding up to %d events and retrying", self.where, error,
                            self.capacity)
            self._down = error
            self._sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter, not crypto
            backoff = min(backoff * 2, RETRY_MAX_S)
        self._disconnect(graceful=True)

    def _take(self) -> list[bytes]:
        if self.transport == "udp":
            return [self._buf[0]] if self._probe else list(itertools.islice(self._buf, 64))
        batch: list[bytes] = []
        size = 0
        for m in self._buf:
            if batch and size + len(m) > BATCH_BYTES:
                break
            batch.append(m)
            size += len(m)
        return batch

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            end = time.monotonic() + seconds
            if self._closing:
                end = min(end, self._deadline)
            while not self._abandoned and (left := end - time.monotonic()) > 0:
                self._cond.wait(left)

    def _attempt(self, batch: list[bytes]) -> tuple[int, str | None]:
        """Send a batch: (messages done, None) or (messages done before the failure, why it failed)."""
        try:
            if self._sock is None:
                self._sock = self._connect()
            if self.transport == "udp":
                return self._send_udp(self._sock, batch)
            if self._peer_closed(self._sock):
                return 0, "the receiver closed the connection"
        except (OSError, ValueError) as e:
            return 0, _why(e)
        return self._send_stream(self._sock, batch)

    def _connect(self) -> socket.socket:
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        if kind == socket.SOCK_DGRAM:
            family, _, _, _, addr = socket.getaddrinfo(self.host, self.port, type=kind)[0]
            sock = socket.socket(family, kind)
            sock.connect(addr)  # a connected UDP socket reports ICMP "port unreachable" as ECONNREFUSED
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._ctx is not None:
                sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)
            sock.settimeout(SEND_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        return sock

    def _send_stream(self, sock: socket.socket, batch: list[bytes]) -> tuple[int, str | None]:
        """Octet counting (`LEN SP MSG`); tracks how many messages went out whole before an error."""
        frames = [f"{len(m)} ".encode() + m for m in batch]
        data = memoryview(b"".join(frames))
        sent = 0
        try:
            while sent < len(data):
                sent += sock.send(data[sent:])
        except (OSError, ValueError) as e:
            done = 0
            end = 0
            for f in frames:
                end += len(f)
                if end > sent:
                    break
                done += 1
            return done, _why(e)
        return len(batch), None

    def _send_udp(self, sock: socket.socket, batch: list[bytes]) -> tuple[int, str | None]:
        """One datagram each. A connected UDP socket learns from ICMP "port unreachable" that a datagram
        was refused, but only on the next send: that send fails, and the datagram sent just before it
        (the one refused, on loopback and most LANs) is put back. After the backoff one datagram is
        confirmed (no refusal within UDP_PROBE_S) before the rest follow."""
        done = 0
        for m in batch:
            try:
                sock.send(m)
            except OSError as e:
                if e.errno == errno.EMSGSIZE:  # too big for one datagram: drop it, not the queue
                    self._on_drop(1)
                    done += 1
                    continue
                if done > 0:
                    done -= 1              # the previous datagram of this batch stays queued
                elif self._last_udp is not None:
                    with self._cond:
                        self._buf.appendleft(self._last_udp)
                self._last_udp = None
                self._probe = True
                return done, _why(e)
            confirmed = self._probe
            if self._probe:
                readable, _, _ = select.select([sock], [], [], UDP_PROBE_S)
                if readable:
                    try:
                        sock.recv(1)
                    except OSError as e:
                        return done, _why(e)
                self._probe = False
            self._last_udp = None if confirmed else m
            done += 1
        return done, None

    def _peer_closed(self, sock: socket.socket) -> bool:
        """Did the receiver close (or reset) the connection? Checked before every send, so a receiver
        restart is noticed before events are written into a dead connection."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        sock.settimeout(0)
        try:
            return sock.recv(4096) == b""   # a receiver never talks; anything read is discarded
        except (ssl.SSLWantReadError, BlockingIOError):
            return False                   # e.g. a TLS 1.3 session ticket: no application data
        except (OSError, ValueError):
            return True
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(SEND_TIMEOUT_S)

    def _disconnect(self, graceful: bool) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if graceful and isinstance(sock, ssl.SSLSocket):
                sock.settimeout(0.2)
                sock.unwrap()      # close_notify: the receiver sees a clean end of stream
        with contextlib.suppress(OSError):
            sock.close()


def _reset_after_fork(ref: weakref.ref[SyslogSink]) -> None:
    sink = ref()
    if sink is not None:
        sink._reset()


def _why(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}"
