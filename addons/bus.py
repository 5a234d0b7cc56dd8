"""Notifications between the processes of one Portcullis: a decision taken in one process releases the
requests held in every other at once (a message, not a poll).

- `NullBus`: one process; publishing reaches the local subscribers only.
- `LocalHub` + `LocalBus`: workers of one `portcullis run --workers N` on one machine. The supervisor
  runs the hub on a unix socket; every message one process publishes reaches every other, as one
  JSON line. The store stays the source of truth: a message only says "look again".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from addons.background import spawn

log = logging.getLogger(__name__)

Message = dict[str, Any]
Handler = Callable[[Message], None]
MAX_LINE = 64 * 1024


class Bus(Protocol):
    def subscribe(self, handler: Handler) -> None: ...
    def publish(self, message: Message) -> None: ...
    async def close(self) -> None: ...


class NullBus:
    """One process: messages reach this process's own subscribers."""

    def __init__(self) -> None:
        self._handlers: list[Handler] = []

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def publish(self, message: Message) -> None:
        deliver(self._handlers, message)

    async def close(self) -> None:
        self._handlers.clear()


def deliver(handlers: list[Handler], message: Message) -> None:
    for h in list(handlers):
        try:
            h(message)
        except Exception:  # noqa: BLE001 - one subscriber's bug must not stop the others
            log.exception("bus subscriber failed on %s", message.get("t"))


def _line(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LocalHub:
    """The supervisor's side: relays every line one connected process sends to all the others, and to
    the supervisor's own subscribers (which publish through `publish`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: list[Handler] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        self.path.chmod(0o600)

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def publish(self, message: Message) -> None:
        self._broadcast(_line(message), None)
        deliver(self._handlers, message)

    @property
    def connections(self) -> int:
        return len(self._writers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning("bus: dropped a line that is not JSON")
                    continue
                if isinstance(message, dict):
                    self._broadcast(line if line.endswith(b"\n") else line + b"\n", writer)
                    deliver(self._handlers, message)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _broadcast(self, line: bytes, sender: asyncio.StreamWriter | None) -> None:
        for w in list(self._writers):
            if w is not sender and not w.is_closing():
                w.write(line)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        self._writers.clear()
        with contextlib.suppress(OSError):
            self.path.unlink()


class LocalBus:
    """A worker's side. `on_lost` runs when the hub goes away (the supervisor is gone: stop)."""

    def __init__(self, path: Path, on_lost: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_lost = on_lost
        self._handlers: list[Handler] = []
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
        self._reader_task = spawn(self._read(reader), "bus-reader")

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def publish(self, message: Message) -> None:
        """To every other process (through the hub) and to this one's subscribers."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_line(message))
        deliver(self._handlers, message)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                with contextlib.suppress(ValueError):
                    message = json.loads(line)
                    if isinstance(message, dict):
                        deliver(self._handlers, message)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        if self.on_lost is not None:
            self.on_lost()

    async def close(self) -> None:
        self.on_lost = None
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
