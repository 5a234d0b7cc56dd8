"""A tunnel's first client bytes read the way a TLS server reads them, strictly (no mitmproxy).

A server takes any record whose content type is handshake (22) as the start of TLS, whatever the
record header's legacy version says (RFC 8446 §5.1: it "MUST be ignored"), reassembles a ClientHello
split over several records and TCP segments, and routes on the server_name extension. So this reader
does the same, and anything a server could read as a server name that is not exactly one clean host
name is reported as a problem, never folded into "no server name".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

HANDSHAKE = 22
CLIENT_HELLO = 1
# Record types a TLS server processes before (or instead of) a handshake record: an alert, a
# change_cipher_spec, application data or a heartbeat in front of a ClientHello is refused outright.
OTHER_TLS_RECORDS = frozenset({20, 21, 23, 24})
MAX_RECORD = 1 << 14  # RFC 8446 §5.1: a longer plaintext record is a fatal record_overflow
# Handshake message bytes we are willing to wait for. With non-empty records, this also bounds what is
# buffered before the ClientHello is complete (at most 6 bytes per message byte).
MAX_CLIENT_HELLO = 1 << 16

EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
# Extensions that hide the real server name from the proxy (ECH, RFC 9849; the draft ESNI).
EXT_HIDES_NAME = {0xFE0D: "encrypted_client_hello", 0xFFCE: "encrypted_server_name"}

_HOST_NAME = re.compile(rb"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")


class Kind(Enum):
    """What the first bytes of a tunnel are."""

    NEED_MORE = "need_more"  # could still become a ClientHello: wait for more bytes
    TLS = "tls"  # a complete, well-formed ClientHello
    NOT_TLS = "not_tls"  # no TLS server would read these bytes as TLS
    BAD = "bad"  # TLS-shaped, but not a ClientHello we can vouch for (refuse)


@dataclass(frozen=True, slots=True)
class FirstBytes:
    kind: Kind
    sni: str | None = None  # the one host_name, as sent (ASCII), when the extension is present
    alpn: tuple[bytes, ...] = ()
    problem: str | None = None  # why the bytes are BAD or NOT_TLS
    record_version: int | None = None


class _Malformed(Exception):
    pass


def read_first_bytes(data: bytes) -> FirstBytes:
    """Classify a tunnel's first client bytes and, for TLS, read the server name."""
    if not data:
        return FirstBytes(Kind.NEED_MORE)
    first = data[0]
    if first != HANDSHAKE:
        if first in OTHER_TLS_RECORDS:
            if len(data) < 2:
                return FirstBytes(Kind.NEED_MORE)
            if data[1] == 0x03:
                return FirstBytes(Kind.BAD, problem="a TLS record other than a handshake came first")
        return FirstBytes(Kind.NOT_TLS, problem="first bytes are not a TLS ClientHello")
    try:
        message, version = _handshake_message(data)
    except _Malformed as e:
        return FirstBytes(Kind.BAD, problem=f"malformed TLS ClientHello: {e}")
    if message is None:
        return FirstBytes(Kind.NEED_MORE, record_version=version)
    try:
        sni, alpn = _parse_client_hello(message)
    except _Malformed as e:
        return FirstBytes(Kind.BAD, problem=f"malformed TLS ClientHello: {e}", record_version=version)
    return FirstBytes(Kind.TLS, sni=sni, alpn=alpn, record_version=version)


def _handshake_message(data: bytes) -> tuple[bytes | None, int]:
    """The first handshake message, reassembled from consecutive handshake records (None: incomplete)."""
    msg = b""
    offset = 0
    version = 0
    need: int | None = None
    while len(data) >= offset + 5:
        ctype = data[offset]
        version = (data[offset + 1] << 8) | data[offset + 2]
        length = (data[offset + 3] << 8) | data[offset + 4]
        if ctype != HANDSHAKE:
            raise _Malformed(f"a record of type {ctype} inside the ClientHello")
        if length == 0:
            raise _Malformed("an empty handshake record")
        if length > MAX_RECORD:
            raise _Malformed(f"a {length}-byte record (the limit is {MAX_RECORD})")
        offset += 5
        if len(data) < offset + length:
            return None, version
        msg += data[offset : offset + length]
        offset += length
        if need is None and len(msg) >= 4:
            if msg[0] != CLIENT_HELLO:
                raise _Malformed(f"handshake message type {msg[0]} is not a ClientHello")
            need = 4 + int.from_bytes(msg[1:4], "big")
            if need > MAX_CLIENT_HELLO:
                raise _Malformed("the ClientHello is too large")
        if need is not None and len(msg) >= need:
            return msg[4:need], version
    return None, version


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, len_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(len_bytes), "big"))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _parse_client_hello(body: bytes) -> tuple[str | None, tuple[bytes, ...]]:
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    if len(r.vector(1)) > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites = r.vector(2)
    if not suites or len(suites) % 2:
        raise _Malformed("bad cipher suite list")
    if not r.vector(1):
        raise _Malformed("no compression methods")
    if r.left == 0:
        return None, ()  # no extensions at all (TLS 1.2 allows it): no server name
    exts = _Reader(r.vector(2))
    if r.left:
        raise _Malformed("bytes after the extensions")
    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[bytes, ...] = ()
    while exts.left:
        etype = exts.u16()
        ebody = exts.vector(2)
        if etype in seen:
            raise _Malformed(f"extension {etype} appears twice")
        seen.add(etype)
        if etype in EXT_HIDES_NAME:
            raise _Malformed(f"{EXT_HIDES_NAME[etype]} hides the real server name")
        if etype == EXT_SERVER_NAME:
            sni = _server_name(ebody)
        elif etype == EXT_ALPN:
            alpn = _alpn(ebody)
    return sni, alpn


