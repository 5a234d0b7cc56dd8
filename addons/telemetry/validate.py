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


def validate_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a JSON-lines stream parsed and validated; returns the events in order."""
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
    return events


def _where(path: Any) -> str:
    return "/".join(map(str, path)) or "<root>"
