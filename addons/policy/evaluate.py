"""The compiled policy: an indexed rule set and `decide()`, pure (no I/O, no clock)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

from addons.policy.addresses import classify_ip
from addons.policy.credentials import CredentialSet
from addons.policy.hosts import (
    HostError,
    HostPattern,
    IPAddress,
    IPNetwork,
    is_ip,
    parse_ip,
)
from addons.policy.model import Action, Decision, Reason, Request, RuleRef

InspectMode = Literal["auto", "never", "always"]

# Names that reach cloud metadata services without DNS telling us so.
METADATA_NAMES = frozenset({
    "metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal",
})
_PRECEDENCE = (Action.DENY, Action.APPROVAL, Action.ALLOW)
_VERB = {Action.ALLOW: "allows", Action.DENY: "denies", Action.APPROVAL: "requires approval for"}


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule. `order` is its position in its file (informational: a Policy indexes
    rules by their position in its own rule list, which is file order)."""

    order: int
    ref: RuleRef
    patterns: tuple[HostPattern, ...]
    ports: frozenset[int] | None = None
    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None
    clients: frozenset[str] | None = None
    profiles: frozenset[str] | None = None  # the task profiles it applies to (None: every request)
    raw_tcp: bool = False
    hosts_raw: tuple[str, ...] = ()  # the entries as written, for `validate` to show normalised forms
    _path_re: re.Pattern[str] | None = field(default=None, compare=False)

    @property
    def conditional(self) -> bool:
        """True when the rule needs the method or path, i.e. TLS inspection, to be judged."""
        return self.methods is not None or self.paths is not None

    def matches_request(self, method: str, paths: tuple[str, str]) -> bool:
        """Method and path conditions. `paths` are the path as sent and fully %-decoded: a
        server may read `%2F` as '/', so deny/approval rules match if either form does and
        allow rules only if both do (the most restrictive reading wins)."""
        if self.methods is not None and method not in self.methods:
            return False
        if self._path_re is None:
            return True
        hits = [self._path_re.fullmatch(p) is not None for p in paths]
        return all(hits) if self.ref.action is Action.ALLOW else any(hits)


def compile_paths(paths: Sequence[str]) -> re.Pattern[str]:
    """Path globs -> one regex. Only `*` is special and matches any characters, '/' included."""
    return _compile_paths(tuple(paths))


@functools.lru_cache(maxsize=4096)  # rule sets repeat the same path lists
def _compile_paths(paths: tuple[str, ...]) -> re.Pattern[str]:
    parts = ("".join(".*" if c == "*" else re.escape(c) for c in p) for p in paths)
    return re.compile("|".join(f"(?:{p})" for p in parts), re.DOTALL)


@dataclass(frozen=True, slots=True)
class ClientGroup:
    name: str
    networks: tuple[IPNetwork, ...] = ()
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """The non-rule parts of the config that decisions need, already parsed."""

    default_action: Action = Action.APPROVAL
    block_private: bool = True
    allow_cidrs: tuple[IPNetwork, ...] = ()
    resolve: dict[str, tuple[str, ...]] = field(default_factory=dict)
    inspect: InspectMode = "auto"
    clients: tuple[ClientGroup, ...] = ()
    self_addresses: tuple[str, ...] = ()  # the proxy's own listening address(es), canonical
    profiles: frozenset[str] = frozenset()  # the task profiles the config declares


_UNRESERVED_ESCAPE = re.compile(r"%(?:[46][1-9a-fA-F]|[57][0-9aA]|3[0-9]|2[dDeE]|5[fF]|7[eE])")


def normalize_path(path: str) -> str:
    """The path a rule is matched on: no query or fragment, unreserved %-escapes decoded, dot
    segments removed. Without this, `/repos/../admin` would match `/repos/*` while the server
    serves `/admin`."""
    if path.startswith("/") and not any(c in path for c in "?#%") and "/." not in path:
        return path  # the common case: nothing to decode or resolve
    path = path.split("?", 1)[0].split("#", 1)[0] or "/"
    path = _UNRESERVED_ESCAPE.sub(lambda m: unquote(m.group(0)), path)
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


class _NetIndex:
    """CIDR/IP entries: per (version, prefix length) a dict of network ints -> rule orders."""

    def __init__(self) -> None:
        self._by_len: dict[int, dict[int, dict[int, list[int]]]] = {4: {}, 6: {}}

    def __bool__(self) -> bool:
        return bool(self._by_len[4] or self._by_len[6])

    def add(self, net: IPNetwork, order: int) -> None:
        table = self._by_len[net.version].setdefault(net.prefixlen, {})
        table.setdefault(int(net.network_address), []).append(order)

    def lookup(self, addr: IPAddress) -> Iterable[int]:
        bits = addr.max_prefixlen
        value = int(addr)
        for plen, table in self._by_len[addr.version].items():
            key = (value >> (bits - plen)) << (bits - plen) if plen else 0
            hit = table.get(key)
            if hit:
                yield from hit


