"""For proxy harnesses: `audit_events(stdout_text, expected_decisions=N)` at teardown (see validate.py)."""

from addons.telemetry.validate import EventSchemaError, audit_events, validate_event, validate_lines

__all__ = ["EventSchemaError", "audit_events", "validate_event", "validate_lines"]
