"""Decision links for chat tools: `GET {admin}/approvals/{id}/link?cap=...` shows that one approval with
Allow once / Deny buttons; the POST decides it. The capability is an HMAC over the approval id and an
expiry (the approval's own at most): it decides that approval and nothing else, never lists, never
mints, and an approval can be decided once, so a link works once."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable, Mapping

from addons.approvals.errors import ApprovalError
from addons.config.models import LinksConfig

MIN_KEY_BYTES = 16


class Links:
    def __init__(self, key: bytes, ttl: float, clock: Callable[[], float] = time.time) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ApprovalError(f"the decision-link key needs at least {MIN_KEY_BYTES} bytes")
        self.key = key
        self.ttl = ttl
        self.clock = clock

    @classmethod
    def from_config(cls, cfg: LinksConfig | None, environ: Mapping[str, str] | None = None) -> Links | None:
        if cfg is None:
            return None
        value = (os.environ if environ is None else environ).get(cfg.secret_env, "")
        if not value:
            raise ApprovalError(f"approvals.links: environment variable {cfg.secret_env} is not set")
        return cls(value.encode(), cfg.ttl)

    def _sig(self, approval_id: str, expires: int, nonce: str) -> str:
        msg = f"decide-link\0{approval_id}\0{expires}\0{nonce}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def capability(self, approval_id: str, approval_expires_at: float) -> str:
        expires = int(min(self.clock() + self.ttl, approval_expires_at))
        nonce = secrets.token_hex(8)
        return f"{expires}.{nonce}.{self._sig(approval_id, expires, nonce)}"

    def url(self, admin_url: str, approval_id: str, approval_expires_at: float) -> str:
        cap = self.capability(approval_id, approval_expires_at)
        return f"{admin_url.rstrip('/')}/approvals/{approval_id}/link?cap={cap}"

    def problem(self, approval_id: str, cap: str) -> str | None:
        """None when `cap` may decide `approval_id` now; else why not (tampered, expired, another one)."""
        parts = cap.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return "this decision link is malformed"
        expires, nonce, sig = int(parts[0]), parts[1], parts[2]
        if not hmac.compare_digest(sig, self._sig(approval_id, expires, nonce)):
            return "this decision link is not valid for this approval"
        if expires <= self.clock():
            return "this decision link has expired"
        return None
