"""The admin HTTP server (health, readiness, metrics, and routes other parts add)."""
