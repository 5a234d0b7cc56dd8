"""The pipeline's input (`Incoming`: a request as the proxy read it) and output (`Outcome`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from addons.pipeline.dns import Pin
from addons.policy.credentials import Injection
from addons.policy.model import Action, Layer, Reason, Request, RuleRef

# The status of a denial the proxy answers itself: 400 for a malformed request, 407 for proxy
# credentials, 503 while the event stream cannot take the decision, 403 for every policy decision.
_DENY_STATUS = {Reason.BAD_REQUEST: 400, Reason.PROXY_AUTH: 407, Reason.EVENT_SINK_STALLED: 503}


def deny_status(reason: Reason) -> int:
    return _DENY_STATUS.get(reason, 403)


@dataclass(frozen=True, slots=True)
class Incoming:
    """A request (or CONNECT) as the proxy's adapter read it, before any judgment: raw spellings.

    `problem` is framing the adapter found malformed (addons/pipeline/requestform.py), answered with
    `problem_status` when that is not 400 (414/431: a head over the size limits); `tunnel` is the
    outcome of the CONNECT whose inspected tunnel carried this request.
    """

    layer: Layer
    host: str  # the target host as parsed from the request (not yet normalised)
    port: int
    conn_id: str = ""
    flow_id: str = ""
    peer: tuple[str, int] | None = None
    scheme: str | None = None
    method: str | None = None
    path: str | None = None  # without query string or fragment
    credentials: str | None = field(default=None, repr=False)  # Proxy-Authorization: never logged
    host_header: str | None = None
    host_headers: int = 0  # how many Host headers the request carried
    target_authority: str | None = None  # absolute-form target, HTTP/2 :authority, CONNECT (as received)
    problem: str | None = None
    problem_status: int | None = None
    http_version: str = ""  # "HTTP/1.1", "HTTP/1.0", "HTTP/2.0" ... ("" when not known)
    tunnel: Outcome | None = None
    # For credentials: the request target with its query, every header (Proxy-Authorization taken off),
    # and whether the upstream is TLS verified against the host's name (an inspected https request).
    target: str | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    tls_verified: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """The one result of a decision: what the proxy does, and every fact its event needs.

    `action` is ALLOW or DENY: the approvals step settles APPROVAL, which stays only where nobody
    is asked (`portcullis check`, which then answers "approval"). `status` is what
    the proxy answers itself (400/403/407, or 502 for an allowed destination with nowhere to
    connect); None when the traffic passes, or when the refusal has no HTTP answer (an HTTP/2
    connection error). In audit mode a rule denial passes with `enforced` False.
    """

    request: Request
    action: Action
    reason: Reason
    enforced: bool = True
    status: int | None = None
    rule: RuleRef | None = None
    matched: tuple[RuleRef, ...] = ()
    client_name: str | None = None
    pin: Pin | None = None
    ip: str | None = None  # the address connected to (or the literal), when known
    approval_id: str | None = None
    retry_after: int | None = None
    detail: str | None = None
    private_class: str | None = None  # which private class refused it (reason private_address)
    inspect: bool = False  # a CONNECT whose requests are intercepted and decided one by one
    raw_tcp: bool = False  # a CONNECT whose tunnel may carry bytes that are not TLS
    latency_s: float | None = None
    approval_wait_s: float | None = None
    credential: str | None = None  # the credential applied (allow) or refused (deny): a name, never a value
    injection: Injection | None = field(default=None, repr=False)  # what the adapter sets on the request

    @property
    def passes(self) -> bool:
        """The traffic goes on: allowed, or a denial audit mode only records."""
        return self.status is None and (self.action is Action.ALLOW or not self.enforced)

    def refused(self, reason: Reason, detail: str | None = None) -> Outcome:
        """This tunnel (or request), refused after all: a second decision about it."""
        return replace(
            self,
            action=Action.DENY,
            reason=reason,
            enforced=True,
            status=deny_status(reason),
            detail=detail,
            approval_id=None,
            retry_after=None,
            latency_s=None,
            approval_wait_s=None,
            inspect=False,
            raw_tcp=False,
            injection=None,
        )


def refusal(
    req: Request,
    reason: Reason,
    detail: str | None = None,
    client_name: str | None = None,
    latency_s: float | None = None,
) -> Outcome:
    """A denial the pipeline takes before (or without) asking the policy."""
    return Outcome(
        req,
        Action.DENY,
        reason,
        status=deny_status(reason),
        detail=detail,
        client_name=client_name,
        latency_s=latency_s,
    )
