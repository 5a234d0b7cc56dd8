"""addons/config/gcpause.py: the collector paused while a policy compiles, counted across loads."""

from __future__ import annotations

import gc

from addons.config import gcpause


def test_pauses_nest_and_overlap() -> None:
    assert gc.isenabled()
    with gcpause.collector_paused():
        with gcpause.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_pause_keeps_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with gcpause.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_freeze_unfreezes_first_then_freezes_what_lives() -> None:
    try:
        with gcpause.collector_paused() as pause:
            pause.freeze = True
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
