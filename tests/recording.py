"""Recording upstreams and forged TLS ClientHellos for the adversarial suite (and anyone else).

- `RecordingServer`: loopback TCP servers (raw, HTTP/1 or TLS-terminating HTTP/1) that keep every
  byte of every connection, parse the SNI of every ClientHello they see with their own reader (not
  mitmproxy's), and, for HTTP, answer each request head they parse, recording the heads. They are
  the oracle "what arrived upstream", independent of the proxy's parsers.
- `client_hello(...)`: a real ClientHello (made by Python's ssl with no network) with its
  server_name extension, record-layer version and record/segment split rewritten at will.
- `server_names(data)`: every host name in every server_name extension of the first ClientHello in
  `data` (records reassembled), or None when `data` does not hold one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# ------------------------------------------------------------------------------------ ClientHello


def _real_hello(alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="placeholder.invalid")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


@dataclass
class HelloParts:
    legacy_version: bytes
    random: bytes
    session_id: bytes
    ciphers: bytes
    compression: bytes
    extensions: list[tuple[int, bytes]]


def split_hello(record: bytes) -> HelloParts:
    """The fields of a ClientHello handshake message carried in one TLS record."""
    body = record[5 + 4 :]
    i = 0
    version, i = body[i : i + 2], i + 2
    rnd, i = body[i : i + 32], i + 32
    n = body[i]
    sid, i = body[i + 1 : i + 1 + n], i + 1 + n
    n = struct.unpack(">H", body[i : i + 2])[0]
    ciphers, i = body[i + 2 : i + 2 + n], i + 2 + n
    n = body[i]
    comp, i = body[i + 1 : i + 1 + n], i + 1 + n
    n = struct.unpack(">H", body[i : i + 2])[0]
    ext_data, exts = body[i + 2 : i + 2 + n], []
    j = 0
    while j < len(ext_data):
        t, ln = struct.unpack(">HH", ext_data[j : j + 4])
        exts.append((t, ext_data[j + 4 : j + 4 + ln]))
        j += 4 + ln
    return HelloParts(version, rnd, sid, ciphers, comp, exts)


def sni_extension(names: Iterable[bytes | str], name_type: int = 0) -> bytes:
    """The body of a server_name extension listing `names` (all with `name_type`)."""
    entries = b""
    for n in names:
        raw = n.encode() if isinstance(n, str) else n
        entries += bytes([name_type]) + struct.pack(">H", len(raw)) + raw
    return struct.pack(">H", len(entries)) + entries


_TEMPLATES: dict[tuple[str, ...], HelloParts] = {}


def client_hello(
    sni: str | bytes | None | list[str | bytes] = "public.test",
    *,
    sni_body: bytes | None = None,
    duplicate_sni: str | bytes | None = None,
    record_version: int = 0x0301,
    record_sizes: list[int] | None = None,
    alpn: list[str] | None = None,
    padding: int = 0,
    handshake_type: int = 1,
    content_type: int = 22,
    after_block: list[tuple[int, bytes]] | None = None,
) -> bytes:
    """A ClientHello record (or several records, `record_sizes` giving the fragment sizes).

    `sni`: one name, a list of names (one extension listing them all), or None for no extension;
    `sni_body` replaces the extension body with raw bytes; `duplicate_sni` adds a second server_name
    extension; `padding` adds a padding extension of that many bytes (large hellos); `after_block`
    extensions follow the extensions block without being counted in its declared length.
    """
    key = tuple(alpn or ())
    if key not in _TEMPLATES:
        _TEMPLATES[key] = split_hello(_real_hello(alpn))
    p = _TEMPLATES[key]
    exts = [(t, d) for t, d in p.extensions if t not in (0, 21)]
    if sni_body is not None:
        exts.insert(0, (0, sni_body))
    elif sni is not None:
        names = sni if isinstance(sni, list) else [sni]
        exts.insert(0, (0, sni_extension(names)))
    if duplicate_sni is not None:
        exts.insert(1, (0, sni_extension([duplicate_sni])))
    if padding:
        exts.append((21, b"\x00" * padding))
    ext_bytes = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in exts)
    trailing = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in after_block or [])
    body = (
        p.legacy_version
        + p.random
        + bytes([len(p.session_id)])
        + p.session_id
        + struct.pack(">H", len(p.ciphers))
        + p.ciphers
        + bytes([len(p.compression)])
        + p.compression
        + struct.pack(">H", len(ext_bytes))
        + ext_bytes
        + trailing
    )
    hs = bytes([handshake_type]) + struct.pack(">I", len(body))[1:] + body
    sizes = list(record_sizes or [])
    frags, i = [], 0
    for s in sizes:
        frags.append(hs[i : i + s])
        i += s
    while i < len(hs):
        frags.append(hs[i : i + 16384])
        i += 16384
    return b"".join(
        bytes([content_type]) + struct.pack(">HH", record_version, len(f)) + f for f in frags if f
    )


def server_names(data: bytes) -> list[bytes] | None:
    """Every name in every server_name extension of the ClientHello at the start of `data`.

    Read like a server: any record-layer version, the handshake reassembled from as many records as
    it spans, extensions only inside their declared block. None when the bytes do not hold a whole
    ClientHello a server would accept (incomplete, another handshake type, a malformed block).
    """
    layout = hello_layout(data)
    return None if layout is None else layout[0]


def hello_layout(data: bytes) -> tuple[list[bytes], bool] | None:
    """(server names inside the declared extensions block, whether bytes follow that block)."""
    hs, i = b"", 0
    while i + 5 <= len(data) and data[i] == 22:
        ln = struct.unpack(">H", data[i + 3 : i + 5])[0]
        if ln > 16384 or i + 5 + ln > len(data):  # oversized: a server refuses; short: it waits
            return None
        hs += data[i + 5 : i + 5 + ln]
        i += 5 + ln
        if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
            break
    if len(hs) < 4 or hs[0] != 1 or len(hs) < 4 + int.from_bytes(hs[1:4], "big"):
        return None
    body = hs[4 : 4 + int.from_bytes(hs[1:4], "big")]
    try:
        j = 2 + 32
        j += 1 + body[j]
        j += 2 + struct.unpack(">H", body[j : j + 2])[0]
        j += 1 + body[j]
        if j == len(body):
            return [], False  # no extensions at all
        end = j + 2 + struct.unpack(">H", body[j : j + 2])[0]
        if end > len(body):
            return None
        j += 2
        names: list[bytes] = []
        while j < end:
            if j + 4 > end:
                return None
            t, ln = struct.unpack(">HH", body[j : j + 4])
            if j + 4 + ln > end:
                return None  # an extension overruns its block: a server's decode error
            ext = body[j + 4 : j + 4 + ln]
            j += 4 + ln
            if t != 0 or len(ext) < 2:
                continue
            k = 2
            while k + 3 <= len(ext):
                n = struct.unpack(">H", ext[k + 1 : k + 3])[0]
                names.append(ext[k + 3 : k + 3 + n])
                k += 3 + n
        return names, end < len(body)
    except (IndexError, struct.error):
        return None


# ------------------------------------------------------------------------------------ recorders


@dataclass
class Conn:
    """One connection a recording server accepted: every byte, and the HTTP heads it parsed."""

    data: bytearray = field(default_factory=bytearray)
    heads: list[dict[str, object]] = field(default_factory=list)
    closed: bool = False

    @property
    def sni(self) -> list[bytes] | None:
        return server_names(bytes(self.data))


def parse_head(raw: bytes) -> dict[str, object]:
    """A request head as a lenient server reads it: request line, and every header line kept."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ")
    headers = []
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        headers.append((k.strip().lower().decode("latin-1"), v.strip().decode("latin-1")))
    return {
        "line": lines[0].decode("latin-1"),
        "method": parts[0].decode("latin-1"),
        "target": parts[1].decode("latin-1") if len(parts) > 1 else "",
        "headers": headers,
    }


