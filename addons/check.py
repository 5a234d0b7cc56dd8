"""`portcullis check`: one URL through the proxy's own decision pipeline, with DNS, approvals and
credentials left out, so the CLI cannot drift from the proxy (the same `Pipeline.decide`, the same
CONNECT-then-inspected-request sequence the proxy's hooks drive)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from addons.pipeline.decide import Pipeline
from addons.pipeline.inject import candidates
from addons.pipeline.model import Incoming, Outcome
from addons.policy.authority import AuthorityError, split_authority
from addons.policy.evaluate import Policy
from addons.policy.hosts import HostError, normalize_host, parse_ip
from addons.policy.model import Action, Client, Layer, RuleRef

_DEFAULT_PORT = {"http": 80, "https": 443}


class UsageError(Exception):
    """A bad argument (URL, client, method): one line, exit 2."""


# ---------------------------------------------------------------------------------------------
# URL and client parsing


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str


def parse_url(url: str) -> Target:
    """A strict http(s) URL -> scheme, normalised host, port (default by scheme), path (no query)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORT:
        raise UsageError(f"bad URL {url!r}: use a full http:// or https:// URL, e.g. https://pypi.org/simple/")
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise UsageError(f"bad URL {url!r}: credentials in URLs are not accepted; leave out 'user@'")
    # The same authority parser the proxy uses, so `check` never disagrees with it on a spelling.
    try:
        host, port = split_authority(authority)
    except AuthorityError as e:
        raise UsageError(f"bad URL {url!r}: {e}") from None
    try:
        norm = normalize_host(host)
    except HostError as e:
        raise UsageError(f"bad URL {url!r}: {e}") from None
    path = tail.split("#", 1)[0].split("?", 1)[0] or "/"
    if not path.startswith("/"):
        path = "/" + path
    return Target(scheme, norm, port if port is not None else _DEFAULT_PORT[scheme], path)


def parse_client(policy: Policy, client: str | None) -> tuple[str | None, tuple[str, ...] | None]:
    """--client: an address (groups derived from it) or a group name -> (address, groups override)."""
    if client is None:
        return None, None
    try:
        addr = parse_ip(client)
    except HostError:
        addr = None
    if addr is not None:
        return str(addr), None
    names = [g.name for g in policy.settings.clients]
    if client in names:
        return None, (client,)
    raise UsageError(f"unknown client {client!r}: give an IP address or a client group"
                     + (f" ({', '.join(names)})" if names else " (the config defines none)"))


# ---------------------------------------------------------------------------------------------
# Deciding a URL like the proxy would


@dataclass(frozen=True)
class CheckResult:
    """What the proxy would do: the CONNECT outcome (https) and the inspected request's, if judged."""

    target: Target
    method: str
    client_address: str | None
    addresses: tuple[str, ...]
    from_resolve: bool
    tunnel: Outcome | None
    request: Outcome | None
    credentials: tuple[Bound, ...] = ()  # every credential bound to this URL, applied or why not

    @property
    def final(self) -> Outcome:
        if self.tunnel is not None and (self.request is None or not self.tunnel.inspect):
            return self.tunnel
        assert self.request is not None
        return self.request


@dataclass(frozen=True)
class _Fixed:
    policy: Policy


@dataclass(frozen=True)
class Bound:
    """A credential bound to the URL checked: who it is for, and whether this client would get it."""

    name: str
    header: str
    source: str
    profiles: tuple[str, ...] | None
    clients: tuple[str, ...] | None
    first_use: bool
    applied: bool
    why_not: str | None


def _bound(policy: Policy, inc: Incoming, outcome: Outcome) -> tuple[Bound, ...]:
    applied, why = candidates(policy, inc, outcome.request)
    out = []
    for name in ([applied.name] if applied is not None else []) + list(why):
        c = policy.credentials.get(name)
        if c is None:
            continue
        out.append(Bound(c.name, c.apply.header, c.source,
                         tuple(sorted(c.profiles)) if c.profiles is not None else None,
                         tuple(sorted(c.clients)) if c.clients is not None else None,
                         c.approval.value == "first_use", c is applied, why.get(name)))
    return tuple(out)


async def evaluate(
    policy: Policy, url: str, method: str = "GET", client: str | None = None, profile: str | None = None
) -> CheckResult:
    """Decide a URL without network: static `network.resolve` answers only, never DNS."""
    t = parse_url(url)
    address, groups = parse_client(policy, client)
    method = method.strip().upper()
    if not method.isalpha():
        raise UsageError(f"bad method {method!r}")
    if profile is not None and profile not in policy.settings.profiles:
        known = ", ".join(sorted(policy.settings.profiles)) or "the config declares none"
        raise UsageError(f"unknown profile {profile!r} ({known})")
    pipeline = Pipeline(_Fixed(policy))  # no credentials, no approvals, no DNS
    peer = (address, 0) if address else None
    # As the proxy would see it once identified: a task of that profile, or that proxy_auth group's user.
    user = next((g.user for g in policy.settings.clients if groups and g.name == groups[0]), None)
    who = Client(address, 0 if address else None, user, "check", task_id="check" if profile else None,
                 profile=profile)
    tunnel = request = None
    bound: tuple[Bound, ...] = ()
    if t.scheme == "https":
        connect = Incoming(Layer.CONNECT, t.host, t.port, flow_id="check", peer=peer, method="CONNECT")
        tunnel = await pipeline.decide(connect, groups=groups, client=who)
        if tunnel.inspect:
            inner = Incoming(Layer.INSPECTED, t.host, t.port, flow_id="check", peer=peer, scheme="https",
                             method=method, path=t.path, tunnel=tunnel, tls_verified=True)
            request = await pipeline.decide(inner, groups=groups, client=who)
            bound = _bound(policy, inner, request)
    else:
        plain = Incoming(Layer.HTTP, t.host, t.port, flow_id="check", peer=peer, scheme="http", method=method,
                         path=t.path)
        request = await pipeline.decide(plain, groups=groups, client=who)
        bound = _bound(policy, plain, request)
    resolved = policy.static_resolve(t.host)
    return CheckResult(t, method, address, resolved or (), resolved is not None, tunnel, request, bound)


