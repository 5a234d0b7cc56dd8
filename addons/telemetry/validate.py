"""Validate native events against the shipped JSON Schemas (addons/telemetry/schema/*.json).

Test harnesses call `validate_event(doc)` / `validate_lines(text)`; needs the `jsonschema` dev dependency.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).parent / "schema"
_BASE = "urn:portcullis:event:v1:"


class EventSchemaError(ValueError):
    """An event that does not match its schema (or names no known event type)."""


def event_types() -> list[str]:
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.json") if p.stem != "defs")


@cache
def _validators() -> dict[str, Any]:
    from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
    from referencing import Registry, Resource

    docs = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in SCHEMA_DIR.glob("*.json")}
    registry: Registry[Any] = Registry().with_resources(
        (_BASE + name, Resource.from_contents(doc)) for name, doc in docs.items()
    )
    out: dict[str, Any] = {}
    for name, doc in docs.items():
        Draft202012Validator.check_schema(doc)
        if name != "defs":
            out[name] = Draft202012Validator(doc, registry=registry)
    return out


def validate_event(doc: Any) -> None:
    """Raise EventSchemaError unless `doc` is a valid portcullis.event/v1 event of a known type."""
    if not isinstance(doc, dict):
        raise EventSchemaError(f"event is not a JSON object: {type(doc).__name__}")
    validator = _validators().get(str(doc.get("event")))
    if validator is None:
        raise EventSchemaError(f"unknown event type {doc.get('event')!r}")
    errors = sorted(validator.iter_errors(doc), key=lambda e: "/".join(map(str, e.absolute_path)))
    if errors:
        msgs = "; ".join(f"{_where(e.absolute_path)}: {e.message}" for e in errors[:5])
        raise EventSchemaError(f"{doc.get('event')}: {msgs}")


def validate_lines(text: str, *, min_events: int = 1) -> list[dict[str, Any]]:
    """Every line of a JSON-lines stream parsed and validated; returns the events in order.

    A stream with fewer than `min_events` events (by default: an empty one) is an error, so a check
    never passes because nothing was written; pass `min_events=0` where an empty stream is correct.
    """
    events: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise EventSchemaError(f"line {n}: not JSON: {e}") from None
        try:
            validate_event(doc)
        except EventSchemaError as e:
            raise EventSchemaError(f"line {n}: {e}") from None
        events.append(doc)
    if len(events) < min_events:
        raise EventSchemaError(f"{len(events)} events in the stream, expected at least {min_events}")
    return events


def _where(path: Any) -> str:
    return "/".join(map(str, path)) or "<root>"


def audit_events(
    stream: str | list[str], expected_decisions: int | None = None, *, min_events: int = 1
) -> list[dict[str, Any]]:
    """The end-to-end check a proxy harness runs at teardown on everything the proxy wrote to stdout
    (or its events file): every line a valid event (no stray log line mixed in), at least `min_events`
    events, each decision logged once (unique flow_id), and, when given, exactly `expected_decisions`
    egress.decision events. Every tunnel.closed must follow an egress.decision of the same flow.
    Returns the events."""
    text = stream if isinstance(stream, str) else "\n".join(stream)
    events = validate_lines(text, min_events=min_events)
    decisions = [e for e in events if e["event"] == "egress.decision"]
    flows = [e["flow_id"] for e in decisions]
    dupes = _duplicate_flows(decisions)
    if dupes:
        raise EventSchemaError(f"decision logged more than once for flow(s) {dupes[:5]}")
    if expected_decisions is not None and len(decisions) != expected_decisions:
        raise EventSchemaError(f"{len(decisions)} egress.decision events for {expected_decisions} decisions")
    seen = set(flows)
    orphans = [e["flow_id"] for e in events if e["event"] == "tunnel.closed" and e["flow_id"] not in seen]
    if orphans:
        raise EventSchemaError(f"tunnel.closed without an egress.decision: {orphans[:5]}")
    return events


def _duplicate_flows(decisions: list[dict[str, Any]]) -> list[str]:
    """Flows with more than one decision. Two legitimate pairs: a tunnel allowed on its CONNECT
    authority and then refused for what came through it (SNI mismatch / not TLS) on the same flow, and
    a request allowed on its headers whose body carried a credential's placeholder or secret."""
    by_flow: dict[str, list[dict[str, Any]]] = {}
    for e in decisions:
        by_flow.setdefault(e["flow_id"], []).append(e)
    bad = []
    for flow, evs in by_flow.items():
        if len(evs) == 1:
            continue
        pair = len(evs) == 2 and evs[0]["layer"] == evs[1]["layer"] == "connect" and \
            evs[0]["decision"] == "allow" and evs[1]["reason"] == "sni_mismatch"
        # The other: a request let through on its headers whose body then carried a credential's needle.
        leak = len(evs) == 2 and evs[0]["layer"] == evs[1]["layer"] != "connect" and \
            evs[0]["decision"] == "allow" and evs[1]["reason"] == "credential_leak"
        if not (pair or leak):
            bad.append(flow)
    return sorted(bad)