def _framing(head: dict[str, object]) -> tuple[str, int]:
    hdrs = head["headers"]
    assert isinstance(hdrs, list)
    te = [v for k, v in hdrs if k == "transfer-encoding"]
    cl = [v for k, v in hdrs if k == "content-length"]
    if te and "chunked" in te[-1].lower():
        return "chunked", 0
    if cl:
        try:
            return "length", int(cl[0])
        except ValueError:
            return "length", 0
    return "length", 0


def _chunked_end(data: bytes) -> int | None:
    """Where a chunked body (sizes read properly, trailers skipped) ends, or None if incomplete.
    A size line that is not hex ends the body where it stands (the server would fail there)."""
    i = 0
    while True:
        eol = data.find(b"\r\n", i)
        if eol < 0:
            return None
        size_text = data[i:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return eol + 2
        i = eol + 2
        if size == 0:
            while True:  # trailer fields, then the empty line
                eol = data.find(b"\r\n", i)
                if eol < 0:
                    return None
                if eol == i:
                    return eol + 2
                i = eol + 2
        if len(data) < i + size + 2:
            return None
        i += size + 2


class RecordingServer:
    """Loopback servers that record everything (run in a background thread).

    kind "raw": never answers; "http": answers every request head with 200 and a JSON body naming it;
    "tls": terminates TLS (cert public.test / *.public.test) and then behaves like "http" (the bytes
    recorded are the decrypted ones; `hellos` keeps the SNI the server saw on each handshake).
    `upgrade=True` answers requests carrying `Upgrade:` with 101 (then records raw bytes).
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="recorders", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._servers: list[asyncio.Server] = []
        self.conns: dict[int, list[Conn]] = {}
        self.hellos: dict[int, list[str | None]] = {}

    def start(
        self,
        kind: str,
        host: str = "127.0.0.2",
        port: int = 0,
        cert: tuple[Path, Path] | None = None,
        upgrade: bool = False,
    ) -> int:
        fut = asyncio.run_coroutine_threadsafe(self._start(kind, host, port, cert, upgrade), self._loop)
        return fut.result(10)

    async def _start(
        self, kind: str, host: str, port: int, cert: tuple[Path, Path] | None, upgrade: bool
    ) -> int:
        ctx = None
        box: dict[str, int] = {}
        if kind == "tls":
            assert cert is not None
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*cert)
            ctx.set_alpn_protocols(["http/1.1"])

            def sni_cb(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
                with self._lock:
                    self.hellos.setdefault(box["port"], []).append(name)

            ctx.sni_callback = sni_cb  # type: ignore[assignment]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            c = Conn()
            with self._lock:
                self.conns.setdefault(box["port"], []).append(c)
            buf = b""
            raw_mode = kind == "raw"
            try:
                while data := await reader.read(65536):
                    with self._lock:
                        c.data += data
                    if raw_mode:
                        continue
                    buf += data
                    buf, raw_mode = self._answer(buf, c, writer, upgrade)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError, OSError):
                pass
            finally:
                c.closed = True
                with contextlib.suppress(Exception):
                    writer.close()

        srv = await asyncio.start_server(handle, host, port, ssl=ctx)
        self._servers.append(srv)
        box["port"] = int(srv.sockets[0].getsockname()[1])
        self.conns.setdefault(box["port"], [])  # servers on several addresses may share a port number
        return box["port"]

    def _answer(
        self, buf: bytes, c: Conn, writer: asyncio.StreamWriter, upgrade: bool
    ) -> tuple[bytes, bool]:
        while b"\r\n\r\n" in buf:
            raw_head, rest = buf.split(b"\r\n\r\n", 1)
            head = parse_head(raw_head)
            mode, n = _framing(head)
            if mode == "chunked":
                end = _chunked_end(rest)
                if end is None:
                    return buf, False
                rest = rest[end:]
            else:
                if len(rest) < n:
                    return buf, False
                rest = rest[n:]
            with self._lock:
                c.heads.append(head)
            hdrs = dict(head["headers"])  # type: ignore[arg-type]
            if upgrade and "upgrade" in hdrs:
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: "
                    + hdrs["upgrade"].encode("latin-1")
                    + b"\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                )
                return b"", True
            body = json.dumps({"line": head["line"], "host": hdrs.get("host")}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            buf = rest
        return buf, False

    # -- what arrived
    def mark(self) -> dict[int, int]:
        """A position to compare against later (connections per port so far)."""
        with self._lock:
            return {p: len(cs) for p, cs in self.conns.items()}

    def since(self, mark: dict[int, int], port: int | None = None) -> list[Conn]:
        with self._lock:
            out = []
            for p, cs in self.conns.items():
                if port is None or p == port:
                    out.extend(cs[mark.get(p, 0) :])
            return out

    def bytes_since(self, mark: dict[int, int], port: int | None = None) -> bytes:
        with self._lock:
            return b"".join(bytes(c.data) for c in self.since_unlocked(mark, port))

    def since_unlocked(self, mark: dict[int, int], port: int | None) -> list[Conn]:
        out = []
        for p, cs in self.conns.items():
            if port is None or p == port:
                out.extend(cs[mark.get(p, 0) :])
        return out

    def stop(self) -> None:
        async def _stop() -> None:
            for s in self._servers:
                s.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(s.wait_closed(), 2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def free_port_pair(a: str, b: str) -> int:
    """A port that is free on both loopback addresses `a` and `b` (for 'same port, other address')."""
    for _ in range(50):
        with socket.socket() as s1:
            s1.bind((a, 0))
            port = int(s1.getsockname()[1])
            with socket.socket() as s2:
                try:
                    s2.bind((b, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both addresses")


# ------------------------------------------------------------------------------------ scripted DNS


class ScriptedDNS:
    """A UDP DNS server on a loopback address whose answers a test scripts per name and per query.

    `script[name](qtype, n)` returns the addresses for the n-th query (1-based, counted per name
    and type) or None for NXDOMAIN; names without a script are NXDOMAIN. `queries` records every
    (name, qtype) asked, so a test can prove a name was never resolved.
    """

    A, AAAA = 1, 28

    def __init__(self, script: dict[str, object]) -> None:
        self.script = script
        self.queries: list[tuple[str, int]] = []
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(50):
            addr = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"  # noqa: S311
            try:
                self.sock.bind((addr, 53))
                break
            except OSError:
                continue
        else:
            raise OSError("no free 127.53.x.y:53")
        self.address = addr
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-dns", daemon=True)
        self._thread.start()

    def count(self, name: str, qtype: int | None = None) -> int:
        with self._lock:
            return sum(1 for n, t in self.queries if n == name and (qtype is None or t == qtype))

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(Exception):
                self.sock.sendto(self._answer(data), peer)

    def _answer(self, q: bytes) -> bytes:
        qid, labels, i = q[:2], [], 12
        while q[i]:
            labels.append(q[i + 1 : i + 1 + q[i]].decode("ascii", "replace"))
            i += 1 + q[i]
        qtype = struct.unpack(">H", q[i + 1 : i + 3])[0]
        question = q[12 : i + 5]
        name = ".".join(labels).lower()
        with self._lock:
            self.queries.append((name, qtype))
            n = self._counts[(name, qtype)] = self._counts.get((name, qtype), 0) + 1
        fn = self.script.get(name)
        addrs = fn(qtype, n) if callable(fn) else None
        if addrs is None:
            return qid + b"\x81\x83" + struct.pack(">HHHH", 1, 0, 0, 0) + question  # NXDOMAIN
        family = socket.AF_INET if qtype == self.A else socket.AF_INET6
        answers = [a for a in addrs if (":" in a) == (family == socket.AF_INET6)]
        out = qid + b"\x81\x80" + struct.pack(">HHHH", 1, len(answers), 0, 0) + question
        for a in answers:
            rdata = socket.inet_pton(family, a)
            out += b"\xc0\x0c" + struct.pack(">HHIH", qtype, 1, 0, len(rdata)) + rdata
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
