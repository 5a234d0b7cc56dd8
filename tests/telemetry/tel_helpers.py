"""Shared builders for the telemetry tests: a Telemetry writing to a StringIO, sample decisions."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from addons.config.models import TelemetryConfig
from addons.pipeline.model import Outcome
from addons.policy.model import Action, Client, Layer, Reason, Request, RuleRef
from addons.telemetry.events import Telemetry


class TtyIO(io.StringIO):
    """A StringIO that says it is a terminal (for `format: console`)."""

    def isatty(self) -> bool:
        return True


def make(
    tmp_path: Path | None = None, stream: io.StringIO | None = None, **telemetry: Any
) -> tuple[Telemetry, io.StringIO]:
    out = stream if stream is not None else io.StringIO()
    cfg = TelemetryConfig.model_validate(telemetry)
    return Telemetry(cfg, base_dir=tmp_path, stream=out), out


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(x) for x in out.getvalue().splitlines() if x]


def record(**kw: Any) -> Outcome:
    base: dict[str, Any] = {
        "decision": "deny",
        "reason": "rule",
        "enforced": True,
        "host": "pastebin.com",
        "port": 443,
        "flow_id": "flow-1",
        "rule": "no-paste-sites",
        "rule_file": "rules/base.yaml",
        "rule_line": 12,
        "matched_rules": ("no-paste-sites",),
        "client_address": "10.0.1.5",
        "client_port": 50123,
        "client_name": "ci-agents",
        "client_user": None,
        "ip": "203.0.113.7",
        "scheme": "https",
        "method": "GET",
        "path": "/raw/AbCd",
        "approval_id": None,
        "status": 403,
        "layer": "inspected",
        "latency_s": 0.00042,
        "approval_wait_s": None,
        "detail": None,
    }
    base.update(kw)
    return outcome(**base)


def outcome(**f: Any) -> Outcome:
    """An Outcome from the flat facts of an egress.decision (what the pipeline would have built)."""
    action = Action(f["decision"])
    rule = RuleRef(f["rule"], action, f["rule_file"] or "?", f["rule_line"] or 1) if f.get("rule") else None
    matched = tuple(RuleRef(n, action, "?", 1) for n in f.get("matched_rules", ()))
    client = Client(f["client_address"], f["client_port"], f["client_user"])
    req = Request(
        f["host"] or "",
        f["port"] or 0,
        client,
        f["scheme"],
        f["method"],
        f["path"],
        Layer(f["layer"]),
        f["flow_id"],
    )
    return Outcome(
        req,
        action,
        Reason(f["reason"]),
        enforced=f["enforced"],
        status=f["status"],
        rule=rule,
        matched=matched,
        client_name=f["client_name"],
        ip=f["ip"],
        approval_id=f["approval_id"],
        detail=f["detail"],
        latency_s=f["latency_s"],
        approval_wait_s=f["approval_wait_s"],
        credential=f.get("credential"),
    )


# One decision of every kind the proxy produces (HTTP, CONNECT, inspected; every outcome).
DECISIONS: list[Outcome] = [
    record(
        decision="allow",
        reason="rule",
        host="pypi.org",
        rule="package-registries",
        status=None,
        method="GET",
        path="/simple/",
        scheme="https",
        layer="inspected",
    ),
    record(
        decision="allow",
        reason="rule",
        host="files.pythonhosted.org",
        method="CONNECT",
        path=None,
        scheme=None,
        layer="connect",
        status=None,
        rule="package-registries",
    ),
    record(
        decision="deny",
        reason="default",
        host="example.org",
        method="GET",
        path="/",
        scheme="http",
        layer="http",
        rule=None,
        rule_file=None,
        rule_line=None,
        matched_rules=(),
    ),
    record(
        decision="deny",
        reason="private_address",
        host="169.254.169.254",
        port=80,
        ip="169.254.169.254",
        method="GET",
        path="/latest/meta-data/",
        scheme="http",
        layer="http",
        rule=None,
        rule_file=None,
        rule_line=None,
    ),
    record(
        decision="deny",
        reason="sni_mismatch",
        host="github.com",
        method="CONNECT",
        path=None,
        scheme=None,
        layer="connect",
        detail="SNI evil.com != authority github.com",
    ),
    record(decision="deny", reason="host_mismatch", host="github.com", layer="inspected"),
    record(
        decision="deny",
        reason="approval_denied",
        host="api.github.com",
        method="POST",
        path="/repos/o/r/pulls",
        approval_id="apr-1",
        approval_wait_s=12.5,
        rule="github-writes",
    ),
    record(
        decision="deny",
        reason="approval_timeout",
        host="api.github.com",
        method="PUT",
        approval_id="apr-2",
        approval_wait_s=120.0,
    ),
    record(
        decision="deny", reason="approval_pending", host="api.github.com", method="PATCH", approval_id="apr-3"
    ),
    record(
        decision="allow",
        reason="approved",
        host="api.github.com",
        method="DELETE",
        approval_id="apr-4",
        status=None,
    ),
    record(
        decision="deny",
        reason="internal_error",
        host="x.example",
        method="HEAD",
        status=403,
        detail="policy raised",
    ),
    record(
        decision="deny",
        reason="bad_request",
        host="",
        port=0,
        method="OPTIONS",
        path=None,
        layer="http",
        scheme=None,
    ),
    record(
        decision="deny", reason="default", host="audit.example", enforced=False, status=None, method="TRACE"
    ),
    record(decision="allow", reason="rule", host="odd.example", method="PROPFIND", status=None),
    record(decision="deny", reason="proxy_auth", host="pypi.org", status=407, client_user="reviewer"),
    record(decision="allow", reason="rule", host="api.github.com", layer="inspected", status=None,
           rule="github", credential="github-api"),
    record(decision="deny", reason="credential_leak", host="paste.example", layer="inspected", status=403,
           credential="github-api", detail="the request carries the placeholder or secret of credential "
           "'github-api', which is not applied to it"),
]

OTHER_EVENTS: list[tuple[str, dict[str, Any]]] = [
    (
        "tunnel.closed",
        {
            "flow_id": "flow-2",
            "bytes_up": 517,
            "bytes_down": 48213,
            "duration_s": 1.25,
            "client": {"address": "10.0.1.5", "port": 50123, "name": "ci-agents"},
            "destination": {"host": "files.pythonhosted.org", "port": 443},
        },
    ),
    (
        "approval.requested",
        {
            "approval_id": "apr-1",
            "client": {"address": "10.0.1.5", "name": "ci-agents"},
            "destination": {"host": "api.github.com", "port": 443},
            "request": {"scheme": "https", "method": "POST", "path": "/repos/o/r/pulls"},
            "rule": "github-writes",
            "expires_at": "2026-11-22T10:02:00Z",
        },
    ),
    (
        "approval.decided",
        {
            "approval_id": "apr-1",
            "decision": "allow",
            "scope": "session",
            "by": "alice",
            "destination.host": "api.github.com",
            "destination.port": 443,
        },
    ),
    (
        "approval.decided",
        {"approval_id": "apr-2", "decision": "deny", "scope": None, "by": None, "reason": "approval_timeout"},
    ),
    ("approval.decided", {"approval_id": "apr-5", "decision": "deny", "scope": "once", "by": "bob"}),
    ("rules.reloaded", {"rule_count": 12, "files": ["rules/base.yaml"], "trigger": "watch"}),
    ("worker.exited", {"worker": 1, "pid": 4242, "exit_code": None, "signal": "SIGKILL", "restarted": True}),
    (
        "credential.minted",
        {"task_id": "build-7", "profile": "frontend", "labels": {"repo": "web"}, "by": "admin",
         "expires_at": "2026-11-20T18:00:00Z"},
    ),
    ("credential.revoked", {"task_id": "build-7", "profile": None, "labels": {}, "by": "admin",
                            "expires_at": "2026-11-20T18:00:00Z"}),
    ("credential.expired", {"task_id": "build-8", "profile": None, "labels": {}, "by": None,
                            "expires_at": "2026-11-20T18:00:00Z"}),
    ("rules.reload_failed", {"error": "rules/base.yaml:3:5: unknown key 'hostz'", "trigger": "sighup"}),
    (
        "webhook.failed",
        {
            "approval_id": "apr-1",
            "url": "https://hooks.example.com/p",
            "attempt": 3,
            "status": 500,
            "error": "HTTP 500",
            "final": False,
        },
    ),
    (
        "proxy.started",
        {
            "listen": ["127.0.0.1:8080"],
            "admin": "127.0.0.1:9090",
            "mode": "enforce",
            "version": "0.1.0",
            "rule_count": 12,
            "pid": 4242,
        },
    ),
    ("proxy.stopped", {"exit_code": 0, "uptime_s": 3600.5}),
    ("worker.exited", {"worker": 1, "pid": 4243, "exit_code": None, "signal": "SIGKILL", "restarted": True}),
    ("store.unreachable", {"store": "redis://***@valkey:6379/0", "error": "ConnectionError: refused"}),
    ("store.reconnected", {"store": "redis://***@valkey:6379/0", "down_s": 12.5}),
    ("event_sink.resumed", {"sink": "stdout", "since": "2026-11-30T10:00:00.000Z", "stalled_s": 4.2,
                            "refused": 17, "dropped": 0}),
]

# Each decision its own flow, as the proxy does.
DECISIONS = [
    dataclasses.replace(r, request=dataclasses.replace(r.request, flow_id=f"flow-d{i}"))
    for i, r in enumerate(DECISIONS)
]
