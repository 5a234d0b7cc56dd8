"""Every use of mitmproxy's private APIs, in this one module (tests/proxy/test_mitm_compat.py checks
each assumption against the installed mitmproxy and fails loudly when an upgrade changes one).

1. The error pages mitmproxy writes itself (unparsable requests, failed upstream connects) are
   swapped for Portcullis's JSON answers (no hook can replace those bytes).
2. Those refusals are decisions: the server-side HTTP/1 and HTTP/2 layers are wrapped so that the
   builders know which client they answer; one `bad_request` decision per refusal (GOAWAYs too).
3. Tunnel relays built from mitmproxy's TCP and TLS layers (byte counts, the handshake watch, a layer
   that closes both sides), and giving a pinned upstream its name back once connected.
4. The accept queue of mitmproxy's listening sockets.
5. The request target's raw bytes (`Request.data`).
6. Accepting on a listening socket inherited from the supervisor.
7. Reading requests: authority and host checks raise only ValueError (its 400), leading empty lines
   are skipped, an HTTP/1 head is bounded as it arrives (414/431), a denial is sent before the body.
8. For speed (in `mitm_speed.py`, checked by the same tests): mitmproxy's debug-mode type checks of
   every Request and Response dropped, and hook dispatch without walking every addon for every hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import types
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from mitmproxy import connection, http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http._events import ResponseProtocolError
from mitmproxy.proxy.layers.tcp import TCPLayer
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer

from addons.pipeline.requestform import MAX_REQUEST_LINE, head_too_large
from addons.proxy import mitm_speed

log = logging.getLogger(__name__)

SUPPORTED = ((12, 2), (12, 3))  # [from, to): the versions whose internals this module was checked against


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request mitmproxy refused by itself."""

    client: connection.Client
    status: int | None  # the status it answered with; None for an HTTP/2 connection error (GOAWAY)
    message: str
    request: http.Request | None  # what it had parsed of the request, if anything


Reporter = Callable[[Refusal], None]
ErrorBuilder = Callable[[int, str], bytes]

_reporter: Reporter | None = None
_running: list[Any] = []  # the client-side connection layers whose step is running (innermost last)
_reported: weakref.WeakSet[http.Request] = weakref.WeakSet()


def check_version() -> str | None:
    """None when the installed mitmproxy is one this module supports, else what to do."""
    from mitmproxy import version

    parts = tuple(int(p) for p in version.VERSION.split(".")[:2])
    if SUPPORTED[0] <= parts < SUPPORTED[1]:
        return None
    return (
        f"mitmproxy {version.VERSION} is not supported (Portcullis relies on internals checked for "
        f"{SUPPORTED[0][0]}.{SUPPORTED[0][1]}.x); install 'mitmproxy>=12.2,<12.3' (pip install -e .)"
    )


def already_refused(request: http.Request) -> bool:
    """True when mitmproxy answered this request with an error page of its own (already logged)."""
    return request in _reported


def _report(status: int | None, message: str) -> None:
    if _reporter is None or not _running:
        return
    conn_layer = _running[-1]
    request = getattr(conn_layer, "request", None)
    if isinstance(request, http.Request):
        if request in _reported:
            return
        _reported.add(request)
    try:
        _reporter(Refusal(conn_layer.context.client, status, message, request))
    except Exception:  # noqa: BLE001 - reporting must never break mitmproxy's own error handling
        log.exception("could not record a refusal")


