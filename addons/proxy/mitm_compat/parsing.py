"""Reading requests: mitmproxy's HTTP/1 reader bounded and hardened, a denial answered before the body,
and the request target's raw bytes."""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable, Generator
from typing import Any

from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events

from addons.pipeline.requestform import HEAD_TIMEOUT_S, MAX_REQUEST_LINE, head_too_large


def raw_target(request: http.Request) -> tuple[bytes, bytes, bytes]:
    """(method, target path, authority) as the bytes mitmproxy read, before any text decoding."""
    return request.data.method, request.data.path, request.data.authority


_head_timeout = [HEAD_TIMEOUT_S]  # seconds a request head may take to arrive (set_head_timeout)
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

    @functools.wraps(valid_host)  # inspect.getsource still shows the original (mitm_compat/test_parsing.py)
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
    refused (414/431) as soon as its buffered part breaks a size limit, and 408 when it is still
    incomplete more than `_head_timeout` seconds after its first byte (slow-loris: a byte now and
    then keeps mitmproxy's idle timeout from ever firing)."""

    @functools.wraps(original)
    def read_headers(self: Any, event: events.Event) -> Generator[Any, Any, Any]:
        if not isinstance(event, events.DataReceived):
            return (yield from original(self, event))
        now = time.monotonic()
        started = getattr(self, "portcullis_head_t", None)
        if started is None:
            self.portcullis_head_t = started = now
        while True:
            refuse = head_too_large(bytes(self.buf)) if len(self.buf) > MAX_REQUEST_LINE else None
            if refuse is None and now - started > _head_timeout[0]:
                refuse = 408, f"the request head took longer than {_head_timeout[0]:g} s to arrive"
            if refuse is not None:
                from mitmproxy.proxy.layers.http import _http1

                yield commands.SendData(self.conn, _http1.make_error_response(*refuse))  # reported
                # Half-close and drop what still comes: a client still sending its head then reads
                # the answer (closing with unread bytes would reset the connection under it).
                yield commands.CloseTcpConnection(self.conn, half_close=True)
                self.state = types.MethodType(_drain, self)
                return None
            before = len(self.buf)
            yield from original(self, event)
            if self.state != self.read_headers:
                self.portcullis_head_t = None  # a whole head: the next one starts its own clock
                return None
            if not self.buf or len(self.buf) == before:
                return None
            event = events.DataReceived(self.conn, b"")  # an empty line was skipped: read what follows

    return read_headers


def set_head_timeout(seconds: float) -> None:
    """How long an HTTP/1 request head may take from its first byte to its end (network.header_timeout)."""
    _head_timeout[0] = seconds


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


def install() -> None:
    """Every change to how requests are read (once: see __init__). The bounded reader is installed
    before refusals.install tracks read_headers, so its 414/431 pages are attributed and reported."""
    from mitmproxy.proxy.layers.http import _http1

    harden_request_parsing()
    _http1.Http1Server.read_headers = _bounded_read_headers(_http1.Http1Server.read_headers)  # type: ignore[method-assign]
    _answer_before_the_body()
