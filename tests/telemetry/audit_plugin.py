"""pytest plugin: audit every proxy's stdout in the end-to-end suite (`-p tests.telemetry.audit_plugin`).

Wraps tests.harness.PortcullisProc so that each proxy keeps its raw stdout lines and, when it stops,
`audit_events` checks them: every line a valid portcullis.event/v1 event (no stray log line), every
decision logged once. A harness that knows how many requests a test sent can call
`audit_events(proc.raw_lines, expected_decisions=N)` itself for the count check.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from addons.telemetry.validate import audit_events

TOTALS = {"proxies": 0, "events": 0, "decisions": 0}


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
        code: int = orig_stop(self, *a, **kw)
        if was_running:
            events = audit_events(list(self.__dict__.get("raw_lines", [])))
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
            f"event audit: {TOTALS['proxies']} proxies, {TOTALS['events']} events "
            f"({TOTALS['decisions']} decisions), every stdout line a valid event, no decision logged twice"
        )
