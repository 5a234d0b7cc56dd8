"""The file sink: append + flush per event, reopen on rotation and on reopen(), fail closed or open."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from addons.telemetry import sinks
from tests.telemetry.tel_helpers import lines, make, record


def _file_lines(p: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_appends_and_flushes_each_event(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text('{"old": true}\n')
    t, out = make(tmp_path, log={"file": "events.jsonl"})  # relative to the config's directory
    for i in range(3):
        t.decision(record(flow_id=f"f{i}"))
        got = _file_lines(log)  # readable before close: flushed per event
        assert len(got) == i + 2 and got[-1]["flow_id"] == f"f{i}"
    assert got[0] == {"old": True}
    assert [e["flow_id"] for e in lines(out)] == ["f0", "f1", "f2"]  # stdout gets the stream too
    t.close()


def test_follows_logrotate_move_and_create(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks, "ROTATE_CHECK_S", 0.0)
    log = tmp_path / "events.jsonl"
    t, _ = make(tmp_path, log={"file": str(log)})
    t.decision(record(flow_id="before"))
    os.rename(log, tmp_path / "events.jsonl.1")
    t.decision(record(flow_id="after"))
    assert [e["flow_id"] for e in _file_lines(tmp_path / "events.jsonl.1")] == ["before"]
    assert [e["flow_id"] for e in _file_lines(log)] == ["after"]
    log.unlink()  # deleted under us: recreated
    t.decision(record(flow_id="again"))
    assert [e["flow_id"] for e in _file_lines(log)] == ["again"]
    t.close()


def test_reopen_switches_to_the_new_file_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks, "ROTATE_CHECK_S", 3600.0)  # only reopen() can notice the move now
    log = tmp_path / "events.jsonl"
    t, _ = make(tmp_path, log={"file": str(log)})
    t.decision(record(flow_id="one"))
    os.rename(log, tmp_path / "old.jsonl")
    t.decision(record(flow_id="two"))  # still the open (moved) file
    t.reopen()  # what SIGHUP does
    t.decision(record(flow_id="three"))
    assert [e["flow_id"] for e in _file_lines(tmp_path / "old.jsonl")] == ["one", "two"]
    assert [e["flow_id"] for e in _file_lines(log)] == ["three"]
    t.close()


def test_unwritable_file_fails_closed_by_default_and_recovers(tmp_path: Path) -> None:
    log = tmp_path / "missing-dir" / "events.jsonl"
    t, out = make(tmp_path, log={"file": str(log)})
    assert t.healthy()
    t.decision(record(flow_id="lost"))
    assert not t.healthy()
    assert t.metrics.events_dropped.labels("file")._value.get() == 1
    assert [e["flow_id"] for e in lines(out)] == ["lost"]  # stdout still has it
    t.decision(record(flow_id="lost2"))
    assert t.metrics.events_dropped.labels("file")._value.get() == 2
    log.parent.mkdir()
    t.decision(record(flow_id="back"))
    assert t.healthy()
    assert [e["flow_id"] for e in _file_lines(log)] == ["back"]
    t.close()


def test_disk_full_fails_open_when_configured(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full not available")
    t, out = make(tmp_path, log={"file": "/dev/full", "on_write_error": "open"})
    t.decision(record())
    assert t.healthy()  # fail open: keep deciding normally
    assert t.metrics.events_dropped.labels("file")._value.get() == 1
    assert len(lines(out)) == 1
    t2, _ = make(tmp_path, log={"file": "/dev/full"})  # default: closed
    t2.decision(record())
    assert not t2.healthy()
    t.close()
    t2.close()


# -- the sinks on their own -------------------------------------------------------------------------


def test_the_stream_sink_writes_a_line_and_flushes() -> None:
    import io

    class Counting(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1
            super().flush()

    s = Counting()
    sink = sinks.StreamSink(s)
    sink.write('{"a":1}')
    assert s.getvalue() == '{"a":1}\n' and s.flushes == 1
    sink.reopen()  # the stream belongs to the process: nothing to do
    s.close()
    sink.close()  # a closed stream is no error at shutdown
    with pytest.raises(ValueError):
        sink.write("x")  # but a write is (Telemetry counts it)


def test_the_file_sink_opens_lazily_appends_and_raises_what_it_cannot_write(tmp_path: Path) -> None:
    p = tmp_path / "e.jsonl"
    sink = sinks.FileSink(p)
    assert not p.exists()
    sink.write("one")
    sink.write("two")
    assert p.read_text() == "one\ntwo\n"
    sink.close()
    sink.write("three")  # reopened by the next write
    assert p.read_text() == "one\ntwo\nthree\n"
    sink.close()
    missing = sinks.FileSink(tmp_path / "no" / "e.jsonl")
    with pytest.raises(OSError):
        missing.write("x")
    (tmp_path / "no").mkdir()
    missing.write("x")  # the next write retries the open
    assert (tmp_path / "no" / "e.jsonl").read_text() == "x\n"
    missing.close()


def test_a_sink_that_cannot_be_written_is_said_on_stderr_once_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    t, _ = make(tmp_path, log={"file": "logs/events.jsonl"})  # its folder does not exist yet
    for i in range(3):
        t.decision(record(flow_id=f"f{i}"))
    assert not t.healthy()
    said = [r for r in caplog.records if "events cannot be written" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "ERROR"
    msg = said[0].getMessage()
    assert "file: FileNotFoundError" in msg and "denied (internal_error)" in msg
    (tmp_path / "logs").mkdir()
    t.decision(record(flow_id="back"))
    assert t.healthy()
    assert [r.getMessage() for r in caplog.records if "written again" in r.getMessage()] == [
        "events can be written again; requests are served again"]
    t.close()

