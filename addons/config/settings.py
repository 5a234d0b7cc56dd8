"""The config values decisions need (listen, allow_cidrs, resolve, clients), checked with positions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from addons.config.models import Config
from addons.config.yamlio import ErrorList, pos
from addons.policy.evaluate import ClientGroup, Settings
from addons.policy.hosts import HostError, IPNetwork, normalize_host, parse_ip, parse_pattern
from addons.policy.model import Action


def parse_hostport(text: str) -> tuple[str, int]:
    """`host:port` / `[v6]:port` -> (normalised host, port); raises ValueError with a message."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:8080)")
    if ":" in host and not host.startswith("["):
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    try:
        return normalize_host(host), int(port)
    except HostError as e:
        raise ValueError(f"{text!r}: {e}") from None


def _network(text: str) -> IPNetwork:
    pat = parse_pattern(text)
    if pat.network is None:
        raise HostError(f"{text!r} is not a CIDR or IP address")
    return pat.network


def build_settings(cfg: Config, data: Any, shown: str, errors: ErrorList) -> Settings:
    """Check and parse the config values the policy needs; record every problem with its position."""
    self_addresses: list[str] = []
    listens: tuple[tuple[tuple[str, ...], str], ...] = ((("listen",), cfg.listen),
                                                        (("admin", "listen"), cfg.admin.listen))
    for where_l, value in listens:
        try:
            host, _ = parse_hostport(value)
            if where_l == ("listen",) and parse_ip(host) is not None and host not in ("0.0.0.0", "::"):
                self_addresses.append(host)
        except ValueError as e:
            errors.add(shown, *pos(data, where_l, value=True), f"{'.'.join(where_l)}: {e}")
    allow: list[IPNetwork] = []
    for i, text in enumerate(cfg.network.allow_cidrs):
        try:
            allow.append(_network(text))
        except HostError as e:
            errors.add(shown, *pos(data, ("network", "allow_cidrs", i)), f"network.allow_cidrs: {e}")
    resolve: dict[str, tuple[str, ...]] = {}
    for name, answer in cfg.network.resolve.items():
        loc: tuple[str | int, ...] = ("network", "resolve", name)
        try:
            key = normalize_host(name)
            if parse_ip(key) is not None:
                raise HostError(f"{name!r} is an IP address, not a name")
        except HostError as e:
            errors.add(shown, *pos(data, loc), f"network.resolve: {e}")
            continue
        ips: list[str] = []
        for j, ip in enumerate([answer] if isinstance(answer, str) else answer):
            try:
                addr = parse_ip(ip)
                if addr is None:
                    raise HostError(f"{ip!r} is not an IP address")
                ips.append(str(addr))
            except HostError as e:
                single = isinstance(answer, str)
                where = loc if single else (*loc, j)
                errors.add(shown, *pos(data, where, value=single), f"network.resolve.{name}: {e}")
        resolve[key] = tuple(ips)
    groups: list[ClientGroup] = []
    seen: set[str] = set()
    for i, c in enumerate(cfg.clients):
        if c.name in seen:
            errors.add(shown, *pos(data, ("clients", i, "name"), value=True),
                       f"clients: duplicate client name {c.name!r}")
        seen.add(c.name)
        if not c.cidrs and c.proxy_auth is None:
            errors.add(shown, *pos(data, ("clients", i)), f"clients: {c.name!r} needs cidrs or proxy_auth")
        nets: list[IPNetwork] = []
        for j, text in enumerate(c.cidrs):
            try:
                nets.append(_network(text))
            except HostError as e:
                errors.add(shown, *pos(data, ("clients", i, "cidrs", j)), f"clients.{c.name}.cidrs: {e}")
        groups.append(ClientGroup(c.name, tuple(nets), c.proxy_auth.user if c.proxy_auth else None))
    profiles: set[str] = set()
    for i, pr in enumerate(cfg.profiles):
        if pr.name in profiles:
            errors.add(shown, *pos(data, ("profiles", i, "name"), value=True),
                       f"profiles: duplicate profile name {pr.name!r}")
        profiles.add(pr.name)
    return Settings(
        default_action=Action(cfg.default_action), block_private=cfg.network.block_private,
        allow_cidrs=tuple(allow), resolve=resolve, inspect=cfg.tls.inspect, clients=tuple(groups),
        self_addresses=tuple(self_addresses), profiles=frozenset(profiles),
    )



def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _prune(data: Any, loc: Sequence[Any]) -> bool:
    """Delete the deepest existing node on `loc` (its parent item for a missing key)."""
    trail: list[tuple[Any, Any]] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) \
                and 0 <= part < len(node):
            trail.append((node, part))
            node = node[part]
    if not trail:
        return False
    parent, key = trail[-1]
    del parent[key]
    return True


def best_effort_config(data: Any) -> Config | None:
    """The config with every invalid value removed (defaults instead), or None if that fails."""
    plain = _plain(data)
    for _ in range(20):  # bounded: each round removes at least one node
        try:
            return Config.model_validate(plain)
        except ValidationError as e:
            locs = sorted((tuple(err["loc"]) for err in e.errors()), key=str, reverse=True)
            removed = False
            for loc in locs:
                removed = _prune(plain, loc) or removed
            if not removed:
                return None
    return None
