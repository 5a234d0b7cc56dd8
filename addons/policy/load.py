"""Load the config and every rule file (ruamel.yaml, YAML 1.2) into a Policy; errors are path:line:col."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from addons.policy.config import Config, RuleModel
from addons.policy.evaluate import ClientGroup, Policy, Rule, Settings, compile_paths
from addons.policy.fastyaml import parse_rule_file
from addons.policy.hosts import HostError, HostPattern, IPNetwork, normalize_host, parse_ip, parse_pattern
from addons.policy.model import Action, RuleRef

_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*$")


class PolicyError(Exception):
    """Every problem found in a config and its rule files, each `path:line:col: message`."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config, where it lives, and the policy its rule files compile to."""

    config: Config
    path: Path
    base_dir: Path
    policy: Policy

    def resolve_path(self, rel: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return self.base_dir / rel


@dataclass
class ErrorList:
    """Errors collected across files, sorted by (file order, line, column) at the end."""

    items: list[tuple[int, int, int, str]] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, line: int, col: int, message: str) -> None:
        order = self.files.setdefault(path, len(self.files))
        self.items.append((order, line, col, f"{path}:{line}:{col}: {message}"))

    def add_plain(self, path: str, message: str) -> None:
        order = self.files.setdefault(path, len(self.files))
        self.items.append((order, 0, 0, f"{path}: {message}"))

    def sorted(self) -> list[str]:
        return [t[3] for t in sorted(self.items, key=lambda t: t[:3])]


# ---------------------------------------------------------------------------------------------
# YAML and positions


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y


def read_yaml(path: Path, shown: str, errors: ErrorList, *, rule_file: bool = False) -> tuple[bool, Any]:
    """(ok, data). A missing/unreadable file or a YAML syntax error is recorded and ok is False.

    Rule files first go through the strict fast reader (same tree as ruamel.yaml, or it declines).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        errors.add_plain(shown, "cannot read: no such file")
        return False, None
    except (OSError, UnicodeDecodeError) as e:
        errors.add_plain(shown, f"cannot read: {getattr(e, 'strerror', None) or e}")
        return False, None
    if rule_file:
        tree = parse_rule_file(text)
        if tree is not None:
            return True, tree
    try:
        return True, _yaml().load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(str(x) for x in (e.context, e.problem) if x) or "YAML error"
        ctx = e.context_mark
        if ctx is not None and mark is not None and ctx.line != mark.line:
            problem += f" (the construct started at line {ctx.line + 1}, column {ctx.column + 1})"
        if mark is not None:
            errors.add(shown, mark.line + 1, mark.column + 1, problem.replace("\n", " "))
        else:
            errors.add(shown, 1, 1, problem.replace("\n", " "))
    except YAMLError as e:
        errors.add(shown, 1, 1, str(e).replace("\n", " "))
    return False, None


def _pos(node: Any, loc: Sequence[Any], value: bool = False) -> tuple[int, int]:
    """1-based (line, col) of the YAML node a pydantic `loc` points at (the key, or its value)."""
    line, col = (node.lc.line, node.lc.col) if hasattr(node, "lc") else (0, 0)
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            if value and part == loc[-1]:
                line, col = node.lc.value(part)
            else:
                line, col = node.lc.key(part)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line, col = node.lc.item(part)
            node = node[part]
        # anything else is a pydantic union/validator tag, not a YAML node: skip it
    return line + 1, col + 1


_PYDANTIC_TAGS = frozenset({"constrained-str", "str", "int", "bool", "float", "list", "dict"})


def _loc_text(loc: Sequence[Any]) -> str:
    """A pydantic loc as `a.b.0`, without the union/validator tags pydantic inserts."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _PYDANTIC_TAGS)))


def _message(err: Any) -> str:
    msg = str(err["msg"])
    value = err.get("input")
    if err["type"].endswith("_type") and isinstance(value, str | int | float | bool) and value is not None:
        msg += f" (got {value!r})"
    return msg


