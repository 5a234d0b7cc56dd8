"""pytest plugin: audit every proxy's stdout in the end-to-end suite (`-p tests.telemetry.audit_plugin`).

Wraps tests.harness.PortcullisProc so that each proxy keeps its raw stdout lines and, when it stops,
`audit_events` checks them: every line a valid portcullis.event/v1 event (no stray log line), every
decision logged once. A harness that knows how many requests a test sent can call
`audit_events(proc.raw_lines, expected_decisions=N)` itself for the count check.
"""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import pytest

from addons.telemetry.validate import audit_events

TOTALS = {"proxies": 0, "events": 0, "decisions": 0, "scrapes": 0}
LABEL_VALUE = re.compile(r"[a-z][a-z0-9_]*|[0-9.e+]+|\+Inf")


def _scrape(proc: Any) -> str | None:
    """/metrics of a running proxy (not in a private netns: its loopback is not ours)."""
    if proc.netns or not proc.admin_port or proc.proc.poll() is not None:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{proc.admin_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def _check_labels(text: str, events: list[dict[str, Any]]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    values = {
        v for fam in text_string_to_metric_families(text) for smp in fam.samples for v in smp.labels.values()
    }
    bad = [v for v in values if not LABEL_VALUE.fullmatch(v)]
    ids = {str(x) for e in events for x in (e.get("flow_id"), e.get("approval_id")) if x}
    ids |= {str((e.get("destination") or {}).get("host")) for e in events}
    ids |= {str((e.get("client") or {}).get("address")) for e in events}
    bad += sorted(values & ids)
    assert not bad, f"metric label values that are not bounded keywords: {bad[:10]}"


def _install() -> None:
    from tests import harness

    cls: Any = harness.PortcullisProc
    if getattr(cls, "_audited", False):
        return
    orig_stop = cls.stop

    def _read(self: Any) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        raw = self.__dict__.setdefault("raw_lines", [])
        for line in self.proc.stdout:
            raw.append(line.decode("utf-8", "replace"))
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(doc)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def stop(self: Any, *a: Any, **kw: Any) -> int:
        was_running = self.proc is not None
        metrics = _scrape(self) if was_running else None
        code: int = orig_stop(self, *a, **kw)
        if was_running:
            events = audit_events(list(self.__dict__.get("raw_lines", [])))
            if metrics is not None:
                _check_labels(metrics, events)
                TOTALS["scrapes"] += 1
            TOTALS["proxies"] += 1
            TOTALS["events"] += len(events)
            TOTALS["decisions"] += sum(e["event"] == "egress.decision" for e in events)
        return code

    cls._read, cls.stop, cls._audited = _read, stop, True


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    _install()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TOTALS["proxies"]:
        terminalreporter.write_line(
            f"event audit: {TOTALS['proxies']} proxies ({TOTALS['scrapes']} /metrics checked), "
            f"{TOTALS['events']} events "
            f"({TOTALS['decisions']} decisions), every stdout line a valid event, no decision logged twice"
        )
