"""The vocabulary shared by the policy core, the decision pipeline, approvals and telemetry."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Action(StrEnum):
    """What a rule (or the default) says about a destination."""

    ALLOW = "allow"
    DENY = "deny"
    APPROVAL = "approval"


class Reason(StrEnum):
    """Why a decision was taken. A closed set: it is a log field and a metric label.

    Denials the agent sees use the contract's reasons; the extra members cover the
    outcomes the contract leaves open and are documented in the README.
    """

    RULE = "rule"                        # a rule decided (allow or deny)
    DEFAULT = "default"                  # no rule matched: default_action
    PRIVATE_ADDRESS = "private_address"  # literal or resolved address in a blocked class
    SNI_MISMATCH = "sni_mismatch"        # SNI differs from the CONNECT authority, is missing, or not TLS
    HOST_MISMATCH = "host_mismatch"      # Host header or inner request target differs from the authority
    APPROVAL_DENIED = "approval_denied"  # a person (or a deny grant) said no
    APPROVAL_TIMEOUT = "approval_timeout"
    APPROVAL_PENDING = "approval_pending"  # hold: false, answered at once
    BAD_REQUEST = "bad_request"          # unparsable host, bad port, malformed request
    APPROVED = "approved"                # allowed by a human decision or a live grant
    INSPECT = "inspect"                  # CONNECT opened for inspection; each inner request is decided
    PROXY_AUTH = "proxy_auth"            # 407: credentials missing or wrong for a client that needs them
    CLIENT_CLOSED = "client_closed"      # the client hung up while its request was held
    INTERNAL_ERROR = "internal_error"    # fail closed on any internal error on the decision path
    UPSTREAM_ERROR = "upstream_error"    # allowed, but the upstream failed (502, decision stays allow)
    CREDENTIAL_LEAK = "credential_leak"  # a placeholder or secret the proxy holds, sent where it is not bound
    EVENT_SINK_STALLED = "event_sink_stalled"  # 503: stdout is not read, so no decision could be logged


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A rule as named in decisions and events: name, file and line (1-based)."""

    name: str
    action: Action
    file: str
    line: int


class Layer(StrEnum):
    """Where a request was seen: plain HTTP on the proxy port, a CONNECT, or inside an inspected tunnel."""

    HTTP = "http"
    CONNECT = "connect"
    INSPECTED = "inspected"


@dataclass(frozen=True, slots=True)
class Client:
    """Who asks: the peer of the client connection, and the user its credentials established."""

    address: str | None
    port: int | None = None
    user: str | None = None  # the proxy-auth user, once identified
    conn_id: str = ""  # the client connection (checked addresses are pinned per connection)
    task_id: str | None = None  # the agent task whose credential it presented
    profile: str | None = None  # that task's profile: the rules tagged with it apply too
    labels: tuple[tuple[str, str], ...] = ()  # that task's labels (who started it, which repo ...)
    task_until: float | None = None  # when that task's credential expires

    @property
    def key(self) -> str:
        """One agent, not its whole group: the task, else the authenticated user, else the address."""
        if self.task_id:
            return f"task:{self.task_id}"
        return f"user:{self.user}" if self.user else (self.address or "-")


@dataclass(frozen=True, slots=True)
class Request:
    """The one value that is decided, from the proxy's hook to the event (and `portcullis check`).

    `host` is normalised (see hosts.normalize_host), except in the outcome of a request refused
    because its host could not be read. A CONNECT (layer CONNECT) is decided on its authority
    alone: `method` is "CONNECT" and `path` None. `path` never carries a query string.
    """

    host: str
    port: int
    client: Client = Client(None)
    scheme: str | None = None
    method: str | None = None
    path: str | None = None
    layer: Layer = Layer.HTTP
    flow_id: str = ""

    @property
    def tunnel(self) -> bool:
        return self.layer is Layer.CONNECT


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer. `rule` decided; `matched` are every other rule that matched.

    `action` may be APPROVAL: the proxy then asks the approvals service, which turns it
    into allow or deny. `client_name` is the matched client group (first in config order).
    """

    action: Action
    reason: Reason
    rule: RuleRef | None = None
    matched: tuple[RuleRef, ...] = ()
    client_name: str | None = None
    private_class: str | None = None  # which private class refused it, when reason is private_address
    inspect: bool = False             # a CONNECT whose host has method/path rules (or tls.inspect: always)
    raw_tcp: bool = False             # the deciding allow rule permits non-TLS bytes in the tunnel
    detail: str | None = None         # one human sentence, for check/explain and denial messages
    extra: dict[str, str] = field(default_factory=dict)
