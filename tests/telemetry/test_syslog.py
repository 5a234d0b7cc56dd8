"""The syslog sink without rsyslog (fast tier): config errors, the RFC 5424 line, octet-counting frames
read by a loopback receiver, a receiver that stops reading (the caller never waits), an oversized
UDP datagram, and shutdown with the receiver away. The rsyslog tests are e2e/test_syslog_rsyslog.py."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from addons.config.load import PolicyError, load_config
from addons.telemetry.events import Telemetry
from addons.telemetry.syslog import format_message, header_field
from tests.telemetry.tel_helpers import lines, make, record

RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    r"- (?P<msg>.*)$",
    re.DOTALL,
)


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def metric(t: Telemetry, name: str) -> float:
    return t.metrics.registry.get_sample_value(name, {"sink": "syslog"}) or 0.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FrameReceiver:
    """A TCP receiver that reads RFC 6587 octet-counted frames (`LEN SP MSG`), strictly."""

    def __init__(self, read: bool = True) -> None:
        self.read = read
        self.frames: list[bytes] = []
        self.errors: list[str] = []
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen()
        self.port = self.srv.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.read:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b" " in buf:
                length, _, rest = buf.partition(b" ")
                if not length.isdigit():
                    self.errors.append(f"bad frame length {length[:20]!r}")
                    return
                if len(rest) < int(length):
                    break
                self.frames.append(rest[: int(length)])
                buf = rest[int(length):]

    def close(self) -> None:
        self.srv.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def frames() -> Iterator[FrameReceiver]:
    r = FrameReceiver()
    yield r
    r.close()


def test_message_is_rfc5424_with_no_structured_data_and_the_event_as_msg() -> None:
    m = format_message(19 * 8 + 4, "2026-12-01T09:03:00.123Z", "gw", "portcullis", "42", "egress.decision",
                       '{"a":1}').decode()
    assert m == '<156>1 2026-12-01T09:03:00.123Z gw portcullis 42 egress.decision - {"a":1}'
    # A bad timestamp is replaced by now; header fields never carry spaces or control characters.
    odd = format_message(14, "yesterday", "gw", "p", "1", "x y\n", "m").decode()
    g = RFC5424.match(odd)
    assert g and re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", g["ts"]) and g["msgid"] == "x_y_"
    assert header_field("", 10) == "-" and header_field("a" * 60, 48) == "a" * 48
    assert header_field("host name\u00e9", 255) == "host_name_"


def test_tcp_frames_are_octet_counted_and_carry_the_stdout_line(
    tmp_path: Path, frames: FrameReceiver
) -> None:
    t, out = make(tmp_path, syslog={"address": f"127.0.0.1:{frames.port}", "transport": "tcp",
                                    "facility": 13, "app_name": "pc", "hostname": "gw.test"})
    t.decision(record(decision="deny", reason="rule"))
    t.decision(record(decision="allow", reason="rule", path="/a b/\u00e9"))
    t.emit("proxy.stopped", exit_code=0)
    assert wait_for(lambda: len(frames.frames) == 3), frames.errors
    t.close()
    assert not frames.errors
    sent = out.getvalue().splitlines()
    for frame, line, sev, msgid in zip(frames.frames, sent, (4, 6, 6),
                                       ("egress.decision", "egress.decision", "proxy.stopped"), strict=True):
        g = RFC5424.match(frame.decode("ascii"))   # the JSON is pure ASCII: no BOM needed
        assert g, frame
        assert int(g["pri"]) == 13 * 8 + sev and g["host"] == "gw.test" and g["app"] == "pc"
        assert g["msgid"] == msgid and g["msg"] == line
        assert g["ts"] == json.loads(line)["timestamp"]


def test_ocsf_format_sends_ocsf_to_syslog_too(tmp_path: Path, frames: FrameReceiver) -> None:
    t, _ = make(tmp_path, log={"format": "ocsf"},
                syslog={"address": f"127.0.0.1:{frames.port}", "transport": "tcp"})
    t.decision(record(decision="deny", reason="rule"))
    assert wait_for(lambda: len(frames.frames) == 1)
    t.close()
    g = RFC5424.match(frames.frames[0].decode())
    assert g and json.loads(g["msg"])["class_uid"] == 4002 and int(g["pri"]) == 16 * 8 + 4  # local0


def test_a_receiver_that_stops_reading_never_holds_up_the_caller(tmp_path: Path) -> None:
    stuck = FrameReceiver(read=False)   # accepts, never reads: the sender thread blocks in send()
    try:
        t, out = make(tmp_path, syslog={"address": f"127.0.0.1:{stuck.port}", "transport": "tcp",
                                        "buffer": 100})
        n = 30_000   # far more than the kernel's socket buffers hold
        done = threading.Event()

        def emit_all() -> None:
            for i in range(n):
                t.emit("rules.reloaded", trigger=f"load-{i}", files=["x" * 200])
            done.set()

        th = threading.Thread(target=emit_all, daemon=True)
        th.start()
        assert done.wait(120), "emit() waited for the syslog receiver"
        assert len(out.getvalue().splitlines()) == n and t.healthy()
        assert metric(t, "portcullis_events_buffered") <= 100
        assert metric(t, "portcullis_events_dropped_total") > 0     # the bounded buffer overflowed
        closer = threading.Thread(target=t.close, daemon=True)
        closer.start()
        closer.join(30)
        assert not closer.is_alive()
        assert metric(t, "portcullis_events_buffered") == 0
    finally:
        stuck.close()


def test_receiver_away_at_shutdown_counts_what_was_not_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    t, out = make(tmp_path, syslog={"address": f"127.0.0.1:{closed_port()}", "transport": "tcp"})
    for i in range(3):
        t.emit("rules.reloaded", trigger=str(i))
    assert wait_for(lambda: metric(t, "portcullis_events_buffered") == 3)
    assert t.healthy() and len(lines(out)) == 3   # no denial for a syslog outage
    with caplog.at_level(logging.WARNING, logger="portcullis.syslog"):
        closer = threading.Thread(target=t.close, daemon=True)
        closer.start()
        closer.join(30)
        assert not closer.is_alive()
    assert metric(t, "portcullis_events_dropped_total") == 3
    assert "3 events not delivered at shutdown" in caplog.text
    t.emit("rules.reloaded", trigger="late")      # after close: counted, never raised
    assert metric(t, "portcullis_events_dropped_total") == 4


def test_udp_datagram_too_big_is_dropped_and_the_next_one_goes(tmp_path: Path) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(10)
    try:
        t, _ = make(tmp_path, syslog={"address": f"127.0.0.1:{rx.getsockname()[1]}", "transport": "udp"})
        t.emit("rules.reload_failed", errors=[f"{i}:" + "e" * 2000 for i in range(40)])  # ~80 KB
        t.emit("rules.reloaded", trigger="small")
        data = rx.recv(65536)
        g = RFC5424.match(data.decode())
        assert g and json.loads(g["msg"])["trigger"] == "small"
        assert wait_for(lambda: metric(t, "portcullis_events_dropped_total") == 1)
        t.close()
    finally:
        rx.close()


def _config_file(tmp_path: Path, syslog: str) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    cfg = tmp_path / "portcullis.yaml"
    cfg.write_text("rules: [rules/]\ntelemetry:\n  syslog:\n" + syslog)
    return cfg


A514 = "    address: 127.0.0.1:514\n"


@pytest.mark.parametrize(("body", "message"), [
    (A514 + "    transport: tpc\n", "telemetry.syslog.transport"),
    ("    address: 127.0.0.1:99999\n    transport: tcp\n", "bad port"),
    (A514 + "    transport: tcp\n    facility: local9\n", "unknown facility 'local9'"),
    (A514 + "    transport: tcp\n    app_name: my app\n", "printable ASCII"),
    (A514 + "    transport: udp\n    tls: {ca: ca.pem}\n", "only used with transport: tls"),
    (A514 + "    transport: tcp\n    bufer: 10\n", "unknown key 'bufer'"),
    ("    transport: tcp\n", "telemetry.syslog.address: required key is missing"),
])
def test_config_errors_name_the_key_and_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        load_config(_config_file(tmp_path, body))
    text = "\n".join(e.value.errors)
    assert message in text and re.search(r"portcullis\.yaml:\d+:\d+: ", text), text


def test_unreadable_ca_is_a_startup_error(tmp_path: Path) -> None:
    cfg = _config_file(tmp_path, A514 + "    transport: tls\n    tls: {ca: missing.pem}\n")
    cmd = [sys.executable, "-m", "addons.cli", "run", "--config", str(cfg),
           "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2, proc.stderr
    assert "telemetry.syslog.tls: cannot load the CA" in proc.stderr and proc.stdout == ""


def test_a_failing_sender_thread_is_restarted_by_the_next_event(
    tmp_path: Path, frames: FrameReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    t, _ = make(tmp_path, syslog={"address": f"127.0.0.1:{frames.port}", "transport": "tcp"})
    sink = t._syslog
    assert sink is not None
    real = sink._attempt
    calls: list[int] = []

    def broken_once(batch: list[bytes]) -> tuple[int, str | None]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("a bug in the sender")
        return real(batch)

    sink._attempt = broken_once  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="portcullis.syslog"):
        t.emit("rules.reloaded", trigger="first")
        assert wait_for(lambda: "the sender failed" in caplog.text)
    t.emit("rules.reloaded", trigger="second")   # starts a new sender, which delivers both
    assert wait_for(lambda: len(frames.frames) == 2)
    t.close()
    got = [RFC5424.match(f.decode()) for f in frames.frames]
    assert [json.loads(g["msg"])["trigger"] for g in got if g] == ["first", "second"]