# ---------------------------------------------------------------------------------------------
# Showing it


def _ref_json(r: RuleRef | None) -> dict[str, Any] | None:
    return None if r is None else {"name": r.name, "action": r.action.value, "file": r.file, "line": r.line}


def _outcome_json(o: Outcome | None) -> dict[str, Any] | None:
    if o is None:
        return None
    return {"decision": o.action.value, "reason": o.reason.value, "rule": _ref_json(o.rule),
            "matched": [_ref_json(m) for m in o.matched], "client_name": o.client_name,
            "private_class": o.private_class, "inspect": o.inspect, "raw_tcp": o.raw_tcp, "detail": o.detail,
            "credential": o.credential}


def result_json(v: CheckResult) -> dict[str, Any]:
    """The stable `check --json` object."""
    final = v.final
    out = {"url": {"scheme": v.target.scheme, "host": v.target.host, "port": v.target.port,
                   "path": v.target.path}, "method": v.method,
           "client": {"address": v.client_address, "name": final.client_name,
                      "profile": final.request.client.profile},
           "addresses": list(v.addresses), "dns_queried": False}
    out.update(_outcome_json(final) or {})
    out["tunnel"] = _outcome_json(v.tunnel)
    out["request"] = _outcome_json(v.request)
    out["credentials"] = [{"name": b.name, "header": b.header, "secret_from": b.source,
                           "profiles": list(b.profiles) if b.profiles is not None else None,
                           "clients": list(b.clients) if b.clients is not None else None,
                           "approval": "first_use" if b.first_use else None, "applied": b.applied,
                           "why_not": b.why_not} for b in v.credentials]
    return out


def _credential_lines(v: CheckResult) -> list[str]:
    lines = []
    for b in v.credentials:
        who = []
        if b.profiles is not None:
            who.append("profiles " + ", ".join(b.profiles))
        if b.clients is not None:
            who.append("client groups " + ", ".join(b.clients))
        whom = " and ".join(who) or "any authenticated client"
        first = "; its first use in a task waits for approval" if b.first_use else ""
        if b.applied:
            lines.append(f"  credential: {b.name} is applied ({b.header}, secret from {b.source}; "
                         f"for {whom}{first})")
        else:
            lines.append(f"  credential: {b.name} is bound here (for {whom}) but not applied: {b.why_not}")
    return lines


def ref_text(r: RuleRef) -> str:
    return f"{r.name} ({r.action.value}, {r.file}:{r.line})"


def _outcome_lines(o: Outcome, label: str) -> list[str]:
    lines = [f"{label}{o.action.value.upper()}  (reason: {o.reason.value})"]
    if o.rule is not None:
        lines.append(f"  decided by: {ref_text(o.rule)}")
    if o.matched:
        lines.append("  also matched: " + ", ".join(ref_text(m) for m in o.matched))
    if o.private_class:
        lines.append(f"  private class: {o.private_class}")
    if o.detail:
        lines.append(f"  {o.detail}")
    return lines


def result_text(v: CheckResult) -> str:
    t = v.target
    host = f"[{t.host}]" if ":" in t.host else t.host
    lines = [f"{v.method} {t.scheme}://{host}:{t.port}{t.path}"
             + (f"  client {v.client_address or ''}{' ' if v.client_address else ''}"
                f"[{v.final.client_name or 'no group'}]" if v.client_address or v.final.client_name else "")]
    if v.tunnel is not None and v.request is not None:
        lines += _outcome_lines(v.tunnel, "CONNECT (tunnel): ")
        lines += _outcome_lines(v.request, f"{v.method} {t.path} (inspected request): ")
        lines.append(f"=> {v.final.action.value.upper()}")
    else:
        lines += _outcome_lines(v.final, "=> ")
    lines += _credential_lines(v)
    if v.tunnel is not None and v.request is None and (v.method != "GET" or t.path != "/"):
        lines.append(f"  note: {host} is not inspected, so the tunnel decision covers every request in it "
                     "(method and path are not seen)")
    if v.from_resolve:
        lines.append(f"  addresses from network.resolve: {', '.join(v.addresses)}")
    elif parse_ip(t.host) is None:
        lines.append(f"  note: check does not query DNS; {t.host} was judged by name only "
                     "(add network.resolve to check its addresses)")
    return "\n".join(lines)


EXIT_CODE = {Action.ALLOW: 0, Action.DENY: 1, Action.APPROVAL: 3}
