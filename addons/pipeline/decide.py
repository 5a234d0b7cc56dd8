"""The decision pipeline. `Pipeline.decide` reads top-down, one step per stage:

1. identify the client (proxy credentials; inside a tunnel, the CONNECT's identity);
2. check the authority: a host that normalises, one Host header, the tunnel's own destination, a
   target and Host that agree, framing nothing can read differently;
3. ask the policy (rules, private destinations);
4. resolve once, check every answer, pin the connection to a checked address (a name that needs an
   approval only once it has one);
5. settle approvals (grants, a coalesced pending approval, the hold);
6. one immutable Outcome: audit mode, "allowed but nowhere to connect", the pin kept for the connection.

The proxy (addons/proxy/addon.py) and `portcullis check` (addons/rulecli.py) call this same code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from addons.credentials.model import Check
from addons.pipeline import inject
from addons.pipeline.dns import Lookup, Pin, PinStore, ResolveError, resolve
from addons.pipeline.identity import ProxyAuth, TaskCredentials, parse_basic
from addons.pipeline.model import Incoming, Outcome, deny_status, refusal
from addons.policy.authority import connect_authority_problem, names_port_zero, same_destination
from addons.policy.evaluate import Policy
from addons.policy.hosts import HostError, is_ip, normalize_host
from addons.policy.model import Action, Client, Decision, Layer, Reason, Request

log = logging.getLogger(__name__)

# Audit mode audits the rules: these outcomes are logged with enforced=false and let through. Safety
# checks (private destinations, Host/SNI mismatch, malformed requests, auth, internal errors) always hold.
AUDITED = frozenset({Reason.RULE, Reason.DEFAULT, Reason.APPROVAL_PENDING})
# Retry-After (seconds) of a request refused while the event stream is stalled.
STALLED_RETRY_S = 1


class PolicySource(Protocol):
    """Where the policy in force comes from (swapped whole on reload)."""

    @property
    def policy(self) -> Policy: ...


@dataclass(frozen=True, slots=True)
class Settlement:
    """How approvals settled a request the policy sent to a person."""

    allowed: bool
    reason: Reason
    approval_id: str | None
    retry_after: int | None = None
    waited_s: float = 0.0
    detail: str | None = None  # why, beyond the reason (e.g. "the approvals store ... is unreachable")


class Approvals(Protocol):
    async def resolve(self, pending: Outcome, client_alive: Callable[[], bool]) -> Settlement: ...


def _alive() -> bool:
    return True


class Pipeline:
    """One per proxy process (and one per `portcullis check`, with no DNS, approvals or credentials)."""

    def __init__(
        self,
        policies: PolicySource,
        *,
        auth: ProxyAuth | None = None,
        credentials: TaskCredentials | None = None,
        require_credentials: bool = False,
        approvals: Approvals | None = None,
        pins: PinStore | None = None,
        lookup: Lookup | None = None,
        audit: bool = False,
        healthy: Callable[[], bool] = _alive,
        stalled: Callable[[], bool] = lambda: False,
        is_own: Callable[[str, int], bool] = lambda ip, port: False,
    ) -> None:
        self.policies = policies
        self.auth = auth
        self.credentials = credentials
        self.require_credentials = require_credentials  # no anonymous egress
        self.approvals = approvals
        self.pins = pins if pins is not None else PinStore()
        self.lookup = lookup  # None: decide without DNS, like `portcullis check`
        self.audit = audit
        self.healthy = healthy
        self.stalled = stalled  # the event stream's reader stopped reading: refuse before anything else
        self.is_own = is_own

    async def decide(
        self,
        inc: Incoming,
        client_alive: Callable[[], bool] = _alive,
        groups: Sequence[str] | None = None,
        client: Client | None = None,
    ) -> Outcome:
        """The one outcome for `inc`. Never raises: any internal error denies (internal_error).

        `groups` and `client` stand in for what identification would find (`portcullis check
        --client GROUP --profile P`, which has no credentials to check)."""
        t0 = time.monotonic()
        try:
            return await self._decide(inc, client_alive, groups, client, t0)
        except Exception:
            log.exception("decision failed")
            return refusal(
                _as_received(inc, _peer(inc)), Reason.INTERNAL_ERROR, latency_s=time.monotonic() - t0
            )

    async def _decide(
        self,
        inc: Incoming,
        client_alive: Callable[[], bool],
        groups: Sequence[str] | None,
        given: Client | None,
        t0: float,
    ) -> Outcome:
        policy = self.policies.policy
        if self.stalled():  # stdout is not read: no decision could be logged, so none is taken
            out = refusal(_as_received(inc, _peer(inc)), Reason.EVENT_SINK_STALLED,
                          "the event stream is not being read", latency_s=time.monotonic() - t0)
            return replace(out, retry_after=STALLED_RETRY_S)
        # 1. Who asks.
        client, refused = (given, None) if given is not None else await self._identify(inc)
        if refused is not None:
            return refusal(_as_received(inc, client), Reason.PROXY_AUTH, refused)
        name = groups[0] if groups else policy.client_name(client.address, client.user)
        # 2. What it names: one destination, well formed.
        req = _as_received(inc, client)
        try:
            req = replace(req, host=normalize_host(inc.host))
        except HostError as e:
            return refusal(req, Reason.BAD_REQUEST, str(e), name)
        if (problem := _authority_problem(inc, req)) is not None:
            out = refusal(req, problem[0], problem[1], name)
            if inc.problem_status is not None and problem[1] == inc.problem:
                out = replace(out, status=inc.problem_status)  # 414/431: a head over the size limits
            return out
        if not self.healthy():  # events cannot be written: decide nothing that would go unrecorded
            return refusal(req, Reason.INTERNAL_ERROR, "the event log cannot be written", name)
        # 2b. A placeholder or secret where its credential is not applied: refused before any rule or DNS.
        creds = inject.plan(policy, inc, req)
        if creds.leak is not None:
            return inject.refusal_of(policy, req, creds, name)
        # 3 and 4. The policy, with the checked DNS answers (none yet for a name a person must approve).
        decision, pin, unresolvable = await self._judge(policy, req, groups)
        outcome = self._outcome(req, decision, pin, time.monotonic() - t0)
        # 5. A person decides what the policy left to one.
        if decision.action is Action.APPROVAL:
            outcome = await self._settle(outcome, client_alive)
            task, tasks = client.task_id, self.credentials
            if outcome.passes and task and tasks is not None and not tasks.still_valid(task):
                return refusal(req, Reason.PROXY_AUTH, "the task credential was revoked or expired while the "
                               "request was held", name, latency_s=time.monotonic() - t0)
            if outcome.passes and pin is None:  # approved: only now is the name looked up, and checked
                checked, pin, unresolvable = await self._judge(policy, req, groups, approved=True)
                if checked.action is Action.DENY:  # a private answer (or this proxy): no approval lifts it
                    denied = self._outcome(req, checked, None, time.monotonic() - t0)
                    return replace(denied, approval_id=outcome.approval_id,
                                   approval_wait_s=outcome.approval_wait_s)
                if pin is not None:
                    outcome = replace(outcome, pin=pin, ip=pin.ip)
        # 6. What the proxy does.
        if outcome.passes and outcome.action is Action.ALLOW and pin is None and unresolvable is not None:
            outcome = replace(outcome, status=502, detail=unresolvable)  # allowed, but nowhere to connect
        if self.audit and not outcome.passes and outcome.status == 403 and outcome.reason in AUDITED:
            outcome = replace(outcome, enforced=False, status=None)
        if creds.credential is not None:  # only ever onto a request that passes
            outcome = await inject.apply(outcome, creds.credential, self.approvals, self.audit, client_alive)
        if outcome.passes and pin is not None:
            self.pins.put(client.conn_id, pin)
        return outcome

    def malformed(self, inc: Incoming, detail: str, status: int | None) -> Outcome:
        """A request mitmproxy refused before any hook could read it (its own 400 page, or an HTTP/2
        connection error with no status at all): one bad_request outcome, for the event."""
        t = inc.tunnel
        client = t.request.client if t is not None else _peer(inc)
        host, port = (t.request.host, t.request.port) if t is not None else ("", inc.port)
        if t is None and inc.host:
            try:
                host = normalize_host(inc.host)
            except HostError:
                host = ""
        req = Request(host, port, client, None, inc.method, None, inc.layer, inc.flow_id)
        name = self.policies.policy.client_name(client.address, client.user)
        return Outcome(req, Action.DENY, Reason.BAD_REQUEST, status=status, detail=detail, client_name=name)

    async def _identify(self, inc: Incoming) -> tuple[Client, str | None]:
        """The client, and why its credentials are refused (a 407 the agent can read) or None. A
        refused client is named only as far as it proved who it is: a revoked or expired task whose
        secret matched is named (the event says which task tried), a wrong secret is not."""
        t = inc.tunnel
        if t is not None:  # inside a tunnel the CONNECT's identity applies, while it lasts
            c = t.request.client
            if c.task_id and self.credentials is not None and not self.credentials.still_valid(c.task_id):
                return c, "the task credential of this tunnel was revoked or has expired"
            return c, None
        peer = _peer(inc)
        address, port = peer.address, peer.port
        anonymous = Client(address, port, None, inc.conn_id)
        if inc.credentials is None:
            if self.require_credentials:
                return anonymous, "a task credential is required (Proxy-Authorization: Basic task_id:secret)"
            if self.auth is not None and self.auth.requires(address):
                return anonymous, "this client group needs proxy credentials"
            return anonymous, None
        parsed = parse_basic(inc.credentials)
        if parsed is None:
            return anonymous, "the Proxy-Authorization header is not Basic user:password"
        user, secret = parsed
        if self.auth is not None and self.auth.is_user(user):
            if not self.auth.verify(user, secret):
                return anonymous, "wrong password"
            return Client(address, port, user, inc.conn_id), None
        if self.credentials is not None and self.credentials.knows(user):
            check, cred = await self.credentials.verify(user, secret)
            if cred is None:
                return anonymous, check.value
            task = Client(address, port, user, inc.conn_id, cred.task_id, cred.profile, cred.labels,
                          cred.expires_at)
            return task, None if check is Check.OK else check.value
        return anonymous, "unknown proxy user"

    async def _judge(
        self, policy: Policy, req: Request, groups: Sequence[str] | None, approved: bool = False
    ) -> tuple[Decision, Pin | None, str | None]:
        """The policy's decision with the checked answers; the pin; why the name did not resolve.

        A name is looked up only once something would let the request through: an allow, an approval
        given (`approved`), or audit mode. So no DNS query ever carries a name the rules deny or that
        nobody has approved yet (the proxy's resolver is not a channel out for a held request)."""
        pin = self.pins.get(req.client.conn_id, req.host, req.port)
        if pin is not None:
            # Already resolved on this connection: decide with those checked answers (deciding with
            # addresses is never less restrictive than without).
            decision = policy.decide(req, pin.addresses, groups=groups)
        else:
            decision = policy.decide(req, groups=groups)
            # In audit mode a rule denial or an approval still goes through: it needs its checked address.
            needs_address = (
                approved
                or decision.action is Action.ALLOW
                or (self.audit and (decision.action is Action.APPROVAL or decision.reason in AUDITED))
            )
            if needs_address and self.lookup is not None:
                try:
                    addrs = await resolve(
                        req.host, req.port, is_ip(req.host), policy.static_resolve(req.host), self.lookup
                    )
                except ResolveError as e:
                    return decision, None, str(e)
                pin = Pin(req.host, req.port, addrs)
                decision = policy.decide(req, addrs, groups=groups)
        if (
            pin is not None
            and decision.reason is not Reason.PRIVATE_ADDRESS
            and any(self.is_own(a, req.port) for a in pin.addresses)
        ):
            decision = Decision(
                Action.DENY,
                Reason.PRIVATE_ADDRESS,
                client_name=decision.client_name,
                private_class="self",
                detail="the destination is this proxy itself",
            )
        return decision, pin, None

    def _outcome(self, req: Request, d: Decision, pin: Pin | None, latency_s: float) -> Outcome:
        return Outcome(
            req,
            d.action,
            d.reason,
            status=None if d.action is Action.ALLOW else deny_status(d.reason),
            rule=d.rule,
            matched=d.matched,
            client_name=d.client_name,
            pin=pin,
            ip=pin.ip if pin else (req.host if is_ip(req.host) else None),
            detail=d.detail,
            private_class=d.private_class,
            inspect=d.inspect,
            raw_tcp=d.raw_tcp,
            latency_s=latency_s,
        )

    async def _settle(self, pending: Outcome, client_alive: Callable[[], bool]) -> Outcome:
        """APPROVAL: ask the approvals service (grants, the pending approval, the hold)."""
        if self.approvals is None:
            return pending  # `portcullis check` asks nobody: the answer is "approval"
        if self.audit:
            # Audit never holds: record what would have happened (a hold) and let it pass.
            return replace(pending, action=Action.DENY, reason=Reason.APPROVAL_PENDING)
        s = await self.approvals.resolve(pending, client_alive)
        return replace(
            pending,
            action=Action.ALLOW if s.allowed else Action.DENY,
            reason=s.reason,
            status=None if s.allowed else 403,
            approval_id=s.approval_id,
            retry_after=None if s.allowed else s.retry_after,
            approval_wait_s=s.waited_s,
            detail=s.detail if s.detail is not None else pending.detail,
        )


def _peer(inc: Incoming) -> Client:
    return Client(inc.peer[0] if inc.peer else None, inc.peer[1] if inc.peer else None, None, inc.conn_id)


def _as_received(inc: Incoming, client: Client) -> Request:
    """The request as it arrived (host not normalised yet): what a refusal before step 3 reports."""
    return Request(inc.host, inc.port, client, inc.scheme, inc.method, inc.path, inc.layer, inc.flow_id)


def _authority_problem(inc: Incoming, req: Request) -> tuple[Reason, str] | None:
    """Does the request name exactly one destination, in a shape nothing reads differently?"""
    if inc.layer is Layer.CONNECT:
        if inc.problem:
            return Reason.BAD_REQUEST, inc.problem
        if inc.target_authority is not None:
            why = connect_authority_problem(inc.target_authority, req.host, req.port)
            return (Reason.BAD_REQUEST, why) if why else None
        return None
    if inc.host_headers > 1:
        return Reason.BAD_REQUEST, "more than one Host header"
    if inc.host_headers == 0 and inc.http_version == "HTTP/1.1":
        return Reason.BAD_REQUEST, "an HTTP/1.1 request without a Host header (RFC 9112 3.2)"
    if any(v is not None and names_port_zero(v) for v in (inc.target_authority, inc.host_header)):
        return Reason.BAD_REQUEST, "port 0 is not a destination"  # before it reads as a mismatch
    t = inc.tunnel
    if t is not None and (req.host != t.request.host or req.port != t.request.port):
        where = f"{t.request.host}:{t.request.port}"
        return Reason.HOST_MISMATCH, f"request names {req.host}:{req.port} inside a tunnel to {where}"
    # On the proxy port mitmproxy has turned an origin-form request into one for its Host header, so
    # target and Host agree by construction there; the checks below catch every other disagreement.
    scheme = inc.scheme or "http"
    if inc.target_authority and not same_destination(inc.target_authority, req.host, req.port, scheme):
        return Reason.HOST_MISMATCH, "the request target names another host"
    if inc.host_header is not None and not same_destination(inc.host_header, req.host, req.port, scheme):
        return Reason.HOST_MISMATCH, "the Host header differs from the request target"
    if inc.problem is not None:
        return Reason.BAD_REQUEST, inc.problem
    return None
