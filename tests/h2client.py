"""A byte-level HTTP/2 client for attack tests: sends pseudo-headers exactly as given (no validation)."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class H2Reply:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: int | None = None  # RST_STREAM error code
    goaway: bool = False
    closed: bool = False


def h2_tls(sock: socket.socket, server_name: str, cafile: str | None = None) -> ssl.SSLSocket:
    """TLS with ALPN h2 over `sock` (verified against `cafile` when given)."""
    ctx = ssl.create_default_context(cafile=cafile)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(sock, server_hostname=server_name)
    assert tls.selected_alpn_protocol() == "h2", tls.selected_alpn_protocol()
    return tls


def h2_request(sock: ssl.SSLSocket, headers: list[tuple[str, str]], timeout: float = 5.0) -> H2Reply:
    """Send one request (headers only, end of stream) and read until its answer, a reset or GOAWAY."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    sock.sendall(conn.data_to_send())
    sock.settimeout(timeout)
    out = H2Reply()
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, TimeoutError):
            out.closed = True
            return out
        if not data:
            out.closed = True
            return out
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                out.headers = {str(k): str(v) for k, v in ev.headers}
                out.status = int(out.headers[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                out.body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                return out
            elif isinstance(ev, h2.events.StreamReset):
                out.reset = ev.error_code
                return out
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out.goaway = True
                return out
        if pending := conn.data_to_send():
            sock.sendall(pending)
