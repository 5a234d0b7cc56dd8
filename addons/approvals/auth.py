"""Admin token checks shared by the approvals API and the approval page."""

from __future__ import annotations

import hmac

NO_TOKEN = ("the admin token is not set: export the variable named by admin.token_env "  # noqa: S105
            "(default PORTCULLIS_ADMIN_TOKEN) and restart the proxy")


def token_ok(token: str | None, given: str | None) -> bool:
    """Constant-time comparison; no token configured means nobody gets in."""
    if not token or given is None:
        return False
    return hmac.compare_digest(given.encode(), token.encode())