def _tracked(step: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    """A layer's event handler that marks itself as running while each of its steps runs."""

    def handler(self: Any, event: Any) -> Generator[Any, Any, Any]:
        gen = step(self, event)
        sent: Any = None
        while True:
            _running.append(self)
            try:
                cmd = gen.send(sent)
            except StopIteration as stop:
                return stop.value
            finally:
                _running.pop()
            sent = yield cmd

    handler.__wrapped__ = step  # type: ignore[attr-defined]
    return handler


def install(
    http1_page: ErrorBuilder,
    body: ErrorBuilder,
    h2_headers: Callable[[int], list[tuple[bytes, bytes]]],
    reporter: Reporter,
) -> None:
    """Swap mitmproxy's error pages for ours and report every refusal (4xx page or GOAWAY) it makes.

    `http1_page(status, message)` is a whole HTTP/1 response; `body(status, message)` an HTTP/2 body;
    `h2_headers(status)` the headers for that body (besides `:status`).
    """
    global _reporter
    from mitmproxy import version
    from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2

    _reporter = reporter
    if getattr(_http1, "_portcullis_installed", False):
        return

    def http1_error(status_code: int, message: str = "") -> bytes:
        status = status_code
        if status < 500:
            _report(status, message)
        return http1_page(status, message)

    def h2_body(status_code: int, message: str) -> bytes:
        status = status_code
        if status < 500:
            _report(status, message)
        return body(status, message)

    _http1.make_error_response = http1_error
    _http2.format_error = h2_body  # type: ignore[attr-defined]
    # HTTP/1 builds its pages only in read_headers (an unparsable head) and when sending a protocol
    # error: only those steps are tracked (tracking every event costs every tunnel's relay).
    _http1.Http1Server.read_headers = _tracked(_http1.Http1Server.read_headers)  # type: ignore[method-assign]
    original_send = _http1.Http1Server.send
    tracked_send = _tracked(original_send)

    def http1_send(self: Any, event: Any) -> Generator[Any, Any, Any]:
        if isinstance(event, ResponseProtocolError):
            return tracked_send(self, event)
        return original_send(self, event)

    http1_send.__wrapped__ = original_send  # type: ignore[attr-defined]
    _http1.Http1Server.send = http1_send  # type: ignore[method-assign]
    _http2.Http2Server._handle_event = _tracked(_http2.Http2Server._handle_event)  # type: ignore[method-assign]
    mitm_speed.install()

    original_protocol_error = _http2.Http2Connection.protocol_error

    def protocol_error(self: Any, message: str, *args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        _running.append(self)
        try:
            _report(None, message)
        finally:
            _running.pop()
        return (yield from original_protocol_error(self, message, *args, **kwargs))

    _http2.Http2Server.protocol_error = protocol_error  # type: ignore[method-assign]

    # HTTP/2 error pages are sent with a fixed three-header list (status, server, content-type).
    page_headers = [(b"server", version.MITMPROXY.encode()), (b"content-type", b"text/html")]
    original_send_headers = _http_h2.BufferedH2Connection.send_headers

    def send_headers(self: Any, stream_id: int, headers: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(headers, list) and len(headers) == 3 and headers[1:] == page_headers:
            headers = [headers[0], *h2_headers(int(headers[0][1]))]
        return original_send_headers(self, stream_id, headers, *args, **kwargs)

    _http_h2.BufferedH2Connection.send_headers = send_headers  # type: ignore[method-assign]
    harden_request_parsing()
    _http1.Http1Server.read_headers = _bounded_read_headers(_http1.Http1Server.read_headers)  # type: ignore[method-assign]
    _answer_before_the_body()
    _http1._portcullis_installed = True  # type: ignore[attr-defined]


def set_open_server_address(server: connection.Server, address: tuple[str, int]) -> None:
    """Give a connected server back the address (name) it was asked for, after pinning dialled an IP.

    mitmproxy's connection reuse compares addresses, so without this every keep-alive request would
    open a new upstream connection (and the per-address connection limit then stalls the sixth).
    `Server.__setattr__` forbids changing `address` while the connection is open; this bypasses it.
    """
    object.__setattr__(server, "address", address)


# ---- 3. Tunnel relays: subclasses of mitmproxy's TCP and TLS layers, and a closing layer -------------


class Counts(Protocol):
    """What a relay updates: bytes per direction, and who to tell when it refuses the tunnel."""

    bytes_up: int
    bytes_down: int
    on_refused: Callable[[str], None] | None


class Watch(Protocol):
    """Judges the client's bytes of a passed-through TLS handshake (HandshakeWatch)."""

    done: bool

    def client(self, data: bytes) -> str | None: ...
    def server(self, data: bytes) -> None: ...


class CountingRelay(TCPLayer):
    """mitmproxy's raw TCP relay without a flow object (nothing stored), counting bytes per direction.

    For TLS, `watch` follows the cleartext handshake: a second ClientHello (after a HelloRetryRequest)
    must name the authority too, else the tunnel is closed before it is relayed.
    """

    def __init__(self, context: Context, tunnel: Counts, watch: Watch | None = None) -> None:
        super().__init__(context, ignore=True)
        self.tunnel = tunnel
        self.watch = watch
        self.closed = False

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.closed:
            return
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.tunnel.bytes_up += len(event.data)
                if self.watch is not None and (problem := self.watch.client(event.data)):
                    self.closed = True
                    if self.tunnel.on_refused is not None:
                        self.tunnel.on_refused(problem)
                    yield commands.CloseConnection(self.context.server)
                    yield commands.CloseConnection(self.context.client)
                    return
            else:
                self.tunnel.bytes_down += len(event.data)
                if self.watch is not None:
                    self.watch.server(event.data)
            if self.watch is not None and self.watch.done:
                self.watch = None
        yield from super().relay_messages(event)


class CountingServerTLSLayer(ServerTLSLayer):
    """The top of an inspected tunnel (as mitmproxy builds it), counting raw bytes per direction."""

    def __init__(self, context: Context, tunnel: Counts) -> None:
        super().__init__(context)
        self.tunnel = tunnel

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.tunnel.bytes_up += len(event.data)
            elif event.connection == self.context.server:
                self.tunnel.bytes_down += len(event.data)
        yield from super()._handle_event(event)


def counting_interception(context: Context, tunnel: Counts) -> layer.Layer:
    """What mitmproxy's NextLayer builds for TLS it intercepts (server TLS over client TLS), counting."""
    server_tls = CountingServerTLSLayer(context, tunnel)
    server_tls.child_layer = ClientTLSLayer(context)
    return server_tls


class CloseBoth(layer.Layer):
    """Closes the client (and the eagerly opened upstream) without relaying a single byte."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            if self.context.server.state is not ConnectionState.CLOSED:
                yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)


# ---- 4. The listening sockets' accept queue ---------------------------------------------------------


def raise_listen_backlog(proxyserver_addon: Any, backlog: int) -> int:
    """Re-listen mitmproxy's listening sockets with a larger accept queue (asyncio's default is 100;
    the kernel caps it at somaxconn). Returns how many sockets were raised."""
    raised = 0
    for instance in getattr(proxyserver_addon, "servers", ()):
        for server in getattr(instance, "_servers", ()):
            for tsock in getattr(server, "sockets", ()):
                with contextlib.suppress(OSError, ValueError):
                    dup = socket.socket(fileno=os.dup(tsock.fileno()))
                    try:
                        dup.listen(backlog)  # applies to the shared socket, not just this descriptor
                        raised += 1
                    finally:
                        dup.close()
    return raised


# ---- 5. The request target as received ---------------------------------------------------------------


def raw_target(request: http.Request) -> tuple[bytes, bytes, bytes]:
    """(method, target path, authority) as the bytes mitmproxy read, before any text decoding."""
    return request.data.method, request.data.path, request.data.authority


# ---- 6. Accepting on a listening socket inherited from the supervisor ---------------------------------


def listen_on(sock: socket.socket) -> None:
    """Make mitmproxy's regular-mode server accept on `sock` (bound and listening already, shared by
    every worker of `portcullis run --workers N`) instead of binding the listen address itself."""
    from mitmproxy.proxy import mode_servers

    sock.setblocking(False)

    async def listen(self: Any, host: str, port: int) -> list[Any]:
        return [await asyncio.start_server(self.handle_stream, sock=sock)]

    mode_servers.RegularInstance.listen = listen  # type: ignore[method-assign]


# ---- 7. Reading requests ---------------------------------------------------------------------------

DRAIN_LIMIT = 4 << 20  # after refusing an oversized head: bytes still read (and dropped) before closing


def harden_request_parsing() -> None:
    """Its request readers catch only ValueError, but its host check and authority parser decode
    punycode with CPython's codec, which raises OverflowError for some labels (the connection's layer
    died: no answer, no decision). Any other exception becomes "not a valid host" or ValueError."""
    from mitmproxy.net import check as net_check
    from mitmproxy.net.http import url
    from mitmproxy.utils.strutils import always_str

    if getattr(url, "_portcullis_hardened", False):
        return
    valid_host, parse = net_check.is_valid_host, url.parse_authority

    @functools.wraps(valid_host)  # inspect.getsource still shows the original (test_mitm_compat)
    def is_valid_host(host: Any) -> bool:
        try:
            return valid_host(host)
        except Exception:  # noqa: BLE001 - a label the codec cannot decode is not a valid host
            return False

    @functools.wraps(parse)
    def parse_authority(authority: Any, check: bool) -> tuple[str, int | None]:
        try:
            return parse(authority, check)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - becomes its 400 (reported as one bad_request)
            if check:
                raise ValueError(f"unreadable authority ({type(e).__name__})") from e
            return always_str(authority, "utf-8", "surrogateescape"), None

    net_check.is_valid_host = is_valid_host
    url.is_valid_host = is_valid_host  # type: ignore[attr-defined]  # url imported it by name
    url.parse_authority = parse_authority
    url._portcullis_hardened = True  # type: ignore[attr-defined]


def _bounded_read_headers(original: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Any]:
    """`Http1Server.read_headers` buffers a head without limit ("FIXME: protect against header size
    DoS") and stalls on a leading empty line (h11 eats it and returns no head, and nothing reads what
    is buffered behind it). Empty lines before the request line are skipped (RFC 9112 §2.2); a head is
    refused (414/431) as soon as its buffered part breaks a size limit."""

    @functools.wraps(original)
    def read_headers(self: Any, event: events.Event) -> Generator[Any, Any, Any]:
        if not isinstance(event, events.DataReceived):
            return (yield from original(self, event))
        while True:
            if len(self.buf) > MAX_REQUEST_LINE and (too_large := head_too_large(bytes(self.buf))):
                from mitmproxy.proxy.layers.http import _http1

                yield commands.SendData(self.conn, _http1.make_error_response(*too_large))  # reported
                # Half-close and drop what still comes: a client still sending its head then reads
                # the answer (closing with unread bytes would reset the connection under it).
                yield commands.CloseTcpConnection(self.conn, half_close=True)
                self.state = types.MethodType(_drain, self)
                return None
            before = len(self.buf)
            yield from original(self, event)
            if self.state != self.read_headers or not self.buf or len(self.buf) == before:
                return None
            event = events.DataReceived(self.conn, b"")  # an empty line was skipped: read what follows

    return read_headers


def _drain(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    if isinstance(event, events.DataReceived):
        dropped = len(self.buf)
        self.buf.maybe_extract_at_most(dropped)
        self.portcullis_drained = getattr(self, "portcullis_drained", 0) + dropped
        if self.portcullis_drained <= DRAIN_LIMIT:
            return
    if self.conn.state is not ConnectionState.CLOSED:
        yield commands.CloseConnection(self.conn)
    self.state = self.done


def answer_at_once(flow: http.HTTPFlow) -> None:
    """Send the response set in `requestheaders` (a denial) now, not after the request body.

    mitmproxy sends it once the whole body was read (after a `100 Continue` inviting it), and raises
    for a body over `stream_large_bodies` ("Can't set a response and enable streaming"): no answer.
    Marked streamed, the patched `start_request_stream` answers at once and the body is dropped."""
    flow.request.headers.pop("expect", None)
    flow.request.stream = True


def _answer_before_the_body() -> None:
    from mitmproxy.proxy.layers.http import HttpStream
    from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook

    original = HttpStream.start_request_stream

    @functools.wraps(original)
    def start_request_stream(self: Any) -> Generator[Any, Any, None]:
        if self.flow.response is None:
            return (yield from original(self))
        if not (self.flow.request.is_http2 or self.flow.request.is_http3):
            self.flow.response.headers["connection"] = "close"  # HTTP/1: closed after the body
        self.flow.response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return None
        # The rest of the request is dropped: by this stream while it lives (state_errored consumes
        # every event), then by the connection layer (it ignores data for a stream that ended).
        self.client_state = self.state_errored
        yield from self.send_response()
        yield from self.flow_done()
        return None

    HttpStream.start_request_stream = start_request_stream  # type: ignore[method-assign]
