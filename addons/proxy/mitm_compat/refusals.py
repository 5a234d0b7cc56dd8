"""mitmproxy's own refusals (the requests it answers before any hook sees them) as Portcullis's
answers and decisions: the page builders swapped, the server-side HTTP/1 and HTTP/2 connection
layers tracked so that a builder knows which client it answers, and one report per refusal."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, http
from mitmproxy.proxy.layers.http._events import ResponseProtocolError

log = logging.getLogger("addons.proxy.mitm_compat")


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


def set_reporter(reporter: Reporter) -> None:
    global _reporter
    _reporter = reporter


def install(
    http1_page: ErrorBuilder, body: ErrorBuilder, h2_headers: Callable[[int], list[tuple[bytes, bytes]]]
) -> None:
    """Swap mitmproxy's error pages for ours; track the steps that build them (once: see __init__)."""
    from mitmproxy import version
    from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2

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
    # HTTP/1 builds its pages only in read_headers (an unparsable head, and the bounded reader's
    # 414/431: it is wrapped first, so it runs inside this tracking) and when sending a protocol
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


def http1_bytes(response: http.Response) -> bytes:
    """A whole HTTP/1 response as bytes, as mitmproxy writes it (`mitmproxy.net` is not its API)."""
    from mitmproxy.net.http import http1

    out: bytes = http1.assemble_response(response)  # type: ignore[no-untyped-call]
    return out
