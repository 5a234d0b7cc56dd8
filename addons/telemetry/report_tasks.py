"""`portcullis report EVENTS --by task`: per agent task, what it did, what was refused or held, and
for a task of a profile an allow rule for that profile to paste (never for everyone)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from addons.telemetry.fields import escape_controls

SCHEMA = "portcullis.event/v1"
NO_TASK = "(no task credential)"


@dataclass
class TaskGroup:
    task_id: str
    profiles: Counter[str] = field(default_factory=Counter)
    labels: dict[str, str] = field(default_factory=dict)
    allowed: int = 0
    denied: int = 0
    held: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    refused_hosts: Counter[str] = field(default_factory=Counter)
    first: str | None = None
    last: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_id": None if self.task_id == NO_TASK else self.task_id,
            "profiles": dict(self.profiles),
            "labels": self.labels,
            "allowed": self.allowed,
            "denied": self.denied,
            "held": self.held,
            "reasons": dict(self.reasons),
            "refused_hosts": dict(self.refused_hosts.most_common(50)),
            "first_seen": self.first,
            "last_seen": self.last,
            "rule_yaml": self.rule_yaml(),
        }

    def rule_yaml(self) -> str | None:
        """An allow rule for this task's profile covering what policy rules refused (not for no task)."""
        profile = self.profiles.most_common(1)[0][0] if self.profiles else None
        hosts = sorted(self.refused_hosts)
        if profile is None or not hosts:
            return None
        quoted = ", ".join(json.dumps(h) for h in hosts[:20])
        return (
            f"- name: {profile}-from-{self.task_id}\n  action: allow\n  hosts: [{quoted}]\n"
            f"  profiles: [{profile}]\n"
        )


def build_by_task(
    lines: Iterable[str], since: datetime | None, parse_ts: Callable[[Any], datetime | None]
) -> dict[str, TaskGroup]:
    """Group egress decisions and holds by the task credential that made them."""
    groups: dict[str, TaskGroup] = {}
    for line in lines:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            continue
        ts = doc.get("timestamp")
        if since is not None and (parse_ts(ts) or since) < since:
            continue
        event = doc.get("event")
        if event not in ("egress.decision", "approval.requested"):
            continue
        client: dict[str, Any] = doc["client"] if isinstance(doc.get("client"), dict) else {}
        task = str(client.get("task_id") or NO_TASK)
        g = groups.setdefault(task, TaskGroup(task))
        if client.get("profile"):
            g.profiles[str(client["profile"])] += 1
        if isinstance(client.get("labels"), dict):
            g.labels.update({str(k): str(v) for k, v in client["labels"].items()})
        g.first = g.first or (str(ts) if ts else None)
        g.last = str(ts) if ts else g.last
        if event == "approval.requested":
            g.held += 1
            continue
        if doc.get("decision") == "allow":
            g.allowed += 1
            continue
        g.denied += 1
        reason = str(doc.get("reason") or "unknown")
        g.reasons[reason] += 1
        dest: dict[str, Any] = doc["destination"] if isinstance(doc.get("destination"), dict) else {}
        if reason in ("rule", "default") and dest.get("host"):
            g.refused_hosts[str(dest["host"]).lower()] += 1
    return groups


def write_by_task(groups: dict[str, TaskGroup], fmt: str, out: TextIO) -> None:
    ranked = sorted(groups.values(), key=lambda g: (-(g.denied + g.held), g.task_id))
    if fmt == "json":
        out.write(json.dumps({"tasks": [g.as_dict() for g in ranked]}, indent=2, ensure_ascii=True) + "\n")
        return
    if not ranked:
        out.write("No decisions in these events.\n")
        return
    out.write("| task | profile | allowed | denied | held | reasons | refused hosts |\n")
    out.write("|---|---|---|---|---|---|---|\n")
    for g in ranked:
        profile = ", ".join(g.profiles) or "-"
        reasons = ", ".join(f"{r} {n}" for r, n in g.reasons.most_common())
        hosts = ", ".join(h for h, _ in g.refused_hosts.most_common(5))
        cells = [g.task_id, profile, str(g.allowed), str(g.denied), str(g.held), reasons or "-", hosts or "-"]
        out.write("| " + " | ".join(escape_controls(c).replace("|", "\\|") for c in cells) + " |\n")
    for g in ranked:
        if (rule := g.rule_yaml()) is not None:
            out.write(
                f"\nRule to paste for task `{escape_controls(g.task_id)}` (its profile only):\n\n```yaml\n"
                f"{escape_controls(rule)}```\n"
            )
