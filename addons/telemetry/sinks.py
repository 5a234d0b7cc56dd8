"""Where rendered event lines go: a text stream (stdout) and an append-only file that follows rotation."""

from __future__ import annotations

import contextlib
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
    """Appends JSON lines to `path` (O_APPEND, flushed per event).

    Reopens on `reopen()` (SIGHUP) and by itself when the path no longer names the open
    file (logrotate's move+create, or the file was deleted). A failed open is retried on
    the next write, so the sink recovers as soon as the disk or directory does.
    """

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: TextIO | None = None
        self._ino: tuple[int, int] | None = None
        self._checked = 0.0

    def _open(self) -> TextIO:
        fh = open(self.path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115 - held open across writes
        st = os.fstat(fh.fileno())
        self._fh, self._ino, self._checked = fh, (st.st_dev, st.st_ino), time.monotonic()
        return fh

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
        fh = self._fh
        if fh is not None and self._rotated():
            self._drop()
            fh = None
        if fh is None:
            fh = self._open()
        try:
            fh.write(line + "\n")
            fh.flush()
        except (OSError, ValueError):
            # Start afresh on the next event: the handle may be unusable (disk full, EIO).
            self._drop()
            raise

    def reopen(self) -> None:
        self._drop()

    def _drop(self) -> None:
        fh, self._fh, self._ino = self._fh, None, None
        if fh is not None:
            with contextlib.suppress(OSError, ValueError):
                fh.close()

    def close(self) -> None:
        self._drop()
