"""Where rendered event lines go: a text stream (stdout) and an append-only file that follows rotation."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from typing import TextIO

# How often (seconds) the file sink compares its open file with the path on disk.
# Cheap enough per event, but once a second is all logrotate's move+create needs.
ROTATE_CHECK_S = 1.0


class StreamSink:
    """Writes lines to a text stream and flushes each one."""

    name = "stdout"

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def reopen(self) -> None:
        """Nothing to reopen: the stream belongs to the process."""

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()


class FileSink:
    """Appends JSON lines to `path` (O_APPEND, one write(2) per event, so nothing waits in a buffer).

    Reopens on `reopen()` (SIGHUP) and by itself when the path no longer names the open
    file (logrotate's move+create, or the file was deleted). A failed open is retried on
    the next write, so the sink recovers as soon as the disk or directory does. A line the
    disk had room for only in part (disk full) is taken back, so the file holds whole events
    only; when that cannot be done safely the next line starts on a fresh line instead.
    """

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._checked = 0.0
        self._torn = False  # the file may end in part of a line: start the next one on a new line

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st = os.fstat(fd)
        self._fd, self._ino, self._checked = fd, (st.st_dev, st.st_ino), time.monotonic()
        return fd

    def _rotated(self) -> bool:
        now = time.monotonic()
        if now - self._checked < ROTATE_CHECK_S:
            return False
        self._checked = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._ino

    def write(self, line: str) -> None:
        fd = self._fd
        if fd is not None and self._rotated():
            self._drop()
            fd = None
        if fd is None:
            fd = self._open()
        data = (("\n" if self._torn else "") + line + "\n").encode()
        try:
            done = os.write(fd, data)
            if done < len(data):
                self._short(fd, done, data)
            self._torn = False
        except (OSError, ValueError):
            # Start afresh on the next event: the handle may be unusable (disk full, EIO).
            self._drop()
            raise

    def _short(self, fd: int, done: int, data: bytes) -> None:
        """Only `done` bytes of a line fitted (disk full): take them back when they are still the end of
        the file (workers append to it too), else the next line starts afresh; raises like a failure."""
        self._torn = True
        with contextlib.suppress(OSError):
            end = os.fstat(fd).st_size
            reader = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                tail = os.pread(reader, done, end - done) if end >= done else b""
            finally:
                os.close(reader)
            if tail == data[:done]:
                os.ftruncate(fd, end - done)
                self._torn = False
        raise OSError(errno.ENOSPC, f"No space left on device: only {done} of {len(data)} bytes written")

    def reopen(self) -> None:
        self._drop()

    def _drop(self) -> None:
        fd, self._fd, self._ino = self._fd, None, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self._drop()