def _server_name(body: bytes) -> str:
    r = _Reader(body)
    names = _Reader(r.vector(2))
    if r.left:
        raise _Malformed("bytes after the server name list")
    entries: list[tuple[int, bytes]] = []
    while names.left:
        entries.append((names.u8(), names.vector(2)))
    if len(entries) != 1:
        raise _Malformed(f"the server_name extension lists {len(entries)} names (exactly one is allowed)")
    name_type, name = entries[0]
    if name_type != 0:
        raise _Malformed(f"server name of type {name_type} (only host_name is allowed)")
    if len(name) > 254 or not _HOST_NAME.fullmatch(name):
        raise _Malformed("the server name is not a valid host name")
    return name.decode("ascii")


def _alpn(body: bytes) -> tuple[bytes, ...]:
    r = _Reader(body)
    protos = _Reader(r.vector(2))
    out: list[bytes] = []
    while protos.left:
        out.append(protos.vector(1))
    return tuple(out)


SERVER_HELLO = 2
# RFC 8446 §4.1.3: a ServerHello with this random is a HelloRetryRequest.
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


class HandshakeWatch:
    """Follows the cleartext start of a passed-through TLS handshake, after the first ClientHello.

    A server that answers with a HelloRetryRequest reads a second ClientHello, and may route on its
    server name; a client can even send it before the retry request arrives. So until the server's
    first handshake message shows that no retry comes (a plain ServerHello), and after a retry until
    the second ClientHello has been read, every ClientHello the client sends in handshake records is
    read like the first and judged by `judge` (a problem string refuses the tunnel).
    """

    def __init__(self, judge: Callable[[FirstBytes], str | None]) -> None:
        self.judge = judge
        self.done = False
        self._client = _RecordStream()
        self._server = _RecordStream()
        self._hellos = 0  # ClientHellos read so far
        self._retry = False

    def client(self, data: bytes) -> str | None:
        """Client bytes about to be relayed; a problem means: do not relay them, refuse the tunnel."""
        if self.done:
            return None
        try:
            for message in self._client.feed(data):
                if message[0] != CLIENT_HELLO:
                    continue
                self._hellos += 1
                if self._hellos > 2:
                    return "a third TLS ClientHello in one handshake"
                sni, alpn = _parse_client_hello(message[4:])
                if problem := self.judge(FirstBytes(Kind.TLS, sni=sni, alpn=alpn)):
                    return problem
                if self._retry and self._hellos == 2:
                    self.done = True  # the retried handshake goes on encrypted
                    return None
        except _Malformed as e:
            return f"malformed TLS ClientHello after a retry request: {e}"
        return None

    def server(self, data: bytes) -> None:
        """Server bytes: its first handshake message says whether a second ClientHello can follow."""
        if self.done:
            return
        try:
            for message in self._server.feed(data):
                if message[0] == SERVER_HELLO and message[6:38] == HRR_RANDOM and not self._retry:
                    self._retry = True  # a second ClientHello comes, in the clear
                    self.done = self._hellos >= 2  # ... unless it was sent (and judged) already
                else:
                    self.done = True  # no (further) retry: the rest of the handshake is encrypted
                return
        except _Malformed:
            self.done = True  # not a TLS server we can follow: the client's hellos were already judged


class _RecordStream:
    """Handshake messages from a byte stream of TLS records (non-handshake records are skipped)."""

    def __init__(self) -> None:
        self._buf = b""
        self._hs = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 5:
            ctype = self._buf[0]
            length = (self._buf[3] << 8) | self._buf[4]
            if length > MAX_RECORD + 256:  # ciphertext may exceed the plaintext limit a little
                raise _Malformed(f"a {length}-byte record")
            if len(self._buf) < 5 + length:
                break
            body, self._buf = self._buf[5 : 5 + length], self._buf[5 + length :]
            if ctype == HANDSHAKE:
                self._hs += body
            while len(self._hs) >= 4:
                need = 4 + int.from_bytes(self._hs[1:4], "big")
                if need > MAX_CLIENT_HELLO:
                    raise _Malformed("a handshake message is too large")
                if len(self._hs) < need:
                    break
                out.append(self._hs[:need])
                self._hs = self._hs[need:]
        return out
