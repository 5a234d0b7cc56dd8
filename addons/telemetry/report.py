"""`portcullis report EVENTS.jsonl`: what was denied or held, by registrable domain, with rules to paste."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from addons.policy.hosts import registered_domain
from addons.telemetry.documents import SCHEMA
from addons.telemetry.fields import escape_controls
from addons.telemetry.report_credentials import CredentialUse
from addons.telemetry.report_tasks import build_by_task, write_by_task

# Denials that say something is wrong, not that a rule is missing: never suggest allowlisting them.
SUSPICIOUS = frozenset({"private_address", "sni_mismatch", "host_mismatch"})
# Denials that are not about the destination at all (bad client input, auth, our own failures).
NOT_POLICY = frozenset({"bad_request", "proxy_auth", "internal_error", "client_closed", "upstream_error",
                        "event_sink_stalled"})
# With this many distinct names under one domain the suggestion becomes `**.domain`.
WILDCARD_AT = 3
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")
_IP = re.compile(r"^[0-9.]+$|^[0-9a-f:.]+$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


@dataclass
class Group:
    """Denied or held traffic to one registrable domain (or host, when it has none)."""

    domain: str
    denied: int = 0
    held: int = 0
    hosts: Counter[str] = field(default_factory=Counter)
    ports: Counter[int] = field(default_factory=Counter)
    clients: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    deny_rules: Counter[str] = field(default_factory=Counter)
    first: str = ""
    last: str = ""

    @property
    def total(self) -> int:
        return self.denied + self.held

    def add(self, doc: dict[str, Any], reason: str, held: bool) -> None:
        dest, client = _obj(doc.get("destination")), _obj(doc.get("client"))
        if held:
            self.held += 1
        else:
            self.denied += 1
        self.hosts[str(dest.get("host") or "")] += 1
        if isinstance(dest.get("port"), int):
            self.ports[dest["port"]] += 1
        who = client.get("name") or client.get("address")
        if who:
            self.clients[str(who)] += 1
        self.reasons[reason] += 1
        if reason == "rule" and doc.get("rule"):
            self.deny_rules[str(doc["rule"])] += 1
        ts = str(doc.get("timestamp") or "")
        self.first = min(self.first, ts) if self.first else ts
        self.last = max(self.last, ts)

    def rule_yaml(self) -> str:
        """A ready-to-paste rule. JSON strings are valid YAML scalars: no host can break out of its quotes."""
        hosts = sorted(self.hosts)
        lines: list[str] = []
        if self.deny_rules:
            names = ", ".join(sorted(self.deny_rules))
            lines.append(f"# NOTE: denied by deny rule(s) {names}; deny wins over allow: change that rule")
        if len(hosts) >= WILDCARD_AT:
            lines.append(f"# {len(hosts)} names seen under {self.domain}: " + ", ".join(hosts[:8])
                         + (" ..." if len(hosts) > 8 else ""))
            lines.append("# '**.' covers the domain and every name below it; list the names to be narrower")
            host_list = [f"**.{self.domain}"]
        else:
            lines.append("# exactly the names seen; use '**." + self.domain + "' to cover every subdomain")
            host_list = hosts
        lines.append(f"- name: {json.dumps('allow-' + re.sub(r'[^a-z0-9]+', '-', self.domain).strip('-'))}")
        lines.append("  action: allow")
        lines.append("  hosts: [" + ", ".join(json.dumps(h) for h in host_list) + "]")
        ports = sorted(self.ports)
        if ports and not set(ports) <= {80, 443}:
            lines.append("  ports: [" + ", ".join(str(p) for p in ports) + "]")
        return "\n".join(lines)

    def as_dict(self, with_rule: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "domain": self.domain, "denied": self.denied, "held": self.held,
            "hosts": dict(self.hosts.most_common()), "ports": sorted(self.ports),
            "clients": dict(self.clients.most_common()), "reasons": dict(self.reasons.most_common()),
            "first_seen": self.first, "last_seen": self.last,
        }
        if with_rule:
            d["rule_yaml"] = self.rule_yaml()
        return d


@dataclass
class Report:
    groups: dict[str, Group] = field(default_factory=dict)
    denied_by_rule: dict[str, Group] = field(default_factory=dict)
    suspicious: dict[str, Group] = field(default_factory=dict)
    events: int = 0
    skipped_not_json: int = 0
    skipped_other_schema: int = 0
    skipped_old: int = 0
    not_policy: Counter[str] = field(default_factory=Counter)
    credentials: CredentialUse = field(default_factory=CredentialUse)

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": {"events": self.events, "skipped_not_json": self.skipped_not_json,
                        "skipped_other_schema": self.skipped_other_schema,
                        "skipped_before_since": self.skipped_old,
                        "not_policy_denials": dict(self.not_policy)},
            "candidates": [g.as_dict(True) for g in _ranked(self.groups)],
            "denied_by_deny_rules": [g.as_dict(False) for g in _ranked(self.denied_by_rule)],
            "do_not_allowlist": [g.as_dict(False) for g in _ranked(self.suspicious)],
            "credentials": self.credentials.as_dict(),
        }


def build(lines: Iterable[str], since: datetime | None = None, credentials: Iterable[str] = ()) -> Report:
    """`credentials`: names a config defines (report --config), besides those the events announce."""
    rep = Report()
    rep.credentials.declared.update(credentials)
    for line in lines:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            rep.skipped_not_json += 1
            continue
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            rep.skipped_other_schema += 1
            continue
        rep.events += 1
        if since is not None and (_parse_ts(doc.get("timestamp")) or since) < since:
            rep.skipped_old += 1
            continue
        rep.credentials.add(doc)
        event = doc.get("event")
        if event == "approval.requested":
            reason, held = "approval_requested", True
        elif event == "egress.decision" and doc.get("decision") == "deny":
            reason, held = str(doc.get("reason") or "unknown"), False
        else:
            continue
        if reason in NOT_POLICY:
            rep.not_policy[reason] += 1
            continue
        dest = _obj(doc.get("destination"))
        host = str(dest.get("host") or "").lower()
        domain = str(dest.get("registered_domain") or _domain_of(host)).lower()
        bad_name = not all(_HOSTNAME.match(h) or _IP.match(h) for h in (host, domain))
        target = rep.suspicious if reason in SUSPICIOUS or bad_name else rep.groups
        key = domain[:253]
        target.setdefault(key, Group(key)).add(doc, reason if not bad_name else reason + " (odd host)", held)
    # Domains that only a deny rule refused were refused on purpose: an allow rule would not win anyway.
    for key, g in list(rep.groups.items()):
        if set(g.reasons) == {"rule"}:
            rep.denied_by_rule[key] = rep.groups.pop(key)
    return rep


def _domain_of(host: str) -> str:
    """The registrable domain of a host the event left without one (events written before every name
    had one: `api.build.corp` -> `build.corp`); the host itself for IP literals and odd names."""
    if not _HOSTNAME.match(host):
        return host
    return registered_domain(host) or host


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`1h`, `30m`, `45s`, `2d` before now, or an RFC 3339 timestamp."""
    now = now or datetime.now(UTC)
    m = _DURATION.match(text.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return now - timedelta(**{unit: float(m.group(1))})
    ts = _parse_ts(text.strip())
    if ts is None:
        raise ValueError(f"--since: expected a duration like 1h/30m or an RFC 3339 timestamp, got {text!r}")
    return ts


def report_command(args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since) if getattr(args, "since", None) else None
    except ValueError as e:
        print(f"portcullis report: {e}", file=sys.stderr)
        return 2
    path = Path(args.events)
    fmt = getattr(args, "format", "auto") or "auto"
    out = sys.stdout
    if fmt == "auto":
        fmt = "table" if out.isatty() else "markdown"
    try:
        declared = _config_credentials(args.config) if getattr(args, "config", None) else ()
    except Exception as e:  # noqa: BLE001 - a config that does not load: say so, no traceback
        print(f"portcullis report: --config {args.config}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            if getattr(args, "by", "domain") == "task":
                write_by_task(build_by_task(fh, since, _parse_ts), fmt, out)
                return 0
            rep = build(fh, since, declared)
    except OSError as e:
        print(f"portcullis report: {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    if fmt == "json":
        out.write(json.dumps(rep.as_dict(), indent=2, ensure_ascii=True) + "\n")
    elif fmt == "markdown":
        out.write(markdown(rep))
    else:
        _table(rep, out)
    return 0


def markdown(rep: Report) -> str:
    s = rep.as_dict()["summary"]
    parts = ["# Portcullis report: denied or held destinations\n",
             f"{s['events']} events read; {s['skipped_not_json']} lines not JSON, "
             f"{s['skipped_other_schema']} of another schema, {s['skipped_before_since']} before --since.\n"]
    parts.append("\n## Candidates for an allow rule\n")
    if not rep.groups:
        parts.append("\nNothing denied or held.\n")
    else:
        parts.append("\n| domain | denied | held | clients | reasons | ports | first seen | last seen |\n"
                     "|---|---|---|---|---|---|---|---|\n")
        for g in _ranked(rep.groups):
            parts.append("| " + " | ".join(_md(c) for c in _row(g)) + " |\n")
        for g in _ranked(rep.groups):
            parts.append(f"\n### {_md(g.domain)}\n\n```yaml\n{g.rule_yaml()}\n```\n")
    if rep.denied_by_rule:
        parts.append("\n## Denied by deny rules (on purpose; deny wins over allow)\n\n"
                     "| domain | denied | held | clients | reasons | ports | first seen | last seen |\n"
                     "|---|---|---|---|---|---|---|---|\n")
        for g in _ranked(rep.denied_by_rule):
            parts.append("| " + " | ".join(_md(c) for c in _row(g)) + " |\n")
    if rep.suspicious:
        parts.append("\n## Do not allowlist (suspicious)\n\nPrivate addresses, SNI or Host mismatches and "
                     "odd host names point at a misbehaving or compromised client, not a missing rule.\n\n"
                     "| destination | denied | held | clients | reasons | ports | first seen | last seen |\n"
                     "|---|---|---|---|---|---|---|---|\n")
        for g in _ranked(rep.suspicious):
            parts.append("| " + " | ".join(_md(c) for c in _row(g)) + " |\n")
    if rep.not_policy:
        parts.append("\nNot policy matters (client errors, auth, internal): "
                     + ", ".join(f"{k}: {v}" for k, v in rep.not_policy.most_common()) + "\n")
    parts.append(rep.credentials.markdown(_md))
    return "".join(parts)


def _config_credentials(config: str) -> list[str]:
    from addons.config.load import load_config

    return sorted(load_config(config, secrets=False).policy.credentials.names)


def _table(rep: Report, out: TextIO) -> None:
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table
    from rich.text import Text

    console = Console(file=out, highlight=False)
    console.print(Text(f"{rep.events} events read ({rep.skipped_not_json} not JSON, "
                       f"{rep.skipped_other_schema} other schema, {rep.skipped_old} before --since)"))
    for title, groups, rules in (("Candidates for an allow rule", rep.groups, True),
                                 ("Denied by deny rules (on purpose)", rep.denied_by_rule, False),
                                 ("Do not allowlist (suspicious)", rep.suspicious, False)):
        if not groups:
            continue
        table = Table(title=title)
        for col in ("domain", "denied", "held", "clients", "reasons", "ports", "first seen", "last seen"):
            table.add_column(col)
        for g in _ranked(groups):
            # Text, not markup strings: log data can never style or inject terminal escapes
            table.add_row(*(Text(escape_controls(c)) for c in _row(g)))
        console.print(table)
        if rules:
            for g in _ranked(groups):
                console.print(Text(escape_controls(g.domain), style="bold"))
                console.print(Syntax(g.rule_yaml(), "yaml"))
    if not rep.groups:
        console.print(Text("Nothing denied or held."))
    if rep.credentials.markdown(_md):
        table = Table(title="Credentials")
        for col in ("credential", "applied", "refused"):
            table.add_column(col)
        c = rep.credentials
        for name in sorted(c.declared | set(c.applied) | set(c.refused)):
            table.add_row(Text(escape_controls(name)), str(c.applied.get(name, 0)),
                          str(c.refused.get(name, 0)))
        console.print(table)
        if c.never_used:
            console.print(Text("Never used: " + escape_controls(", ".join(c.never_used))))


def _row(g: Group) -> list[str]:
    return [g.domain, str(g.denied), str(g.held),
            ", ".join(f"{c} ({n})" for c, n in g.clients.most_common(5)) + (" ..." * (len(g.clients) > 5)),
            ", ".join(f"{r} ({n})" for r, n in g.reasons.most_common()),
            ", ".join(str(p) for p in sorted(g.ports)), g.first, g.last]


def _md(cell: str) -> str:
    return escape_controls(cell).replace("|", "\\|").replace("`", "\\`").replace("<", "&lt;")


def _ranked(groups: dict[str, Group]) -> list[Group]:
    return sorted(groups.values(), key=lambda g: (-g.total, g.domain))


def _parse_ts(v: Any) -> datetime | None:
    try:
        ts = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}
