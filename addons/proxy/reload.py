"""The policy in force, swapped whole on reload (file watching and SIGHUP); a failed reload keeps it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from addons.config.load import LoadedConfig, PolicyError, load_policy

if TYPE_CHECKING:
    from addons.policy.evaluate import Policy

log = logging.getLogger(__name__)

DEBOUNCE_MS = 250


class PolicyHolder:
    """Holds the current Policy. Readers take `holder.policy` once per decision (an atomic swap)."""

    def __init__(self, loaded: LoadedConfig, telemetry: Any) -> None:
        self.loaded = loaded
        self.policy: Policy = loaded.policy
        self.telemetry = telemetry
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        telemetry.metrics.rules_loaded.set(self.policy.rule_count)

    def watch_paths(self) -> list[Path]:
        """Folders to watch: every rule folder, the folder of every rule file (editors and atomic
        writers replace files by rename, which only the folder sees) and of every credential's secret
        file (rotating one reloads)."""
        paths: set[Path] = set()
        for entry in self.loaded.config.rules:
            p = self.loaded.resolve_path(entry)
            paths.add(p if p.is_dir() else p.parent)
        for f in self.policy.rule_files:
            paths.add(Path(f).parent)
        paths.update(Path(f).parent for f in self.secret_files())
        return sorted(p.resolve() for p in paths if p.exists())

    def secret_files(self) -> list[str]:
        return [c.secret_file for c in self.policy.credentials.creds if c.secret_file is not None]

    def relevant(self, changed: str) -> bool:
        """A change that needs a reload: a YAML file, a secret file, or a Kubernetes secret volume's
        `..data` swap beside a secret file (its files are symlinks into the swapped folder)."""
        p = Path(changed)
        if p.suffix in (".yaml", ".yml"):
            return True
        folder = p.parent.resolve()
        for f in self.secret_files():
            s = Path(f)
            if folder == s.parent.resolve() and (p.name == s.name or p.name.startswith("..")):
                return True
        return False

    async def reload(self, trigger: str) -> bool:
        """Validate the whole new policy, then swap it in; on any error keep the old one and report."""
        async with self._lock:
            try:
                new = await asyncio.to_thread(load_policy, self.loaded.config, self.loaded.base_dir)
            except PolicyError as e:
                return self._failed(list(e.errors), trigger)
            except Exception as e:  # fail safe: a loader bug must not drop the policy in force
                log.exception("reload failed")
                return self._failed([f"{self.loaded.path}:1:1: reload failed: {e}"], trigger)
            self.policy = new
            m = self.telemetry.metrics
            m.rule_reloads.labels("success").inc()
            m.rules_loaded.set(new.rule_count)
            self.telemetry.emit(
                "rules.reloaded",
                files=[str(f) for f in new.rule_files],
                rule_count=new.rule_count,
                credential_names=sorted(new.credentials.names),
                trigger=trigger,
            )
            return True

    def _failed(self, errors: list[str], trigger: str) -> bool:
        self.telemetry.metrics.rule_reloads.labels("failure").inc()
        self.telemetry.emit("rules.reload_failed", errors=errors, trigger=trigger)
        return False

    async def watch(self) -> None:
        """Reload whenever a YAML file in a watched folder changes (debounced)."""
        from watchfiles import awatch

        while not self._stop.is_set():
            paths = self.watch_paths()
            if not paths:
                return
            try:
                async for changes in awatch(
                    *paths, debounce=DEBOUNCE_MS, step=50, stop_event=self._stop, recursive=False
                ):
                    if any(self.relevant(p) for _, p in changes):
                        await self.reload("watch")
                        if self.watch_paths() != paths:
                            break  # a reload named a new folder (a secret file elsewhere): watch it too
                else:
                    return  # stopped
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rule file watcher stopped; SIGHUP still reloads")
                return

    def stop(self) -> None:
        self._stop.set()
