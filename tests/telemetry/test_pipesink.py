"""stdout through a bounded queue and a writer thread (addons/telemetry/pipesink.py), on a real pipe."""

from __future__ import annotations

import io
import json
import os
import threading
import time

from addons.config.models import TelemetryConfig
from addons.telemetry.events import Telemetry
from addons.telemetry.pipesink import PipeSink, SinkFull, StallStats, usable_fd
from addons.telemetry.validate import validate_event


def _drain(fd: int, until: bytes, timeout: float = 10.0) -> bytes:
    """Reads the pipe until `until` has been seen (bounded)."""
    out = b""
    end = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while until not in out and time.monotonic() < end:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            break
        out += chunk
    return out


def _rest(fd: int) -> bytes:
    """Whatever the (non-blocking) pipe still holds."""
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _wait(pred: object, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_a_reader_that_stops_stalls_the_sink_not_the_caller_and_resuming_loses_nothing() -> None:
    r, w = os.pipe()
    resumed: list[StallStats] = []
    sink = PipeSink(w, capacity=64, on_resume=resumed.append)
    line = json.dumps({"pad": "x" * 2000})
    t0 = time.monotonic()
    n = 0
    while not sink.stalled and n < 10_000:  # nobody reads: the pipe (64 KiB) fills, then the queue
        sink.write(line)
        n += 1
    assert sink.stalled and n < 10_000
    assert time.monotonic() - t0 < 30  # the caller was never blocked by the pipe (bounded loop above)
    sink.refused()
    sink.refused()
    # Past the capacity lines still queue up to twice it, then are dropped (and counted).
    dropped = 0
    for _ in range(3 * sink.capacity):
        try:
            sink.write(line)
        except SinkFull:
            dropped += 1
    assert dropped > 0 and sink.buffered == 2 * sink.capacity
    data = _drain(r, b"", timeout=0.0)  # nothing yet: just make the descriptor non-blocking
    got = data
    assert _wait(lambda: bool(resumed) or False, timeout=0.2) is False  # still stalled while unread
    end = time.monotonic() + 20
    # Read until the writer has written everything (its last batch may still wait for room in the pipe).
    while time.monotonic() < end and not (resumed and sink.flush(0.01)):
        got += _rest(r)
    (stats,) = resumed
    assert (stats.refused, stats.dropped) == (2, dropped) and stats.stalled_s > 0
    assert not sink.stalled
    assert sink.flush(0.01)
    got += _rest(r)
    lines = got.split(b"\n")
    assert lines[-1] == b""
    # Whole lines only, every one that was queued (none torn, none lost but the counted drops).
    assert all(json.loads(x) == {"pad": "x" * 2000} for x in lines[:-1])
    assert len(lines) - 1 == n + 3 * sink.capacity - dropped
    assert sink.close() == 0
    os.close(r)
    os.close(w)


def test_a_closed_reader_fails_the_sink_and_the_next_good_write_clears_it() -> None:
    r, w = os.pipe()
    errors: list[int] = []
    sink = PipeSink(w, capacity=16, on_error=errors.append)
    os.close(r)  # EPIPE from now on (Python ignores SIGPIPE)
    sink.write("a")
    assert _wait(lambda: sink.failed)
    assert errors and sum(errors) == 1
    sink.close()
    os.close(w)


def test_close_reports_the_lines_a_stalled_reader_never_took() -> None:
    r, w = os.pipe()
    sink = PipeSink(w, capacity=1000)
    for _ in range(200):
        sink.write("y" * 1000)  # 200 KB: more than the pipe holds
    left = sink.close(time.monotonic() + 0.3)
    assert left > 0
    os.close(r)
    os.close(w)


def test_usable_fd_only_for_real_descriptors(tmp_path: object) -> None:
    assert usable_fd(io.StringIO()) is None
    r, w = os.pipe()
    with os.fdopen(w, "w") as f:
        assert usable_fd(f) == w
    os.close(r)


def _telemetry(fd: int, **log: object) -> Telemetry:
    stream = os.fdopen(fd, "w", closefd=False)
    return Telemetry(TelemetryConfig.model_validate({"log": {"stdout_buffer": 16, **log}}), stream=stream)


def test_telemetry_refuses_while_stalled_and_summarises_on_resume() -> None:
    from tests.telemetry.tel_helpers import record

    r, w = os.pipe()
    t = _telemetry(w)
    assert not t.sink_stalled() and t.healthy()
    big = "z" * 8000
    for i in range(40):  # 320 KB of events: the pipe (64 KiB) fills, then the queue (16 + 16 more)
        t.emit("rules.reloaded", files=[big], rule_count=i, trigger="sighup")
    time.sleep(0.3)  # the writer is blocked on the full pipe: the stall lasts while nobody reads
    assert t.sink_stalled()
    from dataclasses import replace

    from addons.policy.model import Reason

    rec = replace(record(), reason=Reason.EVENT_SINK_STALLED)
    for _ in range(5):
        t.decision(rec)
    assert t.metrics.requests.labels("deny", "event_sink_stalled", "true")._value.get() == 5
    got = b""
    end = time.monotonic() + 20
    os.set_blocking(r, False)
    while time.monotonic() < end and not (b"event_sink.resumed" in got and t.flush(0.01)):
        got += _rest(r)
    got += _rest(r)
    docs = [json.loads(x) for x in got.splitlines()]
    for d in docs:
        validate_event(d)
    (summary,) = [d for d in docs if d["event"] == "event_sink.resumed"]
    assert summary["refused"] == 5 and summary["sink"] == "stdout"
    # Under load the writer may start late: what did not fit in twice the buffer is counted, never hidden.
    assert summary["dropped"] == t.metrics.events_dropped.labels("stdout")._value.get()
    assert len([d for d in docs if d["event"] == "rules.reloaded"]) == 40 - summary["dropped"]
    assert not [d for d in docs if d["event"] == "egress.decision"]  # summarised, not written one by one
    assert not t.sink_stalled() and t.healthy()
    t.close()
    os.close(r)
    os.close(w)


def test_open_mode_never_refuses_but_counts_what_it_drops() -> None:
    r, w = os.pipe()
    t = _telemetry(w, on_write_error="open")
    for i in range(200):
        t.emit("rules.reloaded", files=["z" * 8000], rule_count=i, trigger="sighup")
    assert t.stdout_stalled() and not t.sink_stalled() and t.healthy()
    assert t.metrics.events_dropped.labels("stdout")._value.get() > 0
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                if not os.read(r, 1 << 16):
                    return
            except OSError:
                return

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    assert t.flush(10)
    t.close()
    stop.set()
    os.close(w)
    th.join(5)
    os.close(r)


def test_a_stalled_refusal_is_a_valid_decision_where_it_is_written() -> None:
    """The file sink (or an in-memory stream) still gets each event_sink_stalled decision."""
    from dataclasses import replace

    from addons.policy.model import Reason
    from tests.telemetry.tel_helpers import make, record

    t, out = make()
    t.decision(replace(record(), reason=Reason.EVENT_SINK_STALLED, status=503))
    (doc,) = [json.loads(x) for x in out.getvalue().splitlines()]
    validate_event(doc)
    assert doc["reason"] == "event_sink_stalled" and doc["status"] == 503
