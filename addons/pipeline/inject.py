"""Credential injection, the pipeline's step: which credential a request gets, and which it must not carry.

`plan` runs before the policy (and before any DNS query): a request that carries a placeholder or the
secret of a credential that is not applied to it is refused at once (reason credential_leak), whatever
the rules say. `apply` runs last, on an outcome that passes: a credential never allows anything by
itself, it only rides on a request the policy (and any approval) already let through. A credential is
applied only when all of these hold:
- the request is https inside an inspected tunnel, the upstream TLS verified against the host name;
- host (exact), port, method and path are bound by the credential;
- the client is authenticated (a task credential, or a proxy_auth user) and entitled by the credential's
  profiles / client groups;
- with `approval: first_use`, a person approved its use in this task (an ordinary approval).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import unquote

from addons.pipeline.model import Incoming, Outcome, refusal
from addons.policy.credentials import Credential, CredentialApproval, Injection
from addons.policy.evaluate import Policy, normalize_path
from addons.policy.model import Action, Layer, Reason, Request

SECURE_SCHEMES = frozenset({"https", "wss"})


class Settles(Protocol):
    """The approvals service, as this step uses it (addons/pipeline/decide.py: Approvals)."""

    async def resolve(self, pending: Outcome, client_alive: Callable[[], bool]) -> _Settlement: ...


class _Settlement(Protocol):
    @property
    def allowed(self) -> bool: ...
    @property
    def reason(self) -> Reason: ...
    @property
    def approval_id(self) -> str | None: ...
    @property
    def retry_after(self) -> int | None: ...
    @property
    def waited_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """What the credentials say about one request: the one to apply if it passes, or a leak."""

    credential: Credential | None = None
    leak: Credential | None = None
    detail: str | None = None


NO_PLAN = Plan()


def _paths(req: Request) -> tuple[str, str]:
    path = normalize_path(req.path or "/")
    return path, (normalize_path(unquote(path)) if "%" in path else path)


def secure(inc: Incoming, req: Request) -> bool:
    """https inside an inspected tunnel, upstream TLS verified against the name: never plain HTTP."""
    return req.layer is Layer.INSPECTED and (inc.scheme or "") in SECURE_SCHEMES and inc.tls_verified


def candidates(policy: Policy, inc: Incoming, req: Request) -> tuple[Credential | None, dict[str, str]]:
    """The credential to apply (first bound one the client is entitled to, in file order) and, for every
    other credential bound here, why it is not applied."""
    if req.layer is Layer.CONNECT or not req.method:
        return None, {}
    why: dict[str, str] = {}
    for c in policy.credentials.bound(req.host, req.port, req.method, _paths(req)):
        if not secure(inc, req):
            why[c.name] = "credentials are injected only into https inside an inspected tunnel"
            continue
        problem = c.refusal(req.client)
        if problem is not None:
            why[c.name] = problem
            continue
        return c, why
    return None, why


def _texts(inc: Incoming) -> Iterator[str]:
    """Where a request can carry a needle: the host, the target (with its query, also %-decoded),
    every header (name and value)."""
    yield inc.host
    target = inc.target if inc.target is not None else inc.path
    if target:
        yield target
        if "%" in target or "+" in target:
            yield unquote(target.replace("+", " "))
            yield unquote(target)
    if inc.host_header:
        yield inc.host_header
    for name, value in inc.headers:
        yield f"{name}: {value}"


def refusal_of(policy: Policy, req: Request, p: Plan, client_name: str | None) -> Outcome:
    """The credential_leak refusal: the host and path it reports have every needle redacted."""
    assert p.leak is not None
    creds = policy.credentials
    shown = replace(req, host=creds.redact(req.host), path=creds.redact(req.path) if req.path else req.path)
    return replace(refusal(shown, Reason.CREDENTIAL_LEAK, p.detail, client_name), credential=p.leak.name)


def plan(policy: Policy, inc: Incoming, req: Request) -> Plan:
    """The credential this request would get, or the credential it carries without being bound."""
    creds = policy.credentials
    if not creds:
        return NO_PLAN
    applied, why = candidates(policy, inc, req)
    leak = creds.leaked(_texts(inc), skip=applied.name if applied is not None else None)
    if leak is not None and leak is applied:
        return Plan(None, leak, f"the request carries the secret of credential {leak.name!r} itself; an "
                                "agent never holds it (the proxy adds it)")
    if leak is not None:
        bound = ", ".join(f"https://{h}:{p}" for h in sorted(leak.hosts) for p in sorted(leak.ports))
        reason = why.get(leak.name) or f"it is bound to {bound} only"
        return Plan(None, leak, f"the request carries the placeholder or secret of credential "
                                f"{leak.name!r}, which is not applied to it ({reason})")
    return Plan(applied)


async def apply(outcome: Outcome, cred: Credential, approvals: Settles | None, audit: bool,
                client_alive: Callable[[], bool]) -> Outcome:
    """The outcome of a request that passes, with the credential applied (or held for its first use)."""
    if not outcome.passes or outcome.action is not Action.ALLOW:
        return outcome  # never on a denial (audit mode lets rule denials through: without credentials)
    if cred.approval is CredentialApproval.FIRST_USE:
        pending = replace(outcome, action=Action.APPROVAL, status=403, credential=cred.name,
                          detail=f"credential {cred.name!r} is applied only after a person approves its use "
                                 "in this task")
        if approvals is None:
            return pending  # `portcullis check`: the answer is "approval"
        if audit:  # audit never holds: recorded, passed on without the credential
            return replace(pending, action=Action.DENY, reason=Reason.APPROVAL_PENDING, enforced=False,
                           status=None)
        s = await approvals.resolve(pending, client_alive)
        if not s.allowed:
            return replace(pending, action=Action.DENY, reason=s.reason, approval_id=s.approval_id,
                           retry_after=s.retry_after, approval_wait_s=s.waited_s)
        outcome = replace(outcome, reason=Reason.APPROVED, approval_id=s.approval_id,
                          approval_wait_s=s.waited_s)
    value = cred.apply.render(cred.secret)
    return replace(outcome, credential=cred.name, injection=Injection(cred.name, cred.apply.header, value))


def body_watch(policy: Policy, outcome: Outcome) -> tuple[Credential, ...]:
    """The credentials whose needles the body of this (passing) request must not carry."""
    if not policy.credentials or outcome.request.layer is Layer.CONNECT:
        return ()
    return policy.credentials.body_watch(outcome.credential if outcome.injection is not None else None)


def leak_refusal(outcome: Outcome, cred: Credential, where: str) -> Outcome:
    """A request let through on its headers whose body carried a needle: a second decision about it."""
    return replace(outcome.refused(Reason.CREDENTIAL_LEAK,
                                   f"the request body carries the placeholder or secret of credential "
                                   f"{cred.name!r} ({where})"), credential=cred.name)