class Policy:
    """An immutable, indexed rule set plus the settings `decide()` needs. Safe to share."""

    def __init__(self, rules: Sequence[Rule], settings: Settings, rule_files: Sequence[Path] = (),
                 credentials: CredentialSet | None = None) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.settings = settings
        self.rule_files: tuple[Path, ...] = tuple(rule_files)
        self.credentials = credentials if credentials is not None else CredentialSet()
        self.rule_count = len(self.rules)
        self._exact: dict[str, list[int]] = {}
        self._below: dict[str, list[int]] = {}
        self._nets = _NetIndex()
        self._deny_nets = _NetIndex()  # deny IP/CIDR entries: they also match names by resolved address
        self._blocked_memo: dict[str, str | None] = {}
        # Rules are indexed by their position here (file order); Rule.order is informational.
        for i, r in enumerate(self.rules):
            for p in r.patterns:
                if p.kind == "exact":
                    self._exact.setdefault(p.value, []).append(i)
                elif p.kind == "below":
                    self._below.setdefault(p.value, []).append(i)
                elif p.kind == "apex_below":
                    self._exact.setdefault(p.value, []).append(i)
                    self._below.setdefault(p.value, []).append(i)
                elif p.network is not None:
                    self._nets.add(p.network, i)
                    if r.ref.action is Action.DENY:
                        self._deny_nets.add(p.network, i)

    # ----------------------------------------------------------------------------------------
    # Helpers other parts call

    def client_groups(self, address: str | None, user: str | None) -> tuple[str, ...]:
        """Every group the client belongs to: proxy_auth user matches first, then CIDR matches."""
        by_user = [g.name for g in self.settings.clients if user is not None and g.user == user]
        addr: IPAddress | None = None
        if address:
            try:
                addr = parse_ip(address)
            except HostError:
                addr = None
        by_cidr = [g.name for g in self.settings.clients
                   if addr is not None and g.name not in by_user and any(addr in n for n in g.networks)]
        return tuple(by_user + by_cidr)

    def client_name(self, address: str | None, user: str | None) -> str | None:
        """The first client group (config order) the request belongs to; a user match wins."""
        groups = self.client_groups(address, user)
        return groups[0] if groups else None

    def blocked_class(self, ip: str) -> str | None:
        """The private class that refuses this address under block_private/allow_cidrs, else None."""
        if not self.settings.block_private:
            return None
        memo = self._blocked_memo
        if ip in memo:
            return memo[ip]
        if len(memo) > 65536:
            memo.clear()  # bounded: a flood of distinct addresses cannot grow it without limit
        memo[ip] = cls = self._blocked_class(ip)
        return cls

    def _blocked_class(self, ip: str) -> str | None:
        try:
            addr = parse_ip(ip)
        except HostError:
            return "invalid"
        if addr is None:
            return "invalid"
        if any(addr in n for n in self.settings.allow_cidrs if n.version == addr.version):
            return None
        cls = classify_ip(addr)
        if cls is None and str(addr) in self.settings.self_addresses:
            return "proxy_self"  # a public listening address: never let the proxy loop to itself
        return cls

    def static_resolve(self, host: str) -> tuple[str, ...] | None:
        """The `network.resolve` answer for a normalised host, or None."""
        return self.settings.resolve.get(host)

    # ----------------------------------------------------------------------------------------
    # Deciding

    def decide(self, req: Request, addresses: Sequence[str] = (), *,
               groups: Sequence[str] | None = None) -> Decision:
        """Decide one request (or one CONNECT: layer CONNECT, decided on its authority). Never raises.

        `req.host` is normalised (the pipeline builds every Request from a normalised host, once);
        `addresses` are the checked DNS answers (none: only `network.resolve` and the literal count).
        1. A bad port -> deny (bad_request); any internal error -> deny (internal_error).
        2. block_private: a private literal, resolved address or metadata name -> deny (private_address).
        3. Rules matching host, port, client and task profile (and method/path for requests):
           deny > approval > allow. A rule with `profiles` applies only to tasks of those profiles
           (a deny rule has none: it applies to everyone).
        4. A CONNECT whose host has method/path rules (or tls.inspect: always) and no unconditional
           deny is allowed for inspection (reason inspect); every inner request is decided again.
        5. Nothing matched -> default_action (reason default).
        `groups` overrides the client groups (used by `check --client GROUP`).
        """
        try:
            return self._decide(req, addresses, groups)
        except Exception as e:  # fail closed: a bug here must never let traffic through
            return Decision(Action.DENY, Reason.INTERNAL_ERROR,
                            detail=f"Internal policy error ({type(e).__name__}); denied to be safe.")

    def _decide(self, req: Request, answers: Sequence[str], groups: Sequence[str] | None) -> Decision:
        host, port = req.host, req.port
        if not 0 < port < 65536:
            return Decision(Action.DENY, Reason.BAD_REQUEST, detail=f"Bad destination port {port}.")
        if groups is None:
            groups = self.client_groups(req.client.address, req.client.user)
        client = groups[0] if groups else None
        literal = is_ip(host)
        addresses = answers or (() if literal else self.settings.resolve.get(host, ()))

        private = self._private(host, literal, addresses)
        if private is not None:
            cls, where = private
            return Decision(Action.DENY, Reason.PRIVATE_ADDRESS, client_name=client, private_class=cls,
                            detail=f"{where} is a private destination ({cls}); "
                                   "add it to network.allow_cidrs if it must be reachable.")

        group_set = frozenset(groups)
        cands = [r for r in self._candidates(host, literal, addresses)
                 if (r.ports is None or port in r.ports)
                 and (r.clients is None or not r.clients.isdisjoint(group_set))
                 and (r.profiles is None or req.client.profile in r.profiles)]
        target = f"{host}:{port}"
        if req.tunnel or req.method is None:
            d = self._decide_tunnel(cands, target, client)
            if d.action is not Action.DENY and not d.inspect and self.credentials.inspects(host, port):
                # A credential is bound here: its requests must be seen to be injected (or refused).
                note = f"A credential is bound to {target}: the tunnel is inspected."
                detail = f"{d.detail} {note}" if d.detail else note
                return replace(d, inspect=True, raw_tcp=False, detail=detail)
            return d
        method = req.method.upper()
        path = normalize_path(req.path or "/")
        decoded = normalize_path(unquote(path)) if "%" in path else path
        matched = [r for r in cands if not r.conditional or r.matches_request(method, (path, decoded))]
        return self._precedence(matched, target, client)

    def _private(self, host: str, literal: bool, addresses: Sequence[str]) -> tuple[str, str] | None:
        if not self.settings.block_private:
            return None
        if not literal:
            if host == "localhost" or host.endswith(".localhost"):
                return "loopback", host
            if host in METADATA_NAMES:
                return "metadata", host
        for a in ((host,) if literal else ()) + tuple(addresses):
            cls = self.blocked_class(a)
            if cls is not None:
                return cls, (a if a == host else f"{host} (resolves to {a})")
        return None

    def _candidates(self, host: str, literal: bool, addresses: Sequence[str]) -> list[Rule]:
        orders: set[int] = set()
        if literal:
            addr = parse_ip(host)
            if addr is not None:
                orders.update(self._nets.lookup(addr))
        else:
            orders.update(self._exact.get(host, ()))
            rest = host
            while "." in rest:
                rest = rest.split(".", 1)[1]
                orders.update(self._below.get(rest, ()))
            # A deny IP/CIDR entry also matches a name whose resolved addresses fall inside it.
            for a in addresses if self._deny_nets else ():
                try:
                    addr = parse_ip(a)
                except HostError:
                    continue
                if addr is not None:
                    orders.update(self._deny_nets.lookup(addr))
        return [self.rules[o] for o in sorted(orders)]

    def _decide_tunnel(self, cands: list[Rule], target: str, client: str | None) -> Decision:
        plain = [r for r in cands if not r.conditional]
        conditional = [r for r in cands if r.conditional]
        decision = self._precedence(plain, target, client)
        if decision.action is Action.DENY and decision.reason is Reason.RULE:
            return decision
        always = self.settings.inspect == "always"
        could_pass = any(r.ref.action is not Action.DENY for r in conditional)
        if conditional and (decision.action is not Action.DENY or could_pass):
            refs = tuple(r.ref for r in cands)
            return Decision(Action.ALLOW, Reason.INSPECT, matched=refs, client_name=client, inspect=True,
                            detail=f"{target} has rules on methods or paths; the tunnel is inspected and "
                                   "each request is decided on its own.")
        if always and decision.action is Action.APPROVAL:
            # Ask about the requests (method, path) rather than the opaque tunnel.
            return Decision(Action.ALLOW, Reason.INSPECT, matched=decision.matched + (
                (decision.rule,) if decision.rule else ()), client_name=client, inspect=True,
                detail=f"{target} is inspected (tls.inspect: always); each request is decided on its own.")
        if always and decision.action is Action.ALLOW:
            return Decision(decision.action, decision.reason, decision.rule, decision.matched, client,
                            inspect=True, raw_tcp=decision.raw_tcp, detail=decision.detail)
        return decision

    def _precedence(self, matched: list[Rule], target: str, client: str | None) -> Decision:
        for action in _PRECEDENCE:
            winners = [r for r in matched if r.ref.action is action]
            if winners:
                rule = winners[0]
                others = tuple(r.ref for r in matched if r is not rule)
                return Decision(action, Reason.RULE, rule.ref, others, client,
                                raw_tcp=action is Action.ALLOW and rule.raw_tcp,
                                detail=f"Rule '{rule.ref.name}' ({rule.ref.file}:{rule.ref.line}) "
                                       f"{_VERB[action]} {target}.")
        default = self.settings.default_action
        return Decision(default, Reason.DEFAULT, client_name=client,
                        detail=f"No rule matches {target}; the default action is {default.value}.")
