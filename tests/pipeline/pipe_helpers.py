"""Fakes for driving the decision pipeline in process: a fixed policy source, a DNS lookup from a table,
an approvals service that answers from a script. No sockets, no files besides the rule file the
policy is compiled from (tests/policy/pol_helpers.make_policy)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.config.models import Config
from addons.pipeline.decide import Pipeline, Settlement
from addons.pipeline.dns import ResolveError
from addons.pipeline.identity import ProxyAuth
from addons.pipeline.model import Incoming, Outcome
from addons.policy.evaluate import Policy
from addons.policy.model import Layer, Reason
from tests.policy.pol_helpers import make_policy

# The policy most pipeline and adapter tests decide against (default_action: deny).
RULES: list[dict[str, Any]] = [
    {"name": "pub", "action": "allow", "hosts": ["public.test", "*.public.test"]},
    {"name": "blocked", "action": "deny", "hosts": ["blocked.test"]},
    {"name": "ask", "action": "approval", "hosts": ["ask.test"]},
    {"name": "insp-ok", "action": "allow", "hosts": ["insp.test"], "paths": ["/ok/*"]},
    {"name": "ssh", "action": "allow", "hosts": ["ssh.test"], "raw_tcp": True},
    {"name": "nx", "action": "allow", "hosts": ["nx.test"]},
    {"name": "self", "action": "allow", "hosts": ["self.test"]},
    {"name": "static", "action": "allow", "hosts": ["static.test"]},
    {"name": "lit", "action": "allow", "hosts": ["8.8.8.8"]},
]
CLIENTS: list[dict[str, Any]] = [
    {"name": "ci", "cidrs": ["10.1.0.0/16"]},
    {"name": "rev", "cidrs": ["10.2.0.0/16"], "proxy_auth": {"user": "rev", "password_env": "REV_PW"}},
]
# Public-looking answers only (the policy refuses private ones); nothing is ever dialled.
DNS: dict[str, list[str]] = {
    "public.test": ["8.8.8.8"],
    "www.public.test": ["8.8.4.4"],
    "private.public.test": ["8.8.8.8", "10.0.0.5"],
    "ask.test": ["1.1.1.1"],
    "insp.test": ["9.9.9.9"],
    "ssh.test": ["9.9.9.10"],
    "self.test": ["93.184.216.99"],
    "blocked.test": ["1.0.0.1"],
}
OWN = ("93.184.216.99", 8080)  # "the proxy's own listener" for the self-address refusal
PEER = ("10.9.0.1", 40000)


def policy(tmp: Path, **config: Any) -> Policy:
    cfg: dict[str, Any] = {"clients": CLIENTS, "network": {"resolve": {"static.test": "8.8.4.4"}}}
    cfg.update(config)
    return make_policy(tmp, RULES, **cfg)


@dataclass
class Source:
    """A PolicySource: the policy in force, swapped by assigning `.policy`."""

    policy: Policy


@dataclass
class Lookup:
    """DNS from a table; every query recorded. A name not in the table does not resolve."""

    table: dict[str, list[str]] = field(default_factory=lambda: dict(DNS))
    calls: list[str] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise ResolveError(f"cannot resolve {host}: NXDOMAIN")
        return self.table[host]


@dataclass
class Approvals:
    """The pipeline's Approvals protocol, answering with `answer` and recording what it was asked."""

    answer: Settlement = field(default_factory=lambda: Settlement(True, Reason.APPROVED, "apr-1", None, 1.5))
    asked: list[Outcome] = field(default_factory=list)
    alive_seen: list[bool] = field(default_factory=list)

    async def resolve(self, pending: Outcome, client_alive: Callable[[], bool]) -> Settlement:
        self.asked.append(pending)
        self.alive_seen.append(client_alive())
        return self.answer


def auth(password: str = "pw") -> ProxyAuth:
    """Proxy auth for CLIENTS: user `rev` with `password`; required from 10.2.0.0/16."""
    return ProxyAuth(Config.model_validate({"clients": CLIENTS}), environ={"REV_PW": password})


def pipeline(pol: Policy, **kw: Any) -> tuple[Pipeline, Lookup, Approvals]:
    """A Pipeline over `pol` with the table DNS and scripted approvals (both overridable)."""
    lookup = kw.pop("lookup", None) or Lookup()
    approvals = kw.pop("approvals", None) or Approvals()
    kw.setdefault("is_own", lambda ip, port: (ip, port) == OWN)
    return Pipeline(Source(pol), lookup=lookup, approvals=approvals, **kw), lookup, approvals


def http(host: str = "public.test", port: int = 80, **kw: Any) -> Incoming:
    """A plain HTTP request on the proxy port (absolute-form target, one matching Host header)."""
    base: dict[str, Any] = {
        "conn_id": "c1",
        "flow_id": "f1",
        "peer": PEER,
        "scheme": "http",
        "method": "GET",
        "path": "/",
        "host_header": host if port == 80 else f"{host}:{port}",
        "host_headers": 1,
        "target_authority": None,
    }
    base.update(kw)
    return Incoming(Layer.HTTP, host, port, **base)


def connect(host: str = "public.test", port: int = 443, **kw: Any) -> Incoming:
    base: dict[str, Any] = {"conn_id": "c1", "flow_id": "t1", "peer": PEER, "method": "CONNECT"}
    base.update(kw)
    return Incoming(Layer.CONNECT, host, port, **base)


def inner(tunnel: Outcome, host: str | None = None, port: int | None = None, **kw: Any) -> Incoming:
    """A request inside the inspected tunnel `tunnel` (origin-form, Host header naming `host`)."""
    h = host if host is not None else tunnel.request.host
    p = port if port is not None else tunnel.request.port
    base: dict[str, Any] = {
        "conn_id": tunnel.request.client.conn_id,
        "flow_id": "f2",
        "peer": PEER,
        "scheme": "https",
        "method": "GET",
        "path": "/ok/1",
        "host_header": h if p == 443 else f"{h}:{p}",
        "host_headers": 1,
        "tunnel": tunnel,
    }
    base.update(kw)
    return Incoming(Layer.INSPECTED, h, p, **base)
