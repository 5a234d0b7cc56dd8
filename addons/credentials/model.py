"""Task credentials: what the orchestrator mints for one agent task, and how one is judged."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Protocol

TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
MAX_LABELS = 16
MAX_LABEL_VALUE = 128

Labels = tuple[tuple[str, str], ...]


class State(StrEnum):
    LIVE = "live"
    EXPIRED = "expired"
    REVOKED = "revoked"


class Check(Enum):
    """What presenting a credential got: a task, or why not (the 407's detail)."""

    OK = "ok"
    UNKNOWN = "unknown task credential"
    WRONG_SECRET = "wrong secret for this task credential"  # noqa: S105 - a message, not a secret
    EXPIRED = "the task credential has expired"
    REVOKED = "the task credential was revoked"
    UNAVAILABLE = "task credentials cannot be checked right now (store unreachable)"


@dataclass(frozen=True, slots=True)
class Credential:
    """One task's credential as stored: only a hash of its secret, never the secret."""

    task_id: str
    profile: str | None
    labels: Labels
    secret_hash: str  # sha256 of the secret, hex: the secret has 256 bits, a slow hash adds nothing
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    minted_by: str | None = None

    def state(self, now: float) -> State:
        if self.revoked_at is not None:
            return State.REVOKED
        return State.LIVE if now < self.expires_at else State.EXPIRED

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(hash_secret(secret), self.secret_hash)

    def public(self, now: float) -> dict[str, object]:
        """What `GET /credentials` shows: everything but the hash."""
        return {
            "task_id": self.task_id,
            "profile": self.profile,
            "labels": dict(self.labels),
            "state": self.state(now).value,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "minted_by": self.minted_by,
        }


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class CredentialStore(Protocol):
    """Where credentials live (the approvals store's database or Redis), shared by every process."""

    async def insert(self, c: Credential, now: float) -> bool:
        """False when a live credential for that task exists already (nothing written)."""
        ...

    async def get(self, task_id: str) -> Credential | None: ...
    async def all(self) -> list[Credential]: ...
    async def revoke(self, task_id: str, now: float) -> Credential | None:
        """The revoked credential, or None when there is no live one."""
        ...

    async def sweep(self, now: float, keep_s: float) -> list[Credential]:
        """Forget credentials ended more than `keep_s` ago; return those newly found expired."""
        ...

    async def count_live(self, now: float) -> int:
        """How many can be used now (the `credentials_live` gauge), without reading them all."""
        ...

    async def close(self) -> None: ...
