"""The approvals model: states, scopes and choices; the stored Approval and Grant rows; the Store protocol.

The enum values are the contract's strings (store, admin API, events, webhooks): "pending", "once",
"allow" ... A request the policy judged `approval` arrives as the pipeline's Outcome
(addons/pipeline/model.py); the Approval row is built from it once (`Approval.opened`).
The stores live beside this module in stores/ and import it; this module imports no store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from addons.pipeline.model import Outcome
from addons.policy.model import Reason

Key = tuple[str, str, int]  # (client key, host, port): what one approval and its grants are about
# A credential's first-use approval is its own question, never answered by an approval of the host:
# its client key carries the credential's name ("task:build-42|credential:github").
CREDENTIAL_MARK = "|credential:"


def client_key(pending: Outcome) -> str:
    """Who an approval is for: the agent, and the credential when one asks about its first use."""
    key = pending.request.client.key
    return f"{key}{CREDENTIAL_MARK}{pending.credential}" if pending.credential else key


class State(StrEnum):
    PENDING = "pending"
    ALLOWED = "allowed"
    DENIED = "denied"
    EXPIRED = "expired"


class Scope(StrEnum):
    """How far a decision reaches: the requests held now (or the next retry), the client's session
    on that host:port (approvals.session_ttl), the rest of the asking task's life on that host:port
    (until its credential expires or is revoked), or a rule appended to approvals.persist_to."""

    ONCE = "once"
    SESSION = "session"
    TASK = "task"
    ALWAYS = "always"


class Choice(StrEnum):
    """What a person (or a grant) says."""

    ALLOW = "allow"
    DENY = "deny"

    @property
    def state(self) -> State:
        return State.ALLOWED if self is Choice.ALLOW else State.DENIED

    @property
    def reason(self) -> Reason:
        return Reason.APPROVED if self is Choice.ALLOW else Reason.APPROVAL_DENIED


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval as stored."""

    id: str
    client_key: str
    client_address: str | None
    client_name: str | None
    host: str
    port: int
    scheme: str | None
    method: str | None
    path: str | None
    rule: str | None
    created_at: float
    expires_at: float
    state: State = State.PENDING
    decision: Choice | None = None
    scope: Scope | None = None
    decided_by: str | None = None
    reason: str | None = None
    decided_at: float | None = None
    notified: bool = False  # every webhook endpoint reached a final answer (else re-sent after a restart)
    labels: tuple[tuple[str, str], ...] = ()  # the asking task's labels (who started it, which repo ...)
    task_until: float | None = None  # when the asking task's credential expires (what scope `task` lasts)

    @classmethod
    def opened(cls, approval_id: str, pending: Outcome, now: float, timeout: float) -> Approval:
        """A new pending approval for a request the policy judged `approval`."""
        r = pending.request
        c = r.client
        return cls(approval_id, client_key(pending), c.address, pending.client_name, r.host, r.port, r.scheme,
                   r.method, r.path, pending.rule.name if pending.rule else None, now, now + timeout,
                   labels=c.labels, task_until=c.task_until if c.task_id else None)

    @property
    def key(self) -> Key:
        return (self.client_key, self.host, self.port)

    @property
    def task_id(self) -> str | None:
        """The agent task that asked, when it presented a task credential (client key `task:<id>`)."""
        agent = self.client_key.split(CREDENTIAL_MARK, 1)[0]
        return agent[5:] if agent.startswith("task:") else None

    @property
    def credential(self) -> str | None:
        """The credential whose first use in a task this approval is about (None: about the host)."""
        _, mark, name = self.client_key.partition(CREDENTIAL_MARK)
        return name if mark else None

    @property
    def ending(self) -> Reason | None:
        """How it ended, as its waiters are answered; None while it is pending."""
        if self.state is State.PENDING:
            return None
        if self.state is State.EXPIRED:
            return Reason.APPROVAL_TIMEOUT
        return Reason.APPROVED if self.state is State.ALLOWED else Reason.APPROVAL_DENIED

    def decided(self, choice: Choice, scope: Scope, by: str | None, reason: str | None,
                now: float) -> Approval:
        """This row after the decision (what the store's compare-and-set writes)."""
        return replace(self, state=choice.state, decision=choice, scope=scope, decided_by=by, reason=reason,
                       decided_at=now)

    def expired(self, now: float) -> Approval:
        return replace(self, state=State.EXPIRED, decided_at=now)


