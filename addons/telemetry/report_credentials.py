"""`portcullis report`: which credentials were used, refused, or never used at all.

The credentials a proxy holds are named in its `proxy.started` and `rules.reloaded` events
(`credential_names`), and `--config` can add the ones a config defines; a credential that no allowed
`egress.decision` applied is listed as never used (a candidate for removal: a secret nobody needs is
one nobody should hold)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CredentialUse:
    declared: set[str] = field(default_factory=set)
    applied: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # leaks and first uses not approved

    def add(self, doc: dict[str, Any]) -> None:
        event = doc.get("event")
        if event in ("proxy.started", "rules.reloaded"):
            names = doc.get("credential_names")
            if isinstance(names, list):
                self.declared.update(str(n) for n in names)
        elif event == "egress.decision" and isinstance(doc.get("credential"), str):
            name = str(doc["credential"])
            if doc.get("decision") == "allow":
                self.applied[name] += 1
            else:
                self.refused[name] += 1

    @property
    def never_used(self) -> list[str]:
        return sorted(self.declared - set(self.applied))

    def as_dict(self) -> dict[str, Any]:
        return {"declared": sorted(self.declared), "applied": dict(sorted(self.applied.items())),
                "refused": dict(sorted(self.refused.items())), "never_used": self.never_used}

    def markdown(self, esc: Callable[[str], str]) -> str:
        """The markdown section (empty when no credential appears); `esc` escapes a table cell."""
        if not self.declared and not self.applied and not self.refused:
            return ""
        parts = ["\n## Credentials\n\n| credential | applied | refused |\n|---|---|---|\n"]
        for name in sorted(self.declared | set(self.applied) | set(self.refused)):
            parts.append(f"| {esc(name)} | {self.applied.get(name, 0)} | {self.refused.get(name, 0)} |\n")
        if self.never_used:
            parts.append("\nNever used (the proxy holds these secrets and applied them to no request): "
                         + ", ".join(esc(n) for n in self.never_used) + "\n")
        return "".join(parts)
