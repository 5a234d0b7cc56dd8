"""Request bodies searched for credential needles (placeholders, secrets, their encoded forms), bounded.

A body whose length is declared and at most SCAN_LIMIT is read whole before anything is sent upstream
(`leaked_in`): a needle refuses the request cleanly. Any other body (chunked, HTTP/2 without a length,
or larger) streams through `StreamScan`: its first SCAN_LIMIT bytes are searched while they pass, with
the last `longest needle - 1` bytes held back, so not one byte of a needle is ever sent; a needle found
is overwritten with `*` (same length: the framing stays valid) and reported, and the proxy then refuses
the answer. Bytes past SCAN_LIMIT pass unsearched, as does a compressed body's content (it is searched
as sent). Pure: no mitmproxy.
"""

from __future__ import annotations

from collections.abc import Sequence

from addons.policy.credentials import Credential

SCAN_LIMIT = 1 << 20  # = the proxy's stream_large_bodies: a declared body up to this is held and read whole


def leaked_in(data: bytes, watch: Sequence[Credential], limit: int = SCAN_LIMIT) -> Credential | None:
    """The first credential whose needle is in the first `limit` bytes of a body."""
    head = data[:limit]
    return next((c for c in watch if c.carried_in_bytes(head)), None)


class StreamScan:
    """A mitmproxy `request.stream` callable: chunks in, the chunks to send out (a list, never an empty
    chunk, which HTTP/1 chunked framing would read as the end of the body)."""

    def __init__(self, watch: Sequence[Credential], limit: int = SCAN_LIMIT) -> None:
        self.watch = tuple(watch)
        self.limit = limit
        self.keep = max((c.longest_needle for c in self.watch), default=1) - 1
        self.hit: Credential | None = None
        self._held = b""
        self._sent = 0  # bytes passed on so far (searched ones included)

    def __call__(self, data: bytes) -> list[bytes]:
        final = data == b""
        if self._sent >= self.limit:  # past the bound: what is held and what comes passes unsearched
            out, self._held = self._held + data, b""
            return [out] if out else []
        pending = self._held + data
        self._held = b""
        if not final and len(pending) > self.keep:
            out, self._held = pending[: len(pending) - self.keep], pending[len(pending) - self.keep :]
        elif final:
            out = pending
        else:
            self._held = pending
            return []
        out = self._redact(out, self._held)
        self._sent += len(out)
        return [out] if out else []

    def _redact(self, out: bytes, held: bytes) -> bytes:
        """Overwrite every needle that starts in `out` (it may run on into the held-back tail)."""
        if not self.watch:
            return out
        window = bytearray(out + held)
        for c in self.watch:
            for start, end in c.spans_in(bytes(window)):
                if start >= len(out):
                    break  # starts in the tail: judged with the next chunk
                if self.hit is None:
                    self.hit = c
                window[start:end] = b"*" * (end - start)
        self._held = bytes(window[len(out) :])
        return bytes(window[: len(out)])
