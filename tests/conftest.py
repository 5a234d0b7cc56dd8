"""Suite-wide: every proxy an end-to-end test starts has its event stream audited at stop
(every stdout line a valid portcullis.event/v1 event, no decision logged twice, /metrics labels bounded)."""

pytest_plugins = ["tests.telemetry.audit_plugin"]

