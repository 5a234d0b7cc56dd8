"""The documents of events: the envelope every event starts with (schema, timestamp, event, worker), the
fields of one decision (`decision_fields`, the generic path) and the whole decision document built
straight from an `Outcome` (`decision_doc`: the same document, without the generic walks, because one
is written for every request and every tunnel; tests/telemetry/test_render.py holds them equal)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from addons.pipeline.model import Outcome
from addons.policy import hosts as policy_hosts
from addons.telemetry.fields import MAX_ITEMS, clean, nest, truncate

SCHEMA = "portcullis.event/v1"
_ENVELOPE = ("schema", "timestamp", "event")


def _envelope(event: str, fields: Mapping[str, Any], worker: int | None = None) -> dict[str, Any]:
    """schema, timestamp, event (and the worker) first; then the caller's fields, nested and cleaned."""
    body = clean(nest({k: v for k, v in fields.items() if k not in _ENVELOPE}))
    doc = _head(clean(event), worker)
    doc.update(body)
    return doc


def decision_fields(o: Outcome) -> dict[str, Any]:
    """The `egress.decision` fields of one outcome (nested, in schema order)."""
    r, c = o.request, o.request.client
    return {
        "decision": o.action._value_,  # the plain str: Enum.value is a slow descriptor
        "reason": o.reason._value_,
        "enforced": o.enforced,
        "rule": o.rule.name if o.rule else None,
        "rule_file": o.rule.file if o.rule else None,
        "rule_line": o.rule.line if o.rule else None,
        "matched_rules": [m.name for m in o.matched],
        "client": {"address": c.address, "port": c.port, "name": o.client_name, "user": c.user,
                   "task_id": c.task_id, "profile": c.profile,
                   "labels": dict(c.labels) if c.task_id else None},
        "destination": {"host": r.host or None, "port": r.port or None, "ip": o.ip,
                        "registered_domain": registered_domain(r.host)},
        "request": {"scheme": r.scheme, "method": r.method, "path": r.path},  # clean() drops any query
        "approval_id": o.approval_id,
        "flow_id": r.flow_id,
        "layer": r.layer.value,
        "status": o.status,
        "latency_ms": _ms(o.latency_s),
        "approval_wait_ms": _ms(o.approval_wait_s),
        # For a private destination the event names the class ("loopback", "metadata", "self" ...).
        "detail": o.private_class if o.private_class is not None else o.detail,
        "credential": o.credential,  # a name, never the value (the Outcome's injection is not rendered)
    }


def decision_doc(o: Outcome, worker: int | None = None) -> dict[str, Any]:
    """The whole `egress.decision` document of one outcome: what `_envelope` makes of
    `decision_fields(o)` (tests/telemetry/test_render.py holds them equal), built directly."""
    r, c = o.request, o.request.client
    rule = o.rule
    doc = _head("egress.decision", worker)
    doc.update({
        "decision": o.action._value_,  # the plain str: Enum.value is a slow descriptor
        "reason": o.reason._value_,
        "enforced": _c(o.enforced),
        "rule": _c(rule.name) if rule else None,
        "rule_file": _c(rule.file) if rule else None,
        "rule_line": _c(rule.line) if rule else None,
        "matched_rules": [_c(m.name) for m in o.matched[:MAX_ITEMS]],
        "client": {"address": _c(c.address), "port": _c(c.port), "name": _c(o.client_name),
                   "user": _c(c.user), "task_id": _c(c.task_id), "profile": _c(c.profile),
                   # a mapping: clean() drops secret-looking keys, at the depth the generic path has
                   "labels": clean(dict(c.labels), "labels", 2) if c.task_id else None},
        "destination": {"host": _c(r.host or None), "port": _c(r.port or None), "ip": _c(o.ip),
                        "registered_domain": _c(registered_domain(r.host))},
        "request": {"scheme": _c(r.scheme), "method": _c(r.method), "path": clean(r.path, "path")},
        "approval_id": _c(o.approval_id),
        "flow_id": _c(r.flow_id),
        "layer": r.layer._value_,
        "status": _c(o.status),
        "latency_ms": _c(_ms(o.latency_s)),
        "approval_wait_ms": _c(_ms(o.approval_wait_s)),
        "detail": _c(o.private_class if o.private_class is not None else o.detail),
        "credential": _c(o.credential),  # a name, never the value
    })
    return doc


def _head(event: str, worker: int | None) -> dict[str, Any]:
    """schema, timestamp, event, then the worker (with `--workers N`): every event starts so."""
    doc: dict[str, Any] = {"schema": SCHEMA, "timestamp": now_rfc3339(), "event": event}
    if worker is not None:
        doc["worker"] = worker
    return doc


def _c(v: Any) -> Any:
    """`clean(v)` for a field whose key needs no special handling, fast for the usual types."""
    t = type(v)
    if t is str:
        return truncate(v)  # bounded, lone surrogates written as text
    if v is None or t is int or t is bool:
        return v
    if t is float:
        return v if math.isfinite(v) else str(v)
    return clean(v)


def registered_domain(host: str | None) -> str | None:
    """The registrable domain (offline PSL, its default rule for unlisted suffixes); None for IP
    literals, bare suffixes and hosts that could not be read."""
    if not host:
        return None
    try:
        return policy_hosts.registered_domain(host)
    except Exception:  # noqa: BLE001 - an odd host never breaks an event
        return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text (one tuple: thread-safe)


def now_rfc3339() -> str:
    """Now, UTC, to the millisecond (truncated, as datetime.isoformat does): 2026-01-02T03:04:05.678Z."""
    global _second
    now = time.time()
    sec = int(now)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{int((now - sec) * 1000):03d}Z"
