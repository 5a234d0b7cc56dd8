"""From a policy Decision (+ DNS, approvals, audit mode) to what the proxy does, and its one log record."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from addons.approvals.service import ApprovalRequest, ApprovalService
from addons.policy.hosts import is_ip
from addons.policy.model import Action, Decision, Query, Reason, RuleRef
from addons.proxy.pinning import Lookup, Pin, PinStore, ResolveError, resolve, system_lookup
from addons.proxy.reload import PolicyHolder
from addons.telemetry.record import DecisionRecord

log = logging.getLogger(__name__)

# Audit mode audits the rules: these verdicts are logged with enforced=false and let through. Safety
# checks (private destinations, Host/SNI mismatch, malformed requests, auth, internal errors) always hold.
AUDITED = frozenset({Reason.RULE.value, Reason.DEFAULT.value, Reason.APPROVAL_PENDING.value})


@dataclass
class Verdict:
    """The outcome of one decision: whether traffic passes, and every fact the event needs."""

    passes: bool
    decision: str  # what is recorded: allow | deny
    reason: str
    host: str
    port: int | None
    enforced: bool = True
    rule: RuleRef | None = None
    matched: tuple[RuleRef, ...] = ()
    client_name: str | None = None
    ip: str | None = None
    approval_id: str | None = None
    retry_after: int | None = None
    detail: str | None = None
    status: int | None = None  # the status the proxy answers with itself (403, 407, 502) or None
    inspect: bool = False
    raw_tcp: bool = False
    pin: Pin | None = None
    latency_s: float | None = None
    approval_wait_s: float | None = None
    private_class: str | None = None


@dataclass(slots=True)
class Request:
    """What is being decided (host normalised once the proxy has parsed it)."""

    host: str
    port: int
    scheme: str | None
    method: str | None
    path: str | None
    client_id: str
    client_address: str | None
    client_port: int | None
    client_user: str | None
    flow_id: str
    layer: str  # http | connect | inspected


# The status of a denial the proxy answers itself: 400 for a malformed request, 407 for proxy
# credentials, 403 for every policy decision.
DENY_STATUS = {Reason.BAD_REQUEST: 400, Reason.PROXY_AUTH: 407}


def deny_status(reason: Reason) -> int:
    return DENY_STATUS.get(reason, 403)


def refusal(
    req: Request,
    reason: Reason,
    *,
    status: int | None = None,
    detail: str | None = None,
    client_name: str | None = None,
) -> Verdict:
    """A denial the proxy takes before (or without) asking the policy."""
    return Verdict(
        False,
        "deny",
        reason.value,
        req.host,
        req.port,
        status=status or deny_status(reason),
        detail=detail,
        client_name=client_name,
    )


class Decider:
    """Runs the policy, the one DNS resolution, the self-address check and the approval wait."""

    def __init__(
        self,
        holder: PolicyHolder,
        approvals: ApprovalService,
        pins: PinStore,
        audit: bool,
        healthy: Callable[[], bool],
        is_own: Callable[[str, int], bool],
        lookup: Lookup = system_lookup,
    ) -> None:
        self.holder = holder
        self.approvals = approvals
        self.pins = pins
        self.audit = audit
        self.healthy = healthy
        self.is_own = is_own
        self.lookup = lookup

    async def decide(self, req: Request, client_alive: Callable[[], bool]) -> Verdict:
        t0 = time.monotonic()
        if not self.healthy():
            return dataclasses.replace(
                refusal(req, Reason.INTERNAL_ERROR, detail="the event log cannot be written"),
                latency_s=time.monotonic() - t0,
            )
        policy = self.holder.policy
        tunnel = req.layer == "connect"  # a CONNECT is decided on its authority alone (method None)
        q = Query(
            host=req.host,
            port=req.port,
            scheme=req.scheme,
            method=None if tunnel else req.method,
            path=None if tunnel else req.path,
            client_address=req.client_address,
            client_user=req.client_user,
        )
        pin: Pin | None = self.pins.get(req.client_id, req.host, req.port)
        unresolvable: str | None = None
        if pin is not None:
            # Already resolved on this connection: one decision with those checked answers (deciding
            # with addresses is never less restrictive than without).
            d = policy.decide(dataclasses.replace(q, addresses=pin.addresses))
        else:
            d = policy.decide(q)
            # Resolve only names the rules do not already refuse: no DNS query leaks a denied name
            # (in audit mode a rule denial still goes through, so it needs its checked address too).
            if d.action is not Action.DENY or (self.audit and d.reason.value in AUDITED):
                try:
                    addrs = await resolve(
                        req.host, req.port, is_ip(req.host), policy.static_resolve(req.host), self.lookup
                    )
                except ResolveError as e:
                    unresolvable = str(e)
                else:
                    pin = Pin(req.host, req.port, addrs)
                    d = policy.decide(dataclasses.replace(q, addresses=addrs))
        own = pin is not None and any(self.is_own(a, req.port) for a in pin.addresses)
        if own and d.reason is not Reason.PRIVATE_ADDRESS:
            d = Decision(
                Action.DENY,
                Reason.PRIVATE_ADDRESS,
                client_name=d.client_name,
                private_class="self",
                detail="the destination is this proxy itself",
            )
        latency = time.monotonic() - t0
        v = self._from_decision(req, d, pin)
        v.latency_s = latency
        if d.action is Action.APPROVAL:
            v = await self._approval(req, d, v, client_alive)
        if v.passes and v.decision == "allow" and pin is None and unresolvable is not None:
            # Allowed, but there is nowhere to connect: an upstream failure, not a denial.
            v.status = 502
            v.detail = unresolvable
            v.passes = False
        if self.audit and not v.passes and v.status == 403 and v.reason in AUDITED:
            v.passes, v.enforced, v.status = True, False, None
        if v.passes and pin is not None:
            self.pins.put(req.client_id, pin)
        return v

    def _from_decision(self, req: Request, d: Decision, pin: Pin | None) -> Verdict:
        allow = d.action is Action.ALLOW
        return Verdict(
            passes=allow,
            decision="allow" if allow else "deny",
            reason=d.reason.value,
            host=req.host,
            port=req.port,
            rule=d.rule,
            matched=d.matched,
            client_name=d.client_name,
            ip=pin.ip if pin else (req.host if is_ip(req.host) else None),
            detail=d.private_class if d.reason is Reason.PRIVATE_ADDRESS else d.detail,
            status=None if allow else deny_status(d.reason),
            inspect=d.inspect,
            raw_tcp=d.raw_tcp,
            pin=pin,
            private_class=d.private_class,
        )

    async def _approval(
        self, req: Request, d: Decision, v: Verdict, client_alive: Callable[[], bool]
    ) -> Verdict:
        if self.audit:
            # Audit never holds: record what would have happened (a hold) and let it pass.
            v.decision, v.reason = "deny", Reason.APPROVAL_PENDING.value
            return v
        ask = ApprovalRequest(
            # One agent, not its whole group: an authenticated user, else the source address.
            client_key=f"user:{req.client_user}" if req.client_user else (req.client_address or "-"),
            client_address=req.client_address,
            client_name=d.client_name,
            host=req.host,
            port=req.port,
            scheme=req.scheme,
            method=req.method,
            path=req.path,
            rule=d.rule.name if d.rule else None,
            flow_id=req.flow_id,
        )
        out = await self.approvals.resolve(ask, client_alive)
        v.approval_id = out.approval_id
        v.approval_wait_s = out.waited_s
        v.reason = out.reason.value
        if out.allowed:
            v.passes, v.decision, v.status = True, "allow", None
        else:
            v.passes, v.decision, v.status = False, "deny", 403
            v.retry_after = out.retry_after
        return v


def record(req: Request, v: Verdict) -> DecisionRecord:
    """The one egress.decision record for this verdict."""
    return DecisionRecord(
        decision=v.decision,
        reason=v.reason,
        enforced=v.enforced,
        host=req.host,
        port=req.port,
        flow_id=req.flow_id,
        rule=v.rule.name if v.rule else None,
        rule_file=v.rule.file if v.rule else None,
        rule_line=v.rule.line if v.rule else None,
        matched_rules=tuple(r.name for r in v.matched),
        client_address=req.client_address,
        client_port=req.client_port,
        client_name=v.client_name,
        client_user=req.client_user,
        ip=v.ip,
        scheme=req.scheme,
        method=req.method,
        path=req.path,
        approval_id=v.approval_id,
        status=v.status,
        layer=req.layer,
        latency_s=v.latency_s,
        approval_wait_s=v.approval_wait_s,
        detail=v.detail,
    )
