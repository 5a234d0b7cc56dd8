"""Fault: the reader of the proxy's stdout stops reading (a log shipper that hangs).

Documented behaviour (README, The event stream > stdout): events wait in a bounded queue drained by a
writer thread, so the event loop never blocks on the pipe; once `telemetry.log.stdout_buffer` events
wait, new requests are refused with 503 `event_sink_stalled` (counted in
portcullis_requests_total{reason="event_sink_stalled"}) while the admin API and /metrics keep
answering; when the reader reads again, `event_sink.resumed` says how many were refused, and every
decision taken before the stall is in the stream, once, on whole lines.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.faults.faults_b_support import GatedProc, admin_get, get, metric, wait_until
from tests.harness import base_config, read_reply, upstreams  # noqa: F401  (session fixture; no conftest.py here, the folder is shared)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

RULES = [{"name": "public", "action": "allow", "hosts": ["public.test"]}]
BUFFER = 16
MAX_REQUESTS = 4000  # bounds the loop that fills the pipe (and the seconds below)
MAX_SECONDS = 90.0
LONG = "/" + "p" * 1800  # a long path makes each event ~2.5 KB, so the pipes fill sooner


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_a_stalled_stdout_reader_refuses_new_requests_then_everything_flows_again(
    upstreams, tmp_path, workers  # noqa: F811
):
    cfg = base_config(upstreams, tmp_path, telemetry={"log": {"format": "json", "stdout_buffer": BUFFER},
                                                      "metrics": True, "otlp": False})
    host, port = "public.test", upstreams.http_port
    with GatedProc(tmp_path, upstreams, rules=RULES, config=cfg, workers=workers) as p:
        assert get(p, host, port, "/before").status == 200
        p.wait_event("egress.decision")
        p.pause()
        ok = refused = in_a_row = 0
        end = time.monotonic() + MAX_SECONDS
        # With workers, each stalls on its own: go on until 20 refusals in a row (every worker stalled).
        for _ in range(MAX_REQUESTS):
            if time.monotonic() > end or in_a_row >= 20:
                break
            r = get(p, host, port, LONG)
            if r.status == 200:
                ok += 1
                in_a_row = 0
            else:
                in_a_row += 1
                assert r.status == 503, (r.status, r.body[:200])
                assert r.headers["x-portcullis-reason"] == "event_sink_stalled"
                assert r.headers["x-portcullis-decision"] == "deny" and r.headers["retry-after"] == "1"
                assert json.loads(r.body)["reason"] == "event_sink_stalled"
                refused += 1
        assert in_a_row >= 20, f"{ok} requests served, {refused} refused: the stall was never noticed"
        # What can wait between a decision and the reader is bounded: a worker's queue and its pipe, the
        # supervisor's queue and its pipe (64 KiB pipes, ~2.5 KB events; measured: 34 served with one
        # process, 102 with two). A buffer nobody counts (the supervisor once read each worker's pipe
        # into 2 MiB of its own) would let a stalled proxy serve, and lose, hundreds more.
        assert ok <= 80 * workers, f"{ok} requests served after the reader stopped"
        # The proxy is stalled, not hung: the admin API and /metrics answer, and so does a CONNECT.
        assert admin_get(p, "/healthz")[0] == 200
        stalled = 'portcullis_requests_total{decision="deny",enforced="true",reason="event_sink_stalled"}'
        assert metric(p, stalled) == refused
        # A CONNECT is refused too. With workers, one that got fewer of the requests above may still
        # have room for a few events: its tunnels are served (and logged) until it stalls as well.
        tunnels = 0
        authority = f"{host}:{upstreams.tls_port}"
        for _ in range(200):
            with p.connect() as s:
                s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
                status = read_reply(s, head_only_2xx=True).status
            if status != 200:
                break
            tunnels += 1
        assert status == 503 and (workers > 1 or tunnels == 0), (status, tunnels)
        refused += 1
        seen_before = len(p.decisions())
        p.resume()
        # Every summary together names every refused request; nothing was dropped.
        assert wait_until(lambda: sum(e["refused"] for e in p.find("event_sink.resumed")) >= refused, 30), \
            p.find("event_sink.resumed")
        summaries = p.find("event_sink.resumed")
        assert sum(e["refused"] for e in summaries) == refused
        assert all(e["dropped"] == 0 and e["sink"] == "stdout" for e in summaries)
        # Everything flows again.
        assert wait_until(lambda: get(p, host, port, "/after").status == 200, 20)
        p.wait_event("egress.decision", **{"request.path": "/after"})
        assert len(p.decisions()) >= seen_before
    # One decision per served request, none for the refused ones (summarised), on whole JSON lines.
    allows = [e for e in p.decisions() if e["decision"] == "allow"]
    after = [e for e in allows if e["request"]["path"] == "/after"]
    assert len(allows) == 1 + ok + tunnels + len(after)
    assert len({e["flow_id"] for e in allows}) == len(allows)
    assert not [e for e in p.decisions() if e["reason"] == "event_sink_stalled"]
    assert all(json.loads(line) for line in p.raw_lines)
    assert len(upstreams.seen(lambda r: r["path"] == LONG)) == ok  # nothing refused reached upstream
    assert p.exit_code == 0
