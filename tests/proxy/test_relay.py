"""The supervisor's relay of a worker's stdout (addons/proxy/relay.py), on a real pipe."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import pytest

from addons.proxy import relay as relay_mod
from addons.proxy.relay import LineRelay


class Out:
    """The supervisor's stdout as the relay sees it: lines written, and a stall switch."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.stalled = False
        self.dropped = 0

    def drop(self) -> None:
        self.dropped += 1

    def write(self, line: str) -> None:
        assert not self.stalled or self.overdue, "a line was written while stdout was stalled"
        self.lines.append(line)

    overdue = False


@contextlib.asynccontextmanager
async def piped(out: Out) -> AsyncIterator[tuple[int, LineRelay]]:
    r, w = os.pipe()
    os.set_blocking(w, False)
    relay = LineRelay("worker 0", out.write, lambda: out.stalled, out.drop)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: relay, os.fdopen(r, "rb", buffering=0))
    try:
        yield w, relay
    finally:
        with contextlib.suppress(OSError):
            os.close(w)
        transport.close()


async def until(pred: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:  # type: ignore[operator]
        await asyncio.sleep(0.01)
    assert pred(), "condition not met in time"  # type: ignore[operator]


def fill(w: int, line: bytes, limit: int) -> int:
    """Writes `line` until the pipe is full (or `limit` lines); returns how many went in whole."""
    n = 0
    for _ in range(limit):
        try:
            if os.write(w, line) != len(line):
                raise AssertionError("a partial write: use lines that divide the pipe")
        except BlockingIOError:
            break
        n += 1
    return n


async def test_lines_arrive_whole_and_in_order_however_the_bytes_are_split() -> None:
    out = Out()
    async with piped(out) as (w, relay):
        for chunk in (b'{"a":', b'1}\n{"b"', b":2}\n", b'{"c":3}\n{"d":4}\n'):
            os.write(w, chunk)
            await asyncio.sleep(0.01)
        os.close(w)
        await asyncio.wait_for(relay.done, 5)
    assert out.lines == ['{"a":1}\n', '{"b":2}\n', '{"c":3}\n', '{"d":4}\n'] and out.dropped == 0


async def test_a_stalled_stdout_stops_the_relay_reading_so_the_workers_pipe_fills() -> None:
    out = Out()
    line = b"x" * 1023 + b"\n"
    async with piped(out) as (w, relay):
        os.write(w, line)
        await until(lambda: len(out.lines) == 1)
        out.stalled = True
        # The pipe fills: the relay holds at most what it read before it paused, not everything sent.
        sent = 0
        for _ in range(20):  # a relay that went on reading would take 64 KiB more each round
            sent += fill(w, line, 10_000)
            await asyncio.sleep(0.02)
        assert sent < 400, f"{sent} KiB went into a pipe whose reader should have paused"
        assert len(out.lines) == 1
        out.stalled = False  # read again: everything held arrives, nothing lost
        await until(lambda: len(out.lines) == 1 + sent)
        os.close(w)
        await asyncio.wait_for(relay.done, 5)
    assert all(x == line.decode() for x in out.lines)


async def test_stopping_waits_for_a_stalled_stdout_only_until_the_deadline() -> None:
    out = Out()
    async with piped(out) as (w, relay):
        out.stalled = True
        os.write(w, b"one\ntwo\n")
        os.close(w)
        await asyncio.sleep(0.2)
        assert out.lines == [] and not relay.done.done()  # held while stalled, even at EOF
        out.overdue = True
        relay.finish_by(time.monotonic() + 0.1)
        await asyncio.wait_for(relay.done, 5)
    assert out.lines == ["one\n", "two\n"]


async def test_a_stall_that_ends_before_the_deadline_loses_nothing_at_stop() -> None:
    out = Out()
    async with piped(out) as (w, relay):
        out.stalled = True
        os.write(w, b"one\ntwo\n")
        os.close(w)
        relay.finish_by(time.monotonic() + 30)
        await asyncio.sleep(0.1)
        assert out.lines == []
        out.stalled = False
        await asyncio.wait_for(relay.done, 5)
    assert out.lines == ["one\n", "two\n"]


async def test_a_cut_off_last_line_is_dropped_not_written_half(caplog: pytest.LogCaptureFixture) -> None:
    out = Out()
    async with piped(out) as (w, relay):
        os.write(w, b'{"whole":1}\n{"cut')
        os.close(w)
        await asyncio.wait_for(relay.done, 5)
    assert out.lines == ['{"whole":1}\n'] and out.dropped == 1
    assert "cut off" in caplog.text


async def test_an_over_long_line_is_dropped_and_the_next_lines_still_arrive(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(relay_mod, "MAX_LINE", 100)
    out = Out()
    async with piped(out) as (w, relay):
        os.write(w, b"a\n" + b"y" * 150)
        await asyncio.sleep(0.05)
        os.write(w, b"y" * 50 + b"\nb\n")
        os.close(w)
        await asyncio.wait_for(relay.done, 5)
    assert out.lines == ["a\n", "b\n"] and out.dropped == 1
    assert "longer than 100 bytes" in caplog.text
