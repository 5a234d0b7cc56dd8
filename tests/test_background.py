"""addons/background.py: a spawned task is kept alive until it finishes, and what it raises is logged
instead of vanishing with it (ruff bans bare asyncio.create_task in addons/)."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from addons import background
from addons.background import spawn


async def test_a_task_is_kept_until_it_finishes() -> None:
    release = asyncio.Event()

    async def work() -> str:
        await release.wait()
        return "done"

    task = spawn(work(), "worker")
    assert task.get_name() == "worker" and task in background._running
    del task
    gc.collect()  # asyncio itself keeps only a weak reference
    (kept,) = [t for t in background._running if t.get_name() == "worker"]
    release.set()
    assert await kept == "done"
    await asyncio.sleep(0)  # the done callback runs on the next loop turn
    assert kept not in background._running


async def test_what_a_task_raises_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="addons.background"):
        task = spawn(broken(), "broken-task")
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)
    (rec,) = [r for r in caplog.records if r.name == "addons.background"]
    assert rec.getMessage() == "background task broken-task failed"
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], RuntimeError)
    assert task not in background._running


async def test_a_cancelled_task_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="addons.background"):
        task = spawn(asyncio.sleep(30), "sleeper")
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
    assert [r for r in caplog.records if r.name == "addons.background"] == []
    assert task not in background._running


def test_spawn_needs_a_running_loop() -> None:
    async def never() -> None:
        raise AssertionError("not run")

    coro = never()
    with pytest.raises(RuntimeError):
        spawn(coro, "x")
    coro.close()
