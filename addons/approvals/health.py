"""Is the shared approvals store (Redis) reachable from this process? One answer, told once per change.

The store's calls (stores/redis.py) and the bus's subscription (addons/redisbus.py) report here: any
"cannot reach it" makes it down, the next answer makes it up again. Each change is one event
(`store.unreachable`, `store.reconnected`), one log line and the `portcullis_store_up` gauge; when
it comes back, the listeners (the service: look again at every held approval) run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from addons.telemetry.events import Telemetry

log = logging.getLogger(__name__)


class StoreHealth:
    def __init__(self, telemetry: Telemetry, store: str, clock: Callable[[], float] = time.monotonic) -> None:
        """`store`: the store as a person reads it (a URL without its password)."""
        self.telemetry = telemetry
        self.store = store
        self.clock = clock
        self.up = True
        self._down_since = 0.0
        self._on_up: list[Callable[[], None]] = []
        telemetry.metrics.store_up.set(1)

    def on_up(self, listener: Callable[[], None]) -> None:
        self._on_up.append(listener)

    def failed(self, error: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self._down_since = self.clock()
        what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        log.warning("approvals store %s is unreachable (%s): requests that need an approval or a grant "
                    "are denied (internal_error) until it answers again", self.store, what)
        self.telemetry.metrics.store_up.set(0)
        self.telemetry.emit("store.unreachable", store=self.store, error=what)

    def ok(self) -> None:
        if self.up:
            return
        self.up = True
        down_s = max(0.0, self.clock() - self._down_since)
        log.warning("approvals store %s answers again after %.1f s", self.store, down_s)
        self.telemetry.metrics.store_up.set(1)
        self.telemetry.emit("store.reconnected", store=self.store, down_s=round(down_s, 3))
        for listener in list(self._on_up):
            try:
                listener()
            except Exception:  # noqa: BLE001 - one listener's bug must not stop the others
                log.exception("store health listener failed")
