"""A worker's stdout onto the supervisor's, whole lines only, never faster than stdout is read.

The supervisor's stdout is a bounded queue (telemetry/pipesink.py) that turns `stalled` when its
reader stops reading. The relay then stops reading the worker's pipe (`pause_reading`), so the pipe
fills, the worker's own queue fills and the worker refuses new requests (`event_sink_stalled`):
the stall reaches the process that takes decisions, and nothing piles up here. (asyncio's
StreamReader would go on reading the pipe into its buffer, up to twice its line limit, without
telling anyone: a worker then kept serving, with hundreds of decisions unwritten in the supervisor.)

A line is handed to `write` only while stdout is not stalled, so the relay never makes the
supervisor's queue drop one. When the supervisor stops, `finish_by(deadline)` bounds the wait: past
it, what is still here is written whatever the stall (the queue counts what it must drop).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("portcullis.supervisor")

MAX_LINE = 1 << 20  # a longer line without a newline is a broken worker: dropped, with a warning
PAUSE_S = 0.05  # how often a relay paused by a stalled stdout looks again


class LineRelay(asyncio.Protocol):
    """The protocol for `loop.connect_read_pipe` on one worker's stdout."""

    def __init__(self, name: str, write: Callable[[str], None], stalled: Callable[[], bool],
                 dropped: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self._write = write
        self._stalled = stalled
        self._dropped = dropped  # one event line lost (cut off or over-long): counted by the caller
        self._buf = bytearray()
        self._transport: asyncio.ReadTransport | None = None
        self._paused = False
        self._eof = False
        self._skipping = False  # inside an over-long line: drop up to its newline
        self._deadline: float | None = None
        self._retry: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ---- asyncio's side -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._drain()

    def eof_received(self) -> bool:
        self._eof = True
        self._drain()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._drain()

    # ---- the supervisor's side ----------------------------------------------------------------
    def finish_by(self, deadline: float) -> None:
        """Stopping: wait for a stalled stdout until `deadline` (monotonic), then write regardless."""
        self._deadline = deadline
        self._drain()

    # ---- lines --------------------------------------------------------------------------------
    def _held(self) -> bool:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return False
        return self._stalled()

    def _drain(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        while self._buf:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    log.warning("%s: a line longer than %d bytes was dropped", self.name, MAX_LINE)
                    self._dropped()
                    self._buf.clear()
                    self._skipping = True
                break
            if self._skipping:
                del self._buf[: end + 1]
                self._skipping = False
                continue
            if self._held():
                self._pause()
                self._retry = asyncio.get_running_loop().call_later(PAUSE_S, self._drain)
                return
            line = bytes(self._buf[: end + 1])
            del self._buf[: end + 1]
            self._write(line.decode("utf-8", "replace"))
        self._resume()
        if self._eof and not self.done.done():
            if self._buf and not self._skipping:
                log.warning("%s: its last line was cut off (%d bytes): dropped", self.name, len(self._buf))
                self._dropped()
            self._buf.clear()
            self.done.set_result(None)

    def _pause(self) -> None:
        if not self._paused and self._transport is not None and not self._eof:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._transport is not None and not self._eof:
            self._paused = False
            self._transport.resume_reading()
