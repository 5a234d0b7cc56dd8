"""stdout when it is a pipe, a file or a terminal: a bounded queue drained by one writer thread.

A reader that stops reading (a log shipper that hangs, a `| less` left open) fills the pipe; a
blocking write on the event loop would then stall every connection of the proxy. With nothing queued
and room in the pipe, a line is written at once (so an event is normally out before the answer it
records); otherwise the loop only queues it, and the writer thread writes whole batches of whole
lines with `os.write` (lines never tear or interleave) and blocks alone while the pipe is full.

`stalled` turns True when `capacity` lines are waiting and False again once the writer has brought
the queue down to half of it; the proxy refuses new requests meanwhile (reason
`event_sink_stalled`), which is what keeps the queue bounded: only decisions already under way and
lifecycle events still arrive. Lines past twice `capacity` are dropped and counted. When the stall
ends, `on_resume(stats)` is called from the writer thread (Telemetry writes `event_sink.resumed`),
unless the stall was a burst shorter than a second that refused and dropped nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

BATCH_BYTES = 64 * 1024  # one os.write per batch of whole lines (a pipe holds 64 KiB on Linux)
QUIET_STALL_S = 1.0  # a shorter stall that refused and dropped nothing is not reported


class SinkFull(OSError):
    """The queue is at its hard limit (twice the capacity): the line is dropped."""


@dataclass(frozen=True, slots=True)
class StallStats:
    """What happened while the sink was stalled: requests refused, lines dropped, for how long."""

    since: float  # time.time() when the stall began
    stalled_s: float
    refused: int
    dropped: int


class PipeSink:
    """Lines to a file descriptor through a bounded queue and a writer thread."""

    name = "stdout"

    def __init__(
        self,
        fd: int,
        capacity: int,
        on_resume: Callable[[StallStats], None] | None = None,
        on_error: Callable[[int], None] | None = None,
    ) -> None:
        self.fd = fd
        self.capacity = max(1, capacity)
        self.on_resume = on_resume
        self.on_error = on_error  # n lines lost to a failed write (EPIPE, EBADF, EIO)
        self._q: deque[str] = deque()
        self._cond = threading.Condition()
        self._stalled = False
        self._since = 0.0
        self._since_wall = 0.0
        self._refused = 0
        self._dropped = 0
        self._closing = False
        self.failed = False  # the last write failed; cleared by the next one that succeeds
        self._busy = False   # the writer holds a batch it has not finished writing
        self._thread = threading.Thread(target=self._run, name="portcullis-stdout", daemon=True)
        self._thread.start()

    # ---- the event loop's side ----------------------------------------------------------------
    def write(self, line: str) -> None:
        with self._cond:
            n = len(self._q)
            if n == 0 and not self._busy and not self._closing and self._write_now(line + "\n"):
                return
            if n >= 2 * self.capacity:
                self._dropped += 1
                raise SinkFull(errno.EAGAIN, "stdout is not being read and its buffer is full")
            self._q.append(line + "\n")
            if not self._stalled and n + 1 >= self.capacity:
                self._stalled, self._since, self._since_wall = True, time.monotonic(), time.time()
                _note(f"portcullis: stdout is not being read ({self.capacity} events waiting); new requests "
                      "are refused (event_sink_stalled) until it is read again")
            self._cond.notify()

    def _write_now(self, text: str) -> bool:
        """The common case, nothing queued: the line is written at once from the caller's thread when
        the descriptor has room for it (a pipe takes up to PIPE_BUF bytes whole, without blocking), so
        an event is out before the answer it records. Anything else goes through the queue."""
        data = text.encode("utf-8", "backslashreplace")
        if len(data) > select.PIPE_BUF:
            return False
        try:
            if not select.select([], [self.fd], [], 0)[1]:
                return False
            n = os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # EPIPE, EBADF, EIO: lost and counted, as when the writer thread meets it
            self.failed = True
            if self.on_error is not None:
                with contextlib.suppress(Exception):
                    self.on_error(1)
            return True
        except ValueError:  # a descriptor select cannot watch: the writer thread takes it
            return False
        self.failed = False
        if n < len(data):  # a file or terminal took part of it: the writer thread writes the rest
            self._q.append(data[n:].decode("utf-8", "replace"))
            self._cond.notify()
        return True

    @property
    def stalled(self) -> bool:
        return self._stalled

    @property
    def buffered(self) -> int:
        return len(self._q)

    def refused(self) -> None:
        """One request refused because of the stall (its decision is summarised on resume)."""
        with self._cond:
            self._refused += 1

    def reopen(self) -> None:
        """Nothing to reopen: the descriptor belongs to the process."""

    def close(self, deadline: float | None = None) -> int:
        """Lets the writer finish what is queued until `deadline` (monotonic); returns the lines left."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(max(0.0, (deadline or time.monotonic() + 2.0) - time.monotonic()))
        with self._cond:
            left = len(self._q) + (1 if self._busy else 0)
            self._q.clear()
        return left

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits (bounded) until every queued line is written; True when it was."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._cond:
                if not self._q and not self._busy:
                    return True
            time.sleep(0.005)
        return False

    # ---- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._closing:
                    self._cond.wait()
                if not self._q:
                    return
                batch, size = [], 0
                while self._q and size < BATCH_BYTES:
                    line = self._q.popleft()
                    batch.append(line)
                    size += len(line)
                self._busy = True
            ok = self._write_all("".join(batch).encode("utf-8", "backslashreplace"))
            with self._cond:
                self._busy = False
            if not ok and self.on_error is not None:
                with contextlib.suppress(Exception):
                    self.on_error(len(batch))
            self._maybe_resume()

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:  # someone made the descriptor non-blocking: wait for room
                with contextlib.suppress(OSError, ValueError):
                    select.select([], [self.fd], [], 1.0)
                continue
            except OSError:
                self.failed = True
                return False
            view = view[n:]
        self.failed = False
        return True

    def _maybe_resume(self) -> None:
        with self._cond:
            if not self._stalled or len(self._q) > self.capacity // 2:
                return
            stats = StallStats(self._since_wall, time.monotonic() - self._since, self._refused, self._dropped)
            self._stalled, self._refused, self._dropped = False, 0, 0
        if not (stats.refused or stats.dropped or stats.stalled_s >= QUIET_STALL_S):
            return  # a burst the writer caught up with at once: nobody was refused, nothing lost
        _note(f"portcullis: stdout is read again after {stats.stalled_s:.1f} s ({stats.refused} requests "
              f"refused, {stats.dropped} events dropped meanwhile)")
        if self.on_resume is not None:
            with contextlib.suppress(Exception):
                self.on_resume(stats)


def _note(text: str) -> None:
    """One line on stderr from a thread of its own, written with os.write: stderr may be stalled
    too (a container runtime that stopped reading both), and nothing here may wait for it."""

    def put() -> None:
        with contextlib.suppress(OSError):
            os.write(2, (text + "\n").encode("ascii", "backslashreplace"))

    threading.Thread(target=put, name="portcullis-note", daemon=True).start()


def usable_fd(stream: object) -> int | None:
    """The descriptor behind a real stdout (pipe, file, terminal); None for in-memory streams."""
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
        os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) else None
