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
        """Folders to watch: every rule folder, and the folder of every rule file (editors and atomic
        writers replace files by rename, which only the folder sees)."""
        paths: set[Path] = set()
        for entry in self.loaded.config.rules:
            p = self.loaded.resolve_path(entry)
            paths.add(p if p.is_dir() else p.parent)
        for f in self.policy.rule_files:
            paths.add(Path(f).parent)
        return sorted(p.resolve() for p in paths if p.exists())

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

        paths = self.watch_paths()
        if not paths:
            return
        try:
            async for changes in awatch(
                *paths, debounce=DEBOUNCE_MS, step=50, stop_event=self._stop, recursive=False
            ):
                if any(Path(p).suffix in (".yaml", ".yml") for _, p in changes):
                    await self.reload("watch")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("rule file watcher stopped; SIGHUP still reloads")

    def stop(self) -> None:
        self._stop.set()