@dataclass(frozen=True, slots=True)
class Grant:
    """A standing decision for (client, host, port): session/always grants, or a single-use `once`."""

    id: int
    client_key: str
    host: str
    port: int
    decision: Choice
    scope: Scope
    approval_id: str | None
    created_at: float
    expires_at: float
    single_use: bool


class Store(Protocol):
    """Where approvals and grants live (stores/sqlite.py, stores/redis.py).

    Every call is a coroutine, atomic on its own and one logical round trip: the ledger never relies
    on two calls being adjacent. Coalescing is `open`'s job (one pending approval per key, across
    replicas), first-decision-wins is `decide`'s compare-and-set, and a `once` grant is used by
    exactly one `take_grant`. A store that cannot be reached raises StoreUnavailable (errors.py).
    """

    @property
    def name(self) -> str:
        """The store as a person reads it in a message (a URL without its password, or a path)."""
        ...
    async def close(self) -> None: ...
    async def open(self, a: Approval, now: float) -> Approval:
        """Insert `a` unless a live pending approval for `a.key` exists; returns the one that stands."""
        ...
    async def get(self, approval_id: str) -> Approval | None: ...
    async def pending(self) -> list[Approval]: ...
    async def count_pending(self) -> int:
        """How many approvals are pending (the gauge; recounted on every change, so cheap)."""
        ...
    async def pending_for(self, key: Key, now: float) -> Approval | None: ...
    async def recent(self, limit: int = 100) -> list[Approval]: ...
    async def decide(self, approval_id: str, choice: Choice, scope: Scope, by: str | None,
                     reason: str | None, now: float) -> bool:
        """Compare-and-set pending -> allowed/denied. False when it was no longer pending."""
        ...
    async def expire(self, approval_id: str, now: float) -> bool:
        """Compare-and-set pending -> expired. False when it was no longer pending."""
        ...
    async def mark_notified(self, approval_id: str) -> None: ...
    async def due(self, now: float) -> list[Approval]:
        """Pending approvals whose expiry has passed."""
        ...
    async def add_grant(self, key: Key, choice: Choice, scope: Scope, approval_id: str | None, now: float,
                        expires_at: float, single_use: bool) -> int: ...
    async def take_grant(self, key: Key, now: float) -> Grant | None:
        """The live grant for this key (deny before allow); a single-use grant is consumed."""
        ...
    async def drop_single_use(self, a: Approval) -> int:
        """Remove the unused `once` grant a decision left for this approval; returns how many."""
        ...
    async def grants(self, now: float) -> list[Grant]: ...
    async def drop_grants_of(self, client_key: str) -> int:
        """Remove every grant of one client (a revoked task's); returns how many."""
        ...
    async def sweep(self, now: float, keep_decided_s: float = 7 * 86400) -> int:
        """Delete expired grants and old decided approvals. Returns the number of grants removed."""
        ...


class DecideError(Exception):
    """A decision that cannot be taken; `status` is the admin API's HTTP status."""

    def __init__(self, status: int, code: str, message: str, approval: Approval | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.approval = status, code, message, approval


def decode_labels(text: str | None) -> tuple[tuple[str, str], ...]:
    """Labels as the stores keep them (a JSON object, or nothing) -> the row's tuple."""
    if not text:
        return ()
    doc = json.loads(text)
    return tuple((str(k), str(v)) for k, v in doc.items()) if isinstance(doc, dict) else ()


def rfc3339(ts: float) -> str:
    """Unix seconds -> RFC 3339 UTC with a Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
