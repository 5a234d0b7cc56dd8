"""A whole proxy with an unreachable OTLP collector stops by itself and says how many events were never
exported (the in-process check of close()'s budget: tests/telemetry/test_otel.py)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PortcullisProc, base_config, upstreams  # noqa: F401 - fixture


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unreachable_collector(monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"http://127.0.0.1:{closed_port()}/v1/logs"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    return url


@pytest.mark.e2e
def test_a_proxy_with_an_unreachable_collector_stops_and_says_how_many_were_lost(
    tmp_path: Path, upstreams: Any, unreachable_collector: str  # noqa: F811
) -> None:
    cfg = base_config(upstreams, tmp_path)
    cfg["telemetry"] = {**cfg["telemetry"], "otlp": True}
    p = PortcullisProc(tmp_path, upstreams, config=cfg, rules=[
        {"name": "pub", "action": "allow", "hosts": ["public.test"]}])
    with p:
        assert p.curl(f"http://public.test:{upstreams.http_port}/x").status == 200
        assert p.curl(f"http://blocked.test:{upstreams.http_port}/y").status == 403
        p.wait_event("egress.decision", count=2)
    assert p.exit_code == 0   # stopped by itself after SIGTERM (the harness kills after 15 s)
    m = re.search(r"OTLP: (\d+) of (\d+) events were not exported", p.stderr_text())
    assert m, p.stderr_text()[-2000:]
    # Every event (proxy.started, both decisions, proxy.stopped) was emitted and none reached a collector.
    assert int(m.group(1)) == int(m.group(2)) == len(p.events) >= 4
