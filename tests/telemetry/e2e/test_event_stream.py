"""Through a real proxy: every request sent is a decision logged once, stdout is nothing but valid events,
and hostile Host / path / SNI values cannot forge a field or a line."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from addons.telemetry.report import build
from tests.harness import PortcullisProc, assert_denied, base_config, tls_client_hello
from tests.telemetry.events_audit import audit_events

pytestmark = pytest.mark.e2e

RULES = [
    {"name": "public", "action": "allow", "hosts": ["public.test"]},
    {"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
    {
        "name": "api-reads",
        "action": "allow",
        "hosts": ["api.public.test"],
        "methods": ["GET"],
        "paths": ["/ok/*"],
    },
    {"name": "ask", "action": "approval", "hosts": ["approve.test"]},
]
PLACEHOLDER = "sniplaceholder-0123456789.test"


LABEL_VALUE = re.compile(r"[a-z][a-z0-9_]*|[0-9.e+]+|\+Inf")


def _label_values(text: str) -> set[str]:
    return {
        v for fam in text_string_to_metric_families(text) for smp in fam.samples for v in smp.labels.values()
    }


def _get(host: str, port: int, path: str = "/", host_header: str | None = None) -> bytes:
    hh = host_header if host_header is not None else f"{host}:{port}"
    return f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {hh}\r\n\r\n".encode()


def _hello_with_sni(raw_sni: bytes) -> bytes:
    hello = tls_client_hello(PLACEHOLDER)
    assert len(raw_sni) == len(PLACEHOLDER) and hello.count(PLACEHOLDER.encode()) == 1
    return hello.replace(PLACEHOLDER.encode(), raw_sni)


def _send_and_wait_close(p: PortcullisProc, authority: str, first: bytes) -> None:
    s, rep = p.connect_tunnel(authority)
    assert rep.status == 200
    s.sendall(first)
    s.settimeout(5)
    try:
        while s.recv(4096):
            pass
    except (ConnectionResetError, TimeoutError):
        pass
    s.close()


def test_every_request_is_one_valid_event_and_nothing_else(upstreams: Any, tmp_path: Path) -> None:
    cfg = base_config(upstreams, tmp_path)
    cfg["telemetry"] = {"log": {"format": "json", "file": "events.jsonl"}, "metrics": True, "otlp": False}
    cfg["approvals"]["hold"] = False  # approval_pending at once (no 5 s hold in this test)
    hp, tp = upstreams.http_port, upstreams.tls_port
    expected = 0
    with PortcullisProc(tmp_path, upstreams, rules=RULES, config=cfg) as p:
        # 1 allow with a query string that must never be logged
        r = p.raw(_get("public.test", hp, "/a/b?token=SECRET-Q"))
        assert r.status == 200
        # 2-4 denials: rule, default, private address
        assert_denied(p.raw(_get("blocked.test", hp)), "rule")
        assert_denied(p.raw(_get("unknown.test", hp)), "default")
        assert_denied(p.raw(_get("127.0.0.1", p.admin_port, "/healthz")), "private_address")
        # 5 a hostile path (quotes, braces, escapes a JSON-lines reader might trip on)
        r = p.raw(_get("public.test", hp, '/x"},{"decision":"allow"}/%0d%0a%1b[31m'))
        assert r.status == 404  # allowed: the upstream itself answered
        # 6 a hostile Host header that differs from the target
        assert_denied(
            p.raw(_get("public.test", hp, host_header='evil.test"},"decision":"allow')), "host_mismatch"
        )
        expected += 6
        # 7 an allowed tunnel, used and closed: one decision, then tunnel.closed
        r = p.curl(f"https://public.test:{tp}/pt", "--cacert", str(upstreams.ca_pem))
        assert r.exit_code == 0 and r.status == 200, r.stderr
        expected += 1
        # 8 a tunnel whose SNI is hostile: the CONNECT allow, then the SNI refusal (same flow)
        evil = b'e"}\r\n\x1b[31m{"event":"x"}\x00\xff.t'
        evil = evil + b"a" * (len(PLACEHOLDER) - len(evil))
        _send_and_wait_close(p, f"public.test:{upstreams.sink_port}", _hello_with_sni(evil))
        expected += 2
        quoted = b'q"},{"decision":"allow"}.t'
        quoted = quoted + b"a" * (len(PLACEHOLDER) - len(quoted))
        _send_and_wait_close(p, f"public.test:{upstreams.sink_port}", _hello_with_sni(quoted))
        expected += 2
        # 12-13 an inspected tunnel: the CONNECT, then its inner request (and a tunnel.closed)
        r = p.curl(f"https://api.public.test:{tp}/ok/1?sig=SECRET-S")
        assert r.exit_code == 0 and r.status == 200, r.stderr
        expected += 2
        # 14 an approval rule with hold: false: denied approval_pending, plus approval.requested
        assert_denied(p.raw(_get("approve.test", hp, "/q?x=SECRET-A")), "approval_pending")
        expected += 1
        p.wait_event("approval.requested")
        p.wait_event("egress.decision", count=expected)
        p.wait_event("tunnel.closed", count=2)
        time.sleep(0.3)  # bounded: let the last tunnel.closed land before stopping
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{p.admin_url}/metrics", timeout=10) as resp:
            metrics_text = resp.read().decode()
    assert p.exit_code == 0
    with p._cond:
        raw = list(p.raw_lines)
    events = audit_events(raw, expected_decisions=expected)  # every stdout line is a valid event
    assert events[0]["event"] == "proxy.started" and events[-1]["event"] == "proxy.stopped"
    text = "".join(raw)
    assert "SECRET" not in text and "token=" not in text
    decisions = [e for e in events if e["event"] == "egress.decision"]
    inner = [e for e in decisions if e["layer"] == "inspected"]
    assert len(inner) == 1 and inner[0]["request"] == {"scheme": "https", "method": "GET", "path": "/ok/1"}
    assert [e["inspected"] for e in events if e["event"] == "tunnel.closed"] == [False, True]
    (held,) = [e for e in events if e["event"] == "approval.requested"]
    assert held["destination"]["host"] == "approve.test" and held["request"]["path"] == "/q"
    assert text.isascii() and "\x1b" not in text and "\r" not in text
    decisions = [e for e in events if e["event"] == "egress.decision"]
    assert sum(e["decision"] == "allow" for e in decisions) >= 3
    forged = [e for e in decisions if e["decision"] == "allow" and "evil" in json.dumps(e)]
    assert forged == []
    sni = [e for e in decisions if e["reason"] == "sni_mismatch"]
    assert len(sni) == 2 and {e["destination"]["host"] for e in sni} == {"public.test"}
    # /metrics after that traffic: every label value a bounded keyword, none a host, address or id
    values = _label_values(metrics_text)
    assert values and all(LABEL_VALUE.fullmatch(v) for v in values), values
    for e in decisions:
        for v in (e["destination"]["host"], e["client"]["address"], e["flow_id"], e["destination"]["ip"]):
            assert v is None or v not in values
    assert (
        'portcullis_requests_total{decision="deny",enforced="true",reason="sni_mismatch"} 2.0' in metrics_text
    )
    # the file sink holds the same stream
    file_events = audit_events((tmp_path / "events.jsonl").read_text(), expected_decisions=expected)
    assert [e["event"] for e in file_events] == [e["event"] for e in events]
    # ... and `portcullis report` turns it into rules to paste
    with (tmp_path / "events.jsonl").open() as fh:
        rep = build(fh)
    assert sorted(rep.groups) == ["approve.test", "unknown.test"]
    assert rep.groups["unknown.test"].reasons == {"default": 1}
    assert (rep.groups["approve.test"].denied, rep.groups["approve.test"].held) == (1, 1)
    assert '"unknown.test"' in rep.groups["unknown.test"].rule_yaml()
    assert list(rep.denied_by_rule) == ["blocked.test"]
    assert set(rep.suspicious) == {"127.0.0.1", "public.test"}  # private address; Host/SNI mismatches


def _proxy_with_file(upstreams: Any, folder: Path, file: str, **log: Any) -> PortcullisProc:
    cfg = base_config(upstreams, folder)
    cfg["telemetry"] = {"log": {"format": "json", "file": file, **log}, "metrics": True, "otlp": False}
    return PortcullisProc(folder, upstreams, rules=RULES, config=cfg)


def test_sighup_moves_the_event_file_like_logrotate(upstreams: Any, tmp_path: Path) -> None:
    hp = upstreams.http_port
    log = tmp_path / "events.jsonl"
    with _proxy_with_file(upstreams, tmp_path, "events.jsonl") as p:
        assert p.raw(_get("public.test", hp, "/before")).status == 200
        p.wait_event("egress.decision", count=1)
        os.rename(log, tmp_path / "events.jsonl.1")  # logrotate: move, then signal
        assert p.proc is not None
        p.proc.send_signal(signal.SIGHUP)
        p.wait_event("rules.reloaded", trigger="sighup")
        assert p.raw(_get("public.test", hp, "/after")).status == 200
        p.wait_event("egress.decision", count=2)
    old = audit_events((tmp_path / "events.jsonl.1").read_text())
    new = audit_events(log.read_text())
    assert [e["event"] for e in old] == ["proxy.started", "egress.decision"]
    assert old[1]["request"]["path"] == "/before"
    assert [e["event"] for e in new] == ["rules.reloaded", "egress.decision", "proxy.stopped"]
    assert new[1]["request"]["path"] == "/after"


def test_unwritable_event_file_fails_closed(upstreams: Any, tmp_path: Path) -> None:
    with _proxy_with_file(upstreams, tmp_path, "/dev/full") as p:  # every write: ENOSPC
        r = p.raw(_get("public.test", upstreams.http_port))
        body = assert_denied(r, "internal_error")
        assert body["host"] == "public.test"
        ev = p.wait_event("egress.decision")  # stdout still carries the decision
        assert ev["reason"] == "internal_error" and ev["decision"] == "deny"
    assert p.exit_code == 0


def test_unwritable_event_file_fails_open_when_configured(upstreams: Any, tmp_path: Path) -> None:
    with _proxy_with_file(upstreams, tmp_path, "/dev/full", on_write_error="open") as p:
        r = p.raw(_get("public.test", upstreams.http_port, "/hello"))
        assert r.status == 200
        ev = p.wait_event("egress.decision")
        assert ev["decision"] == "allow" and ev["reason"] == "rule"
