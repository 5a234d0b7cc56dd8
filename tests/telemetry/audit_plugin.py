"""pytest plugin: audit every proxy's stdout in the end-to-end suite (`-p tests.telemetry.audit_plugin`).

Wraps tests.harness.PortcullisProc so that each proxy keeps its raw stdout lines and, when it stops,
`audit_events` checks them: every line a valid portcullis.event/v1 event (no stray log line), every
decision logged once. A harness that knows how many requests a test sent can call
`audit_events(proc.raw_lines, expected_decisions=N)` itself for the count check.
"""

from __future__ import annotations

import re
import urllib.request
from typing import Any

import pytest

from addons.telemetry.validate import audit_events

TOTALS = {"proxies": 0, "events": 0, "decisions": 0, "scrapes": 0, "upstream_requests": 0}
# Every egress.decision of every audited proxy, and every request a harness upstream received:
# at the end of the session each upstream request must be covered by a logged decision that let
# it through (nothing reaches a server unlogged).
DECISIONS: list[dict[str, Any]] = []
UPSTREAM_SEEN: list[dict[str, Any]] = []
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

    def stop(self: Any, *a: Any, **kw: Any) -> int:
        was_running = self.proc is not None
        metrics = _scrape(self) if was_running else None
        code: int = orig_stop(self, *a, **kw)
        if was_running:
            # A proxy that failed before it started has written nothing (its test reports why); one
            # that started has written proxy.started at least.
            events = audit_events(list(self.raw_lines), min_events=1 if self.port else 0)
            if metrics is not None:
                _check_labels(metrics, events)
                TOTALS["scrapes"] += 1
            TOTALS["proxies"] += 1
            TOTALS["events"] += len(events)
            TOTALS["decisions"] += sum(e["event"] == "egress.decision" for e in events)
            DECISIONS.extend(e for e in events if e["event"] == "egress.decision")
        return code

    cls.stop, cls._audited = stop, True

    up: Any = harness.Upstreams
    orig_clear, orig_up_stop = up.clear, up.stop

    def _snapshot(self: Any) -> None:
        UPSTREAM_SEEN.extend(self.seen())

    def clear(self: Any) -> None:
        _snapshot(self)
        orig_clear(self)

    def up_stop(self: Any) -> None:
        orig_up_stop(self)
        _snapshot(self)
        self.requests.clear()

    up.clear, up.stop = clear, up_stop


def _host_of(authority: str | None) -> str:
    a = (authority or "").strip().lower()
    if a.startswith("["):
        return a[1 : a.find("]")] if "]" in a else a
    return a.rsplit(":", 1)[0].rstrip(".") if a.count(":") == 1 else a.rstrip(".")


def unlogged_upstream_requests() -> list[dict[str, Any]]:
    """Upstream requests that no logged, letting-through decision covers (should be none)."""
    passed_http: set[tuple[str, str, str]] = set()
    passed_tunnels: set[str] = set()
    for e in DECISIONS:
        if e.get("decision") != "allow" and e.get("enforced") is not False:
            continue
        host = str((e.get("destination") or {}).get("host"))
        req = e.get("request") or {}
        if e.get("layer") == "connect":
            passed_tunnels.add(host)
        else:
            passed_http.add((host, str(req.get("method")), str(req.get("path"))))
    out = []
    for r in UPSTREAM_SEEN:
        host = _host_of(r.get("host"))
        path = str(r.get("path") or "/").split("?", 1)[0]
        if (host, str(r.get("method")), path) in passed_http or host in passed_tunnels:
            continue
        out.append({k: r.get(k) for k in ("server", "method", "path", "host")})
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    TOTALS["upstream_requests"] = len(UPSTREAM_SEEN)
    if not DECISIONS and not UPSTREAM_SEEN:
        return
    missing = unlogged_upstream_requests()
    if missing:
        session.config.__dict__["_portcullis_unlogged"] = missing
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    _install()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    missing = terminalreporter.config.__dict__.get("_portcullis_unlogged")
    if missing:
        terminalreporter.write_line(
            f"event audit FAILED: {len(missing)} upstream request(s) reached a server "
            "with no logged decision "
            f"letting them through: {missing[:5]}", red=True)
    if TOTALS["proxies"]:
        terminalreporter.write_line(
            f"event audit: {TOTALS['proxies']} proxies ({TOTALS['scrapes']} /metrics checked), "
            f"{TOTALS['events']} events "
            f"({TOTALS['decisions']} decisions), every stdout line a valid event, no decision logged twice; "
            f"{TOTALS['upstream_requests']} upstream requests"
            + (", each covered by a logged decision" if not missing else "")
        )
