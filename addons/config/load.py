"""Load the config and every rule file (ruamel.yaml, YAML 1.2) into a Policy; errors are path:line:col."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from addons.config import rulefiles
from addons.config.credentials import CredentialEntry, compile_credentials
from addons.config.fastyaml import read_rules
from addons.config.gcpause import FREEZE_RULES, collector_paused
from addons.config.models import Config, CredentialModel, RuleModel
from addons.config.settings import best_effort_config, build_settings, parse_hostport
from addons.config.yamlio import ErrorList, parse_yaml, pos, read_text, read_yaml, validate_model
from addons.policy.evaluate import Policy, Rule, Settings, compile_paths
from addons.policy.hosts import HostError, HostPattern, parse_pattern
from addons.policy.model import Action, RuleRef

__all__ = [
    "ErrorList", "LoadReport", "LoadedConfig", "PolicyError", "load_config", "load_config_report",
    "load_policy", "parse_hostport", "read_yaml", "validate_model",
]

_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*$")
_ACTIONS = {a.value: a for a in Action}


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


# ---------------------------------------------------------------------------------------------
# Config


# ---------------------------------------------------------------------------------------------
# Rule files


def _compile_rule(m: RuleModel, node: Any, order: int, line: int, ref_file: str, shown: str,
                  settings: Settings, errors: ErrorList) -> Rule | None:
    ok = True
    patterns: list[HostPattern] = []
    for j, raw in enumerate(m.hosts):
        try:
            patterns.append(parse_pattern(raw, deny=m.action == "deny"))
        except HostError as e:
            errors.add(shown, *pos(node, ("hosts", j)), f"rule {m.name!r}: {e}")
            ok = False
    methods = None
    if m.methods is not None:
        methods = frozenset(x.upper() for x in m.methods)
        for j, x in enumerate(m.methods):
            if not _METHOD.match(x.upper()):
                errors.add(shown, *pos(node, ("methods", j)), f"rule {m.name!r}: bad method {x!r}")
                ok = False
    if m.paths is not None:
        for j, p in enumerate(m.paths):
            if not p.startswith("/"):
                errors.add(shown, *pos(node, ("paths", j)),
                           f"rule {m.name!r}: a path pattern starts with '/' (got {p!r})")
                ok = False
    known = {g.name for g in settings.clients} if m.clients else set()
    for j, c in enumerate(m.clients or ()):
        if c not in known:
            errors.add(shown, *pos(node, ("clients", j)), f"rule {m.name!r}: unknown client group {c!r}"
                       + (f" (known: {', '.join(sorted(known))})" if known else " (config has no clients)"))
            ok = False
    for j, pr in enumerate(m.profiles or ()):
        if pr not in settings.profiles:
            names = ", ".join(sorted(settings.profiles))
            errors.add(shown, *pos(node, ("profiles", j)), f"rule {m.name!r}: unknown profile {pr!r}"
                       + (f" (known: {names})" if names else " (the config declares no profiles:)"))
            ok = False
    if m.profiles is not None and m.action == "deny":
        errors.add(shown, *pos(node, ("profiles",)),
                   f"rule {m.name!r}: a deny rule applies to every task; remove profiles: (or make it "
                   "an allow or approval rule of those profiles)")
        ok = False
    conditional = m.methods is not None or m.paths is not None
    if conditional and settings.inspect == "never":
        errors.add(shown, *pos(node, ("methods" if m.methods is not None else "paths",)),
                   f"rule {m.name!r}: methods/paths need TLS inspection, but tls.inspect is 'never'")
        ok = False
    if m.raw_tcp and (m.action == "deny" or conditional):
        errors.add(shown, *pos(node, ("raw_tcp",)),
                   f"rule {m.name!r}: raw_tcp applies only to allow/approval rules without methods/paths")
        ok = False
    if not ok:
        return None
    return Rule(
        order=order, ref=RuleRef(m.name, _ACTIONS[m.action], ref_file, line), patterns=tuple(patterns),
        ports=frozenset(m.ports) if m.ports is not None else None, methods=methods,
        paths=tuple(m.paths) if m.paths is not None else None,
        clients=frozenset(m.clients) if m.clients is not None else None,
        profiles=frozenset(m.profiles) if m.profiles is not None else None, raw_tcp=m.raw_tcp,
        hosts_raw=tuple(m.hosts),
        _path_re=compile_paths(m.paths) if m.paths is not None else None,
    )


def _check_hosts_only(node: CommentedMap, shown: str, label: str, errors: ErrorList) -> None:
    """A rule whose shape is wrong still has its host entries checked, so one run shows every error."""
    hosts = node.get("hosts")
    if not isinstance(hosts, list):
        return
    deny = node.get("action") == "deny"
    for j, raw in enumerate(hosts):
        if isinstance(raw, str) and raw:
            try:
                parse_pattern(raw, deny=deny)
            except HostError as e:
                errors.add(shown, *pos(node, ("hosts", j)), f"{label}: {e}")


@dataclass
class _RuleLoad:
    rules: list[Rule] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # policy-test files found in a rule folder
    names: dict[str, str] = field(default_factory=dict)  # rule name -> "path:line" of its first definition
    credentials: list[CredentialEntry] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    """One rule of a file: its name (if any), line, where the name is, and the rule if it compiled."""

    name: str | None
    line: int
    name_pos: tuple[int, int]
    rule: Rule | None


@dataclass(frozen=True)
class _FileResult:
    skipped: bool
    entries: tuple[_Entry, ...]
    errors: tuple[tuple[int, int, str], ...]
    credentials: tuple[CredentialEntry, ...] = ()


# The last clean compile of each rule file: a reload re-reads every file but only re-compiles
# changed ones (a persisted approval must not cost a re-parse of a 100k-rule file). One entry
# per path (its key holds the content digest and everything compilation depends on), so memory
# stays bounded by the files in use. Safe across threads: values are immutable, dict ops atomic.
_CACHE: dict[str, tuple[tuple[object, ...], _FileResult]] = {}
_CACHE_MAX = 1024


_RULE_LIST = TypeAdapter(list[RuleModel])
def _fast_file_result(path: Path, shown: str, text: str, base_dir: Path,
                      settings: Settings) -> _FileResult | None:
    """A plainly written rule file without one error, read without ruamel's tree and validated in one
    pydantic call: the same result as the full path, about ten times sooner (a 100,000-rule file).
    None as soon as anything is unusual or wrong: the full path then reads it (and says where)."""
    plain = read_rules(text)
    if plain is None:
        return None
    try:
        models = _RULE_LIST.validate_python([rule for rule, _, _ in plain])
    except ValidationError:
        return None
    ref_file = rulefiles.ref_file(path, base_dir)
    scratch = ErrorList()
    entries: list[_Entry] = []
    for i, (m, (raw, line, name_pos)) in enumerate(zip(models, plain, strict=True)):
        rule = _compile_rule(m, None, i, line, ref_file, shown, settings, scratch)
        if scratch.items or rule is None:
            return None
        name = raw.get("name")
        entries.append(_Entry(name if isinstance(name, str) and name else None, line, name_pos, rule))
    return _FileResult(False, tuple(entries), ())


def _file_result(path: Path, shown: str, text: str, base_dir: Path, settings: Settings,
                 explicit: bool) -> _FileResult:
    fast = _fast_file_result(path, shown, text, base_dir, settings)
    if fast is not None:
        return fast
    errors = ErrorList()
    ok, data = parse_yaml(text, shown, errors, rule_file=True)
    if ok and data is not None and not isinstance(data, CommentedMap):
        errors.add(shown, 1, 1, "a rule file is a mapping with a 'rules:' list")
    if not ok or not isinstance(data, CommentedMap):
        return _FileResult(False, (), tuple((t[1], t[2], t[3]) for t in errors.items))
    if "cases" in data and "rules" not in data and not explicit:
        return _FileResult(True, (), ())  # a `portcullis test` file living next to the rules
    for k in data:
        if k not in ("rules", "credentials"):
            errors.add(shown, *pos(data, (k,)),
                       f"unknown key {k!r} (a rule file has only 'rules:' and 'credentials:')")
    seq = data.get("rules")
    entries: list[_Entry] = []
    if seq is not None and not isinstance(seq, CommentedSeq):
        errors.add(shown, *pos(data, ("rules",), value=True), "rules: must be a list of rules")
        seq = None
    ref_file = rulefiles.ref_file(path, base_dir)
    for i, node in enumerate(seq or ()):
        name = node.get("name") if isinstance(node, CommentedMap) else None
        label = f"rule {name!r}" if isinstance(name, str) and name else f"rules.{i}"
        if not isinstance(node, CommentedMap):
            errors.add(shown, *pos(seq, (i,)), f"{label}: a rule is a mapping (name, action, hosts)")
            continue
        line = seq.lc.item(i)[0] + 1
        m = validate_model(RuleModel, node, shown, errors, prefix=("rules", i), label=label)
        if m is None:
            _check_hosts_only(node, shown, label, errors)
        rule = None if m is None else _compile_rule(m, node, i, line, ref_file, shown, settings, errors)
        good_name = name if isinstance(name, str) and name else None
        name_pos = pos(node, ("name",), value=True) if good_name else (line, 1)
        entries.append(_Entry(good_name, line, name_pos, rule))
    creds = _credential_entries(data, shown, ref_file, errors)
    return _FileResult(False, tuple(entries), tuple((t[1], t[2], t[3]) for t in errors.items), creds)


def _credential_entries(data: CommentedMap, shown: str, ref_file: str,
                        errors: ErrorList) -> tuple[CredentialEntry, ...]:
    """The shape-checked `credentials:` items (compiled, secrets read, on every load: never cached)."""
    seq = data.get("credentials")
    if seq is None:
        return ()
    if not isinstance(seq, CommentedSeq):
        errors.add(shown, *pos(data, ("credentials",), value=True), "credentials: must be a list")
        return ()
    out = []
    for i, node in enumerate(seq):
        name = node.get("name") if isinstance(node, CommentedMap) else None
        label = f"credential {name!r}" if isinstance(name, str) and name else f"credentials.{i}"
        if not isinstance(node, CommentedMap):
            errors.add(shown, *pos(seq, (i,)),
                       f"{label}: a credential is a mapping (name, secret, hosts, apply)")
            continue
        m = validate_model(CredentialModel, node, shown, errors, prefix=("credentials", i), label=label)
        if m is not None:
            out.append(CredentialEntry(m, node, seq.lc.item(i)[0] + 1, ref_file, shown))
    return tuple(out)


def _load_rules(paths: list[tuple[Path, str]], base_dir: Path, settings: Settings, errors: ErrorList,
                explicit: frozenset[Path] = frozenset()) -> _RuleLoad:
    out = _RuleLoad()
    fingerprint = (frozenset(g.name for g in settings.clients), settings.profiles, settings.inspect,
                   str(base_dir.resolve()))
    for path, shown in paths:
        text = read_text(path, shown, errors)
        if text is None:
            out.files.append(path)  # still watched: fixing it triggers a reload
            continue
        where = str(path.resolve())
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        key = (shown, path in explicit, fingerprint, digest)
        cached = _CACHE.get(where)
        if cached is not None and cached[0] == key:
            result = cached[1]
        else:
            result = _file_result(path, shown, text, base_dir, settings, path in explicit)
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            if result.errors:
                _CACHE.pop(where, None)
            else:
                _CACHE[where] = (key, result)
        if result.skipped:
            out.skipped.append(path)
            continue
        out.files.append(path)
        for line, col, msg in result.errors:
            errors.add_raw(shown, line, col, msg)
        for e in result.entries:
            if e.name is not None:
                first = out.names.get(e.name)
                if first is not None:
                    errors.add(shown, *e.name_pos,
                               f"duplicate rule name {e.name!r} (first defined at {first})")
                    continue
                out.names[e.name] = f"{shown}:{e.line}"
            if e.rule is not None:
                out.rules.append(e.rule)
        out.credentials.extend(result.credentials)
    return out


def load_policy(config: Config, base_dir: Path, *, config_shown: str | None = None,
                secrets: bool = True) -> Policy:
    """Compile every rule file the config names into a Policy; raises PolicyError with ALL errors.

    Credential secrets are read now (a missing or empty one is an error); `secrets=False` (check, test,
    validate --no-secrets) checks the credential rules but reads no value."""
    errors = ErrorList()
    shown_cfg = config_shown or str(base_dir / "portcullis.yaml")
    settings = build_settings(config, None, shown_cfg, errors)
    policy, _ = _build(config, None, base_dir, shown_cfg, settings, errors, secrets)
    if errors.items:
        raise PolicyError(errors.sorted())
    return policy


def _build(config: Config, data: Any, base_dir: Path, shown_cfg: str, settings: Settings,
           errors: ErrorList, secrets: bool = True) -> tuple[Policy, _RuleLoad]:
    paths = rulefiles.rule_paths(config, base_dir, data, shown_cfg, errors)
    explicit = frozenset(base_dir / e for e in config.rules if (base_dir / e).is_file())
    with collector_paused() as pause:
        loaded = _load_rules(paths, base_dir, settings, errors, explicit)
        creds = compile_credentials(loaded.credentials, settings, base_dir, errors, read=secrets)
        policy = Policy(loaded.rules, settings, loaded.files, credentials=creds)
        pause.freeze = len(loaded.rules) >= FREEZE_RULES and not errors.items
    return policy, loaded


@dataclass(frozen=True)
class LoadReport:
    """What `validate` prints about a successful load."""

    loaded: LoadedConfig
    skipped: tuple[Path, ...]


def load_config_report(path: str | Path, *, secrets: bool = True) -> LoadReport:
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
        config = best_effort_config(data)
        if config is None:
            raise PolicyError(errors.sorted())
    base_dir = cfg_path.parent
    settings = build_settings(config, data, shown, errors)
    policy, loaded = _build(config, data, base_dir, shown, settings, errors, secrets)
    if errors.items:
        raise PolicyError(errors.sorted())
    lc = LoadedConfig(config=config, path=cfg_path, base_dir=base_dir, policy=policy)
    return LoadReport(lc, tuple(loaded.skipped))


def load_config(path: str | Path, *, secrets: bool = True) -> LoadedConfig:
    """Load the config and every rule file; raises PolicyError listing ALL errors, path:line:col."""
    return load_config_report(path, secrets=secrets).loaded

