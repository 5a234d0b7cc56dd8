"""Hand-built TLS ClientHellos for attack tests: any server_name list, odd record versions, a hello
split over several records. Independent of the proxy's own reader (addons/pipeline/clienthello.py)."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from tests.harness import tls_client_hello

SNI, ALPN, SUPPORTED_VERSIONS, ECH = 0x0000, 0x0010, 0x002B, 0xFE0D


def ext(etype: int, body: bytes) -> bytes:
    return struct.pack("!HH", etype, len(body)) + body


def server_name_ext(names: Sequence[bytes | tuple[int, bytes]]) -> bytes:
    """A server_name extension listing `names` (bytes = host_name entries; (type, bytes) for others)."""
    entries = b""
    for n in names:
        name_type, value = n if isinstance(n, tuple) else (0, n)
        entries += struct.pack("!BH", name_type, len(value)) + value
    return ext(SNI, struct.pack("!H", len(entries)) + entries)


def alpn_ext(protos: Sequence[bytes]) -> bytes:
    body = b"".join(bytes([len(p)]) + p for p in protos)
    return ext(ALPN, struct.pack("!H", len(body)) + body)


def hello_body(extensions: Sequence[bytes] | None) -> bytes:
    """A TLS 1.2/1.3-style ClientHello body (without the 4-byte handshake header)."""
    body = b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
    body += struct.pack("!H", 4) + b"\x13\x01\xc0\x2f" + b"\x01\x00"
    if extensions is not None:
        exts = b"".join(extensions) + ext(SUPPORTED_VERSIONS, b"\x04\x03\x04\x03\x03")
        body += struct.pack("!H", len(exts)) + exts
    return body


def handshake(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, version: int = 0x0301, sizes: Sequence[int] = ()) -> bytes:
    """`message` framed as handshake records of `version`: one record per size in `sizes`, then the rest."""
    parts = []
    pos = 0
    for size in sizes:
        parts.append(message[pos : pos + size])
        pos += size
    parts.append(message[pos:])
    return b"".join(struct.pack("!BHH", 22, version, len(p)) + p for p in parts if p)


def client_hello(
    names: Sequence[bytes | tuple[int, bytes]] | None = None,
    *,
    extra: Sequence[bytes] = (),
    version: int = 0x0301,
    sizes: Sequence[int] = (),
    raw_sni_ext: bytes | None = None,
) -> bytes:
    """A ClientHello naming `names` (None: no server_name extension) in records of `version`."""
    exts: list[bytes] = []
    if raw_sni_ext is not None:
        exts.append(raw_sni_ext)
    elif names is not None:
        exts.append(server_name_ext(names))
    exts.extend(extra)
    return records(handshake(hello_body(exts)), version, sizes)


def reframe(hello_record: bytes, version: int = 0x0301, sizes: Sequence[int] = ()) -> bytes:
    """A real ClientHello record (e.g. from the ssl module) re-framed: other version, several records."""
    assert hello_record[0] == 22
    length = struct.unpack("!H", hello_record[3:5])[0]
    return records(hello_record[5 : 5 + length], version, sizes)


def real_hello(server_name: str | None) -> bytes:
    return tls_client_hello(server_name)


HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def server_hello(retry: bool) -> bytes:
    """A TLS 1.3 ServerHello record; `retry`: a HelloRetryRequest (asks for another key share)."""
    random = HRR_RANDOM if retry else os.urandom(32)
    exts = ext(SUPPORTED_VERSIONS, b"\x03\x04") + ext(
        0x0033, b"\x00\x17" if retry else b"\x00\x1d" + b"\x00" * 34
    )
    body = b"\x03\x03" + random + b"\x00" + b"\x13\x01" + b"\x00" + struct.pack("!H", len(exts)) + exts
    msg = b"\x02" + len(body).to_bytes(3, "big") + body
    return struct.pack("!BHH", 22, 0x0303, len(msg)) + msg


CCS = b"\x14\x03\x03\x00\x01\x01"
