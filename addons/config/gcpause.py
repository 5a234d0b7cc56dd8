"""Cyclic garbage collection paused while a policy compiles, and a big policy frozen out of it."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = True

# A policy this big is frozen out of the cyclic collector once built (gc.freeze): its objects live
# until a reload drops them, and every full collection of the running proxy would walk them all.
FREEZE_RULES = 10_000


class Pause:
    freeze = False  # set by the caller: move everything alive into the permanent generation


@contextlib.contextmanager
def collector_paused() -> Iterator[Pause]:
    """No cyclic garbage collection while a policy compiles: the objects it makes all live (or go by
    reference count), and each full collection would walk them all again (half the time of a
    100,000-rule load). Process-wide, so counted: concurrent loads resume it when the last ends.
    With `freeze`, gc.unfreeze() then gc.freeze(): what the last big load froze and has died since
    becomes collectable again, and what lives now is not walked again."""
    global _gc_pausers, _gc_was_enabled
    pause = Pause()
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
        _gc_pausers += 1
        gc.disable()
    try:
        yield pause
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if pause.freeze:
                gc.unfreeze()
                gc.freeze()
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()
