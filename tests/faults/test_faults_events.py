"""Event file faults through a real proxy: its disk full (a 256 KiB tmpfs filled up) and the file made
unwritable (replaced by a folder). With `telemetry.log.on_write_error: closed` (the default) no
decision goes unrecorded: while the file cannot be written every new request is denied
`internal_error` (its decision still on stdout), `portcullis_events_dropped_total{sink="file"}`
counts what the file missed and stderr says so once; when the file can be written again the proxy
serves again by itself, and the file holds only whole events. (tests/telemetry/e2e/test_event_stream.py
covers /dev/full from the start, both settings.)"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from addons.telemetry.validate import validate_lines
from tests.faults.faults_support import audit, fill, metric, send, tmpfs, upstream_paths
from tests.harness import PortcullisProc, assert_denied, base_config

RULES = [{"name": "open", "action": "allow", "hosts": ["public.test"]}]


def proxy(folder: Path, upstreams, log_file: Path) -> PortcullisProc:
    cfg = base_config(upstreams, folder)
    cfg["telemetry"] = {"log": {"format": "json", "file": str(log_file)}, "metrics": True, "otlp": False}
    return PortcullisProc(folder, upstreams, rules=RULES, config=cfg)


def until_denied(p: PortcullisProc, upstreams, tag: str, limit: int = 5000, seconds: float = 15.0) -> int:
    """Allowed requests until the first refusal (the file stopped taking events); returns how many.
    Bounded in count and time: the sink looks at its path at most once a second, so a fast machine
    can send hundreds of requests before it notices."""
    deadline = time.monotonic() + seconds
    for i in range(limit):
        if time.monotonic() > deadline:
            break
        r = send(p, upstreams, "public.test", f"/{tag}-{i}")
        if r.status != 200:
            body = assert_denied(r, "internal_error")
            assert "event log cannot be written" in body["message"] or body["reason"] == "internal_error"
            return i + 1
    raise AssertionError(f"still allowed after {i + 1} requests ({seconds} s) once the file was unwritable")


def until_allowed(p: PortcullisProc, upstreams, tag: str, limit: int = 5) -> int:
    for i in range(limit):
        r = send(p, upstreams, "public.test", f"/{tag}-{i}")
        if r.status == 200:
            return i + 1
        assert_denied(r, "internal_error")
    raise AssertionError(f"still denied after {limit} requests once the file could be written")


def test_a_full_disk_under_the_event_file_fails_closed_and_recovers(tmp_path, upstreams):
    with tmpfs(tmp_path / "logs", "256k") as disk:
        log_file = disk / "events.jsonl"
        with proxy(tmp_path, upstreams, log_file) as p:
            assert send(p, upstreams, "public.test", "/before").status == 200
            filler = fill(disk)
            try:
                sent = until_denied(p, upstreams, "full")  # the slack of the file's last page, then no more
                for i in range(3):  # every request while the disk is full: denied, nothing upstream
                    assert_denied(send(p, upstreams, "public.test", f"/denied-{i}"), "internal_error")
                sent += 3
                assert metric(p, "portcullis_events_dropped_total", sink="file") >= 4
                denied = p.decisions(reason="internal_error")
                assert len(denied) == 4 and all(d["decision"] == "deny" for d in denied)  # still on stdout
                assert "the event log cannot be written" in denied[0]["detail"]
            finally:
                filler.unlink()
            sent += until_allowed(p, upstreams, "after")
        assert p.exit_code == 0
        text = log_file.read_text()
        in_file = validate_lines(text)  # only whole events, whatever the full disk cut short
        assert "/before" in {(e.get("request") or {}).get("path") for e in in_file}
        assert in_file[-1]["event"] == "proxy.stopped"
    err = p.stderr_text()
    assert err.count("cannot be written") == 1, err  # said once, loudly, with the reason
    assert "No space left on device" in err and "denied" in err
    assert err.count("can be written again") == 1
    assert not any(x.startswith("/denied") for x in upstream_paths(upstreams))
    audit(p, sent=1 + sent)


def test_an_event_file_replaced_by_a_folder_fails_closed_and_recovers(tmp_path, upstreams):
    log_file = tmp_path / "logs" / "events.jsonl"
    log_file.parent.mkdir()
    with proxy(tmp_path, upstreams, log_file) as p:
        assert send(p, upstreams, "public.test", "/before").status == 200
        log_file.rename(tmp_path / "logs" / "events.jsonl.1")
        log_file.mkdir()  # the path cannot be opened for writing (as root, chmod would not stop it)
        sent = until_denied(p, upstreams, "gone")
        assert_denied(send(p, upstreams, "public.test", "/denied"), "internal_error")
        shutil.rmtree(log_file)
        sent += 1 + until_allowed(p, upstreams, "after")
    assert p.exit_code == 0
    assert [e["event"] for e in validate_lines((tmp_path / "logs" / "events.jsonl.1").read_text())][:2] == [
        "proxy.started", "egress.decision"]
    new = validate_lines(log_file.read_text())
    assert new[-1]["event"] == "proxy.stopped"
    assert "/denied" not in upstream_paths(upstreams)
    assert "Is a directory" in p.stderr_text()
    audit(p, sent=1 + sent)