def validate_model(model: type[BaseModel], data: Any, shown: str, errors: ErrorList, *,
                   prefix: tuple[Any, ...] = (), label: str = "") -> Any:
    """Validate `data` (a ruamel node) against `model`; every error is recorded with its position.

    `prefix` is the loc of `data` inside its file (for messages); `label` starts each message.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            loc = tuple(err["loc"])
            where = _loc_text(loc if label else prefix + loc)
            lead = f"{label}: " if label else ""
            if err["type"] == "extra_forbidden":
                line, col = _pos(data, loc)
                parent = _loc_text(loc[:-1] if label else prefix + loc[:-1])
                errors.add(shown, line, col,
                           f"{lead}unknown key {loc[-1]!r}" + (f" in {parent}" if parent else ""))
            elif err["type"] == "missing":
                line, col = _pos(data, loc[:-1])
                errors.add(shown, line, col, f"{lead}{where}: required key is missing")
            else:
                line, col = _pos(data, loc, value=True)
                errors.add(shown, line, col, f"{lead}{where + ': ' if where else ''}{_message(err)}")
        return None


# ---------------------------------------------------------------------------------------------
# Config


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


def _settings(cfg: Config, data: Any, shown: str, errors: ErrorList) -> Settings:
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
            errors.add(shown, *_pos(data, where_l, value=True), f"{'.'.join(where_l)}: {e}")
    allow: list[IPNetwork] = []
    for i, text in enumerate(cfg.network.allow_cidrs):
        try:
            allow.append(_network(text))
        except HostError as e:
            errors.add(shown, *_pos(data, ("network", "allow_cidrs", i)), f"network.allow_cidrs: {e}")
    resolve: dict[str, tuple[str, ...]] = {}
    for name, answer in cfg.network.resolve.items():
        loc: tuple[str | int, ...] = ("network", "resolve", name)
        try:
            key = normalize_host(name)
            if parse_ip(key) is not None:
                raise HostError(f"{name!r} is an IP address, not a name")
        except HostError as e:
            errors.add(shown, *_pos(data, loc), f"network.resolve: {e}")
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
                errors.add(shown, *_pos(data, where, value=single), f"network.resolve.{name}: {e}")
        resolve[key] = tuple(ips)
    groups: list[ClientGroup] = []
    seen: set[str] = set()
    for i, c in enumerate(cfg.clients):
        if c.name in seen:
            errors.add(shown, *_pos(data, ("clients", i, "name"), value=True),
                       f"clients: duplicate client name {c.name!r}")
        seen.add(c.name)
        if not c.cidrs and c.proxy_auth is None:
            errors.add(shown, *_pos(data, ("clients", i)), f"clients: {c.name!r} needs cidrs or proxy_auth")
        nets: list[IPNetwork] = []
        for j, text in enumerate(c.cidrs):
            try:
                nets.append(_network(text))
            except HostError as e:
                errors.add(shown, *_pos(data, ("clients", i, "cidrs", j)), f"clients.{c.name}.cidrs: {e}")
        groups.append(ClientGroup(c.name, tuple(nets), c.proxy_auth.user if c.proxy_auth else None))
    return Settings(
        default_action=Action(cfg.default_action), block_private=cfg.network.block_private,
        allow_cidrs=tuple(allow), resolve=resolve, inspect=cfg.tls.inspect, clients=tuple(groups),
        self_addresses=tuple(self_addresses),
    )


# ---------------------------------------------------------------------------------------------
# Rule files


def _rule_paths(config: Config, base_dir: Path, data: Any, shown_cfg: str,
                errors: ErrorList) -> list[tuple[Path, str]]:
    """(path, shown path) of every rule file, in order. Folders: *.yaml/*.yml, sorted, not recursive."""
    out: list[tuple[Path, str]] = []
    for i, entry in enumerate(config.rules):
        path = base_dir / entry
        shown = str(Path(shown_cfg).parent / entry)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            out.extend((p, str(Path(shown) / p.name)) for p in files)
        elif path.is_file():
            out.append((path, shown))
        else:
            errors.add(shown_cfg, *_pos(data, ("rules", i), value=True),
                       f"rules: {entry!r}: no such file or folder")
    # scope=always grants are written to persist_to; load it even when no rules entry covers it.
    if config.approvals.persist_to:
        persist = base_dir / config.approvals.persist_to
        known = {p.resolve() for p, _ in out}
        if persist.is_file() and persist.resolve() not in known:
            out.append((persist, str(Path(shown_cfg).parent / config.approvals.persist_to)))
    return out


def _ref_file(path: Path, base_dir: Path) -> str:
    """The rule file as named in decisions and events: relative to the config folder if inside it."""
    try:
        return path.resolve().relative_to(base_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def _compile_rule(m: RuleModel, node: Any, order: int, line: int, ref_file: str, shown: str,
                  settings: Settings, errors: ErrorList) -> Rule | None:
    ok = True
    patterns: list[HostPattern] = []
    for j, raw in enumerate(m.hosts):
        try:
            patterns.append(parse_pattern(raw, deny=m.action == "deny"))
        except HostError as e:
            errors.add(shown, *_pos(node, ("hosts", j)), f"rule {m.name!r}: {e}")
            ok = False
    methods = None
    if m.methods is not None:
        methods = frozenset(x.upper() for x in m.methods)
        for j, x in enumerate(m.methods):
            if not _METHOD.match(x.upper()):
                errors.add(shown, *_pos(node, ("methods", j)), f"rule {m.name!r}: bad method {x!r}")
                ok = False
    if m.paths is not None:
        for j, p in enumerate(m.paths):
            if not p.startswith("/"):
                errors.add(shown, *_pos(node, ("paths", j)),
                           f"rule {m.name!r}: a path pattern starts with '/' (got {p!r})")
                ok = False
    known = {g.name for g in settings.clients}
    for j, c in enumerate(m.clients or ()):
        if c not in known:
            errors.add(shown, *_pos(node, ("clients", j)), f"rule {m.name!r}: unknown client group {c!r}"
                       + (f" (known: {', '.join(sorted(known))})" if known else " (config has no clients)"))
            ok = False
    conditional = m.methods is not None or m.paths is not None
    if conditional and settings.inspect == "never":
        errors.add(shown, *_pos(node, ("methods" if m.methods is not None else "paths",)),
                   f"rule {m.name!r}: methods/paths need TLS inspection, but tls.inspect is 'never'")
        ok = False
    if m.raw_tcp and (m.action == "deny" or conditional):
        errors.add(shown, *_pos(node, ("raw_tcp",)),
                   f"rule {m.name!r}: raw_tcp applies only to allow/approval rules without methods/paths")
        ok = False
    if not ok:
        return None
    return Rule(
        order=order, ref=RuleRef(m.name, Action(m.action), ref_file, line), patterns=tuple(patterns),
        ports=frozenset(m.ports) if m.ports is not None else None, methods=methods,
        paths=tuple(m.paths) if m.paths is not None else None,
        clients=frozenset(m.clients) if m.clients is not None else None, raw_tcp=m.raw_tcp,
        hosts_raw=tuple(m.hosts),
        _path_re=compile_paths(m.paths) if m.paths is not None else None,
    )


@dataclass
class _RuleLoad:
    rules: list[Rule] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # policy-test files found in a rule folder
    names: dict[str, str] = field(default_factory=dict)  # rule name -> "path:line" of its first definition


def _load_rules(paths: list[tuple[Path, str]], base_dir: Path, settings: Settings, errors: ErrorList,
                explicit: frozenset[Path] = frozenset()) -> _RuleLoad:
    out = _RuleLoad()
    for path, shown in paths:
        ok, data = read_yaml(path, shown, errors, rule_file=True)
        if not ok or data is None:
            out.files.append(path)  # still watched: fixing it triggers a reload
            continue
        if not isinstance(data, CommentedMap):
            out.files.append(path)
            errors.add(shown, 1, 1, "a rule file is a mapping with a 'rules:' list")
            continue
        if "cases" in data and "rules" not in data and path not in explicit:
            out.skipped.append(path)  # a `portcullis test` file living next to the rules
            continue
        out.files.append(path)
        unknown = [k for k in data if k != "rules"]
        for k in unknown:
            errors.add(shown, *_pos(data, (k,)), f"unknown key {k!r} (a rule file has only 'rules:')")
        seq = data.get("rules")
        if seq is None:
            continue  # `rules:` with nothing under it, or no key at all: no rules
        if not isinstance(seq, CommentedSeq):
            errors.add(shown, *_pos(data, ("rules",), value=True), "rules: must be a list of rules")
            continue
        ref_file = _ref_file(path, base_dir)
        for i, node in enumerate(seq):
            name = node.get("name") if isinstance(node, CommentedMap) else None
            label = f"rule {name!r}" if isinstance(name, str) and name else f"rules.{i}"
            if not isinstance(node, CommentedMap):
                errors.add(shown, *_pos(seq, (i,)), f"{label}: a rule is a mapping (name, action, hosts)")
                continue
            line = seq.lc.item(i)[0] + 1
            if isinstance(name, str) and name:
                first = out.names.get(name)
                if first is not None:
                    errors.add(shown, *_pos(node, ("name",), value=True),
                               f"duplicate rule name {name!r} (first defined at {first})")
                    continue
                out.names[name] = f"{shown}:{line}"
            m = validate_model(RuleModel, node, shown, errors, prefix=("rules", i), label=label)
            if m is None:
                continue
            rule = _compile_rule(m, node, len(out.rules), line, ref_file, shown, settings, errors)
            if rule is not None:
                out.rules.append(rule)
    return out


def load_policy(config: Config, base_dir: Path, *, config_shown: str | None = None) -> Policy:
    """Compile every rule file the config names into a Policy; raises PolicyError with ALL errors."""
    errors = ErrorList()
    shown_cfg = config_shown or str(base_dir / "portcullis.yaml")
    settings = _settings(config, None, shown_cfg, errors)
    policy, _ = _build(config, None, base_dir, shown_cfg, settings, errors)
    if errors.items:
        raise PolicyError(errors.sorted())
    return policy


def _build(config: Config, data: Any, base_dir: Path, shown_cfg: str, settings: Settings,
           errors: ErrorList) -> tuple[Policy, _RuleLoad]:
    paths = _rule_paths(config, base_dir, data, shown_cfg, errors)
    explicit = frozenset(base_dir / e for e in config.rules if (base_dir / e).is_file())
    loaded = _load_rules(paths, base_dir, settings, errors, explicit)
    return Policy(loaded.rules, settings, loaded.files), loaded


@dataclass(frozen=True)
class LoadReport:
    """What `validate` prints about a successful load."""

    loaded: LoadedConfig
    skipped: tuple[Path, ...]


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


def _best_effort_config(data: Any) -> Config | None:
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


def load_config_report(path: str | Path) -> LoadReport:
    """load_config plus what was skipped (for `portcullis validate`)."""
    cfg_path = Path(path)
    shown = str(path)
    errors = ErrorList()
    ok, data = read_yaml(cfg_path, shown, errors)
    if not ok:
        raise PolicyError(errors.sorted())
    if data is None:
        data = CommentedMap()
    if not isinstance(data, CommentedMap):
        raise PolicyError([f"{shown}:1:1: the config file is a YAML mapping (key: value lines)"])
    config = validate_model(Config, data, shown, errors)
    if config is None:
        # Keep going without the broken values, so one run reports every error (config and rules).
        config = _best_effort_config(data)
        if config is None:
            raise PolicyError(errors.sorted())
    base_dir = cfg_path.parent
    settings = _settings(config, data, shown, errors)
    policy, loaded = _build(config, data, base_dir, shown, settings, errors)
    if errors.items:
        raise PolicyError(errors.sorted())
    lc = LoadedConfig(config=config, path=cfg_path, base_dir=base_dir, policy=policy)
    return LoadReport(lc, tuple(loaded.skipped))


def load_config(path: str | Path) -> LoadedConfig:
    """Load the config and every rule file; raises PolicyError listing ALL errors, path:line:col."""
    return load_config_report(path).loaded

