"""Who is calling the admin API or the approval page: the admin token, or a named approver.

Every bearer token is compared in constant time against every configured one, so the time taken
says nothing about which exists. A decision records the authenticated name (`by`), never what a
request body claims.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from addons.config.models import ApproverConfig

NO_TOKEN = ("no admin token or approver is set: export the variable named by admin.token_env "  # noqa: S105
            "(default PORTCULLIS_ADMIN_TOKEN) or configure admin.approvers, and restart the proxy")
ADMIN = "admin"


class Role(StrEnum):
    APPROVER = "approver"  # lists and decides approvals
    ADMIN = "admin"  # also mints and revokes task credentials


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role


class ApproverError(Exception):
    """An approver's token variable is not set (the proxy refuses to start)."""


class Principals:
    """The admin token (principal `admin`, role admin) and `admin.approvers`."""

    def __init__(self, admin_token: str | None, approvers: Sequence[ApproverConfig] = (),
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._digests: list[tuple[bytes, Principal]] = []
        if admin_token:
            self._digests.append((_digest(admin_token), Principal(ADMIN, Role.ADMIN)))
        missing = []
        for a in approvers:
            if a.token_env is not None:
                value = env.get(a.token_env)
                if not value:
                    missing.append(f"approver {a.name!r}: environment variable {a.token_env} is not set")
                    continue
                digest = _digest(value)
            else:
                assert a.token_sha256 is not None
                digest = bytes.fromhex(a.token_sha256)
            self._digests.append((digest, Principal(a.name, Role(a.role))))
        if missing:
            raise ApproverError("; ".join(missing))
        # What the approval page signs its cookies with: the same on every replica with the same tokens.
        self.key = hashlib.sha256(b"portcullis-page\0" + b"".join(d for d, _ in self._digests)).digest()

    @property
    def configured(self) -> bool:
        return bool(self._digests)

    def who(self, token: str | None) -> Principal | None:
        if not token:
            return None
        given = _digest(token)
        found: Principal | None = None
        for digest, principal in self._digests:
            if hmac.compare_digest(given, digest):
                found = found or principal
        return found

    def named(self, name: str) -> Principal | None:
        return next((p for _, p in self._digests if p.name == name), None)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def token_ok(token: str | None, given: str | None) -> bool:
    """Constant-time comparison; no token configured means nobody gets in."""
    if not token or given is None:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


def bearer(header: str) -> str | None:
    scheme, _, given = header.partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None
